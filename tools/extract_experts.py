#!/usr/bin/env python
"""Pull one task's experts out of a trained generalist into a compact stand-alone bundle.

    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det
    python tools/extract_experts.py --task det --checkpoint runs/synthetic --out experts/det-cov99 --rule coverage --value 0.99
    python tools/extract_experts.py --task seg --checkpoint runs/synthetic --out experts/seg --rule top_n --value 3 --force

Rules: selected (every expert the task's router picked on the calibration data; verified lossless),
coverage (most used experts up to a share of selections), threshold (experts with at least that
share), top_n. Data comes from the run's config.json (override with --data-root).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_vision.cli import user_errors  # noqa: E402
from moe_vision.surgery.pipeline import extract_bundle  # noqa: E402
from moe_vision.surgery.select import RULES  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True)
    ap.add_argument("--checkpoint", required=True, type=Path, help="training run directory or model .safetensors")
    ap.add_argument("--out", required=True, type=Path, help="bundle folder to write (e.g. experts/det)")
    ap.add_argument("--rule", default="selected", choices=RULES)
    ap.add_argument("--value", type=float, default=None, help="threshold / coverage fraction / n for top_n")
    ap.add_argument("--calibration-split", default="val", help="split whose routing decides the experts")
    ap.add_argument("--eval-split", default="val", help="split on which both models' metrics are reported")
    ap.add_argument("--data-root", default=None, help="override data.root of the run's config")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-batches", type=int, default=None)
    ap.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    args = ap.parse_args()
    with user_errors():
        if args.rule != "selected" and args.value is None:
            raise ValueError(f"--rule {args.rule} needs --value")
        info = extract_bundle(args.checkpoint, args.task, args.out, args.rule, args.value, args.data_root,
                              args.calibration_split, args.eval_split, args.batch_size, args.max_batches, args.force)
    print(f"\nbundle {args.out} for task '{info['task']}' (rule {args.rule}"
          + (f"={args.value}" if args.value is not None else "") + ")")
    for layer, kept in info["kept_experts"].items():
        print(f"  {layer:<16} kept {len(kept)}/{info['num_experts'][layer]} experts {kept}")
    p, f, t = info["params"], info["flops_per_image"], info["latency_ms"]
    print(f"  parameters   {p['full'] / 1e6:.2f}M -> {p['bundle'] / 1e6:.2f}M ({p['bundle'] / p['full']:.0%})")
    print(f"  GFLOPs/image {f['full'] / 1e9:.3f} -> {f['bundle'] / 1e9:.3f}")
    print(f"  latency      {t['full']:.1f} ms -> {t['bundle']:.1f} ms per image")
    for m, v in info["metrics"]["full"].items():
        print(f"  {m:<12} {v:.4f} -> {info['metrics']['bundle'][m]:.4f}")
    if info["lossless_check"] is not None:
        print("  lossless check: " + ("outputs bit-identical to the full model" if info["lossless_check"]["identical"]
                                      else f"outputs differ (max |diff| {info['lossless_check']['max_abs_diff']:.3g})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
