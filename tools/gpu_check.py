#!/usr/bin/env python
"""Every GPU figure we publish, from one command on one GPU (sized to a few minutes; not yet run on one).

    python tools/gpu_check.py                     # (make gpu-check) writes docs/results/gpu.md and gpu.json
    python tools/gpu_check.py --steps 100 --out /tmp/gpu.md
    python tools/gpu_check.py --device cpu --quick --out /tmp/gpu.md   # the same path in seconds, no GPU

Runs the CUDA test subset (pytest -m cuda), the MoE benchmark eager and compiled (cases a and c,
bf16), --steps training steps of experiment=real on generated real-size fixtures (step time,
images/s, peak memory beside the computed figures) and a profile of the steps between two log
steps (device-to-host copies and synchronisations per step).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.bench.gpu_check import ROOT, gpu_check
from moe_vision.cli import user_errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "gpu.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=200, help="training steps of experiment=real (default 200)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the path, measures nothing")
    args = ap.parse_args()
    with user_errors():
        if args.steps < 4:
            raise ValueError(f"--steps {args.steps}: at least 4 (the first quarter warms up)")
        gpu_check(args.out, args.device, args.steps, args.quick)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
