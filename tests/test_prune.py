"""Pruning by frequency and the frequency ablation."""

from __future__ import annotations

import json

import pytest
import torch

from eval.ablate import AblationResult, parse_thresholds, plot_ablation, point_labels, run_ablation, write_ablation
from eval.evaluate import evaluate_dictionaries
from eval.kill_frequency import TrainingSplitPass
from eval.outputs import read_frequency
from eval.prune import kill_mask_from_frequency, original_ids, prune_dictionary, save_pruned
from eval_helpers import HOOK, RandomReLU, make_tokens
from sae.dictionaries.registry import ARCHITECTURES
from sae.errors import UserError
from sae.loading import load_dictionary
from sae.means import means_from_model
from test_evaluate import save_test_dictionary


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(str(tiny_model_dir), device="cpu").eval()


@pytest.fixture(scope="module")
def data(model):
    return make_tokens(model.tokenizer)


@pytest.fixture(scope="module")
def means(model):
    tokens, keep = make_tokens(model.tokenizer, n_ctx=9, seed=1)
    return means_from_model(model, [HOOK], tokens, keep)


@pytest.fixture(scope="module")
def measured(model, data, means):
    """A dictionary and its frequencies on the held-out tokens."""
    d = RandomReLU.make(d_sae=96, seed=2)
    tokens, keep = data
    r = evaluate_dictionaries(model, {"d": d}, tokens, keep, train_means=means, progress=False)["d"]
    return d, r


def test_kill_mask_rules():
    freq = torch.tensor([0.0, 0.001, 0.02, 0.038, 0.05, 0.5])
    assert kill_mask_from_frequency(freq, max_frequency=0.038).tolist() == [0, 0, 0, 0, 1, 1]
    assert kill_mask_from_frequency(freq, min_frequency=0).tolist() == [1, 0, 0, 0, 0, 0]  # 0 kills the dead
    assert kill_mask_from_frequency(freq, max_frequency=0.1, min_frequency=0.001, kill_ids="2").tolist() == \
        [1, 1, 1, 0, 0, 1]
    assert not kill_mask_from_frequency(freq).any()
    with pytest.raises(UserError, match="out of range"):
        kill_mask_from_frequency(freq, kill_ids=[6])
    with pytest.raises(UserError, match="integers"):
        kill_mask_from_frequency(freq, kill_ids="a,b")
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        kill_mask_from_frequency(freq, max_frequency=2)
    assert parse_thresholds("0.01,0.2,0.1,0.1") == [0.2, 0.1, 0.01]
    with pytest.raises(UserError):
        parse_thresholds("0.1,x")


def _dicts_to_check():
    out = [("test_relu", "after")]
    if "topk" in ARCHITECTURES:  # the real TopK, once it exists: both kill modes
        out += [("topk", "after"), ("topk", "before")]
    out += [("matryoshka_batchtopk", "after"), ("matryoshka_batchtopk", "before")]
    return out


@pytest.mark.parametrize("arch,mode", _dicts_to_check())
def test_pruned_equals_killed(arch, mode):
    """The pruned dictionary is exactly the original with those features' activations zeroed."""
    if arch == "test_relu":
        d = RandomReLU.make(d_sae=96, seed=2)
    else:
        cls = ARCHITECTURES[arch]
        groups = {"group_sizes": [16, 32, 48]} if arch == "matryoshka_batchtopk" else {}
        d = cls(cls.Config(architecture=arch, d_sae=96, k=8, **groups), 32, metadata={"hook_name": HOOK}).eval()
    x = torch.randn(200, 32, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        freq = (d.encode(x) != 0).float().mean(0)
    kill = kill_mask_from_frequency(freq, max_frequency=float(freq.median()))
    assert 0 < int(kill.sum()) < 96
    res = prune_dictionary(d, kill, mode, max_frequency=float(freq.median()))
    p = res.dictionary
    assert p.d_sae == 96 - int(kill.sum())
    with torch.no_grad():
        d.set_killed(kill, mode)
        f_killed, out_killed = d.encode(x), d(x)
        d.set_killed(None)
        f_pruned, out_pruned = p.encode(x), p(x)
    keep = (~kill).nonzero().flatten()
    assert (f_killed[:, kill] == 0).all()
    assert torch.equal(f_pruned, f_killed[:, keep])
    assert torch.allclose(out_pruned, out_killed, atol=1e-5)
    if arch == "matryoshka_batchtopk":  # each group shrinks by its killed features
        assert p.group_sizes == [16 - int(kill[:16].sum()), 32 - int(kill[16:48].sum()), 48 - int(kill[48:].sum())]


def test_pruned_reloads_with_id_maps(tmp_path, model, data, means, measured):
    d, r = measured
    kill = kill_mask_from_frequency(r.frequency, max_frequency=0.1)
    res = prune_dictionary(d, kill, "after", max_frequency=0.1, frequency_source="test",
                           frequency_tokens=r["tokens_evaluated"], name="p")
    save_pruned(res, tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "cfg.json").read_text())
    rec = cfg["pruning"]
    assert rec["max_frequency"] == 0.1 and rec["kill_mode"] == "after" and rec["frequency_source"] == "test"
    assert rec["frequency_tokens"] == r["tokens_evaluated"] and rec["original_d_sae"] == 96
    assert rec["killed_feature_ids"] == kill.nonzero().flatten().tolist()
    assert sorted(rec["killed_feature_ids"] + rec["kept_feature_ids"]) == list(range(96))
    assert cfg["d_sae"] == 96 - int(kill.sum()) and cfg["hook_name"] == HOOK

    p = load_dictionary(tmp_path / "p")
    ids = original_ids(p)
    x = torch.randn(50, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(p.encode(x), d.encode(x)[:, ids])  # new feature i = original ids[i]
    tokens, keep = data
    out = evaluate_dictionaries(model, {"p": p}, tokens, keep, train_means=means, progress=False)["p"]
    assert out["d_sae"] == p.d_sae and out["tokens_evaluated"] == r["tokens_evaluated"]
    # Frequencies of the kept features are unchanged by pruning (element-wise activation).
    assert torch.equal(out.frequency, r.frequency[ids])

    # Pruning the pruned dictionary again: ids still refer to the first, unpruned dictionary.
    kill2 = torch.zeros(p.d_sae, dtype=torch.bool)
    kill2[:3] = True
    p2 = prune_dictionary(p, kill2, "after", kill_ids=[0, 1, 2]).dictionary
    ids2 = original_ids(p2)
    assert ids2.tolist() == ids[3:].tolist()
    assert sorted(p2.metadata["pruning"]["killed_feature_ids"] + ids2.tolist()) == list(range(96))
    with torch.no_grad():
        assert torch.equal(p2.encode(x), d.encode(x)[:, ids2])


def test_prune_killing_everything_or_nothing(measured):
    d, r = measured
    with pytest.raises(UserError, match="kill all 96"):
        prune_dictionary(d, torch.ones(96, dtype=torch.bool), "after", max_frequency=0.0)
    res = prune_dictionary(d, torch.zeros(96, dtype=torch.bool), "after", max_frequency=1.0)
    assert res.dictionary.d_sae == 96 and res.record["killed"] == 0


def test_ablation_equals_prune_then_evaluate(tmp_path, model, data, means, measured):
    d, r = measured
    tokens, keep = data
    live = r.frequency[r.frequency > 0].sort().values
    t_mid = float(live[len(live) // 2])  # kills about half the live features
    thresholds = [1.0, t_mid, 0.0]  # nothing, some, every live feature
    other = RandomReLU.make(d_sae=32, seed=7)
    out = run_ablation(model, d, r.frequency, thresholds, tokens, keep, means, name="d",
                       compare={"other": other}, frequency_source="test", progress=False)
    write_ablation(tmp_path, out)
    rows = {row["threshold"]: row for row in out.rows}
    assert list(rows) == [1.0, t_mid, 0.0]
    assert rows[1.0]["killed"] == 0 and "nothing" in rows[1.0]["note"]
    for key in ("l0", "mse", "fvu", "loss_recovered", "loss_recovered_mean_ablation"):
        assert rows[1.0][key] == pytest.approx(out.unpruned[key], rel=1e-6), key
    n_live = int((r.frequency > 0).sum())
    assert rows[0.0]["killed"] == n_live and rows[0.0]["l0"] == 0  # every live feature killed
    assert "other" in out.references

    kill = kill_mask_from_frequency(r.frequency, max_frequency=t_mid)
    assert rows[t_mid]["killed"] == int(kill.sum()) > 0
    pruned = prune_dictionary(d, kill, "after", max_frequency=t_mid).dictionary
    sep = evaluate_dictionaries(model, {"p": pruned}, tokens, keep, train_means=means, progress=False)["p"]
    for key in ("l0", "l1", "mse", "fvu", "cossim", "ce_sae", "loss_recovered", "loss_recovered_mean_ablation",
                "kl_sae"):
        assert rows[t_mid][key] == pytest.approx(sep[key], rel=1e-5, abs=1e-7), key

    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert [row["threshold"] for row in saved["thresholds"]] == [1.0, t_mid, 0.0]
    assert "| d (unpruned) |" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.png").stat().st_size > 1000


def test_ablation_killing_every_feature(model, data, means, measured):
    d, r = measured
    tokens, keep = data
    every = run_ablation(model, d, torch.ones(96), [0.5], tokens, keep, means, name="d", progress=False)
    row = every.rows[0]
    assert row["killed"] == 96 and row["l0"] == 0 and row["dead"] == 96 and "every feature" in row["note"]
    assert all(x is None or isinstance(x, (int, float, str)) for x in row.values())


def test_thresholds_that_print_alike_are_refused():
    """0.1 and 0.1000001 would share the ablation row key `d@>0.1` and the folder `d-pruned-0.1`."""
    from types import SimpleNamespace

    from eval.run import evaluate_run, pruned_name

    with pytest.raises(UserError, match=r"0\.1000001 and 0\.1 both print as 0\.1"):
        parse_thresholds("0.2,0.1,0.1000001")
    assert parse_thresholds([0.2, 0.1, 0.038, 0.1]) == [0.2, 0.1, 0.038]
    assert [pruned_name("low", t) for t in (0.1, 0.2, 0.038)] == ["low-pruned-0.1", "low-pruned-0.2",
                                                                  "low-pruned-0.038"]
    assert pruned_name("low", 0.05, 0.0) == "low-pruned-0.05-min0"
    bad = SimpleNamespace(dictionaries=["low"], max_frequency=[0.1, 0.1000001], min_frequency=None, mode="after",
                          ablation=None)  # a PruneConfig's fields
    with pytest.raises(UserError, match=r"prune\.max_frequency 0\.1 and 0\.1000001 both print as 0\.1"):
        evaluate_run(None, {}, {}, "unused", None, None, {}, prune=bad)  # refused before anything runs
    bad.max_frequency = [0.1]
    bad.ablation = SimpleNamespace(dictionary="low", thresholds=[0.05, 0.05000001], compare=[], mode="after")
    with pytest.raises(UserError, match="prune.ablation.thresholds"):
        evaluate_run(None, {}, {}, "unused", None, None, {}, prune=bad)


def test_coincident_ablation_points_share_one_label(tmp_path, monkeypatch):
    pts = [(270.0, 0.99, 0.3, 4), (234.0, 0.96, 0.15, 264), (0.39, 0.16, 0.07, 2298),
           (0.0, 0.1575, 0.05, 2304), (0.0, 0.1575, 0.038, 2304), (0.0, 0.1575, 0.02, 2304)]
    assert point_labels(pts) == [(270.0, 0.99, ">0.3 (-4)"), (234.0, 0.96, ">0.15 (-264)"),
                                 (0.39, 0.16, ">0.07 (-2298)"), (0.0, 0.1575, ">0.05, >0.038, >0.02 (-2304)")]
    # Within the tolerances (labels that would overlap on the plot): one label, "; " between kill counts.
    assert point_labels(pts, x_tol=1.0, y_tol=0.01)[-1] == (0.39, 0.16, ">0.07 (-2298); >0.05, >0.038, >0.02 (-2304)")

    import sae.plots

    drawn = {}
    monkeypatch.setattr(sae.plots, "save_figure", lambda fig, path: drawn.setdefault("fig", fig))
    rows = [{"threshold": t, "killed": k, "l0": x, "loss_recovered": y, "loss_recovered_mean_ablation": y - 0.3}
            for x, y, t, k in pts]
    unpruned = {"l0": 280.0, "loss_recovered": 1.0, "loss_recovered_mean_ablation": 0.7}
    plot_ablation(AblationResult("d", "after", "test", 100, rows, unpruned), tmp_path / "a.png")
    for ax in drawn["fig"].axes:
        texts = [t.get_text() for t in ax.texts]
        assert sum(">0.05" in t for t in texts) == 1 and ">0.07 (-2298); >0.05, >0.038, >0.02 (-2304)" in texts
        assert ">0.3 (-4)" in texts and ">0.15 (-264)" in texts


# ---- the command line ----------------------------------------------------------------------

def _frequency_on(d, model, data_cfg, split: str, n_tokens: int) -> tuple[torch.Tensor, int]:
    """The dictionary's feature frequencies over the first n_tokens of a split, the plain way (one
    run_with_cache, one encode), and the kept-token count."""
    from sae.text import keep_mask, load_contexts

    tokens = load_contexts(data_cfg, model.tokenizer, split=split, n_tokens=n_tokens)
    keep = keep_mask(tokens, model.tokenizer, data_cfg.exclude_tokens)
    hook = d.metadata["hook_name"]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[hook])
        fired = (d.encode(cache[hook][keep]) != 0).sum(dim=0)
    return (fired.double() / int(keep.sum())).float(), int(keep.sum())


def _separating_threshold(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """A threshold that kills a feature on one set of frequencies and keeps it on the other."""
    i = int((train - heldout).abs().argmax())
    assert train[i] != heldout[i]
    return float(f"{float(train[i] + heldout[i]) / 2:.6g}")


def test_cli_prune_and_ablate(tmp_path, tiny_model_dir, tiny_text_file, model, capsys):
    from eval.__main__ import main
    from eval.folders import data_config_for

    src = tmp_path / "dict"
    save_test_dictionary(src, tiny_model_dir, tiny_text_file, d_sae=96, seed=2)
    d = load_dictionary(src)
    common = ["--tokens", "256", "--batch-size", "6", "--device", "cpu", "--no-progress", "--mean-tokens", "512",
              "--frequency-tokens", "1000"]
    # The kill set must follow the frequencies on the first 1000 training-split tokens, not those on
    # the 256 held-out tokens everything is scored on: a threshold between the two tells which.
    train_freq, train_tokens = _frequency_on(d, model, data_config_for(d), "train", 1000)
    heldout_freq, _ = _frequency_on(d, model, data_config_for(d), "heldout", 256)
    t = _separating_threshold(train_freq, heldout_freq)
    main(["prune", str(src), "--max-frequency", str(t), "--kill-ids", "0,1", "--out", str(tmp_path / "pruned"),
          *common])
    text = capsys.readouterr().out
    assert "kill decisions from the feature frequencies of dict on a training-split pass" in text
    assert "% loss rec. (zero)" in text and "change" in text
    cfg = json.loads((tmp_path / "pruned" / "cfg.json").read_text())
    killed = set(kill_mask_from_frequency(train_freq, max_frequency=t, kill_ids=[0, 1]).nonzero().flatten().tolist())
    on_heldout = set(kill_mask_from_frequency(heldout_freq, max_frequency=t, kill_ids=[0, 1]).nonzero().flatten().tolist())
    assert set(cfg["pruning"]["killed_feature_ids"]) == killed != on_heldout and {0, 1} <= killed
    assert cfg["pruning"]["frequency_tokens"] == train_tokens
    assert "training-split pass" in cfg["pruning"]["frequency_source"]
    assert cfg["d_sae"] == 96 - len(killed)
    ev = json.loads((tmp_path / "pruned" / "eval.json").read_text())
    assert ev["d_sae"] == 96 - len(killed) and (tmp_path / "pruned" / "prune.md").is_file()
    assert (tmp_path / "pruned" / "frequency_histogram.png").is_file()
    assert read_frequency(src) is None  # prune writes nothing into the dictionary's own folder

    # An explicit --frequency-file: here the held-out measurement, so killing the features that never
    # fire on the held-out tokens leaves none dead on them.
    main(["evaluate", str(src), *common[:9]])
    capsys.readouterr()
    main(["prune", str(src), "--min-frequency", "0", "--frequency-file", str(src / "frequency.safetensors"),
          "--out", str(tmp_path / "nodead"), *common])
    assert "was measured on held-out tokens" in capsys.readouterr().out
    rec = json.loads((tmp_path / "nodead" / "cfg.json").read_text())["pruning"]
    assert "held-out evaluation" in rec["frequency_source"] and rec["frequency_tokens"] == ev["tokens_evaluated"]
    assert json.loads((tmp_path / "nodead" / "eval.json").read_text())["dead"] == 0

    other = tmp_path / "other"
    save_test_dictionary(other, tiny_model_dir, tiny_text_file, d_sae=48, seed=9)
    thresholds = sorted({0.999, t, 0.001}, reverse=True)
    main(["ablate-frequency", str(src), "--thresholds", ",".join(map(str, thresholds)), "--compare", str(other),
          *common])
    text = capsys.readouterr().out
    assert "dict (unpruned)" in text and "other (reference)" in text
    ab = json.loads((src / "ablation.json").read_text())
    assert [row["threshold"] for row in ab["thresholds"]] == thresholds
    assert "training-split pass" in ab["frequency_source"] and ab["frequency_tokens"] == train_tokens
    assert [row["killed"] for row in ab["thresholds"]] == [int((train_freq > x).sum()) for x in thresholds]
    pruned_ev = json.loads((tmp_path / "pruned" / "eval.json").read_text())
    # The row of t kills a subset of what the pruned dictionary killed (no --kill-ids): both evaluated
    # on the same tokens, so the pruned one with 2 extra kills has L0 <= the row's.
    assert pruned_ev["l0"] <= ab["thresholds"][thresholds.index(t)]["l0"] + 1e-9

    with pytest.raises(SystemExit):
        main(["prune", str(src), "--out", str(tmp_path / "x"), *common])
    assert "nothing to kill" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # more training tokens than the text has
        main(["prune", str(src), "--max-frequency", "0.2", "--out", str(tmp_path / "x"), *common[:-1], "99999999"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "train tokens" in err and "lower --frequency-tokens" in err


def test_evaluate_run_with_prune_block(tmp_path, model, data, means):
    """train.py's end-of-run step: evaluate, prune at each threshold, evaluate the pruned
    dictionaries, ablate, and write the summary."""
    from eval.run import evaluate_run
    from sae.config import AblationConfig, PruneConfig

    tokens, keep = data
    dicts = {"low": RandomReLU.make(d_sae=96, seed=2), "wide": RandomReLU.make(d_sae=128, seed=4)}
    out_dirs = {name: tmp_path / name for name in dicts}
    for name, d in dicts.items():
        d.save(out_dirs[name])
    prune = PruneConfig(dictionaries=["low"], max_frequency=[0.2, 0.05], mode="after",
                        ablation=AblationConfig(dictionary="low", thresholds=[0.2, 0.1, 0.05], compare=["wide"]))
    train = make_tokens(model.tokenizer, n_ctx=11, seed=5)  # the "training tokens" the kill sets are chosen on
    results = evaluate_run(model, dicts, out_dirs, tmp_path, tokens, keep, means, batch_size=5, prune=prune,
                           training_activations=TrainingSplitPass(model, *train, 4, "test training tokens"),
                           progress=False)
    assert list(results) == ["low", "wide", "low-pruned-0.2", "low-pruned-0.05"]
    for name in results:
        assert (tmp_path / name / "eval.json").is_file() and (tmp_path / name / "frequency_histogram.png").is_file()
    p = load_dictionary(tmp_path / "low-pruned-0.05")
    assert p.metadata["pruning"]["max_frequency"] == 0.05
    assert p.d_sae == results["low-pruned-0.05"]["d_sae"] < 96
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [row["name"] for row in summary["dictionaries"]] == list(results)
    assert "low-pruned-0.05" in (tmp_path / "summary.md").read_text()
    ab = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    row = next(r for r in ab["thresholds"] if r["threshold"] == 0.05)
    assert row["l0"] == pytest.approx(results["low-pruned-0.05"]["l0"], rel=1e-6)
    assert row["loss_recovered"] == pytest.approx(results["low-pruned-0.05"]["loss_recovered"], rel=1e-5)
    assert ab["unpruned"]["l0"] == results["low"]["l0"] and "wide" in ab["references"]


def test_cli_frequencies_without_a_token_count(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    """A frequency.safetensors that records no tokens_evaluated (what `python -m sae.convert` writes
    from SAELens's training-time sparsity) is reported with its own `source`, never as "None tokens"."""
    from eval.__main__ import main
    from sae import io

    src = tmp_path / "dict"
    save_test_dictionary(src, tiny_model_dir, tiny_text_file, d_sae=96, seed=2)
    freq = torch.linspace(0, 0.3, 96)
    io.save_tensors(src / "frequency.safetensors", {"frequency": freq},
                    metadata={"source": "converted from /elsewhere/saelens_sae"})  # as sae/convert.py writes it
    common = ["--tokens", "64", "--batch-size", "4", "--device", "cpu", "--no-progress", "--mean-tokens", "64"]
    frequency_file = ["--frequency-file", str(src / "frequency.safetensors")]
    main(["prune", str(src), "--max-frequency", "0.2", "--out", str(tmp_path / "pruned"), *frequency_file, *common])
    text = capsys.readouterr().out
    assert "None tokens" not in text and "converted from /elsewhere/saelens_sae" in text
    assert "was measured on held-out tokens" not in text  # no such claim about a file that does not say
    rec = json.loads((tmp_path / "pruned" / "cfg.json").read_text())["pruning"]
    assert "converted from /elsewhere/saelens_sae" in rec["frequency_source"] and rec["frequency_tokens"] is None
    assert rec["killed"] == int((freq > 0.2).sum()) and "None" not in (tmp_path / "pruned" / "prune.md").read_text()

    main(["ablate-frequency", str(src), "--thresholds", "0.25,0.1", "--out", str(tmp_path / "ab"), *frequency_file,
          *common])
    text = capsys.readouterr().out
    assert "None tokens" not in text and "converted from /elsewhere/saelens_sae" in text
    ab = json.loads((tmp_path / "ab" / "ablation.json").read_text())
    assert "converted from /elsewhere/saelens_sae" in ab["frequency_source"] and "None" not in ab["frequency_source"]
    assert "None tokens" not in (tmp_path / "ab" / "ablation.md").read_text()
