"""python -m sae.convert SRC DST --to saelens|ours

Convert a dictionary (or a run folder of them) between formats. SRC is anything `sae.load`
reads: our format, SAELens's, dictionary_learning's (ae.pt + config.json) or sparsify's.

    python -m sae.convert runs/demo/topk runs/demo/topk_saelens --to saelens
    python -m sae.convert path/to/dictionary_learning/ae_folder my_dict --to ours

--to saelens writes cfg.json + sae_weights.safetensors (+ sparsity.safetensors from the
folder's frequency.safetensors when it has one); --to ours writes cfg.json + sae.safetensors
(+ frequency.safetensors from a SAELens sparsity.safetensors). A run folder gives one output
folder per dictionary under DST. Every conversion is checked before it is reported: the written
folder is loaded back and must encode and decode random inputs exactly like the source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sae import io
from sae.errors import UserError, cli_errors

TARGETS = ("saelens", "ours")
FREQUENCY_FILE = "frequency.safetensors"  # what the evaluator writes next to a dictionary


def _frequency_of(src: Path, d_sae: int) -> torch.Tensor | None:
    """The source folder's feature frequencies: ours (frequency.safetensors) or SAELens's
    (sparsity.safetensors, log10 density); None when it has neither."""
    from sae.formats import saelens

    if (src / FREQUENCY_FILE).is_file():
        freq = io.load_tensors(src / FREQUENCY_FILE).get("frequency")
    else:
        log_density = saelens.read_sparsity(src)
        freq = saelens.log10_density_to_frequency(log_density) if log_density is not None else None
    return freq if freq is not None and freq.numel() == d_sae else None


@torch.no_grad()
def check_same_outputs(a, b, n: int = 256, seed: int = 0) -> None:
    """Raise unless dictionaries a and b encode and decode the same random inputs identically
    (up to float rounding where a conversion folded a convention into the weights)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, a.d_in, generator=g) * (a.W_dec.float().norm(dim=1).mean() + 1.0) + a.b_dec.float().cpu()
    xa, xb = x.to(a.W_enc), x.to(b.W_enc)
    fa, fb = a.encode(xa).float().cpu(), b.encode(xb).float().cpu()
    ya, yb = a.decode(a.encode(xa)).float().cpu(), b.decode(b.encode(xb)).float().cpu()
    tol = dict(rtol=1e-5, atol=1e-5) if a.W_enc.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    if fa.shape != fb.shape or not torch.allclose(fa, fb, **tol) or not torch.allclose(ya, yb, **tol):
        diff = (fa - fb).abs().max().item() if fa.shape == fb.shape else float("nan")
        raise UserError(f"the converted dictionary does not reproduce the source (max |Δf| = {diff:.3g}); "
                        f"please report this")


def convert_one(d, src: Path, dst: Path, to: str) -> Path:
    """Write one loaded dictionary `d` (read from folder `src`) to folder `dst` in format `to`."""
    from sae.formats import saelens
    from sae.loading import load

    frequency = _frequency_of(src, d.d_sae)
    if to == "saelens":
        saelens.export(d, dst, frequency=frequency)
    else:
        d.save(dst)
        if frequency is not None:
            io.save_tensors(dst / FREQUENCY_FILE, {"frequency": frequency.float()},
                            metadata={"source": f"converted from {src}"})
    check_same_outputs(d, load(dst, format="saelens" if to == "saelens" else "ours"))
    return dst


def convert(src: str | Path, dst: str | Path, to: str, force: bool = False) -> list[Path]:
    """Convert a dictionary folder (or a run folder of them) to `to` ("saelens" or "ours");
    returns the folders written."""
    from sae.loading import _dictionary_dirs, load

    if to not in TARGETS:
        raise UserError(f"--to {to!r}: use one of {', '.join(TARGETS)}")
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UserError(f"{dst} exists and is not empty; choose a new folder or pass --force")
    if src.resolve() == dst.resolve():
        raise UserError("SRC and DST are the same folder")
    loaded = load(src)
    if not isinstance(loaded, dict):
        return [convert_one(loaded, src if src.is_dir() else src.parent, dst, to)]
    folders = {name: folder for name, folder, _ in _dictionary_dirs(src)}
    return [convert_one(d, folders[name], dst / name, to) for name, d in loaded.items()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sae.convert", description=(
        "Convert a dictionary folder (ours, SAELens, dictionary_learning or sparsify) or a run folder of "
        "them to SAELens's format or ours; the result is checked to give identical outputs."))
    p.add_argument("src", metavar="SRC", help="dictionary folder (any format sae.load reads) or a run folder")
    p.add_argument("dst", metavar="DST", help="output folder (a run gives one sub-folder per dictionary)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--force", action="store_true", help="write into DST even if it is not empty")
    args = p.parse_args(argv)
    with cli_errors("python -m sae.convert"):
        for folder in convert(args.src, args.dst, args.to, force=args.force):
            print(f"wrote {folder} ({args.to}; outputs checked against {args.src})")


if __name__ == "__main__":
    main(sys.argv[1:])
