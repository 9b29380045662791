"""Training curves: what the trainer records every log window and at every frequency histogram, the
files beside each dictionary, wandb, and a resumed run's curves equal to an uninterrupted run's."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from sae.dictionaries import parse_dictionary_config
from sae.plots import BINS_PER_DECADE, LOG_MIN
from sae.synthetic import SyntheticFeatures
from sae.trainer import Trainer, train_dictionaries
from sae.training_history import CURVES_FILE, HISTOGRAMS_FILE, HISTORY_FILE, TrainingHistory

BATCH = 128


def _configs():
    return [parse_dictionary_config({"architecture": "topk", "k": 3, "d_sae": 48, "name": "topk"}),
            parse_dictionary_config({"architecture": "relu", "d_sae": 48, "l1_coefficient": 1.0, "name": "relu",
                                     "dead_after_tokens": 2000})]


def _bin(log10_frequency: float) -> int:
    return int((log10_frequency - LOG_MIN) * BINS_PER_DECADE + 1e-9)


def test_a_snapshot_is_the_frequency_histogram():
    history = TrainingHistory(dead_after_tokens=100)
    history.snapshot(640, torch.tensor([0.0, 0.0, 1e-3, 0.05, 0.5, 1.0]), window_tokens=320)
    (snap,) = history.snapshots
    assert snap["tokens"] == 640 and snap["window_tokens"] == 320
    assert snap["dead"] == 2 and snap["dense_1e-2"] == 3 and snap["dense_1e-1"] == 2
    expected = [0] * len(snap["counts"])
    for f in (1e-3, 0.05, 0.5):
        expected[_bin(torch.tensor(f).log10().item())] += 1
    expected[-1] += 1  # frequency 1: the last bin
    assert snap["counts"] == expected


def _history(l0_at, fvu_at, n: int = 100) -> TrainingHistory:
    history = TrainingHistory()
    for t in range(1, n + 1):
        history.update(t * 10, t, {"loss": 1.0, "l0": l0_at(t), "fvu": fvu_at(t), "dead": 0})
    return history


def test_the_last_fifth_says_how_far_l0_and_fvu_still_moved():
    """Means over the last 5 % of training against the 5 % before the last fifth began."""
    falling = _history(lambda t: 100.0 if t <= 80 else (95.0 if t <= 95 else 90.0), lambda t: 0.2)
    moved = falling.last_fifth()
    assert moved["l0"] == pytest.approx(-0.10) and moved["fvu"] == 0.0
    assert (moved["from_tokens"], moved["to_tokens"]) == (800, 1000)
    assert falling.describe_last_fifth() == "over the last fifth of training L0 moved -10.0%, FVU +0.0%: still moving"
    settled = _history(lambda t: 40.0 + (t % 2), lambda t: 0.1 - 1e-4 * (t > 80))  # noise averaged out
    assert settled.last_fifth()["l0"] == pytest.approx(0.0) and settled.last_fifth()["fvu"] == pytest.approx(-1e-3)
    assert settled.describe_last_fifth().endswith("converged (both under 2 %)")
    assert _history(lambda t: 1.0, lambda t: 1.0, n=1).last_fifth() is None


def test_training_writes_curves_beside_each_dictionary(tmp_path):
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=BATCH, seed=2)
    trainer = Trainer(_configs(), total_tokens=45 * BATCH, out_dir=tmp_path, progress=False, log_every=5,
                      histogram_every_tokens=10 * BATCH)
    trainer.fit(data)
    for name in ("topk", "relu"):
        history = trainer.histories[name]
        assert [r["step"] for r in history.rows] == list(range(5, 46, 5))
        assert [r["tokens"] for r in history.rows] == [s * BATCH for s in range(5, 46, 5)]
        # every 10 steps, and the last, shorter window (5 steps: at least half of one)
        assert [(s["tokens"], s["window_tokens"]) for s in history.snapshots] == \
            [(s * BATCH, 10 * BATCH) for s in (10, 20, 30, 40)] + [(45 * BATCH, 5 * BATCH)]
        assert all(s["dead"] + sum(s["counts"]) == 48 for s in history.snapshots)
        assert history.rows[-1]["fvu"] < 0.7 * history.rows[0]["fvu"]  # training reduced the error
        saved = json.loads((tmp_path / name / HISTORY_FILE).read_text())
        assert saved == json.loads(json.dumps({**history.state_dict(), "last_fifth": history.last_fifth()}))
        assert saved["last_fifth"]["to_tokens"] == 45 * BATCH and saved["last_fifth"]["from_tokens"] == 35 * BATCH
        for png in (CURVES_FILE, HISTOGRAMS_FILE):
            assert (tmp_path / name / png).stat().st_size > 20_000
    topk = trainer.histories["topk"]
    assert all(2.5 < r["l0"] <= 3 for r in topk.rows)  # TopK: at most k per token
    assert all(r["dead"] == 0 for r in topk.rows) and topk.dead_after_tokens == _configs()[0].dead_after_tokens
    assert trainer.histories["relu"].dead_after_tokens == 2000


def test_wandb_gets_the_curves(tmp_path, monkeypatch):
    logged = []

    class FakeRun:
        def log(self, row, step=None):
            logged.append((step, row))

        def finish(self):
            pass

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun(), Histogram=lambda values, num_bins: ("hist", len(values)),
                                 Image=lambda path: ("image", path),
                                 util=types.SimpleNamespace(generate_id=lambda: "abc"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=BATCH, seed=2)
    train_dictionaries(data, _configs()[:1], total_tokens=20 * BATCH, out_dir=tmp_path, progress=False,
                       wandb={"mode": "offline", "log_every": 5, "histogram_every_tokens": 10 * BATCH})
    step, row = logged[-1]  # unstepped like every row: a later pass or a resume counts from lower down
    assert step is None
    assert row == {"tokens": 20 * BATCH, "train_step": 20,
                   "topk/training_curves": ("image", str(tmp_path / "topk" / CURVES_FILE)),
                   "topk/frequency_over_training": ("image", str(tmp_path / "topk" / HISTOGRAMS_FILE))}


class Interrupted(Exception):
    pass


class StopAt:
    """The synthetic stream, raising (as a crash would) when step `stop` is drawn."""

    def __init__(self, data, stop: int | None):
        self.data, self.stop = data, stop

    def batches(self, start_step=0):
        for i, b in enumerate(self.data.batches(start_step), start=start_step):
            if i == self.stop:
                raise Interrupted
            yield b


# resumed from the checkpoint of step 24 (a histogram was just taken) or of step 32 (mid-window)
@pytest.mark.parametrize("stop", [27, 33])
def test_a_resumed_run_has_the_whole_history(tmp_path, stop):
    data = SyntheticFeatures(d_in=16, n_features=32, batch_size=BATCH, seed=7)
    common = {"total_tokens": 50 * BATCH, "checkpoint_every_tokens": 8 * BATCH, "progress": False, "log_every": 3,
              "histogram_every_tokens": 10 * BATCH}
    train_dictionaries(StopAt(data, None), _configs(), out_dir=tmp_path / "straight", **common)
    with pytest.raises(Interrupted):
        train_dictionaries(StopAt(data, stop), _configs(), out_dir=tmp_path / "resumed", **common)
    train_dictionaries(StopAt(data, None), _configs(), out_dir=tmp_path / "resumed", **common)
    for name in ("topk", "relu"):
        straight = json.loads((tmp_path / "straight" / name / HISTORY_FILE).read_text())
        resumed = json.loads((tmp_path / "resumed" / name / HISTORY_FILE).read_text())
        assert len(straight["rows"]) == 17 and [s["tokens"] // BATCH for s in straight["snapshots"]] == [12, 24, 36, 48]
        assert resumed == straight


def test_the_last_fifth_of_a_dictionary_at_zero_is_no_change_and_never_infinite():
    """A collapsed dictionary (L0 0 throughout) did not move; from 0 to something has no relative
    change (None, not inf: training_history.json stays strict JSON), and no line is printed."""
    dead = _history(lambda t: 0.0, lambda t: 1.0)
    assert dead.last_fifth()["l0"] == 0.0 and dead.describe_last_fifth().startswith(
        "over the last fifth of training L0 moved +0.0%")
    waking = _history(lambda t: 0.0 if t <= 80 else 3.0, lambda t: 1.0)
    assert waking.last_fifth()["l0"] is None and waking.describe_last_fifth() is None
