"""torch.distributed helpers for runs launched by torchrun (NCCL on GPUs, gloo on CPUs).

`init_from_env()` joins the process group torchrun describes in its environment and does nothing
in a plain single process, where every helper here is a no-op (rank 0 of 1). The two placements
of the training work (README, "Several GPUs") need: `RankShards` (data parallel: reductions over
the ranks' shards of each batch, handed to the losses by the trainer), `average_gradients`, and
`assign_dictionaries` (dictionary per rank); the third, feature_sharded, is `sae.sharding`.
"""

from __future__ import annotations

import datetime
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from sae.dictionaries.base import BatchShards
from sae.errors import ConfigError, UserError

Placement = Literal["data_parallel", "dictionary_per_rank", "feature_sharded"]
PLACEMENTS: tuple[str, ...] = ("data_parallel", "dictionary_per_rank", "feature_sharded")


# ---- the process group ---------------------------------------------------------------------------
def launched() -> bool:
    """True when a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when this process is one rank of an initialised group of more than one."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def free_port() -> int:
    """A free TCP port on this machine, for a one-machine torchrun rendezvous (tests, benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_batch_divisible(batch_size: int, what: str = "a batch", parts: int | None = None) -> None:
    """Data parallel: every rank (or data group: `parts`) trains on an equal contiguous slice of
    each global batch."""
    parts = world_size() if parts is None else parts
    if batch_size % parts:
        raise ConfigError(f"{what} ({batch_size} rows) must be divisible by the {parts} "
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
    if dist.is_initialized():
        return False
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for_rank(device: torch.device) -> torch.device:
    """A CUDA device without an index becomes this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and is_distributed():
        return torch.device("cuda", local_rank())
    return device


def barrier() -> None:
    if is_distributed():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


@contextmanager
def failing_together(what: str) -> Iterator[None]:
    """A block some ranks may fail in (rank 0 writing what the others then read, each rank writing
    its own file), ending in a collective: when any rank fails, every rank raises, instead of the
    others waiting at the next collective for the process group's timeout."""
    error: Exception | None = None
    try:
        yield
    except Exception as e:  # re-raised below, once the other ranks know
        error = e
    failed = int(all_reduce(torch.tensor([float(error is not None)])).item())
    if error is not None:
        raise error
    if failed:
        raise UserError(f"{what}: failed on {failed} other rank(s) (their error is above); nothing was lost "
                        f"that a rerun of the same command does not redo")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """rank `src`'s value of a small picklable object (our own data only) on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _comm_device(t: Tensor) -> Tensor:
    """NCCL needs CUDA tensors, gloo CPU ones."""
    want_cuda = dist.get_backend() == "nccl"
    if want_cuda and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    if not want_cuda and t.device.type != "cpu":
        return t.cpu()
    return t


def all_reduce(t: Tensor, op: str = "sum") -> Tensor:
    """A new tensor: t reduced over all ranks ('sum', 'max', 'min'); t itself on one process."""
    if not is_distributed():
        return t
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
    dist.all_gather(out, src)
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


# ---- the shards of a data-parallel batch ----------------------------------------------------------
class RankShards(BatchShards):
    """Data parallel: every rank holds one contiguous shard of each batch; the reductions run
    over all ranks (collectives: every rank must call them in the same order)."""

    def __init__(self) -> None:
        self.count = world_size()

    def sum(self, t: Tensor) -> Tensor:
        return all_reduce(t, "sum")

    def min(self, t: Tensor) -> Tensor:
        return all_reduce(t, "min")

    def max(self, t: Tensor) -> Tensor:
        return all_reduce(t, "max")

    def gather(self, t: Tensor) -> Tensor:
        return all_gather(t)

    def reduce_gradients(self, dictionary: torch.nn.Module) -> None:
        average_gradients(list(dictionary.parameters()))


# ---- dictionary placement -------------------------------------------------------------------------
def assign_dictionaries(configs: Sequence[Any], world: int,
                        d_in: int | Mapping[str, int] | None = None) -> list[int]:
    """Owner rank of each dictionary: largest first onto the least-loaded rank (cost d_sae · d_in).

    Deterministic, so every rank computes the same assignment from the same configs."""
    def cost(cfg: Any) -> float:
        width = d_in.get(cfg.reads_hook) if isinstance(d_in, Mapping) else d_in
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
