"""The README's examples work: its YAML example is a valid run config (it is what users copy
first), and every one of its Python blocks runs, on the tiny test model and a tiny run standing in
for runs/demo, so the manual cannot drift from the code."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline import run_experiment
from sae.config import load_run_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_yaml_example_validates_and_expands_as_described(tmp_path):
    text = README.read_text()
    block = re.search(r"## A run is one YAML file\n\n```yaml\n(.*?)```", text, re.S)
    assert block, "README lost its YAML example"
    path = tmp_path / "example.yaml"
    path.write_text(block.group(1))
    run, dictionaries = load_run_config(path)
    # the README says: 2 hooks x (1 + 3) entries x 2 lrs = 16 dictionaries
    assert len(dictionaries) == 16
    assert run.prune is not None and run.prune.dictionaries[0] in {d.name for d in dictionaries}


# runs/demo of `make demo`, on the tiny model: a TopK dictionary named topk (and a ReLU one)
DEMO = """
run_name: demo
output_dir: runs
model: {model}
hooks: [blocks.1.hook_resid_post]
data: {{source: {text}, context_size: 16}}
train_tokens: 1024
harvest: {{contexts_per_shard: 32}}
train: {{batch_size: 256}}
eval_tokens: 256
dictionaries:
  - {{name: topk, architecture: topk, k: 8, d_sae: 64}}
  - {{architecture: relu, d_sae: 64, sweep: {{l1_coefficient: [1.0]}}}}
"""
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, tiny_model_dir, tiny_text_file) -> Path:
    """A folder whose runs/demo is a tiny run, and whose my_activations.pt is [1024, 32] activations."""
    folder = tmp_path_factory.mktemp("readme")
    config = folder / "demo.yaml"
    config.write_text(textwrap.dedent(DEMO).format(model=tiny_model_dir, text=tiny_text_file))
    run, dictionaries = load_run_config(config, [f"output_dir={folder / 'runs'}"])
    run_experiment(run, dictionaries)
    torch.save(torch.randn(1024, 32, generator=torch.Generator().manual_seed(0)), folder / "my_activations.pt")
    return folder


def runnable(block: str) -> str:
    """A README block as the tests run it: on the CPU (the only rewrite)."""
    return block.replace('device="cuda"', 'device="cpu"')


def test_readme_has_python_blocks():
    assert len(PYTHON_BLOCKS) >= 3, "README lost its Python examples"


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_readme_python_block_runs(demo_dir, monkeypatch, index):
    monkeypatch.chdir(demo_dir)  # its relative paths (runs/demo, my_activations.pt) are there
    code = compile(runnable(PYTHON_BLOCKS[index]), f"README.md python block {index + 1}", "exec")
    exec(code, {"__name__": "readme_block"})
