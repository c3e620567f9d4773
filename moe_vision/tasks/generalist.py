"""The generalist: MoE-ViT backbone -> shared GLID decoder (pixel decoder + query decoder with one
set of learnable queries) -> the task's topmost linear head.

Shared by all tasks: the backbone (except each task's router and task embedding), the pixel
decoder, the query decoder and its queries. Task-specific: the linear layer(s) in ``heads[task]``.
Optional (off by default): multi-scale adapters after every block and on every pixel-decoder
level (per task or shared), and a language-prior LV-Adapter per classed task
(:mod:`moe_vision.adapters`).
"""
from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from ..adapters import LanguagePrior, ModelAdapters, language_config, language_losses
from ..adapters.language import LV_TASK_TYPES
from ..decoder import DEFAULT_NUM_QUERIES, PixelDecoder, QueryDecoder
from ..models import MoEViT
from ..models.checkpoint import register_format
from .base import Task, build_task

DEFAULT_DECODER = {"dim": 128, "num_queries": DEFAULT_NUM_QUERIES, "num_layers": 3, "num_heads": 4, "mlp_ratio": 4.0,
                   "deep_supervision": True, "stem_skip": False, "box_prior": 0.0, "position_prior": 0.0,
                   "memory": "separate"}


class GeneralistModel(nn.Module):
    """``forward(images, task)`` -> the task head's outputs (and routing on request).

    Args:
        backbone: a :class:`MoEViT` or its config dict; it must know every task name.
        tasks: task name -> task config (``type``, ``num_classes``, loss weights, options).
        decoder: query/pixel decoder sizes (see ``DEFAULT_DECODER``).
        adapters: multi-scale adapter options (:data:`moe_vision.adapters.DEFAULT_ADAPTERS`).
        language: LV-Adapter options (:data:`moe_vision.adapters.DEFAULT_LANGUAGE`).
    """

    checkpoint_format = "moe_vision.generalist/1"

    def __init__(self, backbone: MoEViT | Mapping[str, Any], tasks: Mapping[str, Mapping[str, Any]],
                 decoder: Mapping[str, Any] | None = None, adapters: Mapping[str, Any] | None = None,
                 language: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone if isinstance(backbone, MoEViT) else MoEViT(**backbone)
        missing = [t for t in tasks if t not in self.backbone.tasks]
        if missing:
            raise ValueError(f"backbone has no router for task(s) {missing}; it knows {self.backbone.tasks}")
        dec = {**DEFAULT_DECODER, **(decoder or {})}
        self.specs: dict[str, Task] = {name: build_task(name, dict(cfg)) for name, cfg in tasks.items()}
        for spec in self.specs.values():
            spec.check_decoder(dec["num_queries"])
        self.pixel_decoder = PixelDecoder(self.backbone.embed_dim, dec["dim"], num_levels=4,
                                          stem_channels=self.backbone.stem_channels if dec["stem_skip"] else (),
                                          finest_stride=self.backbone.patch_size // 2, memory=dec["memory"])
        self.decoder = QueryDecoder(dec["dim"], dec["num_queries"], dec["num_layers"], dec["num_heads"],
                                    dec["mlp_ratio"], box_prior=float(dec["box_prior"]),
                                    position_prior=float(dec["position_prior"]))
        self.heads = nn.ModuleDict({name: spec.build_head(dec["dim"]) for name, spec in self.specs.items()})
        self.decoder_config = dec
        self.adapter_config = dict(adapters or {})
        self.adapters = ModelAdapters(self.adapter_config, list(self.specs), self.backbone.embed_dim,
                                      len(self.backbone.blocks), len(self.pixel_decoder.lateral)) \
            if self.adapter_config.get("enabled") else None
        self.compile_options: dict | None = None  # set by compile_core (train.compile)
        self.language_config = language_config(language)
        lv = self.language_config
        lv_tasks = [t for t, s in self.specs.items() if s.type_name in LV_TASK_TYPES] if lv["tasks"] is None \
            else [t for t in lv["tasks"] if t in self.specs]  # (a bundle keeps only its own task)
        for t in lv_tasks:
            if self.specs[t].type_name not in LV_TASK_TYPES:
                raise ValueError(f"lv.tasks names {t!r} (type {self.specs[t].type_name}); the LV-Adapter serves "
                                 f"task types {list(LV_TASK_TYPES)}")
        self.lv = LanguagePrior({t: self.specs[t].num_classes for t in lv_tasks}, dec["dim"],
                                num_heads=int(lv["num_heads"]), temperature=float(lv["temperature"]),
                                prompt_learning=bool(lv["prompt_learning"]), text_logits=bool(lv["text_logits"])) \
            if lv["enabled"] and lv_tasks else None

    @property
    def config(self) -> dict:
        return {"backbone": self.backbone.config, "tasks": {n: s.config() for n, s in self.specs.items()},
                "decoder": self.decoder_config, "adapters": self.adapter_config, "language": self.language_config}

    @property
    def tasks(self) -> list[str]:
        return list(self.specs)

    def new_head(self, task: str, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """Replace ``task``'s head (its topmost linear layer(s)) with a new one for ``num_classes``
        classes, e.g. to fine-tune on a dataset with its own label space (GLID's recipe); the
        class names, when given, are kept in the task config (and so in checkpoints and bundles)."""
        old = self.spec(task)
        if self.lv is not None and task in self.lv.texts:
            raise ValueError(f"task {task!r} has an LV-Adapter sized for its {old.num_classes} classes; a new head "
                             "for another label space is not supported with lv.enabled")
        cfg = {**old.config(), "num_classes": int(num_classes)}
        if class_names is not None:
            if len(class_names) != int(num_classes):
                raise ValueError(f"{len(class_names)} class names for a head of {num_classes} classes")
            cfg["class_names"] = [str(c) for c in class_names]
        else:
            cfg.pop("class_names", None)
        spec = build_task(task, cfg)
        spec.check_decoder(self.decoder_config["num_queries"])
        ref = next(self.heads[task].parameters())
        self.specs[task] = spec
        self.heads[task] = spec.build_head(self.decoder_config["dim"]).to(device=ref.device, dtype=ref.dtype)

    def spec(self, task: str) -> Task:
        if task not in self.specs:
            raise KeyError(f"unknown task {task!r}; this model knows tasks {self.tasks}")
        return self.specs[task]

    def forward(self, images: torch.Tensor, task: str, return_routing: bool = False,
                targets: list[dict] | None = None, input_sizes: torch.Tensor | None = None):
        """The head's outputs for the last decoder layer. While training with deep supervision,
        ``out["aux_outputs"]`` holds the same head applied to every earlier decoder layer (DETR's
        auxiliary losses; the head is the same linear layer, so nothing task-specific is added).
        ``targets`` (training) let a task add training-only queries (detection's denoising).

        Padded batches: ``input_sizes`` ``[B, 2]`` (default: the targets' ``input_size``) says
        where each image ends on the canvas; nothing beyond it changes the image's outputs. The
        canvas is padded to whole patches, and positions are measured in a square frame of the
        task's ``img_size`` (at least the canvas), so they do not depend on the batch."""
        spec = self.spec(task)
        if images.ndim == 5:  # [B, V, 3, H, W]: several views per image (contrastive pre-training)
            images = images.flatten(0, 1)
        # The per-image bookkeeping (sizes, padding, which targets the head needs) happens here, on
        # the host; the tensor work is in forward_core, the part train.compile compiles, which then
        # sees targets only when the task's forward needs them (no guards on box counts).
        images, frame, valid_px = self.frame_inputs(images, spec, targets, input_sizes)
        head_targets = targets if spec.forward_uses_targets(self.training) else None
        core = GeneralistModel.forward_core if self.compile_options is None else compiled_core(**self.compile_options)
        out, routing = core(self, images, task, frame, valid_px, head_targets)
        return (out, routing) if return_routing else out

    def forward_core(self, images: torch.Tensor, task: str, frame, valid_px, targets: list[dict] | None):
        """``(outputs, routing)`` of images already framed (:meth:`frame_inputs`); ``targets`` only
        for tasks whose forward uses them (:meth:`~moe_vision.tasks.base.Task.forward_uses_targets`)."""
        spec = self.spec(task)
        stem_maps: list[torch.Tensor] = []
        visible = spec.visible_patches(targets, images.device)
        maps, routing = self.backbone.forward_multiscale(
            images, task, return_routing=True, stem_maps=stem_maps, visible_BNv=visible,
            after_block=self.adapters.after_block(task) if self.adapters is not None else None,
            frame=frame, valid_px_B2=valid_px)
        if self.adapters is not None:
            maps = self.adapters.on_levels(maps, task)
        size = tuple(images.shape[-2:])
        feats = self.pixel_decoder(maps, stem_maps, size, frame=frame, valid_px_B2=valid_px)
        lv = self.lv if self.lv is not None and task in self.lv.texts else None
        text_CD = lv.inject(feats, task) if lv is not None else None
        deep = self.training and bool(self.decoder_config.get("deep_supervision"))
        out = spec.forward(self.heads[task], self.decoder, feats, size, deep, targets)
        if lv is not None:
            out["lv"] = lv.align(spec.type_name, out, feats, text_CD)
        return out, routing

    def compile_core(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Run :meth:`forward_core` through ``torch.compile`` (the host-side bookkeeping of
        :meth:`forward` stays eager). A copy of the model (``copy.deepcopy``) compiles its own."""
        self.compile_options = {"backend": backend, "mode": mode}

    def frame_inputs(self, images: torch.Tensor, spec: Task, targets: list[dict] | None,
                     input_sizes: torch.Tensor | None):
        """``(images padded to whole patches, frame or None, valid regions [B, 2] or None)``; None
        where the batch is one unpadded canvas that is its own frame (the plain path)."""
        p = self.backbone.patch_size
        H, W = images.shape[-2:]
        if input_sizes is None and targets and all("input_size" in t for t in targets):
            input_sizes = torch.stack([torch.as_tensor(t["input_size"]) for t in targets])
        pad_h, pad_w = -H % p, -W % p
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        Hp, Wp = H + pad_h, W + pad_w
        side = max(Hp, Wp, spec.input_side)
        side += -side % p
        frame = None if (side, side) == (Hp, Wp) else (side, side)
        valid_px = None
        if input_sizes is not None:  # (on the host: the sizes come with the batch)
            valid_px = torch.div(torch.as_tensor(input_sizes).cpu() + p - 1, p, rounding_mode="floor") * p
            valid_px = None if bool((valid_px == torch.tensor([Hp, Wp])).all()) else valid_px.to(images.device)
        return images, frame, valid_px

    def task_loss(self, task: str, out: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """The task's loss terms (``"loss"`` their weighted sum), LV alignment terms included."""
        spec = self.spec(task)
        losses = spec.total_loss(out, targets)
        if "lv" in out:
            lv = self.language_config
            extra = language_losses(spec.type_name, out["lv"], targets, float(lv["align_weight"]),
                                    float(lv["tag_weight"]))
            losses = {**losses, **extra, "loss": losses["loss"] + sum(extra.values())}
        return losses

    @torch.no_grad()
    def predict(self, images: torch.Tensor, task: str, targets: list[dict]) -> list:
        """Postprocessed predictions (``targets`` carry per-image meta such as ``orig_size``)."""
        return self.spec(task).postprocess(self(images, task), targets)


register_format(GeneralistModel.checkpoint_format, GeneralistModel)


@functools.lru_cache(maxsize=None)
def compiled_core(backend: str, mode: str | None):
    """:meth:`GeneralistModel.forward_core` compiled with these options (one compiled function per
    option set; dynamo keeps a graph per model instance and task)."""
    return torch.compile(GeneralistModel.forward_core, backend=backend, mode=mode)
