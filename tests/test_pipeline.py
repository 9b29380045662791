"""train.py end to end on the tiny model: harvest -> train -> save -> evaluate -> prune -> summary."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sae
from conftest import make_tiny_model
from pipeline import run_experiment
from sae.config import load_run_config

REPO = Path(__file__).resolve().parents[1]

RUN = """
run_name: e2e
output_dir: {out}
model: {model}
hooks: [blocks.0.hook_resid_post, blocks.1.hook_mlp_out]
data: {{source: {text}, context_size: 16}}
train_tokens: 4096
eval_tokens: 256
harvest: {{mode: {mode}, contexts_per_shard: 64}}
train: {{batch_size: 256}}
dictionaries:
  - {{name: topk, architecture: topk, k: 4, d_sae: 64, hook_name: blocks.0.hook_resid_post}}
  - {{name: relu, architecture: relu, expansion_factor: 2, l1_coefficient: 0.3, hook_name: blocks.1.hook_mlp_out}}
prune: {{dictionaries: [topk], max_frequency: [0.05]}}
"""
# FVU on the held-out tokens stays below these (measured, disk and stream alike: topk 0.458,
# relu 0.483, topk-pruned-0.05 0.856); the same dictionaries untrained give topk 0.721 and
# relu 0.982, and predicting the training mean gives 1.008.
FVU_BELOW = {"topk": 0.6, "relu": 0.6, "topk-pruned-0.05": 0.95}


def write_config(tmp_path: Path, tiny_model_dir, tiny_text_file, mode: str = "disk") -> Path:
    path = tmp_path / f"{mode}.yaml"
    path.write_text(textwrap.dedent(RUN).format(out=tmp_path / f"runs-{mode}", model=tiny_model_dir,
                                                text=tiny_text_file, mode=mode))
    return path


@pytest.mark.parametrize("mode", ["disk", "stream"])
def test_run_writes_every_output(tmp_path, tiny_model_dir, tiny_text_file, mode):
    run, dicts = load_run_config(write_config(tmp_path, tiny_model_dir, tiny_text_file, mode))
    results = run_experiment(run, dicts)
    run_dir = run.run_dir
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "cache" / "manifest.json").is_file() == (mode == "disk")
    assert set(results) == {"topk", "relu", "topk-pruned-0.05"}
    for name in results:
        folder = run_dir / name
        for file in ("sae.safetensors", "cfg.json", "eval.json", "frequency.safetensors", "frequency_histogram.png"):
            assert (folder / file).is_file(), f"{name}/{file}"
        metrics = json.loads((folder / "eval.json").read_text())
        assert metrics["tokens_evaluated"] > 0 and 0 < metrics["l0"] <= 64
        assert 0 <= metrics["fvu"] < FVU_BELOW[name], name
    assert results["topk-pruned-0.05"]["fvu"] > results["topk"]["fvu"]  # the killed features were used
    cfg = json.loads((run_dir / "topk" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.0.hook_resid_post" and cfg["context_size"] == 16
    assert cfg["tokens_trained"] >= 3000  # ~4096 minus excluded BOS tokens
    assert not (run_dir / "checkpoints").exists()
    summary = (run_dir / "summary.md").read_text()
    assert "topk-pruned-0.05" in summary and "relu" in summary
    # the saved dictionaries load through the public API, by name
    loaded = sae.load(run_dir)
    assert {"topk", "relu"} <= set(loaded)
    mean = sae.io.load_tensors(run_dir / "relu" / "activation_mean.safetensors")["mean"]
    assert mean.shape == (32,) and torch.isfinite(mean).all()


def test_rerun_reuses_finished_dictionaries(tmp_path, tiny_model_dir, tiny_text_file):
    path = write_config(tmp_path, tiny_model_dir, tiny_text_file)
    run, dicts = load_run_config(path)
    run_experiment(run, dicts)
    weights = (run.run_dir / "topk" / "sae.safetensors").read_bytes()
    summary = (run.run_dir / "summary.md").read_text()
    # the same config again: nothing is redone, the summary is printed
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is complete with this config" in proc.stdout and summary in proc.stdout
    assert "evaluating" not in proc.stdout
    # another evaluation setting: the dictionaries are reused, only the evaluation runs again
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), "eval.batch_contexts=3"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "already trained" in proc.stdout
    assert (run.run_dir / "topk" / "sae.safetensors").read_bytes() == weights
    assert (run.run_dir / "summary.md").read_text() == summary  # batch size changes no number
    # the same folder with another hyperparameter is refused, not overwritten
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), "dictionaries.0.k=5"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "trained with other settings (k: 4 -> 5)" in proc.stderr.strip().splitlines()[-1]
    # a dictionary trained under a default that changed since (as an earlier version saved it) is
    # reused as trained, with a line saying so, not refused
    cfg_file = run.run_dir / "topk" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["hyperparameters"]["adam_betas"] = [0.9, 0.999]
    cfg_file.write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), "eval.batch_contexts=4"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("topk: trained under earlier defaults (adam_betas: [0.9, 0.999] -> [0.5, 0.999]); reused as "
            "trained") in proc.stdout
    # so is a change to what every dictionary was trained on (batches, model, dataset, a hook point):
    # one line naming it, exit status 2, and nothing already written is touched
    other_model = make_tiny_model(tmp_path / "other_model", seed=1)
    other_text = tmp_path / "other.txt"
    other_text.write_text(tiny_text_file.read_text().upper())
    before = files_of(run.run_dir)
    for override, named in [("train.batch_size=128", "train.batch_size: 256 -> 128"),
                            (f"model={other_model}", f"model: '{tiny_model_dir}' -> '{other_model}'"),
                            (f"data.source={other_text}", f"data.source: '{tiny_text_file}' -> '{other_text}'"),
                            ("dictionaries.0.hook_name=blocks.1.hook_mlp_out",
                             "dictionary 'topk' of {} was trained on blocks.0.hook_resid_post, this config puts "
                             "it on blocks.1.hook_mlp_out".format(run.run_dir))]:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), override],
                              capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and named in lines[0], proc.stderr
        assert files_of(run.run_dir) == before, override


def files_of(folder: Path) -> dict[str, tuple[bytes, int]]:
    """{relative path: (bytes, mtime)} of every file under folder (the cache's files by size)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if "cache" not in p.parts else p.stat().st_size,
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# Added to the finished run of RUN: a member trained and evaluated on its own, and one whose
# huge lr makes its loss NaN within two steps.
ADDED = """\
  - {name: topk8, architecture: topk, k: 8, d_sae: 64, hook_name: blocks.0.hook_resid_post}
  - {name: boom, architecture: relu, d_sae: 64, l1_coefficient: 0.3, lr: 1.0e+30, hook_name: blocks.1.hook_mlp_out}
"""


def test_a_finished_sweep_with_dictionaries_added_trains_only_those(tmp_path, tiny_model_dir, tiny_text_file):
    """The others' files stay byte for byte what they were (not re-evaluated either); the new one
    trains its full budget and is evaluated; the diverging one leaves with status: diverged, a row
    in the summary, the last line and exit status 3; with train.stop_on_divergence it stops all."""
    path = write_config(tmp_path, tiny_model_dir, tiny_text_file)
    run, dicts = load_run_config(path)
    run_experiment(run, dicts)
    before = files_of(run.run_dir)
    bigger = tmp_path / "bigger.yaml"
    bigger.write_text(path.read_text().replace("prune:", ADDED + "prune:"))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(bigger), "train.stop_on_divergence=true"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("train.py: error: dictionary 'boom': the loss became "
                                                           "NaN or inf at step 1")
    assert not (run.run_dir / "boom").exists() and not (run.run_dir / "topk8").exists()
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(bigger)], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr[-2000:]
    out = proc.stdout.strip().splitlines()
    assert "[train.py] topk: already trained, reused" in out and "[train.py] relu: already trained, reused" in out
    assert "evaluating 1 dictionaries" in proc.stdout  # topk8; topk's pruned folder is kept too
    assert out[-1].startswith("[train.py] 1 of 4 dictionaries diverged: boom (step 1)"), out[-1]
    after = files_of(run.run_dir)
    changed = {p.split("/")[0] for p in after if after[p] != before.get(p)}
    assert changed == {"topk8", "boom", "config.yaml", "summary.md", "summary.json"}
    assert not (run.run_dir / "checkpoints").exists()
    cfg = json.loads((run.run_dir / "topk8" / "cfg.json").read_text())
    assert cfg["tokens_trained"] == json.loads((run.run_dir / "topk" / "cfg.json").read_text())["tokens_trained"]
    assert json.loads((run.run_dir / "topk8" / "eval.json").read_text())["fvu"] < FVU_BELOW["topk"]
    boom = json.loads((run.run_dir / "boom" / "cfg.json").read_text())
    assert boom["status"] == "diverged" and boom["divergence"]["step"] == 1 and boom["hyperparameters"]["lr"] == 1e30
    assert not (run.run_dir / "boom" / "eval.json").exists()
    summary = json.loads((run.run_dir / "summary.json").read_text())
    status = {row["name"]: row["status"] for row in summary["dictionaries"]}
    assert status == {"topk": "trained", "relu": "trained", "topk8": "trained", "topk-pruned-0.05": "trained",
                      "boom": "diverged"}
    row = next(r for r in summary["dictionaries"] if r["name"] == "boom")
    assert row["fvu"] is None and row["divergence"]["step"] == 1 and row["lr"] == 1e30
    md = (run.run_dir / "summary.md").read_text()
    assert f"| boom | blocks.1.hook_mlp_out | 64 | 1e+30 | 1 | {boom['divergence']['restored_step']} |" in md
    # the same again: the run is complete, and still says so and exits 3
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(bigger)], capture_output=True, text=True)
    assert proc.returncode == 3 and "is complete with this config" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("[train.py] 1 of 4 dictionaries diverged: boom")
    assert files_of(run.run_dir) == after


def test_missing_hook_is_one_line(tmp_path, tiny_model_dir, tiny_text_file):
    path = write_config(tmp_path, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path),
                           "hooks=[blocks.0.hook_resid_post, blocks.1.hook_mlp_outt]"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()
    assert len(last) == 1 and "blocks.1.hook_mlp_outt" in last[0] and "did you mean" in last[0], proc.stderr


@pytest.mark.parametrize("overrides, expected", [
    (["dictionaries.0.d_sae=null", "dictionaries.0.expansion_factor=0.5", "dictionaries.0.k=40"],
     "dictionary 'topk': k=40 is more than d_sae=16 features"),
    (["eval_tokens=10000000"], "lower eval_tokens (--tokens) or raise data.heldout_fraction"),
])
def test_settings_that_need_the_model_fail_before_the_harvest(tmp_path, tiny_model_dir, tiny_text_file,
                                                             overrides, expected):
    path = write_config(tmp_path, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), *overrides],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]  # (after the model-loading bar)
    assert last.startswith("train.py: error: ") and expected in last, proc.stderr[-2000:]
    assert not (tmp_path / "runs-disk" / "e2e").exists()  # nothing harvested, not even config.yaml written
