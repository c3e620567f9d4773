#!/usr/bin/env python
"""Add a task to a trained generalist with new experts, training only the new parts.

    python tools/add_task.py --checkpoint runs/synthetic --task depth --data data/synthetic/depth \
        --new-experts 2 --out runs/synthetic+depth
    torchrun --nproc_per_node 2 tools/add_task.py --checkpoint runs/synthetic --task depth \
        --data data/synthetic/depth --new-experts 2 --out runs/synthetic+depth-ddp     # the same, data parallel

A task with classes (cls, det, seg) gets a head sized from its data's classes, whatever the parent's
tasks have (--num-classes for segmentation label maps, which do not name them).
Every pre-existing parameter is frozen (requires_grad=False, excluded from the optimizer); after
training the tool checks that every old task's outputs on a probe batch are bit-identical and
writes continual_report.json (old metrics before/after, new task's metric, parameter counts).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.surgery.continual_run import add_task_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, type=Path, help="training run directory")
    ap.add_argument("--task", required=True, help="name of the new task")
    ap.add_argument("--type", default=None, help="task type (cls, det, seg, depth); default: the task name")
    ap.add_argument("--data", required=True, type=Path, help="the new task's dataset folder (standard layout)")
    ap.add_argument("--num-classes", type=int, default=None,
                    help="classes of the new task (default: read from the data; needed for seg label maps)")
    ap.add_argument("--new-experts", type=int, default=2, help="experts added to every MoE layer")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the parent run's)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="new task's batch size (default: the parent run's smallest per-task batch)")
    ap.add_argument("--out", required=True, type=Path, help="new run directory")
    args = ap.parse_args()
    with user_errors():
        overrides = {"batch_size": args.batch_size} if args.batch_size else {}
        rep = add_task_run(args.checkpoint, args.task, args.data, args.out, args.new_experts, args.steps, args.type,
                           overrides, num_classes=args.num_classes)
    if rep is None:  # ranks other than 0 under torchrun
        return 0
    print(json.dumps({k: rep[k] for k in ("new_task_metrics", "old_metrics_delta", "parameters",
                                          "old_tasks_bit_identical")}, indent=2))
    print("old tasks' outputs " + ("bit-identical" if rep["old_tasks_bit_identical"] else "CHANGED") +
          f"; report in {args.out / 'continual_report.json'}")
    return 0 if rep["old_tasks_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
