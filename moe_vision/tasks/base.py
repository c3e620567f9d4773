"""What a task type provides, and the registry that maps type names to implementations.

A task type is one module: a head (the topmost linear layer(s) on the shared decoder's outputs),
a loss, a postprocess (outputs -> predictions in image coordinates) and an evaluator that
accumulates predictions over a dataset and returns standard metrics.

Shared inputs every head receives: ``queries_BQD`` (query decoder answers) and ``pixel_BDhw``
(pixel decoder features at the finest stride). :meth:`Task.forward` decides how the task's head
reads the shared decoder: by default the shared learned queries go through the decoder and the
head reads the answers; a task may place the queries itself (class-wise segmentation picks one
query per class, detection gives queries reference boxes).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
import torch.nn.functional as F

from ..decoder.position_queries import ask_grid, query_grid
from ..moe.reduce import mean_count_over_ranks

TASK_TYPES: dict[str, type["Task"]] = {}


def loss_normaliser(count: float, device: torch.device) -> float | torch.Tensor:
    """``max(1, count)`` for normalising a summed loss; under data parallelism the count is the
    mean over ranks, a device tensor (see :func:`moe_vision.moe.reduce.mean_count_over_ranks`)."""
    n = mean_count_over_ranks(count, device)
    return n.clamp(min=1.0) if isinstance(n, torch.Tensor) else max(1.0, n)


def pixel_features(feats, image_size: tuple[int, int]) -> torch.Tensor:
    """The pixel decoder's per-pixel features; in a padded batch each image's edge values are
    repeated beyond it, so that upsampling a dense head's output to the canvas gives inside the
    image exactly what the image alone gives."""
    if feats.valid_px_B2 is None:
        return feats.pixel_BDhw
    from ..models.padding import replicate_beyond, valid_cells
    stride = image_size[0] / feats.pixel_BDhw.shape[-2]
    return replicate_beyond(feats.pixel_BDhw, valid_cells(feats.valid_px_B2, stride))


def to_image(map_1Chw: torch.Tensor, canvas: tuple[int, int], target: dict, out_size: tuple[int, int]) -> torch.Tensor:
    """One image's dense output ``[1, C, h, w]`` (over the canvas) as ``[1, C, *out_size]``: upsampled
    to the canvas, cropped to where the resized image lies (``input_size``), resized to
    ``out_size`` (the original image's, where metrics are computed). Bilinear, on scores."""
    m = map_1Chw.float()
    if tuple(m.shape[-2:]) != tuple(canvas):
        m = F.interpolate(m, size=tuple(canvas), mode="bilinear", align_corners=False)
    ih, iw = [int(v) for v in target.get("input_size", canvas)]
    m = m[..., :ih, :iw]
    if tuple(m.shape[-2:]) != tuple(out_size):
        m = F.interpolate(m, size=tuple(out_size), mode="bilinear", align_corners=False)
    return m


def target_size(target: dict, key: str) -> tuple[int, int]:
    """The size a dense prediction is compared at: the ground truth's (``key``), else the
    original image's."""
    if key in target:
        return tuple(torch.as_tensor(target[key]).shape[-2:])
    return tuple(int(v) for v in target["orig_size"])


def register_task(cls: type["Task"]) -> type["Task"]:
    TASK_TYPES[cls.type_name] = cls
    return cls


class Evaluator:
    """Accumulates predictions and targets; ``compute()`` returns ``{metric: value}``."""

    def update(self, preds: list, targets: list[dict]) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    """Base class; subclasses set ``type_name`` and ``primary_metric``."""

    type_name: str = ""
    primary_metric: str = ""
    loss_defaults: dict[str, float] = {}  # loss term -> default weight (overridden by ``loss_weights``)
    uses_deep_supervision = False  # read every decoder layer while training (DETR's auxiliary losses)
    training_only: tuple[str, ...] = ()  # head parameters used only while training (dropped from bundles)
    # Output tensors whose rows [B, Q, ...] form a set per image (their order is data-dependent):
    # comparisons of two models' outputs match rows before they compare values.
    unordered_outputs: tuple[str, ...] = ()
    queries_from_targets = False  # the task builds its queries from the targets, also when evaluating (MIM)

    def __init__(self, name: str, num_classes: int = 0, loss_weights: dict | None = None, **options: Any) -> None:
        self.name, self.num_classes = name, int(num_classes)
        self.loss_weights = dict(loss_weights or {})
        self.options = options

    def loss_weight(self, key: str) -> float:
        """Weight of loss term ``key``."""
        return float(self.loss_weights.get(key, self.loss_defaults[key]))

    def config(self) -> dict:
        """Everything needed to rebuild this task (stored in checkpoints)."""
        return {"type": self.type_name, "num_classes": self.num_classes, "loss_weights": self.loss_weights,
                **self.options}

    def inference_config(self) -> dict:
        """The config of this task without training-only parts (what a bundle stores)."""
        return self.config()

    def build_head(self, dim: int) -> nn.Module:
        raise NotImplementedError

    @property
    def input_side(self) -> int:
        """The longest side this task's inputs have after resizing (``img_size``; ``max_size`` for
        ``resize=short``); 0 when the config does not say (older checkpoints)."""
        from ..data.transforms import canvas_side
        o = self.options
        return canvas_side(int(o.get("img_size") or 0), o.get("resize"), o.get("max_size"))

    @property
    def query_stride(self) -> int:
        """Cell size in pixels of a dense task posed as position queries (``mode=queries``)."""
        return int(self.options.get("query_stride", 8))

    def query_cells(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The ``(gh, gw)`` grid of ``query_stride`` cells over the image (``mode=queries``)."""
        return query_grid(image_size, self.query_stride, f"tasks.{self.name}.query_stride")

    def check_decoder(self, num_queries: int) -> None:
        """Raise a clear error if the shared decoder cannot serve this task."""

    def forward_uses_targets(self, training: bool) -> bool:
        """Whether :meth:`forward` reads the targets (training-only queries such as detection's
        denoising, or queries built from them); otherwise the model's core never sees them."""
        return self.queries_from_targets

    def visible_patches(self, targets: list[dict] | None, device) -> torch.Tensor | None:
        """Indices ``[B, Nv]`` of the patches the backbone's blocks see (masked image modelling
        with visible-only encoding); None: every patch (the default)."""
        return None

    def decoder_queries(self, decoder, batch_size: int):
        """The :class:`~moe_vision.decoder.Queries` this task asks the decoder (None: the shared
        learned queries as they are)."""
        return None

    def ask_decoder(self, decoder, feats, image_size: tuple[int, int], return_all: bool):
        """The decoder's answers to this task's queries (every layer's with ``return_all``):
        :meth:`decoder_queries`, or in ``mode=queries`` one mask query per grid cell."""
        if self.options.get("mode") == "queries":
            return ask_grid(decoder, feats, self.query_cells(image_size), return_all=return_all,
                            stride=self.query_stride)
        return decoder(feats.memory_BMD, feats.memory_pos_BMD, return_all=return_all,
                       queries=self.decoder_queries(decoder, feats.memory_BMD.shape[0]), centres_M2=feats.centres_M2,
                       memory_valid_BM=feats.memory_valid_BM)

    def forward(self, head: nn.Module, decoder, feats, image_size: tuple[int, int], deep_supervision: bool = False,
                targets: list[dict] | None = None) -> dict[str, Any]:
        """The head's outputs on the shared decoder's answers (``feats``: the pixel decoder's
        :class:`~moe_vision.decoder.DecoderInputs`). With ``deep_supervision`` (training), also
        ``aux_outputs``: the same head on every earlier decoder layer. ``targets`` are given while
        training for tasks that build training-only queries from them."""
        every = deep_supervision and self.uses_deep_supervision
        answers = self.ask_decoder(decoder, feats, image_size, every)
        layers = answers if every else [answers]
        pixel_BDhw = pixel_features(feats, image_size)
        out = self.head_forward(head, layers[-1], pixel_BDhw, image_size)
        if every:
            out["aux_outputs"] = [self.head_forward(head, q, pixel_BDhw, image_size) for q in layers[:-1]]
        return out

    def head_forward(self, head: nn.Module, queries_BQD: torch.Tensor, pixel_BDhw: torch.Tensor,
                     image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self, outputs: dict[str, torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
        """Loss terms; ``"loss"`` is their weighted sum."""
        raise NotImplementedError

    def total_loss(self, outputs: dict[str, Any], targets: list[dict]) -> dict[str, torch.Tensor]:
        """:meth:`loss` of the final outputs plus, under deep supervision, the mean of the same loss
        over the earlier decoder layers' outputs (``aux_outputs``), reported as ``aux_layers``."""
        losses = self.loss(outputs, targets)
        aux = outputs.get("aux_outputs") or []
        if aux:
            aux_loss = torch.stack([self.loss(o, targets)["loss"] for o in aux]).mean()
            losses = {**losses, "loss": losses["loss"] + aux_loss, "aux_layers": aux_loss}
        return losses

    def postprocess(self, outputs: dict[str, torch.Tensor], targets: list[dict]) -> list:
        raise NotImplementedError

    def evaluator(self, dataset) -> Evaluator:
        raise NotImplementedError

    def chance_predictions(self, dataset, targets: list[dict]) -> list:
        """Predictions of a trivial, input-blind predictor (for the chance level beside each metric)."""
        raise NotImplementedError


def build_task(name: str, cfg: dict) -> Task:
    cfg = dict(cfg)
    type_name = cfg.pop("type", name)
    if type_name not in TASK_TYPES:
        raise ValueError(f"task {name!r}: unknown task type {type_name!r}; expected one of {sorted(TASK_TYPES)}")
    return TASK_TYPES[type_name](name, **cfg)
