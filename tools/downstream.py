#!/usr/bin/env python
"""The downstream benchmark: how the trained generalist adapts to real photographs it has not seen.

    python tools/downstream.py                                    # everything, seeds 0 and 1
    python tools/downstream.py --datasets fashion-mnist --labels 600 --seeds 0 --methods generalist_ft scratch_moe
    python tools/downstream.py --labels 60000 --datasets fashion-mnist --methods generalist_ft   # all labels

Needs make downstream-data (data/real/), make demo SEED=s (the generalist) and, for
dense_specialist_ft, make baselines SEED=s (the dense specialists). Each run is its own folder
under --runs (a finished run is read back, an interrupted one resumes); every row goes to
--json (rows of other runs already there are kept), the plot to --plot, the table to stdout.
Methods: scratch_dense scratch_moe dense_specialist_ft generalist_ft (and top1_infer, its top-1
evaluation) bundle_ft head router_head pruned top1 add_task (docs/downstream.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.downstream import ALL_METHODS, Dataset, Protocol, run_all
from moe_vision.downstream.protocol import FULL_LABELS, TASK_OF, downstream_datasets, find_parents
from moe_vision.downstream.summary import plot, table
from moe_vision.io_utils import atomic_path

ROW_KEY = ("dataset", "labels", "seed", "method", "metric")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("data/real"), help="where make downstream-data wrote")
    ap.add_argument("--datasets", nargs="+", default=list(TASK_OF), choices=list(TASK_OF))
    ap.add_argument("--labels", type=int, nargs="+", default=[600, 6000],
                    help=f"Fashion-MNIST label budgets ({FULL_LABELS}: the whole training split)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds; seed s starts from make demo SEED=s")
    ap.add_argument("--methods", nargs="+", choices=list(ALL_METHODS),
                    help="default: every method but the diagnostics (generalist_ft_fresh, scratch_head) on trees "
                         "and at 600 labels, the label-sensitive ones at larger budgets")
    ap.add_argument("--steps", type=int, help="training steps of every method (default 300)")
    ap.add_argument("--batch-size", type=int, help="images per step (default: 32 for cls, 16 for det)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--img-size", type=int,
                    help="Fashion-MNIST's input size in pixels (default 32: 4 x 4 patches of 8 px); trees keep 64")
    ap.add_argument("--parents", type=Path, default=Path("runs"), help="where the demo and baseline runs are")
    ap.add_argument("--runs", type=Path, default=Path("runs/downstream"), help="where each downstream run goes")
    ap.add_argument("--json", type=Path, default=Path("docs/results/downstream.json"))
    ap.add_argument("--plot", type=Path, default=Path("docs/results/downstream.png"))
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 4 steps at batch 4, 2 evaluation batches (figures meaningless)")
    args = ap.parse_args()
    with user_errors():
        proto = Protocol.from_flags(args.steps, args.batch_size, args.lr, args.img_size, args.quick)
        sets = downstream_datasets(args.data_root, args.datasets, args.labels)
        parents = {s: find_parents(s, args.parents) for s in args.seeds}
        rows = run_all(sets, args.methods, args.seeds, proto, parents, args.runs)
        old = json.loads(args.json.read_text()) if args.json.is_file() else []
        keys = {tuple(r[k] for k in ROW_KEY) for r in rows}
        merged = [r for r in old if tuple(r[k] for k in ROW_KEY) not in keys] + rows
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(merged, indent=1) + "\n")
        plot(merged, args.plot)
    print(table(merged, [*ALL_METHODS[:4], "top1_infer", *ALL_METHODS[4:]]))  # (top1_infer beside generalist_ft)
    print(f"rows: {args.json}; plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
