"""Dtype names: how a torch dtype is written in files and messages, and read back from text.

A dtype is written as torch's name without the ``torch.`` prefix ('float32'). Text may also use
torch's own spelling ('torch.float16') or an alias (fp32, float, bf16, fp16, half).
"""

from __future__ import annotations

import torch

from sae.errors import UserError, did_you_mean

SUPPORTED = ("float32", "bfloat16", "float16")  # what models run in and activation caches store
ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(dtype: torch.dtype | str) -> str:
    """'float32' for torch.float32, 'torch.float32', 'float32' or an alias such as 'fp32'."""
    name = str(dtype).removeprefix("torch.")
    return ALIASES.get(name, name)


def find_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The torch dtype that `dtype` names (any of torch's, float64 included); None for None or a
    name torch does not know."""
    if dtype is None:
        return None
    found = getattr(torch, dtype_name(dtype), None)
    return found if isinstance(found, torch.dtype) else None


def parse_dtype(dtype: torch.dtype | str, what: str = "dtype",
                error: type[Exception] = UserError) -> torch.dtype:
    """float32, bfloat16 or float16 from a torch dtype, its name or an alias; anything else raises
    `error` naming it as `what`."""
    name = dtype_name(dtype)
    if name not in SUPPORTED:
        given = str(dtype).removeprefix("torch.")
        typo = "" if find_dtype(dtype) else did_you_mean(given, [*SUPPORTED, *ALIASES])
        raise error(f"{what} {given!r} is not supported{typo}; use float32, bfloat16 or float16")
    return getattr(torch, name)
