"""Detection, DETR-style on the shared queries: class linear (+ no-object) and box linear
(normalised cxcywh); Hungarian matching; classification + L1 + generalised IoU loss; COCO mAP by
pycocotools.

Legend: B batch, Q queries, C classes, N ground-truth boxes of one image.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou

from .base import Evaluator, Task, register_task
from .matching import hungarian_match, matched_cross_entropy


class DetHead(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.class_linear = nn.Linear(dim, num_classes + 1)
        self.box_linear = nn.Linear(dim, 4)


def _normalised_cxcywh(target: dict, image_size: tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    boxes = torch.as_tensor(target["boxes"]).float()
    scale = boxes.new_tensor([w, h, w, h])
    return box_convert(boxes / scale, "xyxy", "cxcywh")


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


@register_task
class DetectionTask(Task):
    type_name, primary_metric = "det", "mAP"
    loss_defaults = {"class": 1.0, "l1": 5.0, "giou": 2.0, "no_object": 0.1}

    def build_head(self, dim: int) -> nn.Module:
        return DetHead(dim, self.num_classes)

    def head_forward(self, head, queries_BQD, pixel_BDhw, image_size):
        return {"logits": head.class_linear(queries_BQD), "boxes": head.box_linear(queries_BQD).sigmoid(),
                "image_size": image_size}

    def match(self, logits_QC, boxes_Q4, target, image_size):
        labels = target["labels"].to(logits_QC.device)
        gt = _normalised_cxcywh(target, image_size).to(boxes_Q4.device)
        prob = logits_QC.float().softmax(-1)
        cost = (-self.w("class") * prob[:, labels] + self.w("l1") * torch.cdist(boxes_Q4.float(), gt, p=1)
                - self.w("giou") * generalized_box_iou(box_convert(boxes_Q4.float(), "cxcywh", "xyxy"),
                                                       box_convert(gt, "cxcywh", "xyxy")))
        return hungarian_match(cost), labels, gt

    def loss(self, outputs, targets):
        logits, boxes, size = outputs["logits"].float(), outputs["boxes"].float(), outputs["image_size"]
        matched, l1, giou, n_boxes = [], logits.new_zeros(()), logits.new_zeros(()), 0
        for b, t in enumerate(targets):
            (qi, ti), labels, gt = self.match(logits[b], boxes[b], t, size)
            if len(qi) == 0:
                continue
            matched.append((b, qi, labels[ti]))
            pb, gb = boxes[b, qi], gt[ti]
            l1 = l1 + F.l1_loss(pb, gb, reduction="sum")
            giou = giou + (1 - torch.diag(generalized_box_iou(box_convert(pb, "cxcywh", "xyxy"),
                                                              box_convert(gb, "cxcywh", "xyxy")))).sum()
            n_boxes += len(qi)
        ce = matched_cross_entropy(logits, matched, self.w("no_object"))
        n = max(1, n_boxes)
        l1, giou = l1 / n, giou / n
        total = self.w("class") * ce + self.w("l1") * l1 + self.w("giou") * giou
        return {"loss": total, "ce": ce, "l1": l1, "giou": giou}

    def postprocess(self, outputs, targets, max_detections: int = 100):
        """Top-scoring (query, class) pairs per image, boxes in original image pixels (XYXY)."""
        prob = outputs["logits"].float().softmax(-1)[..., :-1]  # [B, Q, C]
        boxes = box_convert(outputs["boxes"].float(), "cxcywh", "xyxy")
        preds = []
        for b, t in enumerate(targets):
            h, w = [int(v) for v in t["orig_size"]]
            scores, flat = prob[b].flatten().topk(min(max_detections, prob[b].numel()))
            q, c = flat // prob.shape[-1], flat % prob.shape[-1]
            xyxy = boxes[b, q] * boxes.new_tensor([w, h, w, h])
            preds.append({"boxes": xyxy.detach().cpu(), "scores": scores.detach().cpu(), "labels": c.cpu()})
        return preds

    def evaluator(self, dataset, results_path: Path | None = None) -> Evaluator:
        return CocoEvaluator(dataset.ann_file, dataset.category_ids, results_path)

    def chance_predictions(self, dataset, targets):
        # One whole-image box of the most frequent class per image.
        counts = torch.bincount(torch.tensor([r[4] for rows in dataset.targets for r in rows], dtype=torch.long),
                                minlength=self.num_classes)
        label = int(counts.argmax())
        out = []
        for t in targets:
            h, w = [int(v) for v in t["orig_size"]]
            out.append({"boxes": torch.tensor([[0.0, 0.0, w, h]]), "scores": torch.tensor([1.0]),
                        "labels": torch.tensor([label])})
        return out
