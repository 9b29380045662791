"""Several processes, one run: torch.distributed helpers (torchrun; NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node 2 train.py CONFIG.yaml

`init_from_env()` joins the process group torchrun describes in its environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and does nothing in a plain single process, so
every helper here is a no-op (rank 0 of 1) without a launcher.

Two placements of the work (`distributed.placement` in the run config):

* ``data_parallel``: every rank draws the same shuffled global batch (same reader, same seed), trains
  on its own contiguous slice of it, and the gradients of every dictionary are averaged over the
  ranks before the optimiser step, so every rank holds the same weights and the result equals one
  process training on the whole batch (to floating-point rounding). Statistics of the whole batch
  that a loss needs (TopK's variance, BatchTopK's selection threshold, feature firing counts) are
  reduced over the ranks by the helpers below, which act only inside `data_parallel_step()`.
* ``dictionary_per_rank``: each rank trains its own share of the dictionaries (`assign_dictionaries`)
  on the whole batch stream of just the hook points they need; nothing is communicated while
  training, so a sweep scales with the number of ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor

Placement = Literal["data_parallel", "dictionary_per_rank"]
PLACEMENTS: tuple[str, ...] = ("data_parallel", "dictionary_per_rank")


def _dist():
    import torch.distributed as dist

    return dist


# ---- the process group ---------------------------------------------------------------------------
def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when this process is one rank of an initialised group of more than one."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if is_distributed() else 0


def world_size() -> int:
    return _dist().get_world_size() if is_distributed() else 1


def free_port() -> int:
    """A free TCP port on this machine, for a one-machine torchrun rendezvous (tests, benchmarks)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_batch_divisible(batch_size: int, what: str = "a batch") -> None:
    """Data parallel: every rank trains on an equal contiguous slice of each global batch."""
    if batch_size % world_size():
        from sae.errors import ConfigError

        raise ConfigError(f"{what} ({batch_size} rows) must be divisible by the {world_size()} "
                          f"data-parallel ranks: each trains on an equal slice")


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str = "auto", timeout_minutes: float = 120.0) -> bool:
    """Join torchrun's process group (once). Returns True if this call initialised it.

    backend 'auto' is NCCL when CUDA is available, else gloo. On CUDA each process uses the GPU
    of its LOCAL_RANK. The timeout bounds how long a rank waits for the others at a barrier (a
    rank resuming a harvest may wait for the others to finish theirs).
    """
    if not launched():
        return False
    dist = _dist()
    if dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    if _dist().is_available() and _dist().is_initialized():
        _dist().destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        dist = _dist()
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank `src`'s value of a small picklable object (our own data only) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(t: Tensor) -> Tensor:
    """NCCL needs CUDA tensors, gloo CPU ones."""
    want_cuda = _dist().get_backend() == "nccl"
    if want_cuda and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    if not want_cuda and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """A new tensor: t reduced over all ranks ('sum', 'max', 'min'); t itself on one process."""
    if not is_distributed():
        return t
    dist = _dist()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    buf = _comm_device(t.detach().clone())
    dist.all_reduce(buf, op=ops[op])
    return buf.to(t.device)


def all_gather(t: Tensor) -> Tensor:
    """[world * n, ...]: every rank's t (same shape on every rank) concatenated in rank order."""
    if not is_distributed():
        return t
    src = _comm_device(t.detach().contiguous())
    out = [torch.empty_like(src) for _ in range(world_size())]
    _dist().all_gather(out, src)
    return torch.cat(out).to(t.device)


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its mean over the ranks (one all-reduce)."""
    if not is_distributed():
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = all_reduce(flat) / world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


# ---- data-parallel statistics of the whole batch ---------------------------------------------------
_DP_ACTIVE = False


@contextlib.contextmanager
def data_parallel_step() -> Iterator[None]:
    """Within this block the batch statistics below are reduced over every rank."""
    global _DP_ACTIVE
    previous, _DP_ACTIVE = _DP_ACTIVE, is_distributed()
    try:
        yield
    finally:
        _DP_ACTIVE = previous


def batch_shards() -> int:
    """How many ranks share the current batch (1 outside a data-parallel step).

    Gradients are averaged over the ranks, so a loss must be the whole batch's loss when averaged
    over them: per-row means need nothing; a ratio of batch sums (TopK's SSE / variance) is
    `batch_shards() * local_sum / whole_batch_denominator`."""
    return world_size() if _DP_ACTIVE else 1


def batch_sum(t: Tensor) -> Tensor:
    """t summed over the ranks sharing the batch (t itself outside a data-parallel step). No grad."""
    return all_reduce(t) if _DP_ACTIVE else t


def batch_min(t: Tensor) -> Tensor:
    return all_reduce(t, "min") if _DP_ACTIVE else t


def batch_variance(x: Tensor) -> Tensor:
    """Σ over the whole batch of ‖x - x̄‖² (x̄ the whole batch's mean), for x [rows, d]. No grad."""
    if not _DP_ACTIVE:
        return (x - x.mean(dim=0)).pow(2).sum()
    with torch.no_grad():
        n = batch_sum(torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device))
        mean = (batch_sum(x.double().sum(dim=0)) / n).to(x.dtype)
        return batch_sum((x - mean).pow(2).sum().double()).to(x.dtype)


def batch_topk_threshold(values: Tensor, n: int) -> Tensor:
    """The n-th largest of `values` (flat, this rank's part) over the whole batch's values."""
    flat = values.detach().flatten()
    local = flat.topk(min(n, flat.numel()), sorted=False).values
    if _DP_ACTIVE:
        # every rank sends the same number of candidates (pad with -inf)
        count = int(all_reduce(torch.tensor([local.numel()]), "max").item())
        if local.numel() < count:
            local = torch.cat([local, local.new_full((count - local.numel(),), -torch.inf)])
        local = all_gather(local)
    return local.topk(min(n, local.numel()), sorted=False).values.min()


# ---- dictionary placement -------------------------------------------------------------------------
def assign_dictionaries(configs: Sequence[Any], world: int,
                        d_in: int | Mapping[str, int] | None = None) -> list[int]:
    """Owner rank of each dictionary: largest first onto the least-loaded rank (cost d_sae · d_in).

    Deterministic, so every rank computes the same assignment from the same configs."""
    def cost(cfg: Any) -> float:
        width = d_in.get(cfg.hook_name) if isinstance(d_in, Mapping) else d_in
        if width is None:
            return float(cfg.d_sae if cfg.d_sae is not None else cfg.expansion_factor)
        return float(cfg.resolve_d_sae(width) * width)

    owners = [0] * len(configs)
    load = [0.0] * max(1, world)
    for i in sorted(range(len(configs)), key=lambda i: (-cost(configs[i]), i)):
        r = min(range(len(load)), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost(configs[i])
    return owners
