"""What every peer worker of benchmarks/quality.py shares: reading the request, drawing the same
batches, writing a result. torch and the standard library only (it runs in the peers' venvs)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ground_truth import GroundTruth, GroundTruthSpec  # noqa: E402


@dataclass
class Request:
    truth: GroundTruth
    steps: int
    d_sae: int
    lr: float | None  # None: the peer's default
    out_dir: Path
    runs: list[dict]  # {"name", "architecture", <knob>: value}

    @classmethod
    def read(cls, path: str) -> "Request":
        raw = json.loads(Path(path).read_text())
        return cls(GroundTruth(GroundTruthSpec(**raw["spec"])), int(raw["steps"]), int(raw["d_sae"]),
                   raw["lr"], Path(raw["out_dir"]), raw["runs"])

    def batch_iterator(self) -> Iterator[torch.Tensor]:
        """The training batches [batch_size, d_in], exactly as our trainer draws them, then stop."""
        return (self.truth.batch(step) for step in range(self.steps))

    @staticmethod
    def clock() -> float:
        return time.perf_counter()


def save_result(request: Request, run: dict, W_dec: torch.Tensor, x_hat: torch.Tensor, l0: torch.Tensor,
                lr: float, start: float, **extra) -> None:
    """<name>.pt: decoder rows [d_sae, d_in], held-out reconstructions, L0 per held-out token;
    <name>.json: lr used, training seconds, and whatever else the worker reports."""
    name = run["name"]
    torch.save({"W_dec": W_dec.detach().float().cpu().contiguous(),
                "x_hat": x_hat.detach().float().cpu().contiguous(),
                "l0": l0.detach().cpu().to(torch.int32)}, request.out_dir / f"{name}.pt.tmp")
    (request.out_dir / f"{name}.pt.tmp").replace(request.out_dir / f"{name}.pt")
    info = {"lr": float(lr), "train_seconds": time.perf_counter() - start, **extra}
    (request.out_dir / f"{name}.json").write_text(json.dumps(info))
    print(f"{name}: done in {info['train_seconds']:.0f} s", file=sys.stderr, flush=True)


def nested_widths(fractions: list[float], d_sae: int) -> list[int]:
    """Matryoshka group fractions as cumulative widths (SAELens's `matryoshka_widths`): each group
    ends at round(cumulative fraction * d_sae), the last at d_sae, as our `group_sizes` fractions do."""
    ends, total = [], 0.0
    for fraction in fractions[:-1]:
        total += fraction
        ends.append(round(total * d_sae))
    return [*ends, d_sae]
