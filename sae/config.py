"""The run config: one YAML file describes a whole experiment (harvest, train, evaluate, prune).

`load_run_config(path, overrides)` reads the YAML, applies `dotted.key=value` overrides,
validates everything (unknown keys, types, files) before any work starts, and expands the
dictionaries' sweeps into the flat list of dictionaries to train. Errors are one line
naming the key path, with a close-match suggestion for typos.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sae.dictionaries import ARCHITECTURES, DictionaryConfig, get_architecture, parse_dictionary_config
from sae.dictionaries.naming import check_unique, dictionary_name
from sae.errors import ConfigError, UserError, did_you_mean
from sae.text import DataConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HarvestConfig(_Strict):
    """How activations reach the trainer."""

    mode: Literal["disk", "stream"] = Field("disk", description="disk: cache shards; stream: straight from the model")
    cache_dir: str | None = Field(None, description="default: <output_dir>/<run_name>/cache")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    batch_contexts: int = Field(16, ge=1, description="contexts per model forward")
    contexts_per_shard: int = Field(512, ge=1)
    verify: Literal["quick", "full"] = Field(
        "quick", description="checking an existing cache: quick = sizes and headers; full = also the "
                             "sha256 of every shard (reads it all; finds flipped bytes), re-harvesting bad ones")


class TrainConfig(_Strict):
    batch_size: int = Field(4096, ge=1, description="tokens per optimiser step")
    epochs: float = Field(1.0, gt=0, description="passes over the train tokens")
    checkpoint_every_tokens: int | None = Field(None, description="None: a checkpoint every ~10% of training")
    autocast: Literal["auto", "bfloat16", "float16", "none"] = Field("auto", description="auto: bf16 on CUDA, none on CPU")
    log_every_steps: int = Field(50, ge=1, description="steps between progress-bar stats, wandb logs and NaN checks")
    stop_on_divergence: bool = Field(
        False, description="false: a dictionary whose loss becomes NaN/inf is saved with status: diverged and "
                           "the others train on; true: the whole run stops there (exit status 2)")


class EvalConfig(_Strict):
    enabled: bool = True
    batch_contexts: int = Field(8, ge=1, description="contexts per model forward during evaluation")


Frequency = Annotated[float, Field(ge=0, le=1)]  # a fraction of tokens


class AblationConfig(_Strict):
    dictionary: str = Field(description="name of the dictionary to ablate")
    thresholds: list[Frequency] = Field(min_length=1, description="kill features firing more often than each")
    compare: list[str] = Field(default_factory=list, description="dictionaries drawn as reference points")
    mode: Literal["after", "before"] = "after"


# Training tokens the kill decisions are measured on (prune.frequency_tokens, --frequency-tokens):
# 4x the default held-out window, so a frequency p is known to about ±sqrt(p / 65,536) (±2 % at the
# reference's threshold 0.038, ±12 % at 1e-3), at a small cost next to the evaluation: an encoder
# pass over cached tokens (0.17 TFLOP for 2,304 features on SmolLM2's 576 dims), or, without a
# cache, forwards up to the hook (about 2 TFLOP to block 3), where the default evaluation's four
# full forwards over 16,384 tokens take about 17.
DEFAULT_FREQUENCY_TOKENS = 65_536


class PruneConfig(_Strict):
    """Kill features by frequency after training; each (dictionary, threshold) is saved and evaluated.
    The frequencies that decide what is killed are measured on training tokens (never on the
    held-out tokens everything is scored on): the first `frequency_tokens` of the run's activation
    cache, or of its training split when it streamed."""

    dictionaries: list[str] = Field(description="names of the trained dictionaries to prune")
    max_frequency: list[Frequency] = Field(default_factory=list, description="kill features firing more often")
    min_frequency: Frequency | None = Field(None, description="also kill features firing at most this often (0: the dead)")
    mode: Literal["after", "before"] = Field("after", description="TopK only: kill after or before the top-k selection")
    frequency_tokens: int = Field(DEFAULT_FREQUENCY_TOKENS, ge=1, description="training tokens the kill decisions' "
                                  "frequencies are measured on (at most train_tokens)")
    ablation: AblationConfig | None = None

    @model_validator(mode="after")
    def _thresholds_make_sense(self) -> "PruneConfig":
        if self.dictionaries and not self.max_frequency and self.min_frequency is None:
            raise ValueError("give max_frequency (a list) and/or min_frequency: nothing would be killed")
        if self.min_frequency is not None and any(m <= self.min_frequency for m in self.max_frequency):
            raise ValueError(f"every max_frequency must exceed min_frequency={self.min_frequency:g}, "
                             f"or every feature is killed")
        return self


class WandbConfig(_Strict):
    mode: Literal["disabled", "offline", "online"] = "disabled"
    project: str = "sae"
    entity: str | None = None  # curves are logged every train.log_every_steps


class DistributedConfig(_Strict):
    """Read only under torchrun (several processes, see sae.distributed); one process ignores it."""

    placement: Literal["data_parallel", "dictionary_per_rank", "feature_sharded"] = Field(
        "data_parallel", description="data_parallel: every rank trains every dictionary on its slice of "
        "each batch; dictionary_per_rank: each rank trains its share of the dictionaries on whole batches; "
        "feature_sharded: each rank holds a shard of every dictionary's features (sae.sharding)")
    feature_shards: int | None = Field(None, ge=1, description="feature_sharded: ranks sharing each "
                                       "dictionary's features (a divisor of the ranks, the rest data-parallel "
                                       "groups); null: all of them")
    saved_as: Literal["one_file", "feature_shards"] = Field(
        "one_file", description="feature_sharded: how a finished dictionary is saved. one_file: gathered "
        "tensor by tensor into rank 0's host memory and saved as one sae.safetensors (evaluated, pruned "
        "and ablated by rank 0 like any other); feature_shards: each rank writes its own features "
        "(sae-<i>-of-<F>.safetensors + sae.safetensors.index.json, which sae.load reads), no process ever "
        "holds it whole, and every rank evaluates it together (no prune block)")
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto: nccl with CUDA, else gloo")
    timeout_minutes: float = Field(120.0, gt=0, description="how long a rank waits for the others")

    @model_validator(mode="after")
    def _shards_need_sharding(self) -> "DistributedConfig":
        if self.feature_shards is not None and self.placement != "feature_sharded":
            raise ValueError(f"feature_shards needs placement: feature_sharded (placement is {self.placement})")
        if self.saved_as != "one_file" and self.placement != "feature_sharded":
            raise ValueError(f"saved_as: {self.saved_as} needs placement: feature_sharded (placement is "
                             f"{self.placement}); the other placements hold every dictionary whole")
        return self


class RunConfig(_Strict):
    """Everything a run does; see configs/*.yaml for annotated examples."""

    run_name: str
    output_dir: str = "runs"
    seed: int = 0
    device: str = Field("auto", description="auto picks CUDA when present")
    model: str = Field(description="smollm2-135m (embedded), a local HF folder or a hub id")
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    hooks: list[str] = Field(min_length=1, description="hook points, e.g. blocks.3.hook_resid_post")
    data: DataConfig = Field(default_factory=DataConfig)
    train_tokens: int = Field(ge=1, description="tokens harvested for training")
    eval_tokens: int = Field(16_384, ge=1, description="held-out tokens for evaluation")
    harvest: HarvestConfig = Field(default_factory=HarvestConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dictionaries: list[dict[str, Any]] = Field(min_length=1)
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="grid applied to every dictionary")
    eval: EvalConfig = Field(default_factory=EvalConfig)
    prune: PruneConfig | None = None
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)

    @field_validator("model")
    @classmethod
    def _model_folder_exists(cls, name: str) -> str:
        # a hub id has no leading '.', '/' or '~'; anything that does is a folder and must exist now
        path = Path(name).expanduser()
        if name.startswith((".", "/", "~")) and not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise ValueError(f"model folder {name} {what}; give an HF model folder, a hub id or smollm2-135m")
        return name

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not name or "/" in name or name.startswith("."):
            raise ValueError("run_name must be a plain folder name (no '/', not starting with '.')")
        return name

    @model_validator(mode="after")
    def _unique_hooks(self) -> "RunConfig":
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError("hooks lists a hook point twice")
        return self

    @model_validator(mode="after")
    def _prune_needs_whole_dictionaries(self) -> "RunConfig":
        if self.prune is not None and self.distributed.saved_as == "feature_shards":
            raise ValueError("prune: kills features of whole dictionaries, and distributed.saved_as: feature_shards "
                             "never holds one in a process: drop the prune block (prune afterwards in one process "
                             "with python -m eval prune, which loads the shards whole) or save as one_file")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    @property
    def cache_dir(self) -> Path:
        return Path(self.harvest.cache_dir) if self.harvest.cache_dir else self.run_dir / "cache"


# ---- sweep expansion -----------------------------------------------------------------------

def _config_fields(architecture: Any) -> set[str] | None:
    """The keys an architecture's config takes (None: unknown architecture; parsing names it)."""
    cls = ARCHITECTURES.get(architecture) if isinstance(architecture, str) else None
    return set(cls.Config.model_fields) if cls is not None else None


def _entry_grid(run: RunConfig, index: int, entry: dict[str, Any]) -> dict[str, list[Any]]:
    """The grid one `dictionaries` entry is swept over: the run's `sweep:` keys its architecture
    has (a run may sweep l1_coefficient over its relu entries while a topk entry has none), its own
    `sweep:` (whatever the key), and the hook points when it names none."""
    fields = _config_fields(entry.get("architecture"))
    grid = {k: v for k, v in run.sweep.items() if fields is None or k in fields}
    grid.update(entry.get("sweep") or {})
    if "hook_name" not in entry and "hook_name" not in grid and len(run.hooks) > 1:
        grid["hook_name"] = list(run.hooks)
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"dictionaries[{index}].sweep.{key}: must be a non-empty list")
    return grid


def _expand_entry(run: RunConfig, index: int, entry: dict[str, Any],
                  grid: dict[str, list[Any]]) -> list[DictionaryConfig]:
    """One validated config per point of the entry's grid, named after the swept values."""
    entry = {k: v for k, v in entry.items() if k != "sweep"}
    keys = list(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        raw = {**entry, **dict(zip(keys, combo))}
        raw.setdefault("hook_name", run.hooks[0])
        for key in ("hook_name", "input_hook"):
            if raw.get(key) is not None and raw[key] not in run.hooks:
                # (a close name is suggested for hook_name; an input hook is usually another hook altogether)
                close = did_you_mean(str(raw[key]), run.hooks) if key == "hook_name" else ""
                raise ConfigError(f"dictionaries[{index}].{key}: {raw[key]!r} is not in hooks {run.hooks}{close}; "
                                  f"list it in hooks (the harvest captures every hook there in one pass)")
        # a hook point shows in the name as itself (no `hook_name=`), and only when there are several
        swept = [(None if k == "hook_name" else k, v) for k, v in zip(keys, combo)
                 if k != "hook_name" or len(run.hooks) > 1]
        raw["name"] = dictionary_name(raw.get("name") or raw.get("architecture", f"dict{index}"), swept)
        raw.setdefault("seed", run.seed)
        try:
            out.append(parse_dictionary_config(raw))
        except ValidationError as e:
            raise ConfigError(_format_validation_error(e, f"dictionaries[{index}]", raw)) from None
    return out


def expand_dictionaries(run: RunConfig) -> list[DictionaryConfig]:
    """Each `dictionaries` entry × its own `sweep:` grid × the run's `sweep:` grid × (hook points
    when the entry names none) -> validated configs with unique names."""
    expanded: list[DictionaryConfig] = []
    used: set[str] = set()  # run-level sweep keys some entry takes
    for index, entry in enumerate(run.dictionaries):
        grid = _entry_grid(run, index, entry)
        used.update(k for k in grid if k in run.sweep)
        expanded += _expand_entry(run, index, entry, grid)
    unused = [k for k in run.sweep if k not in used]
    if unused:
        raise ConfigError(f"sweep.{unused[0]}: no dictionary has this key "
                          f"(architectures: {sorted({str(e.get('architecture')) for e in run.dictionaries})})")
    check_unique([c.name for c in expanded])
    return expanded


# ---- loading -------------------------------------------------------------------------------

def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node: Any = tree
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[:i])} has no item {part}")
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        else:
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"override {dotted}: {'.'.join(parts[:i + 1])} is not a mapping")


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        _set_dotted(raw, key.strip(), yaml.safe_load(text))
    return raw


def _model_fields(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names valid at `loc` (for typo suggestions)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return [] if model is None else list(model.model_fields)
        annotation = model.model_fields[part].annotation
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
    return list(model.model_fields) if model is not None else []


def _format_validation_error(err: ValidationError, prefix: str, raw: Any, model: type[BaseModel] | None = None) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    path = ".".join([prefix, *(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)] if prefix else
                    [f"[{p}]" if isinstance(p, int) else str(p) for p in loc]).replace(".[", "[")
    if first["type"] == "extra_forbidden":
        if model is None and isinstance(raw, dict) and "architecture" in raw:
            model = get_architecture(raw["architecture"]).Config
        valid = _model_fields(model, loc[:-1])
        more = f"; more than one problem ({len(err.errors())})" if len(err.errors()) > 1 else ""
        return f"{path}: unknown key{did_you_mean(str(loc[-1]), valid)}{more}"
    if first["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {first['msg']} (got {first.get('input')!r})"


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> tuple[RunConfig, list[DictionaryConfig]]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where} ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    raw = apply_overrides(raw, overrides or [])
    try:
        run = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: " + _format_validation_error(e, "", raw, RunConfig)) from None
    dictionaries = expand_dictionaries(run)
    if run.prune is not None:
        names = [d.name for d in dictionaries]
        for name in run.prune.dictionaries + ([run.prune.ablation.dictionary, *run.prune.ablation.compare]
                                              if run.prune.ablation else []):
            if name not in names:
                raise ConfigError(f"{path}: prune: no dictionary named {name!r}{did_you_mean(name, names)}; "
                                  f"dictionaries are: {', '.join(names)}")
    return run, dictionaries


def dump_run_config(run: RunConfig) -> str:
    return yaml.safe_dump(run.model_dump(mode="json"), sort_keys=False)
