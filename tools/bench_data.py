#!/usr/bin/env python
"""Is the data pipeline fast enough for the GPU? Loader images/s per worker for each task of an
experiment, on real-size JPEG fixtures it generates (500x375 .. 800x600; RGB, grayscale, CMYK,
EXIF-rotated; ImageNet / COCO / ADE20K / NYU layouts), next to the images/s a GPU step consumes,
computed from the step's FLOPs; plus memory per GPU and time per epoch.

    python tools/bench_data.py                                   # experiment=real, 1 GPU
    python tools/bench_data.py --experiment real_base --gpus 8 --json bench_data.json
    python tools/bench_data.py --images 32 --workers 2 tasks.det.img_size=800   # Hydra overrides last

The GPU side is computed, not measured: train FLOPs per image / (--peak-tflops x --mfu); the
default peak is an H100 SXM's dense bf16 (989 TFLOP/s) at 35% utilisation.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.bench.data import data_report, format_report
from moe_vision.io_utils import atomic_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default="real", help="configs/experiment/<name>.yaml (default: real)")
    ap.add_argument("--images", type=int, default=48, help="images timed per task and decoder")
    ap.add_argument("--workers", type=int, default=2, help="worker processes for the pooled rate")
    ap.add_argument("--gpus", type=int, default=1, help="data-parallel GPUs the global batches are split over")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--mfu", type=float, default=0.35, help="assumed share of the peak a training step reaches")
    ap.add_argument("--fixtures", type=Path, default=None, help="where to write the fixtures (default: a temp dir)")
    ap.add_argument("--no-cost", action="store_true", help="loader rates only (skip the FLOP and memory count)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment, e.g. tasks.det.img_size=800")
    args = ap.parse_args()
    with user_errors():
        for name in ("images", "gpus"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
        if args.workers < 0 or not 0 < args.mfu <= 1:
            raise ValueError("--workers must be >= 0 and --mfu in (0, 1]")
        with tempfile.TemporaryDirectory() as tmp:
            report = data_report(args.experiment, args.overrides, args.fixtures or Path(tmp) / "fixtures",
                                 images=args.images, workers=args.workers, gpus=args.gpus,
                                 peak_tflops=args.peak_tflops, mfu=args.mfu, cost=not args.no_cost)
        print(format_report(report))
        if args.json:
            with atomic_path(args.json) as out:
                out.write_text(json.dumps(report, indent=2))
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
