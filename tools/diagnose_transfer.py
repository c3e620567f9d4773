#!/usr/bin/env python
"""Where the tasks of a trained generalist help or fight each other.

    python tools/diagnose_transfer.py runs/synthetic
    python tools/diagnose_transfer.py runs/synthetic --dense runs/dense_cls runs/dense_det runs/dense_seg
    python tools/diagnose_transfer.py runs/synthetic --batches 8 --out reports/transfer

Per shared parameter group (patch stem, attention, experts, non-expert MLPs, pixel decoder,
queries, query decoder): each task's gradient norm and the cosine between every two tasks'
gradients on a few fixed training batches (negative: one task's update undoes part of the
other's). Per task and MoE layer: how concentrated its routing is and the mean combine weight of
each of its k choices. With --dense (single-task runs of tools/train.py, matched by task): each
task's training loss beside its dense run's. Prints a table and the findings; writes
transfer.json and transfer_curves.png into the run directory (or --out).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.transfer import diagnose_run, format_report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="training run directory of a generalist (tools/train.py)")
    ap.add_argument("--dense", nargs="*", default=[], type=Path, help="dense single-task run directories")
    ap.add_argument("--batches", type=int, default=4, help="training batches per task (default 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the smallest training batch size of the run")
    ap.add_argument("--out", type=Path, default=None, help="folder for transfer.json / transfer_curves.png")
    args = ap.parse_args()
    with user_errors():
        if args.batches < 1:
            raise ValueError(f"--batches {args.batches}: expected at least 1")
        report, out = diagnose_run(args.run, args.dense, args.batches, args.batch_size, args.out)
    print(format_report(report))
    print(f"\nwritten: {out / 'transfer.json'}" + (f", {out / 'transfer_curves.png'}" if report["curves"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
