"""Monocular depth: log-depth from a linear layer, either per pixel on the pixel decoder's features
(``mode=pixels``, the default) or, GLID's query-to-answer (``mode=queries``), on the query
decoder's answer to one mask query per grid cell (the question masked image modelling
pre-trains), each answer giving its cell's pixels. Trained with the scale-invariant log loss;
RMSE, AbsRel and delta<1.25 over all valid pixels."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..decoder.position_queries import CellHead, check_mask_query
from .base import Evaluator, Task, pixel_features, register_task, target_size, to_image

DEPTH_MODES = ("pixels", "queries")


class DepthEvaluator(Evaluator):
    def __init__(self) -> None:
        self.sq = self.absrel = self.delta1 = 0.0
        self.count = 0

    def update(self, preds, targets):
        for p, t in zip(preds, targets):
            gt = torch.as_tensor(t["depth"]).float()
            valid = gt > 0
            p, g = p.float()[valid].clamp(min=1e-3), gt[valid]
            self.sq += float(((p - g) ** 2).sum())
            self.absrel += float(((p - g).abs() / g).sum())
            self.delta1 += float((torch.maximum(p / g, g / p) < 1.25).sum())
            self.count += int(valid.sum())

    def compute(self) -> dict[str, float]:
        n = max(1, self.count)
        return {"rmse": (self.sq / n) ** 0.5, "absrel": self.absrel / n, "delta1": self.delta1 / n}


@register_task
class DepthTask(Task):
    """Options: ``mode`` (``pixels`` | ``queries``), ``query_stride`` (queries: the cell size in
    pixels), ``silog_lambda``."""

    type_name, primary_metric = "depth", "delta1"

    @property
    def mode(self) -> str:
        return self.options.get("mode", "pixels")

    def build_head(self, dim: int) -> nn.Module:
        if self.mode not in DEPTH_MODES:
            raise ValueError(f"depth mode={self.mode!r}; expected one of {', '.join(DEPTH_MODES)}")
        if self.mode == "queries":
            return CellHead(dim, self.query_stride, 1)
        return nn.Linear(dim, 1)

    def check_decoder(self, num_queries: int) -> None:
        if self.mode == "queries":
            check_mask_query("depth", num_queries)

    def forward(self, head, decoder, feats, image_size, deep_supervision=False, targets=None):
        if self.mode == "queries":
            return super().forward(head, decoder, feats, image_size, deep_supervision, targets)
        # Per pixel: the pixel features only, no need to run the query decoder.
        return self.head_forward(head, None, pixel_features(feats, image_size), image_size)

    def head_forward(self, head, queries_BQD, pixel_BDhw, image_size):
        if self.mode == "queries":
            return {"log_depth": head(queries_BQD, self.query_cells(image_size))[:, 0]}
        log_depth = head(pixel_BDhw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        log_depth = F.interpolate(log_depth, size=image_size, mode="bilinear", align_corners=False)
        return {"log_depth": log_depth[:, 0]}

    def loss(self, outputs, targets):
        gt = torch.stack([torch.as_tensor(t["depth"]).float() for t in targets]).to(outputs["log_depth"].device)
        pred = outputs["log_depth"].float()[..., :gt.shape[-2], :gt.shape[-1]]  # (the canvas may be padded)
        valid = gt > 0
        d = pred[valid] - torch.log(gt[valid])
        lam = float(self.options.get("silog_lambda", 0.85))
        silog = torch.sqrt((d ** 2).mean() - lam * d.mean() ** 2 + 1e-8)
        return {"loss": silog, "silog": silog}

    def postprocess(self, outputs, targets):
        """Depth in metres at the size of each target's depth map (the original image's when
        there is none)."""
        log_depth = outputs["log_depth"].float().detach()
        canvas = tuple(log_depth.shape[-2:])
        return [to_image(log_depth[b:b + 1, None], canvas, t, target_size(t, "depth"))[0, 0].exp().cpu()
                for b, t in enumerate(targets)]

    def evaluator(self, dataset) -> Evaluator:
        return DepthEvaluator()

    def chance_predictions(self, dataset, targets):
        # One constant depth: the mean valid depth of these images.
        gt = torch.cat([torch.as_tensor(t["depth"]).reshape(-1) for t in targets])
        mean = float(gt[gt > 0].mean())
        return [torch.full(torch.as_tensor(t["depth"]).shape, mean) for t in targets]
