#!/usr/bin/env python
"""Generate the built-in synthetic heterogeneous benchmark (deterministic from the seed).

    python tools/make_synthetic.py                       # data/synthetic, default sizes
    python tools/make_synthetic.py --out /tmp/syn --seed 1 --scale 0.1 --force
    python tools/make_synthetic.py --unlabelled 40000    # data/synthetic_unlabelled/unlabelled/{train,val}
                                                         # (images only, for tools/pretrain.py)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.data.synthetic import SyntheticConfig, generate, is_complete


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None,
                    help="output folder (default data/synthetic, or data/synthetic_unlabelled with --unlabelled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every split's image count")
    ap.add_argument("--unlabelled", type=int, default=0, metavar="N",
                    help="write only an unlabelled pre-training split of N training images (plus N/20, "
                         "at least 256, validation images), drawn apart from the benchmark's images")
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete benchmark is there")
    args = ap.parse_args()
    with user_errors():
        if args.scale <= 0 or args.img_size < 16 or args.unlabelled < 0:
            raise ValueError(f"--scale must be > 0, --img-size >= 16 and --unlabelled >= 0, got {args.scale}, "
                             f"{args.img_size}, {args.unlabelled}")
        cfg = SyntheticConfig(seed=args.seed, img_size=args.img_size)
        if args.unlabelled:
            cfg.splits = {"unlabelled": {"train": args.unlabelled, "val": max(256, args.unlabelled // 20)}}
        out = args.out or Path("data/synthetic_unlabelled" if args.unlabelled else "data/synthetic")
        cfg.splits = {t: {s: max(1, round(n * args.scale)) for s, n in sp.items()} for t, sp in cfg.splits.items()}
        if is_complete(out) and not args.force:
            print(f"{out} already holds a complete benchmark (use --force to regenerate)")
            return 0
        generate(out, cfg, force=args.force, progress=lambda m: print(f"  {m}", flush=True))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
