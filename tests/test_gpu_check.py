"""benchmarks/gpu_check.py at its tiny size on the CPU: every check runs and reports a figure (on a
GPU, the same command at full size gives the README's figures)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE_ROWS = ["relu (classic)", "relu (classic), dense", "relu (april2024)", "relu (april2024), dense",
                     "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "jumprelu, dense", "gated",
                     "gated, dense"]


def test_gpu_check_runs_every_check_at_a_tiny_size_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("| check"):]
    cells = [[c.strip() for c in line.strip("|").split(" | ")] for line in table.splitlines()[2:]]
    rows = {c[0]: " | ".join(c[1:]) for c in cells}
    assert "not run" in rows["cuda tests"] and "no CUDA device" in rows["cuda tests"]
    for matmul in ("bf16 matmul 256^3", "bf16 matmul 256x64x512"):
        assert float(re.search(r"([\d.e-]+) TFLOP/s", rows[matmul]).group(1)) > 0
    for name in ARCHITECTURE_ROWS:
        step = rows[f"step {name}"]
        assert int(re.search(r"([\d,]+) tok/s", step).group(1).replace(",", "")) > 0, name
        assert re.search(r"% of matmul.*L0 \d+", step), name
    for k in (4, 8, 16):
        assert re.search(r"sparse [\d,]+ tok/s, dense [\d,]+ tok/s", rows[f"topk k={k}: sparse vs dense step"])
    assert "| ok |" in rows["reader to device (bf16 cache, shuffled)"]
    assert "slowdown" in rows["reader feeding a topk-long step"]
    assert "| ok |" in rows["tiny model: harvest (bf16 cache)"]
    fvu = float(re.search(r"fvu ([\d.]+)", rows["tiny model: train topk from it + evaluate"]).group(1))
    assert 0 < fvu < 1
    assert "FAIL" not in table and not os.listdir(tmp_path)  # its caches are removed
