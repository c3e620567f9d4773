#!/usr/bin/env python
"""Compare the multi-task MoE run with single-task dense baselines, per task.

    python tools/compare.py runs/synthetic runs/dense_cls runs/dense_det runs/dense_seg      # after make demo, make baselines
    python tools/compare.py runs/synthetic runs/dense_* --json comparison.json

Several baseline runs of one task (a learning-rate sweep, as `make baselines` trains) are a
sweep: the best of them on its evaluation split (cls top1, det mAP, seg mIoU, depth rmse) is the
baseline, and the sweep is printed. --link-best points runs/dense_<task> (beside the runs) at it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.report import (best_single_task_runs, comparison_table, format_metric, load_run_metrics,
                                     write_json)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("multi", type=Path, help="run directory of the multi-task model")
    ap.add_argument("singles", type=Path, nargs="+", help="run directories of single-task baselines")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--link-best", action="store_true", help="point <runs>/dense_<task> at each task's best run")
    args = ap.parse_args()
    with user_errors():
        multi, chance = load_run_metrics(args.multi)
        best = best_single_task_runs(args.singles)
        for task, b in best.items():
            if len(b["sweep"]) > 1:
                values = ", ".join(f"lr {'?' if lr is None else f'{lr:g}'}: {format_metric(b['metric'], v)}"
                                   for _, lr, v in b["sweep"])
                print(f"{task}: best of {len(b['sweep'])} runs by {b['metric']} ({values}): {b['run']}")
            if args.link_best:
                link = b["run"].parent / f"dense_{task}"
                if link.exists() and not link.is_symlink():
                    print(f"{link} is a folder of its own, left as it is")
                    continue
                tmp = link.with_name(link.name + ".tmp")
                tmp.unlink(missing_ok=True)
                os.symlink(b["run"].name, tmp)
                os.replace(tmp, link)
        table, rows = comparison_table(multi, {t: b["metrics"] for t, b in best.items()}, chance)
        print(table)
        if args.json:
            write_json(args.json, {"rows": rows, "baselines": {t: {"run": str(b["run"]), "lr": b["lr"],
                                                                   "sweep": b["sweep"]} for t, b in best.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
