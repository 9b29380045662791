"""A shared progress bar for long token-counting loops (harvesting, training, evaluation).

    with token_bar(total=n_tokens, desc="harvest") as bar:
        for batch in ...:
            ...
            bar.update(batch.numel())

The bar counts tokens and shows tokens/s and the ETA (tqdm with SI-scaled units). On a terminal it
redraws a few times a second; when stderr is not a terminal (CI logs, `nohup`), it prints a plain
line at most every `log_interval` seconds instead of spamming carriage returns.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def token_bar(total: int | None, desc: str = "tokens", *, initial: int = 0, enabled: bool = True,
              unit: str = "tok", log_interval: float = 30.0, leave: bool = True) -> tqdm:
    """A tqdm bar over `total` tokens starting at `initial` (e.g. when resuming).

    `enabled=False` returns a silent bar (same API, prints nothing)."""
    tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        unit_scale=True,
        unit_divisor=1000,
        dynamic_ncols=True,
        smoothing=0.1,
        mininterval=0.2 if tty else log_interval,
        leave=leave,
        disable=not enabled,
        file=sys.stderr,
    )
