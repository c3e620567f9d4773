#!/usr/bin/env python
"""Generate the built-in synthetic heterogeneous benchmark (deterministic from the seed).

    python tools/make_synthetic.py                       # data/synthetic, default sizes
    python tools/make_synthetic.py --out /tmp/syn --seed 1 --scale 0.1 --force
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_vision.cli import user_errors  # noqa: E402
from moe_vision.data.synthetic import SyntheticConfig, generate, is_complete  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/synthetic"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every split's image count")
    ap.add_argument("--force", action="store_true", help="regenerate even if a complete benchmark is there")
    args = ap.parse_args()
    with user_errors():
        if args.scale <= 0 or args.img_size < 16:
            raise ValueError(f"--scale must be > 0 and --img-size >= 16, got {args.scale}, {args.img_size}")
        cfg = SyntheticConfig(seed=args.seed, img_size=args.img_size)
        cfg.splits = {t: {s: max(1, round(n * args.scale)) for s, n in sp.items()} for t, sp in cfg.splits.items()}
        if is_complete(args.out) and not args.force:
            print(f"{args.out} already holds a complete benchmark (use --force to regenerate)")
            return 0
        generate(args.out, cfg, force=args.force, progress=lambda m: print(f"  {m}", flush=True))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
