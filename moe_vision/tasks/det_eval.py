"""COCO mAP of detections with pycocotools (the evaluator of :mod:`.det`)."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from torchvision.ops import box_convert

from .base import Evaluator


class CocoEvaluator(Evaluator):
    """Collects detections as a COCO results list (original image and category ids, xywh in
    original image pixels) and scores them with pycocotools against the dataset's JSON."""

    def __init__(self, ann_file: Path, category_ids: list[int], results_path: Path | None = None) -> None:
        self.ann_file, self.category_ids, self.results_path = Path(ann_file), category_ids, results_path
        self.results: list[dict] = []
        self.image_ids: list[int] = []

    def update(self, preds, targets):
        for p, t in zip(preds, targets):
            image_id = int(t["image_id"])
            self.image_ids.append(image_id)
            xywh = box_convert(p["boxes"], "xyxy", "xywh")
            for box, score, label in zip(xywh.tolist(), p["scores"].tolist(), p["labels"].tolist()):
                self.results.append({"image_id": image_id, "category_id": self.category_ids[label],
                                     "bbox": [round(v, 2) for v in box], "score": round(score, 5)})

    def compute(self) -> dict[str, float]:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
        if self.results_path is not None:
            from ..io_utils import atomic_path
            with atomic_path(self.results_path) as tmp:
                tmp.write_text(json.dumps(self.results))
        if not self.results:
            return {"mAP": 0.0, "mAP50": 0.0}
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(str(self.ann_file))
            dt = gt.loadRes(self.results)
            ev = COCOeval(gt, dt, "bbox")
            ev.params.imgIds = sorted(set(self.image_ids))
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        return {"mAP": max(0.0, float(ev.stats[0])), "mAP50": max(0.0, float(ev.stats[1]))}
