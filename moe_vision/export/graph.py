"""The exportable function of one task: images in, the task's raw outputs (and optionally its
postprocessed ones) out, with the MoE layers on their static-shaped path.

Legend: B batch, H x W input size, Q queries, C classes, K kept detections.

The sparse MoE path sorts tokens by expert, so its shapes depend on the data. For export every
MoE layer instead runs each expert it holds on every token and combines the outputs with the
router's top-k weights (zero for experts a token did not choose): the same function (tested in
fp64). For a bundle that keeps n experts per layer this costs n/k times the sparse path's expert
FLOPs; a bundle cut with ``top_n k`` costs exactly the sparse FLOPs.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..moe import MoEMLP
from ..tasks import GeneralistModel
from ..tasks.det import top_detections

# Output names per task type: raw outputs first (the first is the head's raw logits), each
# mapped to the head's output key it carries; then the postprocessed ones (``postprocess=True``).
RAW_OUTPUTS = {"cls": {"logits": "logits"}, "det": {"logits": "logits", "boxes_cxcywh": "boxes"},
               "seg": {"mask_logits": "masks"}, "depth": {"log_depth": "log_depth"}}
POST_OUTPUTS = {"cls": ("probs",), "det": ("det_boxes_xyxy", "det_scores", "det_labels"), "seg": ("label_map",),
                "depth": ("depth_m",)}
MAX_DETECTIONS = 100


@contextmanager
def dense_experts(model: nn.Module):
    """Run every MoE MLP of ``model`` on the static-shaped all-experts path inside the block."""
    layers = [m for m in model.modules() if isinstance(m, MoEMLP)]
    before = [m.dense_experts for m in layers]
    for m in layers:
        m.dense_experts = True
    try:
        yield model
    finally:
        for m, b in zip(layers, before):
            m.dense_experts = b


def moe_cost(model: GeneralistModel) -> dict:
    """Expert FLOPs of the exported (all experts) path relative to the sparse one, per layer and
    in all: ``{"layers": {name: {"experts", "top_k", "ratio"}}, "expert_flops_ratio": x}``."""
    layers = {m.layer_name: {"experts": m.num_experts, "top_k": m.top_k, "ratio": m.num_experts / m.top_k}
              for m in model.modules() if isinstance(m, MoEMLP)}
    total_dense = sum(v["experts"] for v in layers.values())
    total_sparse = sum(v["top_k"] for v in layers.values())
    return {"layers": layers, "expert_flops_ratio": total_dense / total_sparse if total_sparse else 1.0}


class TaskGraph(nn.Module):
    """``forward(images_B3HW)`` -> a tuple of tensors named by :meth:`output_names`.

    Postprocessed outputs: cls ``probs [B, C]``; det the ``MAX_DETECTIONS`` best (query, class)
    pairs of the one-to-one queries, ``det_boxes_xyxy [B, K, 4]`` in input pixels, ``det_scores
    [B, K]``, ``det_labels [B, K]`` (int64; before NMS: with ``inference=queries_nms`` the runtime
    wrapper, :mod:`moe_vision.export.runtime`, applies class-wise NMS after the graph); seg
    ``label_map [B, H, W]`` (int64); depth ``depth_m [B, H, W]``.
    """

    def __init__(self, model: GeneralistModel, task: str, postprocess: bool = False) -> None:
        super().__init__()
        self.model, self.task, self.postprocess = model, task, postprocess
        self.spec = model.spec(task)
        self.kind = self.spec.type_name
        if self.kind not in RAW_OUTPUTS:
            raise ValueError(f"task {task!r} of type {self.kind!r} cannot be exported; "
                             f"exportable types: {', '.join(RAW_OUTPUTS)}")
        if self.kind == "seg" and self.spec.options.get("mode", "classwise") != "classwise":
            raise ValueError(f"task {task!r}: only class-wise segmentation (mode=classwise) exports")
        if self.kind == "det" and self.spec.option("inference", "queries_nms") == "dense_nms":
            raise ValueError(f"task {task!r}: inference=dense_nms reads the dense token outputs, which the exported "
                             "graph does not return; export with inference=queries or queries_nms")

    def output_names(self) -> list[str]:
        return list(RAW_OUTPUTS[self.kind]) + (list(POST_OUTPUTS[self.kind]) if self.postprocess else [])

    def forward(self, images_B3HW: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(images_B3HW, self.task)
        raw = tuple(out[key] for key in RAW_OUTPUTS[self.kind].values())
        if not self.postprocess:
            return raw
        H, W = images_B3HW.shape[-2:]
        if self.kind == "cls":
            post = (out["logits"].softmax(-1),)
        elif self.kind == "det":
            scores_BK, labels_BK, boxes_BK4 = top_detections(out["logits"], out["boxes"], MAX_DETECTIONS)
            post = (boxes_BK4 * torch.tensor([W, H, W, H], dtype=boxes_BK4.dtype), scores_BK, labels_BK)
        elif self.kind == "seg":
            post = (self.spec.semantic_probs(out, (H, W)).argmax(1),)
        else:
            post = (out["log_depth"].exp(),)
        return raw + post


def task_graph(model: GeneralistModel, task: str, postprocess: bool = False) -> TaskGraph:
    """An evaluation-mode :class:`TaskGraph` (call it inside :func:`dense_experts` to export)."""
    return TaskGraph(model.eval(), task, postprocess).eval()
