"""User-facing errors: one clear line that names the culprit and what to do.

Raise `UserError` (or a subclass) for anything caused by input the user controls (a config
key, a path, a cache, a hook name). Command-line entry points catch it with `cli_errors()`,
print the one line and exit with status 2 instead of a traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
from typing import Iterable, Iterator


class UserError(Exception):
    """An error in user input; its message is shown as-is on one line."""


class ConfigError(UserError):
    pass


class CacheError(UserError):
    pass


class HookError(UserError):
    pass


class TrainingDiverged(UserError):
    pass


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """' (did you mean: a, b?)' or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.6)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


@contextlib.contextmanager
def cli_errors(prog: str) -> Iterator[None]:
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; everything already written is kept", file=sys.stderr)
        sys.exit(130)
