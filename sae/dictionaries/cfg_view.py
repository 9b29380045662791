"""`SparseDictionary.cfg`: the dictionary's hyperparameters seen through SAELens / SAEBench's names.

Code written for SAELens or SAEBench reads `sae.cfg.d_in`, `sae.cfg.hook_name`,
`sae.cfg.metadata.model_name`, ...; those names are derived live from the dictionary (its
weights and `metadata`). Any other name is the dictionary's hyperparameter of that name, read from
(and, when set, validated by) its pydantic Config, `cfg.hyperparameters`.
"""

from __future__ import annotations

from typing import Any

from sae.dtypes import dtype_name
from sae.models import hook_layer


class _Namespace(dict):
    """A dict whose keys read as attributes too; missing ones read as None (like SAELens's
    SAEMetadata)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.get(name)


class DictionaryCfg:
    """SAELens / SAEBench field names, live from `module`, over the pydantic `hyperparameters`.

    The derived names below are read-only (they follow the weights and the metadata); a name that
    is not one of them reads and sets `hyperparameters` (setting validates). `to_dict()` gives the
    SAELens-style fields.
    """

    __slots__ = ("_module", "hyperparameters")
    SAELENS_FIELDS = ("architecture", "d_in", "d_sae", "dtype", "device", "model_name", "hook_name", "hook_layer",
                      "hook_head_index", "context_size", "prepend_bos", "exclude_special_tokens",
                      "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                      "finetuning_scaling_factor", "activation_fn_str", "activation_fn_kwargs", "dataset_path",
                      "dataset_trust_remote_code", "seqpos_slice", "training_tokens", "model_from_pretrained_kwargs",
                      "sae_lens_training_version", "neuronpedia_id")
    METADATA_FIELDS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                       "exclude_special_tokens", "dataset_path", "neuronpedia_id", "seqpos_slice",
                       "model_from_pretrained_kwargs")

    def __init__(self, module, hyperparameters):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "hyperparameters", hyperparameters)

    # ---- derived from the dictionary --------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self._module.architecture

    @property
    def d_in(self) -> int:
        return self._module.d_in

    @property
    def d_out(self) -> int:
        return self._module.d_out

    @property
    def d_sae(self) -> int:
        return self._module.d_sae

    @property
    def dtype(self) -> str:
        return dtype_name(self._module.W_enc.dtype)

    @property
    def device(self) -> str:
        return str(self._module.W_enc.device)

    @property
    def model_name(self) -> str | None:
        return self._module.metadata.get("model_name")

    @property
    def hook_name(self) -> str | None:
        return self._module.metadata.get("hook_name") or self.hyperparameters.hook_name

    @property
    def hook_layer(self) -> int | None:
        return hook_layer(self.hook_name) if self.hook_name else None

    @property
    def context_size(self) -> int | None:
        return self._module.metadata.get("context_size") or self._dataset().get("context_size")

    @property
    def exclude_special_tokens(self) -> Any:
        metadata = self._module.metadata
        if "exclude_special_tokens" in metadata:
            return metadata["exclude_special_tokens"]
        return self._dataset().get("exclude_tokens")

    @property
    def dataset_path(self) -> str | None:
        dataset = self._module.metadata.get("dataset")
        return dataset.get("source") if isinstance(dataset, dict) else dataset

    @property
    def prepend_bos(self) -> bool:
        return bool(self._module.metadata.get("prepend_bos", True))

    @property
    def training_tokens(self) -> int | None:
        return self._module.metadata.get("tokens_trained")

    @property
    def neuronpedia_id(self) -> str | None:
        return self._module.metadata.get("neuronpedia_id")

    @property
    def activation_fn_str(self) -> str:
        return "topk" if self.architecture == "topk" else "relu"

    @property
    def activation_fn_kwargs(self) -> dict[str, Any]:
        k = getattr(self.hyperparameters, "k", None)
        return {"k": k} if self.architecture == "topk" and k is not None else {}

    def _dataset(self) -> dict[str, Any]:
        dataset = self._module.metadata.get("dataset")
        return dataset if isinstance(dataset, dict) else {}

    # ---- constant for these dictionaries ---------------------------------------------------
    @property
    def apply_b_dec_to_input(self) -> bool:
        return not self._module.is_transcoder  # imports fold other conventions into b_enc

    @property
    def normalize_activations(self) -> str:
        return "none"  # the input scale is folded into the weights at save time

    hook_head_index = property(lambda self: None)
    reshape_activations = property(lambda self: "none")
    finetuning_scaling_factor = property(lambda self: False)
    dataset_trust_remote_code = property(lambda self: False)
    seqpos_slice = property(lambda self: (None,))
    model_from_pretrained_kwargs = property(lambda self: {})
    sae_lens_training_version = property(lambda self: None)

    # ---- SAELens's containers ---------------------------------------------------------------
    @property
    def metadata(self) -> _Namespace:
        """SAELens 6's `cfg.metadata` block."""
        return _Namespace({k: getattr(self, k) for k in self.METADATA_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.SAELENS_FIELDS}
        out["metadata"] = dict(self.metadata)
        return out

    # ---- every other name: the hyperparameters ----------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in DictionaryCfg.__slots__:
            raise AttributeError(name)
        return getattr(self.hyperparameters, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in DictionaryCfg.__slots__:
            object.__setattr__(self, name, value)
        elif isinstance(getattr(type(self), name, None), property):
            raise AttributeError(f"cfg.{name} is derived from the dictionary and read-only")
        else:
            setattr(self.hyperparameters, name, value)

    def __repr__(self) -> str:
        return (f"DictionaryCfg(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"model_name={self.model_name!r}, hook_name={self.hook_name!r}, "
                f"hyperparameters={self.hyperparameters!r})")
