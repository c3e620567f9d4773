#!/usr/bin/env python
"""Compare the multi-task MoE run with single-task dense baselines, per task.

    python tools/compare.py runs/synthetic runs/dense_cls runs/dense_det runs/dense_seg      # after make demo, make baselines
    python tools/compare.py runs/synthetic runs/dense_* --json comparison.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.report import comparison_table, load_run_metrics, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("multi", type=Path, help="run directory of the multi-task model")
    ap.add_argument("singles", type=Path, nargs="+", help="run directories of single-task baselines")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    with user_errors():
        multi, chance = load_run_metrics(args.multi)
        singles = {}
        for run in args.singles:
            metrics, _ = load_run_metrics(run)
            if len(metrics) != 1:
                raise ValueError(f"{run} holds {len(metrics)} tasks {sorted(metrics)}; expected a single-task run")
            singles.update(metrics)
        table, rows = comparison_table(multi, singles, chance)
        print(table)
        if args.json:
            write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
