"""The README's YAML example is a valid run config (it is what users copy first)."""

from __future__ import annotations

import re
from pathlib import Path

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
