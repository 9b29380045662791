"""sae.load: exact save -> load round trips for every architecture, the SAEBench-style interface,
run folders, dtype/device, and our format's versions."""

from __future__ import annotations

import json

import pytest
import torch

import sae
from loading_helpers import HOOK, VARIANTS, random_dictionary, random_inputs
from sae.errors import UserError


def _assert_identical(a, b, x):
    assert type(a) is type(b)
    wa, wb = a.weights(), b.weights()
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert torch.equal(a.encode(x), b.encode(x))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name,arch,hyper", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_save_load_round_trip_is_exact(tmp_path, name, arch, hyper):
    d = random_dictionary(arch, **hyper)
    x = random_inputs(d)
    d.save(tmp_path / name)
    loaded = sae.load(tmp_path / name)
    _assert_identical(d, loaded, x)
    assert loaded.cfg.hyperparameters == d.cfg  # every hyperparameter comes back
    assert (loaded.encode(x) != 0).any() and (loaded.encode(x) == 0).any()  # a real sparse code
    # and again through a second save of the loaded module (its cfg view saves like a Config)
    loaded.save(tmp_path / "again")
    _assert_identical(d, sae.load(tmp_path / "again" / "cfg.json"), x)


def test_round_trip_of_a_trained_dictionary_with_input_scale(tmp_path):
    """A dictionary trained with activation normalisation (input_scale != 1, folded at save)."""
    from sae.trainer import train_dictionaries

    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 16, generator=g) * 7 + 3 for _ in range(20)]
    cfg = sae.dictionaries.get_architecture("topk").Config(architecture="topk", name="t", d_sae=48, k=4)
    trained = train_dictionaries(data, [cfg], total_tokens=20 * 64, out_dir=tmp_path, progress=False,
                                 metadata={"t": {"hook_name": HOOK}})["t"]
    loaded = sae.load(tmp_path / "t")
    x = data[0]
    assert torch.equal(loaded.encode(x), trained.encode(x))
    assert torch.allclose(loaded(x), trained(x), atol=1e-5)
    assert loaded.cfg.k == 4 and loaded.cfg.hook_name == HOOK


def test_pruned_topk_with_shadow_encoder_round_trips(tmp_path):
    d = random_dictionary("topk", k=5)
    pruned = d.pruned(torch.arange(0, 96, 2), mode="after")
    assert pruned.W_enc_shadow is not None
    pruned.save(tmp_path / "p")
    x = random_inputs(d)
    _assert_identical(pruned, sae.load(tmp_path / "p"), x)


def test_saebench_interface(tmp_path):
    d = random_dictionary("topk", k=5, metadata={"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny",
                                                 "context_size": 16, "dataset": {"source": "shakespeare"}})
    d.save(tmp_path / "d")
    loaded = sae.load(tmp_path / "d", device="cpu", dtype="float32")
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.W_enc.shape == (32, 96) and loaded.W_dec.shape == (96, 32)
    assert loaded.b_enc.shape == (96,) and loaded.b_dec.shape == (32,)
    assert loaded.dtype == torch.float32 and loaded.device == torch.device("cpu")
    cfg = loaded.cfg
    assert (cfg.d_in, cfg.d_sae, cfg.architecture) == (32, 96, "topk")
    assert (cfg.model_name, cfg.hook_name, cfg.hook_layer, cfg.context_size) == ("tiny", "blocks.1.hook_resid_post",
                                                                               1, 16)
    assert cfg.dtype == "float32" and cfg.k == 5 and cfg.dataset_path == "shakespeare"
    assert cfg.metadata.hook_name == "blocks.1.hook_resid_post" and cfg.metadata.missing_key is None
    assert cfg.to_dict()["d_sae"] == 96
    with pytest.raises(AttributeError, match="read-only"):
        cfg.d_sae = 3
    cfg.k = 7  # hyperparameters stay settable (validated)
    assert loaded.cfg.k == 7
    cfg.k = 5

    x = random_inputs(loaded, n=10)
    f = loaded.encode(x)
    values, indices = loaded.encode_sparse(x)
    assert values.shape == indices.shape == (10, 5)
    assert torch.equal(torch.zeros_like(f).scatter(-1, indices, values), f)
    assert torch.equal(loaded.decode(f), loaded(x))


def test_dtype_and_device_arguments(tmp_path):
    d = random_dictionary("jumprelu")
    d.save(tmp_path / "d")
    half = sae.load(tmp_path / "d", dtype="bfloat16")
    assert half.W_enc.dtype == torch.bfloat16 and half.threshold.dtype == torch.bfloat16
    assert half.cfg.dtype == "bfloat16"
    x = random_inputs(d)
    ref = d(x)
    assert ((half(x.bfloat16()).float() - ref).norm() / ref.norm()).item() < 0.05  # bf16 rounding only
    assert sae.load(tmp_path / "d", dtype=torch.float64).W_dec.dtype == torch.float64
    with pytest.raises(UserError, match="dtype"):
        sae.load(tmp_path / "d", dtype="float7")
    if torch.cuda.is_available():
        gpu = sae.load(tmp_path / "d", device="cuda")
        assert gpu.W_enc.is_cuda and torch.allclose(gpu(x.cuda()).cpu(), d(x), atol=1e-5)


def test_run_folder_gives_dictionaries_by_name(tmp_path):
    run = tmp_path / "run"
    made = {"topk": random_dictionary("topk", k=3), "relu": random_dictionary("relu", seed=1)}
    for name, d in made.items():
        d.save(run / name)
    random_dictionary("gated", seed=2).save(run / "sweep" / "gated")
    (run / "cache").mkdir()
    (run / "summary.json").write_text("{}")
    out = sae.load(run)
    assert sorted(out) == ["relu", "sweep/gated", "topk"]
    x = random_inputs(made["topk"])
    for name, d in made.items():
        assert torch.equal(out[name](x), d(x))
    assert sae.load_run(run / "topk").keys() == {"topk"}


def test_older_format_version_loads_and_newer_is_refused(tmp_path):
    d = random_dictionary("relu")
    d.save(tmp_path / "v1")
    cfg = json.loads((tmp_path / "v1" / "cfg.json").read_text())
    assert cfg["format_version"] == 1
    # version 0: no format_version, metadata in a nested block, no hyperparameters (defaults)
    v0 = {"architecture": "relu", "d_in": cfg["d_in"], "d_sae": cfg["d_sae"], "dtype": "float32",
          "metadata": {"hook_name": HOOK, "model_name": "tiny"}}
    (tmp_path / "v0").mkdir()
    (tmp_path / "v0" / "cfg.json").write_text(json.dumps(v0))
    (tmp_path / "v0" / "sae.safetensors").write_bytes((tmp_path / "v1" / "sae.safetensors").read_bytes())
    old = sae.load(tmp_path / "v0")
    x = random_inputs(d)
    assert torch.equal(old(x), d(x))
    assert old.metadata["hook_name"] == HOOK and old.cfg.model_name == "tiny"

    cfg["format_version"] = 99
    (tmp_path / "v1" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="newer version"):
        sae.load(tmp_path / "v1")


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sae.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a dictionary folder"):
        sae.load(tmp_path / "empty")
    with pytest.raises(UserError, match="format"):
        sae.load(tmp_path / "empty", format="onnx")
