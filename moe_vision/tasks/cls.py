"""Classification: the first query's answer -> linear -> logits."""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .base import Evaluator, Task, register_task


class AccuracyEvaluator(Evaluator):
    def __init__(self, topk: tuple[int, ...] = (1, 5)) -> None:
        self.topk, self.correct, self.total = topk, {k: 0 for k in topk}, 0

    def update(self, preds: list[torch.Tensor], targets: list[dict]) -> None:
        logits = torch.stack(preds)
        labels = torch.stack([t["label"] for t in targets]).to(logits.device)
        ranked = logits.argsort(dim=1, descending=True)
        for k in self.topk:
            self.correct[k] += int((ranked[:, :k] == labels[:, None]).any(1).sum())
        self.total += len(labels)

    def compute(self) -> dict[str, float]:
        return {f"top{k}": self.correct[k] / max(1, self.total) for k in self.topk}


@register_task
class ClassificationTask(Task):
    type_name, primary_metric = "cls", "top1"

    def build_head(self, dim: int) -> nn.Module:
        return nn.Linear(dim, self.num_classes)

    def head_forward(self, head, queries_BQD, pixel_BDhw, image_size):
        # The answer itself too: the LV-Adapter scores it against the class texts.
        return {"logits": head(queries_BQD[:, 0]), "embedding": queries_BQD[:, 0]}

    def loss(self, outputs, targets):
        labels = torch.stack([t["label"] for t in targets]).to(outputs["logits"].device)
        ce = F.cross_entropy(outputs["logits"].float(), labels, label_smoothing=self.options.get("label_smoothing", 0.0))
        return {"loss": ce, "ce": ce}

    def postprocess(self, outputs, targets):
        return list(outputs["logits"].float().detach().cpu())

    def evaluator(self, dataset) -> Evaluator:
        return AccuracyEvaluator((1, min(5, self.num_classes)))

    def chance_predictions(self, dataset, targets):
        # A fixed ranking of the classes, most frequent in the dataset first.
        counts = torch.bincount(torch.tensor([s[1] for s in dataset.samples]), minlength=self.num_classes)
        return [counts.float().clone() for _ in targets]
