#!/usr/bin/env python
"""Mean and half-range of each metric over the seeds of one setting, one group per setting.

    python tools/summarize_runs.py scratch='runs/seg_scratch_s*' glid='runs/seg_glid_s*'
    python tools/summarize_runs.py glid=runs/seg_glid_s0 runs/seg_glid_s1 --json summary.json

A group is NAME=PATTERN: the pattern is expanded here (quote it) or by the shell (then the
further paths join the group before them). Prints a markdown table: per group, task and metric
the number of runs, mean ± half the range, every run's value and the chance level.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.engine.report import parse_run_groups, seed_summary, write_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("groups", nargs="+", help="NAME=PATTERN, then optional further run directories of that group")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows (with every run's value) here")
    args = ap.parse_args()
    with user_errors():
        table, rows = seed_summary(parse_run_groups(args.groups))
        print(table)
        if args.json:
            write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
