#!/usr/bin/env python
"""Fine-tune an expert bundle on a new dataset of the same task, training only part of it.

    python tools/finetune.py --bundle experts/det --data /datasets/my_coco --out runs/det-ft
    python tools/finetune.py --bundle experts/seg --data data/synthetic/seg --trainable router+head --steps 100 --out runs/seg-ft
    python tools/finetune.py --bundle experts/cls --data data/real/fashion-mnist-600 --new-head --trainable all --out runs/fm-ft

--trainable: head (GLID's recipe: only the topmost linear layer), router+head, stem+head (the patch stem and
position embedding too), experts+head, all.
--new-head: a dataset with its own label space gets a new head sized from its classes (their names
are kept in the run's config.json); without it the data's classes must match the bundle's head.
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
    ap.add_argument("--new-head", action="store_true",
                    help="replace the task's head with a new one sized from the data's classes")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="with --new-head: the number of classes, for data that does not name them (seg label maps)")
    args = ap.parse_args()
    with user_errors():
        rep = finetune_bundle(args.bundle, args.data, args.out, args.trainable, args.steps, args.lr, args.batch_size,
                              task=args.task, new_head=args.new_head, num_classes=args.num_classes)
    if rep is not None:  # None on ranks other than 0 under torchrun
        print(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
