"""Model resolution: the embedded model's one-time conversion under concurrent starts."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CONVERT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import sae.models as m
    m._smollm2_gguf = lambda: Path({tmp!r}) / "model-q8.gguf"
    def fake_convert(gguf, target):  # slow, and refuses to run over a finished folder
        with open({log!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")
        time.sleep(1.0)
        tmp = target.parent / (".tmp-" + str(os.getpid()))
        tmp.mkdir()
        (tmp / "config.json").write_text("{{}}")
        os.replace(tmp, target)  # raises if another process had already put a folder there
    m._convert_gguf = fake_convert
    print(m.embedded_model_dir())
""")


def test_concurrent_first_use_converts_once(tmp_path):
    """torchrun ranks on a fresh machine all ask for the embedded model at once: one converts, the
    others wait and reuse its folder (before the lock, the slower one crashed in os.replace)."""
    log = tmp_path / "conversions.log"
    script = CONVERT.format(repo=str(REPO), tmp=str(tmp_path), log=str(log))
    env = {**os.environ, "SAE_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert len(log.read_text().split()) == 1
    folders = {out.strip() for out, _ in outs}
    assert len(folders) == 1 and (Path(folders.pop()) / "config.json").is_file()
