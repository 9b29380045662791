"""Config loading: every bad-input case is one clear line naming the key path, exit code 2."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sae.config import load_run_config
from sae.errors import ConfigError, UserError

REPO = Path(__file__).resolve().parents[1]

BASE = """
run_name: t
model: {model}
hooks: [blocks.0.hook_resid_post, blocks.1.hook_resid_post]
data: {{source: {text}, context_size: 16}}
train_tokens: 2048
dictionaries:
  - {{architecture: topk, k: 4, d_sae: 64}}
  - {{architecture: relu, expansion_factor: 2, sweep: {{l1_coefficient: [0.001, 0.01]}}}}
"""


def write(tmp_path: Path, text: str, tiny_model_dir, tiny_text_file) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text).format(model=tiny_model_dir, text=tiny_text_file))
    return path


def test_valid_config_expands_sweeps_and_hooks(tmp_path, tiny_model_dir, tiny_text_file):
    run, dicts = load_run_config(write(tmp_path, BASE, tiny_model_dir, tiny_text_file))
    names = [d.name for d in dicts]
    # 1 topk × 2 hooks + 2 l1 values × 2 hooks
    assert len(names) == 6 and len(set(names)) == 6
    assert {d.hook_name for d in dicts} == set(run.hooks)
    assert sorted(d.l1_coefficient for d in dicts if d.architecture == "relu") == [0.001, 0.001, 0.01, 0.01]
    assert run.data.context_size == 16


def test_overrides_set_nested_and_list_keys(tmp_path, tiny_model_dir, tiny_text_file):
    path = write(tmp_path, BASE, tiny_model_dir, tiny_text_file)
    run, dicts = load_run_config(path, ["train.batch_size=128", "dictionaries.0.k=8", "hooks=[blocks.1.hook_resid_post]"])
    assert run.train.batch_size == 128
    assert {d.k for d in dicts if d.architecture == "topk"} == {8}
    assert {d.hook_name for d in dicts} == {"blocks.1.hook_resid_post"}


@pytest.mark.parametrize("override, expected", [
    ("trian_tokens=5", "trian_tokens: unknown key (did you mean: train_tokens"),
    ("train.batch_sise=5", "train.batch_sise: unknown key (did you mean: batch_size?)"),
    ("train_tokens=lots", "train_tokens: Input should be a valid integer"),
    ("dictionaries.0.kk=3", "dictionaries[0].kk: unknown key (did you mean: k"),
    ("dictionaries.0.architecture=reul", "unknown architecture 'reul' (did you mean: relu?)"),
    ("data.source=/no/such/file.txt", "data.source: Value error, no files match '/no/such/file.txt'"),
    ("harvest.dtype=float64", "harvest.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("dictionaries.0.k=-3", "dictionaries[0].k: Input should be greater than or equal to 1"),
    ("dictionaries.0.k=100", "dictionaries[0]: Value error, k=100 is more than d_sae=64 features"),
    ("dictionaries.0.d_sae=0", "dictionaries[0].d_sae: Input should be greater than or equal to 1"),
    ("dictionaries.1.lr=-1", "dictionaries[1].lr: Input should be greater than 0"),
    ("dictionaries.1.sweep={l1_coefficient: [-0.5]}", "dictionaries[1].l1_coefficient: Input should be greater than or equal to 0"),
    ("sweep={l1_coeficient: [1, 2]}", "sweep.l1_coeficient: no dictionary has this key"),
    ("model=./no/such/model", "model: Value error, model folder ./no/such/model does not exist"),
    ("dictionaries.1.resample_min_frequency=0.01", "resample_min_frequency needs resample_every_tokens"),
    ("dictionaries.0.name=../elsewhere", "dictionaries[0].name: Value error, a dictionary name must be a plain folder name"),
    ("dictionaries.0={architecture: matryoshka_batchtopk, k: 4, d_sae: 64, group_sizes: [16, 32]}",
     "dictionaries[0]: Value error, group_sizes [16, 32] sum to 48, not d_sae=64; make them sum to d_sae"),
    ("dictionaries.0={architecture: matryoshka_batchtopk, k: 4, d_sae: 64, group_sizes: [0.25, 0.5]}",
     "dictionaries[0].group_sizes: Value error, group_sizes [0.25, 0.5] as fractions of d_sae must be positive "
     "and sum to 1 (they sum to 0.75)"),
    ("dictionaries.0={architecture: matryoshka_batchtopk, k: 4, d_sae: 64}",
     "dictionaries[0].group_sizes: required key is missing"),
])
def test_bad_input_names_the_key(tmp_path, tiny_model_dir, tiny_text_file, override, expected):
    path = write(tmp_path, BASE, tiny_model_dir, tiny_text_file)
    with pytest.raises(UserError) as err:
        load_run_config(path, [override])
    assert expected in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_run_config(bad)


def test_missing_required_key(tmp_path, tiny_model_dir, tiny_text_file):
    text = BASE.replace("train_tokens: 2048\n", "")
    with pytest.raises(ConfigError, match="train_tokens: required key is missing"):
        load_run_config(write(tmp_path, text, tiny_model_dir, tiny_text_file))


def test_prune_must_name_a_real_dictionary(tmp_path, tiny_model_dir, tiny_text_file):
    text = BASE + "prune: {{dictionaries: [rleu], max_frequency: [0.1]}}\n"
    with pytest.raises(ConfigError, match="no dictionary named 'rleu'"):
        load_run_config(write(tmp_path, text, tiny_model_dir, tiny_text_file))


@pytest.mark.parametrize("prune, expected", [
    ("{{dictionaries: [topk-blocks.0.hook_resid_post], max_frequency: [5]}}",
     "prune.max_frequency[0]: Input should be less than or equal to 1"),
    ("{{dictionaries: [topk-blocks.0.hook_resid_post], max_frequency: [0.1], min_frequency: 0.2}}",
     "every max_frequency must exceed min_frequency=0.2"),
    ("{{dictionaries: [topk-blocks.0.hook_resid_post]}}", "give max_frequency (a list) and/or min_frequency"),
    ("{{dictionaries: [], ablation: {{dictionary: topk-blocks.0.hook_resid_post, thresholds: []}}}}",
     "prune.ablation.thresholds: List should have at least 1 item"),
])
def test_bad_prune_settings_fail_before_any_work(tmp_path, tiny_model_dir, tiny_text_file, prune, expected):
    with pytest.raises(ConfigError) as err:
        load_run_config(write(tmp_path, BASE + f"prune: {prune}\n", tiny_model_dir, tiny_text_file))
    assert expected in str(err.value), str(err.value)


def test_run_level_sweep_applies_to_the_entries_that_have_the_key(tmp_path, tiny_model_dir, tiny_text_file):
    text = BASE.replace("sweep: {{l1_coefficient: [0.001, 0.01]}}", "l1_coefficient: 0.001")
    text += "sweep: {{l1_coefficient: [0.5, 2.0]}}\n"
    run, dicts = load_run_config(write(tmp_path, text, tiny_model_dir, tiny_text_file))
    assert sorted(d.name for d in dicts if d.architecture == "topk") == [
        "topk-blocks.0.hook_resid_post", "topk-blocks.1.hook_resid_post"]
    assert sorted(d.l1_coefficient for d in dicts if d.architecture == "relu") == [0.5, 0.5, 2.0, 2.0]


def test_train_py_exits_2_with_one_line(tmp_path, tiny_model_dir, tiny_text_file):
    path = write(tmp_path, BASE, tiny_model_dir, tiny_text_file)
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(path), "trian_tokens=1"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean: train_tokens" in lines[0], proc.stderr


def test_sweep_names_match_the_trainers_names(tmp_path, tiny_model_dir, tiny_text_file):
    """A YAML sweep and an unnamed Python config list name a dictionary the same way, list values
    included, and every name is one plain folder."""
    from sae.dictionaries import parse_dictionary_config
    from sae.dictionaries.naming import dictionary_names
    text = BASE.replace("sweep: {{l1_coefficient: [0.001, 0.01]}}",
                        "sweep: {{adam_betas: [[0.9, 0.999], [0.8, 0.99]]}}")
    text = text.replace("hooks: [blocks.0.hook_resid_post, blocks.1.hook_resid_post]",
                        "hooks: [blocks.0.hook_resid_post]")
    run, dicts = load_run_config(write(tmp_path, text, tiny_model_dir, tiny_text_file))
    relu = [d.name for d in dicts if d.architecture == "relu"]
    assert relu == ["relu-adam_betas=0.9,0.999", "relu-adam_betas=0.8,0.99"]
    unnamed = [parse_dictionary_config(dict(architecture="relu", expansion_factor=2, adam_betas=b))
               for b in [(0.9, 0.999), (0.8, 0.99)]]
    assert dictionary_names(unnamed) == relu
