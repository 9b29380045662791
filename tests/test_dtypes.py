"""Dtype names and parsing (sae/dtypes.py): one spelling in files, aliases accepted, culprits named."""

from __future__ import annotations

import pytest
import torch

from sae.dtypes import dtype_name, find_dtype, parse_dtype
from sae.errors import CacheError, UserError


@pytest.mark.parametrize("given, name", [
    (torch.float32, "float32"), ("torch.bfloat16", "bfloat16"), ("fp32", "float32"), ("float", "float32"),
    ("bf16", "bfloat16"), ("fp16", "float16"), ("half", "float16"), (torch.float64, "float64"),
    (torch.bool, "bool"), ("int8", "int8"),
])
def test_dtype_name_is_torch_name_without_prefix_and_resolves_aliases(given, name):
    assert dtype_name(given) == name


def test_find_dtype_knows_every_torch_dtype_and_nothing_else():
    assert find_dtype("float64") is torch.float64 and find_dtype("double") is torch.float64
    assert find_dtype("half") is torch.float16 and find_dtype(torch.int32) is torch.int32
    assert find_dtype(None) is None and find_dtype("float7") is None and find_dtype("Tensor") is None


def test_parse_dtype_accepts_the_three_float_types_and_names_anything_else():
    assert [parse_dtype(v) for v in ("float32", "bf16", torch.float16, "torch.bfloat16")] == [
        torch.float32, torch.bfloat16, torch.float16, torch.bfloat16]
    with pytest.raises(UserError, match=r"^dtype 'flaot32' is not supported \(did you mean: float32"):
        parse_dtype("flaot32")
    with pytest.raises(CacheError, match=r"^cache dtype 'float64' is not supported; use float32, "
                                         r"bfloat16 or float16$"):
        parse_dtype(torch.float64, "cache dtype", CacheError)
