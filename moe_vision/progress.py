"""Progress bars for long work, quiet in logs."""
from __future__ import annotations

import os
import sys


def progress_bar(iterable=None, **kwargs):
    """A tqdm progress bar that, when its output is not a terminal (a log file, CI), redraws at
    most every ``MOE_VISION_PROGRESS_SECONDS`` (default 10) seconds instead of on every step."""
    from tqdm import tqdm
    stream = kwargs.get("file") or sys.stderr
    if not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", float(os.environ.get("MOE_VISION_PROGRESS_SECONDS", 10)))
        kwargs.setdefault("maxinterval", kwargs["mininterval"])
    return tqdm(iterable, **kwargs)
