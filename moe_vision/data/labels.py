"""What a target says about its image's classes, whatever the task's label format."""
from __future__ import annotations

import torch


def classes_present(task_type: str, target, num_classes: int) -> torch.Tensor:
    """The class indices that occur in one image's label, as a 1-D long tensor: the label of a
    classification target, the box labels of a detection target, the label-map values of a
    segmentation target that lie in ``[0, num_classes)`` (so ignore values drop out)."""
    if task_type == "cls":
        return torch.as_tensor(target["label"]).long().reshape(1)
    if task_type == "det":
        return torch.as_tensor(target["labels"]).long().unique()
    if task_type == "seg":
        labels = torch.as_tensor(target["mask"]).long().unique()
        return labels[(labels >= 0) & (labels < num_classes)]
    raise ValueError(f"classes_present: task type {task_type!r} has no class labels (expected cls, det or seg)")
