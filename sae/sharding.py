"""Feature-sharded training (placement `feature_sharded`): dictionaries wider than one device.

The ranks form a 2-D `DeviceMesh` of D data groups × F feature shards (`feature_shards: F`,
N = D·F ranks; D = 1 unless asked). Within a data group each rank holds d_sae / F consecutive
features of every dictionary (`W_enc[:, shard]`, `b_enc[shard]`, `W_dec[shard]`, thresholds and
the other per-feature tensors, their Adam state and their dead-feature counters), `b_dec` and the
input scale replicated; every rank of a data group sees that group's slice of each batch (D = 1:
the whole batch). The losses get a `MeshShards` (a `BatchShards`) and do what one process does:

* partial decodes (and penalties summed over features) are summed over the feature shards
  (`feature_sum`: one all-reduce forward, the gradient passed back unchanged: every shard computes
  the same loss from the sum);
* TopK and AuxK take each row's top k of the whole dictionary from every shard's own top k
  (`feature_gather`); BatchTopK's cut is chosen from every rank's candidates;
* the replicated parameters' gradients are summed over the feature shards (`once` counts the
  decoder's use of b_dec on one shard only), then every gradient is averaged over the data
  groups; gradient clipping uses the norm of the whole dictionary's gradient.

DeviceMesh gives the two process groups (what DTensor would use); the step itself uses plain
collectives on them, because what it needs (a sum whose backward is the identity, a gather of
top-k candidates, gradients of replicated parameters counted once) are not DTensor placements,
and one dictionary's step makes a handful of calls a DTensor would dispatch per operation.

Checkpoints: the first data group's ranks each write their shard into
`checkpoints/<name>/features-<f>-of-<F>/` (atomically; the previous one is removed only once every
shard has written the new one, so a kill leaves a step all shards hold); a relaunch resumes from
the latest step every shard holds, with the same layout only. At the end the shards are gathered
onto rank 0 one tensor at a time and saved as one sae.safetensors (rank 0's host memory holds the
whole dictionary once; its devices never do), or, with `saved_as: feature_shards`, each rank saves
its own features beside an index (sae.formats.feature_shards) and nothing is ever gathered.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.distributed as tdist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from sae import checkpoint as ckpt
from sae import distributed as dist
from sae import io
from sae.dictionaries.base import CFG_FILE, BatchShards, DictionaryConfig, SparseDictionary
from sae.dictionaries.registry import get_architecture
from sae.dictionaries.topk import top_per_row
from sae.errors import ConfigError
from sae.formats import feature_shards
from sae.loading import read_header

SHARD_DIR = re.compile(r"^features-(\d+)-of-(\d+)$")


class Layout(NamedTuple):
    """D data groups × F feature shards, and this rank's place in them."""
    data_groups: int
    feature_shards: int
    data_index: int
    feature_index: int

    def describe(self) -> str:
        return f"{self.feature_shards} feature shards × {self.data_groups} data groups"


def layout_for(world: int, rank: int, feature_shards: int | None) -> Layout:
    """The layout of `world` ranks with `feature_shards` per dictionary (None: all of them)."""
    F = world if feature_shards is None else int(feature_shards)
    if F < 1 or world % F:
        raise ConfigError(f"distributed.feature_shards {F} does not divide the {world} ranks: give a divisor "
                          f"of the number of processes (each data group holds every feature once)")
    return Layout(world // F, F, rank // F, rank % F)


def check_widths(configs: Sequence[DictionaryConfig], names: Sequence[str], d_in: Any, feature_shards: int) -> None:
    """ConfigError naming the first dictionary whose width the feature shards do not divide."""
    for cfg, name in zip(configs, names):
        width = d_in.get(cfg.hook_name) if isinstance(d_in, Mapping) else d_in
        if cfg.d_sae is None and width is None:
            continue  # expansion_factor: checked once the batches give d_in (`shard_width`)
        shard_width(cfg.resolve_d_sae(width), feature_shards, name)


def shard_width(d_sae: int, feature_shards: int, name: str) -> int:
    if d_sae % feature_shards:
        raise ConfigError(f"dictionary {name!r}: d_sae {d_sae} is not divisible by the {feature_shards} feature "
                          f"shards: choose a d_sae that is a multiple of distributed.feature_shards")
    return d_sae // feature_shards


# ---- collectives with the autograd the losses need ------------------------------------------------
class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        out = t.detach().clone()
        tdist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, None  # every shard computes the same loss from the sum: d(loss)/d(own part) = g


class _OnFirstShard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, first: bool) -> Tensor:
        ctx.first = first
        return t.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        return (g if ctx.first else torch.zeros_like(g)), None


class MeshShards(BatchShards):
    """This rank's part of the mesh: batch reductions over its data group's ranks (D shards of
    each batch), feature reductions over its feature group (F shards of each dictionary).
    `for_width(d_sae)` gives the same with `feature_lo` set for a dictionary of that width."""

    def __init__(self, mesh: DeviceMesh | None, layout: Layout, feature_lo: int = 0):
        self.mesh, self.layout = mesh, layout
        self.count, self.feature_count = layout.data_groups, layout.feature_shards
        self.feature_lo = feature_lo
        self._data = mesh.get_group("data") if mesh is not None and layout.data_groups > 1 else None
        self.feature_group = mesh.get_group("feature") if mesh is not None and layout.feature_shards > 1 else None

    def for_width(self, d_sae: int, name: str = "") -> "MeshShards":
        width = shard_width(d_sae, self.feature_count, name)
        return MeshShards(self.mesh, self.layout, self.layout.feature_index * width)

    # batch shards (the data groups)
    def sum(self, t: Tensor) -> Tensor:
        return _reduce(t, "sum", self._data)

    def min(self, t: Tensor) -> Tensor:
        return _reduce(t, "min", self._data)

    def max(self, t: Tensor) -> Tensor:
        return _reduce(t, "max", self._data)

    def gather(self, t: Tensor) -> Tensor:
        return _gather(t, self._data)

    # feature shards
    def feature_sum(self, t: Tensor) -> Tensor:
        if self.feature_group is None:
            return t
        return _SumOverShards.apply(t, self.feature_group)

    def once(self, t: Tensor) -> Tensor:
        if self.feature_group is None:
            return t
        return _OnFirstShard.apply(t, self.layout.feature_index == 0)

    def feature_gather(self, t: Tensor) -> Tensor:
        return _gather(t, self.feature_group)

    # gradients (the trainer calls these between backward and the optimiser step)
    def reduce_gradients(self, dictionary: SparseDictionary) -> None:
        """Replicated parameters: sum over the feature shards; then every gradient: mean over the
        data groups (one flat all-reduce each)."""
        shared, own = split_parameters(dictionary)
        for p in [*shared, *own]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.feature_group is not None and shared:
            _all_reduce_flat([p.grad for p in shared], self.feature_group)
        if self._data is not None:
            grads = [p.grad for p in [*shared, *own]]
            _all_reduce_flat(grads, self._data)
            for g in grads:
                g.div_(self.count)

    def clip_gradients(self, dictionary: SparseDictionary, max_norm: float) -> None:
        """torch's clip_grad_norm_ with the norm of the whole dictionary's gradient."""
        shared, own = split_parameters(dictionary)
        own_sq = sum((p.grad.double().pow(2).sum() for p in own), torch.zeros((), dtype=torch.float64))
        shared_sq = sum((p.grad.double().pow(2).sum() for p in shared), torch.zeros((), dtype=torch.float64))
        total = (self.feature_sum(own_sq.to(own[0].grad.device)) + shared_sq.to(own[0].grad.device)).sqrt()
        coef = (max_norm / (total.float() + 1e-6)).clamp(max=1.0)
        for p in [*shared, *own]:
            p.grad.mul_(coef.to(p.grad.dtype))


def split_parameters(dictionary: SparseDictionary) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(replicated parameters, this shard's per-feature parameters), in a fixed order."""
    shared, own = [], []
    for name, p in dictionary.named_parameters():
        (own if name in dictionary.feature_dims else shared).append(p)
    return shared, own


def _comm(t: Tensor) -> Tensor:
    return dist._comm_device(t.detach().contiguous().clone())


def _reduce(t: Tensor, op: str, group) -> Tensor:
    if group is None:
        return t
    ops = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
    buf = _comm(t)
    tdist.all_reduce(buf, op=ops[op], group=group)
    return buf.to(t.device)


def _gather(t: Tensor, group) -> Tensor:
    """[ranks · n, ...] every rank's t of the group, in group order (no gradients)."""
    if group is None:
        return t.detach()
    src = _comm(t)
    out = [torch.empty_like(src) for _ in range(tdist.get_world_size(group))]
    tdist.all_gather(out, src, group=group)
    return torch.cat(out).to(t.device)


def _all_reduce_flat(tensors: list[Tensor], group) -> None:
    """Sum each tensor over the group in place (one all-reduce of them all, flattened)."""
    flat = _comm(torch.cat([t.reshape(-1) for t in tensors]))
    tdist.all_reduce(flat, group=group)
    flat = flat.to(tensors[0].device)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def make_mesh(layout: Layout, device: torch.device) -> MeshShards:
    """The mesh of every rank (a collective: every rank calls it once)."""
    mesh = init_device_mesh(device.type, (layout.data_groups, layout.feature_shards),
                            mesh_dim_names=("data", "feature"))
    return MeshShards(mesh, layout)


# ---- a feature shard of a dictionary ----------------------------------------------------------------
def build_shard(cfg: DictionaryConfig, d_in: int, shards: MeshShards, name: str,
                d_out: int | None = None) -> SparseDictionary:
    """This rank's features of dictionary `cfg`, initialised as the whole dictionary's rows."""
    d_sae = cfg.resolve_d_sae(d_in)
    width = shard_width(d_sae, shards.feature_count, name)
    # the hyperparameters as given, at this shard's width (not validated again: k, group_sizes
    # and the default lr keep meaning the whole dictionary's, through d_sae_total)
    local = cfg.model_copy(update={"d_sae": width, "expansion_factor": None})
    d = get_architecture(cfg.architecture)(local, d_in, d_out=d_out)
    d.d_sae_total = d_sae
    d.reset_parameters(first_feature=shards.feature_lo)
    return d


@torch.no_grad()
def gather_whole(d: SparseDictionary, cfg: DictionaryConfig, shards: MeshShards) -> SparseDictionary | None:
    """On rank 0: the whole dictionary, its shards gathered one tensor at a time (onto the CPU);
    None on the other ranks (a collective over the feature group)."""
    tensors = {}
    for key, t in d.weights().items():
        dim = d.feature_dims.get(key)
        tensors[key] = t.detach().cpu() if dim is None else _gather_to_first(t.detach(), dim, shards)
    if shards.layout.feature_index != 0 or shards.layout.data_index != 0:
        return None
    whole = get_architecture(cfg.architecture)(cfg, d.d_in, metadata=dict(d.metadata), d_out=d.d_out)
    whole.prepare_for_weights(tensors)
    whole.load_weights(tensors)
    whole.input_scale.copy_(d.input_scale.cpu())
    return whole.to(d.W_enc.device)


@torch.no_grad()
def save_feature_shards(d: SparseDictionary, cfg: DictionaryConfig, shards: MeshShards, directory: Path,
                        writes: bool) -> None:
    """Save dictionary `cfg` as feature shards (sae.formats.feature_shards, a collective): each rank
    that `writes` (the first data group) saves its own features, feature shard 0 the shared tensors
    too; once all have, rank 0 writes the index and the whole dictionary's cfg.json. The earlier
    index goes first, so a save killed half-way leaves no index over old and new shards. A rank
    failing in any step makes every rank raise (`dist.failing_together`)."""
    layout = shards.layout
    folded = d.in_raw_units()
    with dist.failing_together(f"saving {directory.name}'s index"):
        if dist.is_main():
            feature_shards.unlink_index(directory)
    with dist.failing_together(f"saving {directory.name}'s feature shards"):
        if writes:
            tensors = {k: t.cpu() for k, t in folded.weights().items() if k in d.feature_dims or layout.feature_index == 0}
            feature_shards.write_shard(directory, layout.feature_index, layout.feature_shards, tensors)
    with dist.failing_together(f"saving {directory.name}'s index"):
        if dist.is_main():  # the index last: it marks the save finished (sae.formats.ours.detect)
            io.write_json(directory / CFG_FILE, {**folded.cfg_dict(), "d_sae": d.d_sae_total,
                                                 "hyperparameters": cfg.model_dump(mode="json")})
            feature_shards.write_index(directory, d.d_sae_total, d.feature_dims, layout.feature_shards)


def _gather_to_first(t: Tensor, dim: int, shards: MeshShards) -> Tensor | None:
    """t of every feature shard concatenated along dim on feature shard 0 (CPU), else None."""
    group = shards.feature_group
    if group is None:
        return t.cpu()
    src = _comm(t)
    first = tdist.get_global_rank(group, 0)
    parts = [torch.empty_like(src) for _ in range(shards.feature_count)] if tdist.get_rank() == first else None
    tdist.gather(src, parts, dst=first, group=group)
    return torch.cat([p.cpu() for p in parts], dim=dim) if parts is not None else None


# ---- checkpoints of the shards ------------------------------------------------------------------------
def shard_dir(member: Path, layout: Layout) -> Path:
    return member / f"features-{layout.feature_index:03d}-of-{layout.feature_shards:03d}"


def written_shards(member: Path) -> int | None:
    """The number of feature shards whose checkpoints `member` holds (None: none)."""
    for sub in sorted(member.iterdir()) if member.is_dir() else []:
        m = SHARD_DIR.match(sub.name)
        if m and ckpt.latest_path(sub) is not None:
            return int(m.group(2))
    return None


def refuse_other_layout(member: Path, layout: Layout | None, name: str) -> None:
    """ConfigError when dictionary `name`'s checkpoints were written by another layout (layout
    None: this run holds whole dictionaries: one process, data_parallel, dictionary_per_rank)."""
    found, written = None, written_shards(member)
    if layout is not None and ckpt.latest_path(member) is not None:
        found = "one process, data_parallel or dictionary_per_rank (the whole dictionary)"
    if written is not None and (layout is None or written != layout.feature_shards):
        found = f"{written} feature shards"
    if found is None:
        return
    this = layout.describe() if layout is not None else "whole dictionaries (not feature_sharded)"
    raise ConfigError(f"{member}: the checkpoint of {name} was written by {found}, this run has "
                      f"{this}: relaunch with the layout it was written with, or delete "
                      f"{member} to train {name} from the start")


def load_shard(member: Path, layout: Layout, name: str) -> tuple[Path, dict[str, Any]] | None:
    """This shard's checkpoint at the latest step every shard holds (a collective), or None."""
    refuse_other_layout(member, layout, name)
    directory = shard_dir(member, layout)
    steps = {int(p.name[len("checkpoint-"):-len(".pt")]): p for p in directory.glob("checkpoint-*.pt")}
    latest = torch.tensor([max(steps, default=-1)])
    common = int(dist.all_reduce(latest, "min"))
    if common < 0:
        return None
    if common not in steps:
        raise ConfigError(f"{directory} holds no checkpoint of step {common}, the latest every feature shard of "
                          f"{name} holds: delete {member} to train {name} from the start")
    path = steps[common]
    layout_saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved = layout_saved.get("layout")
    if saved is not None and list(saved) != [layout.data_groups, layout.feature_shards]:
        raise ConfigError(f"{path}: written by {saved[1]} feature shards × {saved[0]} data groups, this run has "
                          f"{layout.describe()}: relaunch with the layout it was written with, or delete {member}")
    return path, layout_saved


def save_shard(member: Path, layout: Layout, step: int, state: dict[str, Any], writes: bool) -> Path:
    """Write this shard's checkpoint (first data group only), then, once every rank has, remove
    the older ones."""
    directory = shard_dir(member, layout)
    state = {**state, "layout": [layout.data_groups, layout.feature_shards]}
    path = ckpt.save_checkpoint(directory, step, state, keep_older=True) if writes else \
        directory / f"checkpoint-{step:010d}.pt"
    dist.barrier()
    if writes:
        ckpt.remove_others(directory, step)
    return path


def remove_shards(member: Path, layout: Layout, writes: bool) -> None:
    """This shard's checkpoints go (the run's end); rank 0 removes the folder once all have."""
    if writes:
        ckpt.remove_checkpoints(shard_dir(member, layout))
    dist.barrier()
    if dist.is_main():
        ckpt.remove_if_empty(member)


# ---- a shard of a saved dictionary, for inference ---------------------------------------------------
@torch.no_grad()
def load_shard_of(directory: str | Path, shards: MeshShards, device: torch.device | str = "cpu") -> SparseDictionary:
    """This rank's features of the dictionary saved in `directory` (cfg.json + sae.safetensors, or
    its feature shards), read slice by slice (never the whole dictionary), in eval mode."""
    directory = Path(directory)
    header = read_header(directory)
    mine = shards.for_width(header.d_sae, directory.name)
    d = build_shard(header.hyperparameters, header.d_in, mine, directory.name, d_out=header.d_out)
    d.metadata.update(header.metadata)
    tensors = feature_shards.read_features(directory, d.feature_dims, mine.feature_lo, mine.feature_lo + d.d_sae)
    if "W_enc_shadow" in tensors:
        raise ConfigError(f"{directory}: a pruned TopK dictionary with a shadow encoder cannot be split into "
                          f"feature shards; evaluate it in one process")
    d.load_weights(tensors)
    return d.to(device).eval()


@torch.no_grad()
def encode_shard(d: SparseDictionary, x: Tensor, shards: MeshShards) -> Tensor:
    """f [n, this shard's d_sae]: the whole dictionary's encoding of x [n, d_in], this shard's
    columns (TopK: each row's top k of the whole dictionary; the others act feature by feature).
    `shards`: the mesh's (or this dictionary's: `for_width`)."""
    if d.max_active() is None or shards.feature_count == 1:
        return d.encode(x)
    pre = d.pre_acts(x).float()
    rows, cols, mine = top_per_row(pre, d.max_active(), shards.for_width(d.d_sae_total))
    f = torch.zeros_like(pre)
    f[rows[mine], cols[mine]] = torch.relu(pre[rows[mine], cols[mine]])
    return f.to(d.W_dec.dtype)


@torch.no_grad()
def decode_shard(d: SparseDictionary, f: Tensor, shards: MeshShards, x: Tensor | None = None) -> Tensor:
    """x̂ [n, d_out] in raw units: the sum of every shard's partial decode of its f, plus b_dec
    (and x @ W_skip for a dictionary with a skip connection, given its raw input x)."""
    partial = f.to(d.W_dec.dtype) @ d.W_dec
    offset = d.b_dec if x is None else d.decoder_offset(d.scale_input(x))
    return (shards.feature_sum(partial) + offset) / d.target_scale
