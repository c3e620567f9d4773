"""Behaviour shared by the command-line tools: user errors become one line, not a traceback."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from .errors import USER_ERRORS


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ``error: <message>`` and exit with status 2 on a user error (:data:`USER_ERRORS`).

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
