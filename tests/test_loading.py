"""sae.load: exact save -> load round trips for every architecture, the SAEBench-style interface,
run folders, dtype/device, and our format's versions."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

import sae
from loading_helpers import HOOK, VARIANTS, random_dictionary, random_inputs
from sae.dictionaries.cfg_view import DictionaryCfg
from sae.errors import UserError
from sae.loading import load_dictionary
from sae.trainer import train_dictionaries


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
    assert loaded.cfg.hyperparameters == d.cfg.hyperparameters  # every hyperparameter comes back
    assert (loaded.encode(x) != 0).any() and (loaded.encode(x) == 0).any()  # a real sparse code
    # and again through a second save of the loaded module
    loaded.save(tmp_path / "again")
    _assert_identical(d, sae.load(tmp_path / "again" / "cfg.json"), x)


def test_round_trip_of_a_trained_dictionary_with_input_scale(tmp_path):
    """A dictionary trained with activation normalisation (input_scale != 1, folded at save)."""
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


def test_cfg_is_the_same_view_however_the_dictionary_was_made(tmp_path):
    """Made in this process, trained, loaded by sae.load or by load_dictionary: `cfg` is the
    SAELens-style view over the pydantic Config, and gives the same answers."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 16, generator=g) for _ in range(4)]
    config = sae.dictionaries.get_architecture("topk").Config(architecture="topk", name="t", expansion_factor=3, k=4)
    trained = train_dictionaries(data, [config], total_tokens=4 * 64, out_dir=tmp_path, progress=False,
                                 metadata={"t": {"hook_name": HOOK, "model_name": "tiny"}})["t"]
    made = random_dictionary("topk", k=5)
    for d in (trained, made, sae.load(tmp_path / "t"), load_dictionary(tmp_path / "t")):
        assert isinstance(d.cfg, DictionaryCfg)
        assert isinstance(d.cfg.hyperparameters, sae.dictionaries.DictionaryConfig)
    assert trained.cfg.hyperparameters is config  # the trainer's own Config, not a copy
    assert (trained.cfg.d_sae, config.d_sae) == (48, None)  # the view's width is the module's
    assert (trained.cfg.hook_name, trained.cfg.hook_layer, config.hook_name) == (HOOK, 0, None)
    assert sae.load(tmp_path / "t").cfg.to_dict() == trained.cfg.to_dict()

    made.cfg.k = 7  # a hyperparameter: set on the Config, validated
    assert made.cfg.hyperparameters.k == 7 and made.encode_sparse(random_inputs(made))[0].shape[-1] == 7
    with pytest.raises(ValidationError):
        made.cfg.k = 0
    made.cfg = made.cfg.hyperparameters.model_copy(update={"name": "renamed"})  # a new Config: wrapped
    assert isinstance(made.cfg, DictionaryCfg) and made.cfg.name == "renamed" and made.cfg.k == 7
    with pytest.raises(TypeError, match="DictionaryConfig"):
        made.cfg = {"k": 3}
    pruned = made.pruned(torch.arange(10))
    assert isinstance(pruned.cfg, DictionaryCfg) and pruned.cfg.hyperparameters.d_sae == pruned.cfg.d_sae == 10


def test_load_dictionary_is_trainable_and_sae_load_is_frozen(tmp_path):
    random_dictionary("relu").save(tmp_path / "d")
    frozen, trainable = sae.load(tmp_path / "d"), load_dictionary(tmp_path / "d")
    assert not frozen.training and not trainable.training
    assert not any(p.requires_grad for p in frozen.parameters())
    x = random_inputs(trainable)
    (trainable(x) - x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (trainable.W_enc, trainable.W_dec))


def test_a_cfg_json_without_a_later_field_reads_back_as_trained(tmp_path):
    """A ReLU dictionary saved before b_enc had its own lr (no b_enc_lr_scale in cfg.json) was
    trained at 1, not at the √d_in the new default resolves to; one that says keeps its value."""
    random_dictionary("relu").save(tmp_path / "d")
    path = tmp_path / "d" / "cfg.json"
    cfg = json.loads(path.read_text())
    assert sae.load(tmp_path / "d").b_enc_lr_scale == pytest.approx(cfg["d_in"] ** 0.5)
    del cfg["hyperparameters"]["b_enc_lr_scale"]
    path.write_text(json.dumps(cfg))
    old = load_dictionary(tmp_path / "d")
    assert old.cfg.hyperparameters.b_enc_lr_scale == 1.0 and old.b_enc_lr_scale == 1.0


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


def test_format_version_newer_or_missing_is_refused(tmp_path):
    d = random_dictionary("relu")
    d.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["format_version"] == 1
    cfg["format_version"] = 99
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="newer version"):
        sae.load(tmp_path / "d")
    del cfg["format_version"]  # no file this library wrote lacks it
    (tmp_path / "d" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="no format_version"):
        sae.load(tmp_path / "d")


def test_clear_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        sae.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a dictionary folder"):
        sae.load(tmp_path / "empty")
    with pytest.raises(UserError, match="format"):
        sae.load(tmp_path / "empty", format="onnx")
