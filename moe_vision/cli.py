"""Shared behaviour of the command-line tools: user errors become one line, not a traceback."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

# Errors that mean "the input was wrong" (a path, a field, a value); anything else is a bug
# and keeps its traceback.
class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, MissingExtra)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` and exit with status 2 on a user error.

    Set ``MOE_VISION_TRACEBACK=1`` to see the full traceback instead.
    """
    try:
        yield
    except USER_ERRORS as e:
        if os.environ.get("MOE_VISION_TRACEBACK"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar that, when its output is not a terminal (a log file, CI), redraws at
    most every ``MOE_VISION_PROGRESS_SECONDS`` (default 10) seconds instead of on every step."""
    from tqdm import tqdm
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", float(os.environ.get("MOE_VISION_PROGRESS_SECONDS", 10)))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
    return tqdm(iterable, **kwargs)
