#!/usr/bin/env python
"""Predict with a bundle (or a full model) on image files and folders, into standard result files.

    python tools/predict.py --bundle experts/det data/synthetic/det/val --out preds \\
        --coco-ann data/synthetic/det/annotations/instances_val.json         # COCO results JSON
    python tools/predict.py --bundle experts/seg data/synthetic/seg/images/validation --out preds
    python tools/predict.py --checkpoint runs/synthetic --task cls img1.png img2.png --pictures

Inputs are image files or folders (searched recursively), run in batches (--batch-size) with a
progress bar. Written under --out: det <task>_results.json (COCO results: image ids from
--coco-ann, else file names; boxes XYWH in each image's pixels), seg annotations/<name>.png
(ADE20K layout label maps; --label-offset 1 for ADE20K's reduce-zero-label convention), depth
depth/<name>.png (16-bit, millimetres), cls <task>_predictions.json (top-5). A file that cannot
be decoded, or that is larger than --max-megapixels (checked before decoding, as tools/serve.py
does), is skipped with a warning naming it; if none can be read, one error line. Existing results are refused unless --force.
--pictures also writes a JSON and an overlay picture per image.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moe_vision.cli import user_errors
from moe_vision.data.readers import DEFAULT_MAX_PIXELS
from moe_vision.engine.builders import load_generalist
from moe_vision.surgery.bundle import bundle_task, load_bundle
from moe_vision.inference.predict import image_files, predict_folder, predict_image


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path)
    src.add_argument("--checkpoint", type=Path, help="run directory or model .safetensors")
    ap.add_argument("--parent", type=Path, default=None,
                    help="with --bundle: refuse unless the bundle was extracted from this checkpoint (sha256)")
    ap.add_argument("--task", default=None, help="task to run (default: the bundle's task; a bundle of several needs it)")
    ap.add_argument("--out", type=Path, default=Path("predictions"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--coco-ann", type=Path, default=None,
                    help="det: COCO annotation file of the input split (image and category ids come from it)")
    ap.add_argument("--label-offset", type=int, default=0, help="seg: added to every label in the PNGs")
    ap.add_argument("--force", action="store_true", help="replace existing results under --out")
    ap.add_argument("--pictures", action="store_true", help="also a JSON and an overlay picture per image")
    ap.add_argument("--score-threshold", type=float, default=0.3, help="--pictures: detections below this are not drawn")
    ap.add_argument("--classes", type=Path, default=None, help="optional JSON list of class names (pictures)")
    ap.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6,
                    help="larger images are skipped before decoding (default %(default)g, as tools/serve.py)")
    ap.add_argument("inputs", nargs="+", type=Path, help="image files and/or folders")
    args = ap.parse_args()
    with user_errors():
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.bundle:
            model = load_bundle(args.bundle, parent_checkpoint=args.parent)
            task = bundle_task(model.bundle_info, args.task)
        else:
            model = load_generalist(args.checkpoint)[0]
            task = args.task or (model.tasks[0] if len(model.tasks) == 1 else None)
            if task is None:
                raise ValueError(f"--task is required; the model knows tasks {model.tasks}")
        model.spec(task)
        paths = image_files(args.inputs)
        max_pixels = int(args.max_megapixels * 1e6)
        summary = predict_folder(model, task, paths, args.out, args.batch_size, args.coco_ann, args.label_offset,
                                 args.force, max_pixels=max_pixels)
        print(f"{summary['images']} images -> {summary['written']}"
              + (f" ({summary['detections']} detections)" if summary["detections"] is not None else "")
              + (f"; skipped {len(summary['skipped'])} unreadable: {', '.join(summary['skipped'])}"
                 if summary["skipped"] else ""))
        if args.pictures:
            names = json.loads(args.classes.read_text()) if args.classes else None
            skipped = set(summary["skipped"])
            for image in (p for p in paths if str(p) not in skipped):
                result, picture = predict_image(model, task, image, names, args.score_threshold, max_pixels)
                (args.out / f"{image.stem}.{task}.json").write_text(json.dumps(result))
                picture.save(args.out / f"{image.stem}.{task}.png")
            print(f"pictures: {args.out}/<name>.{task}.json/.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
