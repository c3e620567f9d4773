#!/usr/bin/env python
"""A screenshot of the serve page answering one image, taken in Debian's headless Chromium
(docs/serve.md): the image as a user would upload it, each task's answer and its routing maps.

    python tools/serve_screenshot.py runs/downstream/trees/generalist_ft-s0 data/real/trees/val/<tile>.png \\
        --out docs/serve_trees.png --min-score 0.3

Needs the serve and browser extras (pip install -e '.[serve,browser]') and apt-get install chromium
chromium-driver.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", type=Path, help="a run directory (model.safetensors) or a bundle folder (bundle.json)")
    ap.add_argument("image", type=Path, help="the image to upload")
    ap.add_argument("--out", type=Path, required=True, help="the PNG to write")
    ap.add_argument("--min-score", type=float, help="detection score threshold of the page's slider (default: its own)")
    ap.add_argument("--size", type=int, nargs=2, default=[1400, 1300], metavar=("W", "H"), help="browser window")
    args = ap.parse_args()
    with user_errors():
        if args.min_score is not None and not 0.0 <= args.min_score <= 1.0:
            raise ValueError(f"--min-score {args.min_score}: expected a value in [0, 1]")
        from moe_vision.serve.browser import screenshot
        out = screenshot(args.source, args.image, args.out, args.min_score, *args.size)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
