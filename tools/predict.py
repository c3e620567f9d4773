#!/usr/bin/env python
"""Predict on images with a bundle (or a full model) and write JSON + an overlay picture per image.

    python tools/predict.py --bundle experts/det data/synthetic/det/val/00000.png
    python tools/predict.py --checkpoint runs/synthetic --task seg --out preds/ img1.png img2.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_vision.cli import user_errors  # noqa: E402
from moe_vision.engine.builders import load_generalist  # noqa: E402
from moe_vision.surgery.bundle import load_bundle  # noqa: E402
from moe_vision.surgery.predict import predict_image  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path)
    src.add_argument("--checkpoint", type=Path, help="run directory or model .safetensors")
    ap.add_argument("--parent", type=Path, default=None,
                    help="with --bundle: refuse unless the bundle was extracted from this checkpoint (sha256)")
    ap.add_argument("--task", default=None, help="task to run (default: the bundle's task)")
    ap.add_argument("--out", type=Path, default=Path("predictions"))
    ap.add_argument("--score-threshold", type=float, default=0.3, help="detections below this are not drawn")
    ap.add_argument("--classes", type=Path, default=None, help="optional JSON list of class names")
    ap.add_argument("images", nargs="+", type=Path)
    args = ap.parse_args()
    with user_errors():
        if args.bundle:
            model = load_bundle(args.bundle, parent_checkpoint=args.parent)
            task = args.task or model.bundle_info["task"]
        else:
            model = load_generalist(args.checkpoint)[0]
            task = args.task or (model.tasks[0] if len(model.tasks) == 1 else None)
            if task is None:
                raise ValueError(f"--task is required; the model knows tasks {model.tasks}")
        names = json.loads(args.classes.read_text()) if args.classes else None
        args.out.mkdir(parents=True, exist_ok=True)
        for image in args.images:
            result, picture = predict_image(model, task, image, names, args.score_threshold)
            (args.out / f"{image.stem}.{task}.json").write_text(json.dumps(result))
            picture.save(args.out / f"{image.stem}.{task}.png")
            print(f"{image}: wrote {args.out / (image.stem + '.' + task)}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
