"""python -m sae.convert SRC DST --to saelens|dictionary_learning|sparsify|ours: a dictionary (or a
run folder of them), read by `sae.load` in any format it knows, written as SAELens's format,
dictionary_learning's (Matryoshka BatchTopK dictionaries), sparsify's (topk dictionaries,
transcoders and skip connections included) or ours.

A conversion is reported only once the written folder loads back and encodes and decodes random
inputs like the source. In a run folder, a dictionary the target cannot express is skipped with
one warning line naming its folder; the command fails (exit status 2) only when nothing converts.
Feature frequencies travel too (frequency.safetensors <-> SAELens's sparsity.safetensors;
dictionary_learning's format has no place for them).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Callable

import torch

from sae import io
from sae.errors import UserError, cli_errors
from sae.formats import dictionary_learning, saelens, sparsify
from sae.loading import detect_format, dictionary_dirs, load

TARGETS = ("saelens", "dictionary_learning", "sparsify", "ours")  # format names, as sae.load takes them
FREQUENCY_FILE = "frequency.safetensors"  # what the evaluator writes next to a dictionary


def _frequency_of(src: Path, d_sae: int) -> torch.Tensor | None:
    """The source folder's feature frequencies: ours (frequency.safetensors) or SAELens's
    (sparsity.safetensors, log10 density); None when it has neither."""
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
    x = torch.randn(n, a.d_in, generator=g) * (a.W_dec.float().norm(dim=1).mean() + 1.0)
    if not getattr(a, "is_transcoder", False):  # around an autoencoder's centre
        x = x + a.b_dec.float().cpu()
    xa, xb = x.to(a.W_enc), x.to(b.W_enc)
    fa, fb = a.encode(xa).float().cpu(), b.encode(xb).float().cpu()
    ya, yb = a(xa).float().cpu(), b(xb).float().cpu()  # with the skip path of one that has it
    tol = dict(rtol=1e-5, atol=1e-5) if a.W_enc.dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    if fa.shape != fb.shape or not torch.allclose(fa, fb, **tol) or not torch.allclose(ya, yb, **tol):
        diff = (fa - fb).abs().max().item() if fa.shape == fb.shape else float("nan")
        raise UserError(f"the converted dictionary does not reproduce the source (max |Δf| = {diff:.3g}); "
                        f"please report this")


def convert_one(d, src: Path, dst: Path, to: str) -> Path:
    """Write one loaded dictionary `d` (read from folder `src`) to folder `dst` in format `to`."""
    frequency = _frequency_of(src, d.d_sae)
    if to == "saelens":
        saelens.export(d, dst, frequency=frequency)
    elif to == "dictionary_learning":
        dictionary_learning.export(d, dst)
    elif to == "sparsify":
        sparsify.export(d, dst)
    else:
        d.save(dst)
        if frequency is not None:
            io.save_tensors(dst / FREQUENCY_FILE, {"frequency": frequency.float()},
                            metadata={"source": f"converted from {src}"})
    check_same_outputs(d, load(dst, format=to))
    return dst


def _warn(message: str) -> None:
    print(f"python -m sae.convert: warning: {message}", file=sys.stderr, flush=True)


def _convert_folder(folder: Path, fmt: str | None, dst: Path, to: str) -> Path:
    """Load one dictionary folder and convert it; a UserError names the folder. A half-written
    output folder that did not exist before is removed."""
    existed = dst.exists()
    try:
        d = load(folder, format=fmt or "auto")
        return convert_one(d, folder, dst, to)
    except UserError as e:
        if not existed and dst.exists():
            shutil.rmtree(dst, ignore_errors=True)
        raise UserError(f"{folder}: {e}") from e


def convert(src: str | Path, dst: str | Path, to: str, force: bool = False,
            warn: Callable[[str], None] | None = None) -> list[Path]:
    """Convert a dictionary folder (or a run folder of them) to `to` (one of TARGETS);
    returns the folders written.

    A run folder: each dictionary that cannot be converted (its format cannot express it, or it
    does not load) is skipped with one `warn(line)` (default: a warning line on stderr) naming its
    folder and why; a UserError only when none could be converted. A single dictionary that cannot
    be converted raises a UserError naming its folder."""
    src, dst = Path(src).expanduser(), Path(dst).expanduser()
    _check_arguments(src, dst, to, force)
    folder = src if src.is_dir() else src.parent
    fmt = detect_format(folder)
    if fmt is not None:
        return [_convert_folder(folder, fmt, dst, to)]
    return _convert_run(folder, dst, to, warn or _warn)


def _check_arguments(src: Path, dst: Path, to: str, force: bool) -> None:
    if to not in TARGETS:
        raise UserError(f"--to {to!r}: use one of {', '.join(TARGETS)}")
    if not src.exists():
        raise UserError(f"{src}: no such file or folder")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise UserError(f"{dst} exists and is not empty; choose a new folder or pass --force")
    if src.resolve() == dst.resolve():
        raise UserError("SRC and DST are the same folder")


def _convert_run(folder: Path, dst: Path, to: str, warn: Callable[[str], None]) -> list[Path]:
    """Every dictionary under a run folder, each to dst/<its name>; one that fails is skipped
    with a warning."""
    found = dictionary_dirs(folder)
    written: list[Path] = []
    skipped: list[str] = []
    for name, sub, sub_fmt in found:
        try:
            written.append(_convert_folder(sub, sub_fmt, dst / name, to))
        except UserError as e:
            skipped.append(str(e))
            warn(f"skipped {e}")
    if not written:
        raise UserError(f"none of the {len(found)} dictionaries in {folder} could be converted to {to} "
                        f"({'; '.join(skipped)})")
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sae.convert", description=(
        "Convert a dictionary folder (ours, SAELens, dictionary_learning or sparsify) or a run folder of "
        "them to SAELens's format, dictionary_learning's (Matryoshka BatchTopK) or ours; the result is checked "
        "to give identical outputs."))
    p.add_argument("src", metavar="SRC", help="dictionary folder (any format sae.load reads) or a run folder")
    p.add_argument("dst", metavar="DST", help="output folder (a run gives one sub-folder per dictionary)")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--force", action="store_true", help="write into DST even if it is not empty")
    args = p.parse_args(argv)
    with cli_errors("python -m sae.convert"):
        skipped: list[str] = []

        def warn(line: str) -> None:
            skipped.append(line)
            _warn(line)

        written = convert(args.src, args.dst, args.to, force=args.force, warn=warn)
        for folder in written:
            print(f"wrote {folder} ({args.to}; outputs checked against {args.src})")
        if skipped:
            print(f"converted {len(written)} of {len(written) + len(skipped)} dictionaries; skipped "
                  f"{len(skipped)} (warnings above)")


if __name__ == "__main__":
    main(sys.argv[1:])
