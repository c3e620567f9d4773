#!/usr/bin/env python
"""Fine-tune an expert bundle on a new dataset of the same task, training only part of it.

    python tools/finetune.py --bundle experts/det --data /datasets/my_coco --out runs/det-ft
    python tools/finetune.py --bundle experts/seg --data data/synthetic/seg --trainable router+head --steps 100 --out runs/seg-ft

--trainable: head (GLID's recipe: only the topmost linear layer), router+head, experts+head, all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.surgery.finetune import TRAINABLE, finetune_bundle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path, help="dataset folder in the task's standard layout")
    ap.add_argument("--trainable", default="head", choices=TRAINABLE)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", required=True, type=Path, help="run directory for the fine-tuned model")
    ap.add_argument("--task", default=None, help="the task to fine-tune (a bundle of several tasks needs it)")
    args = ap.parse_args()
    with user_errors():
        rep = finetune_bundle(args.bundle, args.data, args.out, args.trainable, args.steps, args.lr, args.batch_size,
                              task=args.task)
    if rep is not None:  # None on ranks other than 0 under torchrun
        print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
