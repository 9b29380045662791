"""Matryoshka BatchTopK: its groups (sizes or fractions, bad ones refused), pruning that keeps
the groups consistent (also through `python -m eval prune` / `ablate-frequency`), its formats
(dictionary_learning both ways, checked against the real package when it is installed), and what
it is for: on hierarchical data its first group alone reconstructs better than the same features
of a plain BatchTopK trained alongside it. (The loss against a dense reference, save/load, folding,
SAELens export and data-parallel shards are in the every-architecture tests.)"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sae
from loading_helpers import HOOK, random_dictionary, random_inputs
from sae.convert import convert, main as convert_main
from sae.dictionaries import get_architecture, parse_dictionary_config
from sae.errors import ConfigError, UserError
from sae.formats import dictionary_learning
from sae.loading import detect_format
from test_config import BASE, write

ARCH = "matryoshka_batchtopk"
REPO = Path(__file__).resolve().parents[1]
TOL = dict(rtol=1e-5, atol=1e-5)


def make(group_sizes, d_sae: int | None = 48, d_in: int = 16, **extra):
    cfg = parse_dictionary_config({"architecture": ARCH, "d_sae": d_sae, "k": 4, "group_sizes": group_sizes,
                                   **extra})
    return get_architecture(ARCH)(cfg, d_in)


# ---- groups ---------------------------------------------------------------------------------

def test_group_sizes_are_sizes_or_fractions():
    d = make([8, 16, 24])
    assert (d.group_sizes, d.prefix_ends()) == ([8, 16, 24], [8, 24, 48])
    assert d.group_of(torch.tensor([0, 7, 8, 23, 24, 47])).tolist() == [0, 0, 1, 1, 2, 2]
    assert make([0.25, 0.25, 0.5], d_sae=96).group_sizes == [24, 24, 48]
    # fractions: boundaries at round(cumulative fraction · d_sae), so the sizes always sum to d_sae
    assert make([1 / 3, 1 / 3, 1 / 3], d_sae=100).group_sizes == [33, 34, 33]
    assert make([0.5, 0.5], d_sae=None, expansion_factor=3).group_sizes == [24, 24]  # d_sae = 3 · 16


@pytest.mark.parametrize("group_sizes, d_sae, expected", [
    ([8, 16], 48, "group_sizes [8, 16] sum to 24, not d_sae=48; make them sum to d_sae, or give fractions"),
    ([0.5, 0.25], 48, "group_sizes [0.5, 0.25] as fractions of d_sae must be positive and sum to 1"),
    ([0.5, 24], 48, "not a mix"),
    ([0, 48], 48, "every group needs at least 1 feature"),
    ([0.01, 0.99], 48, "leave a group empty at d_sae=48 ([0, 48])"),
])
def test_bad_group_sizes_are_refused_naming_them(group_sizes, d_sae, expected):
    with pytest.raises(ValueError, match=r"group_sizes") as err:
        make(group_sizes, d_sae)
    assert expected in str(err.value)


def test_group_sizes_that_do_not_fit_a_width_known_from_the_model_are_one_line():
    cfg = parse_dictionary_config({"architecture": ARCH, "name": "m", "expansion_factor": 2, "k": 4,
                                   "group_sizes": [16, 32]})
    cfg.require_width(24)  # d_sae = 48: fits
    with pytest.raises(ConfigError) as err:
        cfg.require_width(32)
    assert str(err.value) == ("dictionary 'm': group_sizes [16, 32] sum to 48, not d_sae=64; make them sum to "
                              "d_sae, or give fractions of it that sum to 1")


@pytest.mark.parametrize("entry, expected", [
    ("{architecture: matryoshka_batchtopk, k: 4, d_sae: 64, group_sizes: [16, 32]}",
     "dictionaries[0]: Value error, group_sizes [16, 32] sum to 48, not d_sae=64"),
    # d_sae = 2 · 32 (the tiny model's width) is only known once the model is loaded, before any harvest
    ("{architecture: matryoshka_batchtopk, k: 4, expansion_factor: 2, group_sizes: [16, 32]}",
     "dictionary 'matryoshka_batchtopk-blocks.0.hook_resid_post': group_sizes [16, 32] sum to 48, not d_sae=64"),
])
def test_train_py_exits_2_with_one_line_on_group_sizes(tmp_path, tiny_model_dir, tiny_text_file, entry, expected):
    path = write(tmp_path, BASE, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), f"dictionaries.0={entry}",
                           f"output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    # (the second case loads the model first: transformers may draw its loading bar before)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("Loading weights")]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and expected in lines[0], proc.stderr
    assert not (tmp_path / "runs" / "t" / "cache").exists()  # nothing harvested


# ---- pruning keeps the groups consistent ---------------------------------------------------------

def test_pruning_shrinks_each_group_by_its_killed_features(tmp_path):
    d = random_dictionary(ARCH, d_in=16, d_sae=48, k=4, group_sizes=[8, 16, 24])
    x = random_inputs(d, n=128)
    kill = torch.zeros(48, dtype=torch.bool)
    kill[[1, 5]] = True  # group 0 keeps 6
    kill[8:24] = True  # group 1 loses every feature: it disappears
    kill[[30, 47]] = True  # group 2 keeps 22
    keep = (~kill).nonzero().flatten()
    p = d.pruned(keep)
    assert (p.d_sae, p.group_sizes, p.prefix_ends()) == (28, [6, 22], [6, 28])
    # the pruned first group decodes what the original's first group decodes with those features killed
    d.set_killed(kill)
    f = d.encode(x)
    d.set_killed(None)
    first = f[:, :8] @ d.W_dec[:8] + d.b_dec
    torch.testing.assert_close(p.encode(x)[:, :6] @ p.W_dec[:6] + p.b_dec, first, **TOL)
    # it is saved with integer group sizes and loads back with them; fractions become sizes too
    p.save(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "cfg.json").read_text())["hyperparameters"]["group_sizes"] == [6, 22]
    assert sae.load(tmp_path / "p").group_sizes == [6, 22]
    fractions = random_dictionary(ARCH, d_in=16, d_sae=48, k=4, group_sizes=[0.25, 0.75])
    assert fractions.pruned(torch.arange(4, 40)).cfg.group_sizes == [8, 28]
    # a pruned dictionary prunes again; features may not go back to an earlier group
    assert p.pruned(torch.tensor([0, 1, 6, 7])).group_sizes == [2, 2]
    with pytest.raises(ValueError, match="group order"):
        d.pruned(torch.tensor([30, 2]))


def _save_for_the_tiny_model(path, model_dir, text_file):
    d = random_dictionary(ARCH, d_sae=96, k=8, group_sizes=[16, 32, 48], seed=3, metadata={
        "model_name": str(model_dir), "hook_name": HOOK, "context_size": 16,
        "dataset": {"source": str(text_file), "context_size": 16, "heldout_fraction": 0.3}})
    d.save(path)
    return d


def test_eval_prune_and_ablate_frequency_on_a_matryoshka(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    from eval.__main__ import main

    src = tmp_path / "m"
    _save_for_the_tiny_model(src, tiny_model_dir, tiny_text_file)
    common = ["--tokens", "256", "--batch-size", "6", "--device", "cpu", "--no-progress", "--mean-tokens", "256",
              "--frequency-tokens", "1024"]
    main(["prune", str(src), "--max-frequency", "0.3", "--out", str(tmp_path / "pruned"), *common])
    capsys.readouterr()
    cfg = json.loads((tmp_path / "pruned" / "cfg.json").read_text())
    killed = torch.zeros(96, dtype=torch.bool)
    killed[cfg["pruning"]["killed_feature_ids"]] = True
    survivors = [int((~killed[a:b]).sum()) for a, b in ((0, 16), (16, 48), (48, 96))]
    assert all(0 < n < size for n, size in zip(survivors, (16, 32, 48)))  # every group lost some
    assert cfg["hyperparameters"]["group_sizes"] == survivors and cfg["d_sae"] == sum(survivors)
    pruned = sae.load(tmp_path / "pruned")
    assert pruned.architecture == ARCH and pruned.group_sizes == survivors
    assert json.loads((tmp_path / "pruned" / "eval.json").read_text())["d_sae"] == sum(survivors)

    main(["ablate-frequency", str(src), "--thresholds", "0.3,0.05", *common])
    rows = {r["threshold"]: r for r in json.loads((src / "ablation.json").read_text())["thresholds"]}
    assert rows[0.3]["killed"] == int(killed.sum())  # the same features as the pruned dictionary's
    assert rows[0.05]["killed"] > rows[0.3]["killed"] and rows[0.05]["l0"] < rows[0.3]["l0"]


# ---- dictionary_learning's format -----------------------------------------------------------

def _dl_forward(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MatryoshkaBatchTopKSAE.encode(use_threshold=True) / decode, written from its source."""
    post = F.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
    f = post * (post > sd["threshold"])
    return f, f @ sd["W_dec"] + sd["b_dec"]


class _DLModuleShape(torch.nn.Module):
    """The parameters and buffers MatryoshkaBatchTopKSAE.__init__ registers (its from_pretrained
    is load_state_dict(torch.load(ae.pt)), strict)."""

    def __init__(self, d_in, d_sae, k, group_sizes):
        super().__init__()
        self.register_buffer("k", torch.tensor(k, dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0, dtype=torch.float32))
        self.register_buffer("group_sizes", torch.tensor(group_sizes))
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.W_dec = torch.nn.Parameter(torch.empty(d_sae, d_in))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in))


def _exportable(seed: int = 0):
    d = random_dictionary(ARCH, k=5, group_sizes=[0.25, 0.25, 0.5], seed=seed)
    with torch.no_grad():
        d.threshold.fill_(0.15)  # one threshold, as BatchTopK training leaves it
        d.input_scale.fill_(0.5)  # folded at export
    return d


def test_dictionary_learning_export_is_what_its_loader_reads(tmp_path):
    d = _exportable()
    x = random_inputs(d)
    dictionary_learning.export(d, tmp_path / "dl")
    assert detect_format(tmp_path / "dl") == "dictionary_learning"
    sd = torch.load(tmp_path / "dl" / "ae.pt", weights_only=True)
    like_theirs = _DLModuleShape(32, 96, 5, [24, 24, 48])
    like_theirs.load_state_dict(sd)  # strict: exactly their names, shapes
    assert sd["k"].dtype == torch.int32 and sd["k"].item() == 5 and sd["threshold"].shape == ()
    assert sd["group_sizes"].tolist() == [24, 24, 48] and sd["group_sizes"].dtype == torch.int64
    f, x_hat = _dl_forward(sd, x)
    assert (f != 0).any() and (f == 0).any()
    assert torch.allclose(f, d.encode(x), **TOL) and torch.allclose(x_hat, d(x), **TOL)
    trainer = json.loads((tmp_path / "dl" / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == "MatryoshkaBatchTopKSAE" and trainer["group_sizes"] == [24, 24, 48]
    assert (trainer["activation_dim"], trainer["dict_size"], trainer["k"]) == (32, 96, 5)
    assert (trainer["lm_name"], trainer["layer"], trainer["submodule_name"]) == ("tiny", 0, "resid_post_layer_0")

    back = sae.load(tmp_path / "dl")  # our own block restores what ae.pt cannot say
    assert back.architecture == ARCH and back.group_sizes == [24, 24, 48] and back.metadata["hook_name"] == HOOK
    assert back.cfg.hyperparameters.model_copy(update={"group_sizes": [0.25, 0.25, 0.5]}) == d.cfg.hyperparameters
    assert torch.allclose(back.encode(x), d.encode(x), **TOL) and torch.allclose(back(x), d(x), **TOL)


def test_a_dictionary_learning_matryoshka_folder_keeps_its_groups_and_goes_back_unchanged(tmp_path):
    """What their trainer writes (no block of ours): group sizes, k and the hook come from ae.pt
    and config.json; exporting the loaded dictionary writes the same tensors."""
    d = _exportable(seed=1)
    dictionary_learning.export(d, tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    del config["sae_dict"]
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(config))
    loaded = sae.load(tmp_path / "theirs")
    assert (loaded.architecture, loaded.cfg.k, loaded.group_sizes) == (ARCH, 5, [24, 24, 48])
    assert loaded.cfg.hook_name == HOOK and loaded.cfg.model_name == "tiny"
    dictionary_learning.export(loaded, tmp_path / "again")
    first, again = (torch.load(tmp_path / p / "ae.pt", weights_only=True) for p in ("theirs", "again"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_dictionary_learning_export_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(UserError, match="'batchtopk' has no dictionary_learning export"):
        dictionary_learning.export(random_dictionary("batchtopk", k=5), tmp_path / "a")
    d = _exportable()
    with torch.no_grad():
        d.threshold[3] = 0.4
    with pytest.raises(UserError, match="different thresholds"):
        dictionary_learning.export(d, tmp_path / "b")


def test_convert_to_dictionary_learning(tmp_path, capsys):
    run = tmp_path / "run"
    _exportable().save(run / "m")
    random_dictionary("topk", k=4).save(run / "t")
    written = convert(run, tmp_path / "dl", "dictionary_learning", warn=lambda line: None)
    assert [p.name for p in written] == ["m"]  # the TopK is skipped: no export of it here
    convert_main([str(tmp_path / "dl" / "m"), str(tmp_path / "ours"), "--to", "ours"])
    assert "wrote" in capsys.readouterr().out
    m, back = sae.load(run / "m"), sae.load(tmp_path / "ours")
    x = random_inputs(m)
    assert back.group_sizes == m.group_sizes and torch.allclose(back(x), m(x), **TOL)


def _real_matryoshka_class():
    """dictionary_learning's MatryoshkaBatchTopKSAE from the installed package (pip install
    dictionary-learning --no-deps will do), imported without running the package's __init__
    (which needs nnsight); None when it is not installed."""
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not spec.submodule_search_locations:
        return None
    if "dictionary_learning" not in sys.modules:
        package = types.ModuleType("dictionary_learning")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = package
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE

    return MatryoshkaBatchTopKSAE


def test_the_real_dictionary_learning_reads_our_export_and_we_read_its_files(tmp_path):
    cls = _real_matryoshka_class()
    if cls is None:
        pytest.skip("dictionary_learning is not installed")
    d = _exportable()
    x = random_inputs(d)
    dictionary_learning.export(d, tmp_path / "ours")
    theirs = cls.from_pretrained(str(tmp_path / "ours" / "ae.pt"))
    with torch.no_grad():
        assert theirs.group_indices[-1] == 96 and theirs.group_sizes.tolist() == [24, 24, 48]
        assert torch.allclose(theirs.encode(x), d.encode(x), **TOL) and torch.allclose(theirs(x), d(x), **TOL)
        # and the other way: a dictionary of theirs, saved as their trainer saves it
        other = cls(32, 80, k=6, group_sizes=[16, 64])
        other.b_enc.copy_(0.2 * torch.randn(80, generator=torch.Generator().manual_seed(0)))
        other.threshold.fill_(0.1)
    (tmp_path / "theirs").mkdir()
    torch.save(other.state_dict(), tmp_path / "theirs" / "ae.pt")
    loaded = sae.load(tmp_path / "theirs")
    assert (loaded.architecture, loaded.group_sizes) == (ARCH, [16, 64])
    with torch.no_grad():
        assert torch.allclose(loaded.encode(x), other.encode(x), **TOL) and torch.allclose(loaded(x), other(x), **TOL)
