"""Our transcoder exports read by the real peers, in their own environments (benchmarks/.venvs/<peer>,
made by `python benchmarks/quality.py --setup-peers`): SAELens 6 loads our `--to saelens` skip
transcoder and sparsify our `--to sparsify` one, and both compute our outputs on the same inputs.
Each test skips when its environment is absent."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest
import torch

from sae import io
from sae.convert import convert
from sae.dictionaries import get_architecture

REPO = Path(__file__).resolve().parents[1]
VENVS = REPO / "benchmarks" / ".venvs"
IN_HOOK, OUT_HOOK = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"

SAELENS_SCRIPT = textwrap.dedent("""
    import sys
    from safetensors.torch import load_file, save_file
    from sae_lens import SAE
    folder, data = sys.argv[1], sys.argv[2]
    sae = SAE.load_from_disk(folder, device="cpu")
    x = load_file(data)["x"]
    out = sae(x)
    out = out[0] if isinstance(out, tuple) else out
    save_file({"y": out.detach().contiguous(), "f": sae.encode(x).detach().contiguous()}, data + ".out")
    print(type(sae).__name__, sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_name_out)
""")

SPARSIFY_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from sparsify import SparseCoder
    folder, data = sys.argv[1], sys.argv[2]
    coder = SparseCoder.load_from_disk(folder, device="cpu")
    x = load_file(data)["x"]
    with torch.no_grad():
        out = coder(x)
    save_file({"y": out.sae_out.float().contiguous()}, data + ".out")
    print(type(coder).__name__, coder.cfg.transcode, coder.cfg.skip_connection)
""")


def _peer(name: str, module: str) -> Path:
    python = VENVS / name / "bin" / "python"
    if not python.is_file() or subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode:
        pytest.skip(f"{name} is not installed (python benchmarks/quality.py --setup-peers makes "
                    f"benchmarks/.venvs/{name})")
    return python


def _transcoder(arch: str, d_in: int, d_out: int, **hyper):
    cls = get_architecture(arch)
    cfg = cls.Config(architecture=arch, d_sae=48, input_hook=IN_HOOK, hook_name=OUT_HOOK, skip_connection=True,
                     **hyper)
    d = cls(cfg, d_in, metadata={"hook_name": OUT_HOOK, "model_name": "gpt2", "context_size": 16}, d_out=d_out)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in d.weights().values():
            t.copy_(torch.randn(t.shape, generator=g) / t.shape[0] ** 0.5)
        d.input_scale.fill_(2.0)
        d.output_scale.fill_(0.5)
    return d.eval()


def _run_peer(python: Path, script: str, folder: Path, x: torch.Tensor,
              tmp_path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The peer's outputs on x, and what it printed."""
    (tmp_path / "peer.py").write_text(script)
    data = tmp_path / "x.safetensors"
    io.save_tensors(data, {"x": x})
    proc = subprocess.run([str(python), str(tmp_path / "peer.py"), str(folder), str(data)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return io.load_tensors(Path(str(data) + ".out")), proc.stdout.strip().splitlines()[-1]  # (after any warnings)


def test_saelens_loads_our_skip_transcoder_with_our_outputs(tmp_path):
    python = _peer("sae-lens", "sae_lens")
    d = _transcoder("relu", 32, 24)
    d.save(tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "sl", to="saelens")
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)) * 3
    out, said = _run_peer(python, SAELENS_SCRIPT, tmp_path / "sl", x, tmp_path)
    assert said.split() == ["SkipTranscoder", IN_HOOK, OUT_HOOK]
    with torch.no_grad():
        torch.testing.assert_close(out["y"], d(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out["f"], d.encode(x), rtol=1e-4, atol=1e-4)


def test_sparsify_loads_our_skip_transcoder_with_our_outputs(tmp_path):
    python = _peer("eai-sparsify", "sparsify")
    d = _transcoder("topk", 32, 32, k=6)
    d.save(tmp_path / "ours")
    convert(tmp_path / "ours", tmp_path / "sp", to="sparsify")
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1)) * 3
    out, said = _run_peer(python, SPARSIFY_SCRIPT, tmp_path / "sp", x, tmp_path)
    assert said.split() == ["SparseCoder", "True", "True"]
    with torch.no_grad():
        torch.testing.assert_close(out["y"], d(x), rtol=1e-4, atol=1e-4)
