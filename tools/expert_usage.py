#!/usr/bin/env python
"""Per layer and task, how often each expert is selected (and its mean gate weight).

    python tools/expert_usage.py --checkpoint runs/synthetic                 # validation split
    python tools/expert_usage.py --checkpoint runs/synthetic --split train --max-batches 10 --out usage/

Writes expert_usage.json and expert_usage.png (tasks x experts heatmap per layer) and prints one
line per layer.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.report import usage_summary
from moe_vision.surgery.pipeline import run_usage


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="training run directory")
    ap.add_argument("--split", default="val", help="calibration split (val or train)")
    ap.add_argument("--out", type=Path, default=None, help="where to write (default: the run directory)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batches", type=int, default=None)
    args = ap.parse_args()
    with user_errors():
        usage, out = run_usage(args.checkpoint, args.split, args.out, args.batch_size, args.max_batches)
    for line in usage_summary(usage):
        print(line)
    print(f"wrote {out / 'expert_usage.json'} and {out / 'expert_usage.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
