"""Hybrid pre-training: multi-label classification from the heterogeneous labels the toolkit
already reads, masked image modelling and contrastive learning between two views, in one
objective (task type ``hybrid``; each term's weight in ``loss_weights``, 0 switches it off).

Legend: B images, V = 2 views per image, C label columns, N patches, Nm masked patches, P
values per patch, D decoder dim, d projection dim.

Multi-label targets (``LabelSpace``): the columns are the union of the sources' class names
(classes of the same name share a column). What each source says about an image:

* classification (ImageFolder): its class is present; nothing about the others (a single label
  does not say what else is in the picture), so only that column is annotated;
* detection (COCO): the classes of its boxes are present, its other classes absent;
* segmentation (ADE20K layout): the classes in its map are present, its other classes absent;
* sources without labels (e.g. depth, image folders): no column is annotated.

Columns a source does not annotate are masked out of the loss.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..data.readers import ADE20KDataset, CocoDetectionDataset, ImageFolderDataset
from ..data.labels import classes_present
from ..tasks.base import Evaluator, Task, register_task
from .masking import held_out_generator, mask_image, normalised_patches, patchify, random_patch_mask
from .mim import ask_masked_patches, check_encoder_input, masked_indices, reconstruction_loss, visible_indices

VIEWS = 2


class LabelSpace:
    """Union of class names over sources; ``columns[source]`` maps a source's class index to a column."""

    def __init__(self, sources: Mapping[str, Dataset], class_names: Mapping[str, Sequence[str]] | None = None) -> None:
        class_names = dict(class_names or {})
        self.names: list[str] = []
        self.columns: dict[str, list[int]] = {}
        for source, dataset in sources.items():
            names = class_names.get(source) or getattr(dataset, "classes", None)
            if names is None:
                if isinstance(dataset, ADE20KDataset):
                    raise ValueError(f"segmentation source {source!r} has no class names: set "
                                     f"class_names.{source} in the pre-training data entry (label i = name i)")
                self.columns[source] = []  # no labels
                continue
            cols = []
            for name in names:
                if name not in self.names:
                    self.names.append(name)
                cols.append(self.names.index(name))
            self.columns[source] = cols

    def __len__(self) -> int:
        return len(self.names)

    def target(self, source: str, dataset: Dataset, target: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """``(present_C, known_C)``: 1 where the class is in the image, and where the source says so."""
        cols = self.columns[source]
        present, known = torch.zeros(len(self)), torch.zeros(len(self), dtype=torch.bool)
        if not cols:
            return present, known
        idx = torch.tensor(cols)
        if isinstance(dataset, ImageFolderDataset):
            # One label per image: only its own column is known (the others may be in the picture).
            c = idx[classes_present("cls", target, len(cols))]
            present[c], known[c] = 1.0, True
            return present, known
        if isinstance(dataset, CocoDetectionDataset):
            labels = classes_present("det", target, len(cols))
        elif isinstance(dataset, ADE20KDataset):
            labels = classes_present("seg", target, len(cols))
        else:
            return present, known
        known[idx] = True
        present[idx[labels]] = 1.0
        return present, known


class TwoViewImages(Dataset):
    """Images of several labelled (or unlabelled) sources, each returned as two augmented views
    ``[V, 3, S, S]`` with target keys ``ml`` / ``ml_known`` (``[C]``), ``mask`` (``[V, N]``),
    ``patches`` (``[V, N, P]``) and ``image`` (view 0 unmasked, for pictures). With
    ``mask_ratio`` 0 nothing is masked. ``held_out`` fixes each item's masks (the views stay
    random augmentations)."""

    def __init__(self, sources: Mapping[str, Dataset], view_transform, patch_size: int, mask_ratio: float,
                 class_names: Mapping[str, Sequence[str]] | None = None, norm_pix: bool = True,
                 held_out: bool = False) -> None:
        self.sources = dict(sources)
        self.labels = LabelSpace(self.sources, class_names)
        self.classes = self.labels.names
        self.index = [(s, i) for s, d in self.sources.items() for i in range(len(d))]
        self.view_transform, self.p, self.mask_ratio, self.norm_pix = view_transform, patch_size, mask_ratio, norm_pix
        self.held_out = bool(held_out)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        source, k = self.index[i]
        dataset = self.sources[source]
        image, target = dataset[k]  # sources carry no transform: the full image and its labels
        present, known = self.labels.target(source, dataset, target)
        views, masks, patches = [], [], []
        generator = held_out_generator(i if self.held_out else None)
        for _ in range(VIEWS):
            view, _ = self.view_transform(image, {})
            view = torch.as_tensor(view)
            pv = patchify(view, self.p)
            mask = random_patch_mask(pv.shape[0], self.mask_ratio, generator) if self.mask_ratio > 0 else \
                torch.zeros(pv.shape[0], dtype=torch.bool)
            views.append(mask_image(view, mask, self.p))
            masks.append(mask)
            patches.append(normalised_patches(pv) if self.norm_pix else pv)
            if len(views) == 1:
                first = view
        return torch.stack(views), {"ml": present, "ml_known": known, "mask": torch.stack(masks),
                                    "patches": torch.stack(patches), "image": first}


def info_nce(z1_Bd: torch.Tensor, z2_Bd: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: view 1 of image i should pick view 2 of image i among the batch's
    view-2 embeddings, and the other way round (MoCo v3 / SimCLR without a queue)."""
    z1, z2 = F.normalize(z1_Bd.float(), dim=-1), F.normalize(z2_Bd.float(), dim=-1)
    logits = z1 @ z2.t() / temperature
    labels = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def masked_bce(logits_BC: torch.Tensor, present_BC: torch.Tensor, known_BC: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the annotated entries only (0 when none is annotated)."""
    loss = F.binary_cross_entropy_with_logits(logits_BC.float(), present_BC, reduction="none")
    return (loss * known_BC).sum() / known_BC.sum().clamp(min=1)


class HybridEvaluator(Evaluator):
    """``mse`` (masked patches), ``ml_acc`` (multi-label accuracy over annotated entries) and
    ``retrieval_top1`` (view 1 finds its own view 2 among every validation image's)."""

    def __init__(self, terms: set[str]) -> None:
        self.terms, self.sq, self.n, self.ok, self.known = terms, 0.0, 0, 0.0, 0.0
        self.z1: list[torch.Tensor] = []
        self.z2: list[torch.Tensor] = []

    def update(self, preds: list[dict], targets: list[dict]) -> None:
        for pred, t in zip(preds, targets):
            if "mim" in self.terms:
                want = t["patches"][t["mask"]]
                self.sq += float(((pred["mim"].reshape(want.shape) - want) ** 2).sum())
                self.n += want.numel()
            if "multilabel" in self.terms:
                right = ((pred["ml"] > 0).float() == t["ml"]).float() * t["ml_known"]
                self.ok += float(right.sum())
                self.known += float(t["ml_known"].sum())
            self.z1.append(pred["z"][0])
            self.z2.append(pred["z"][1])

    def compute(self) -> dict[str, float]:
        out = {}
        if "mim" in self.terms:
            out["mse"] = self.sq / max(1, self.n)
        if "multilabel" in self.terms:
            out["ml_acc"] = self.ok / max(1.0, self.known)
        if self.z1:
            z1, z2 = F.normalize(torch.stack(self.z1), dim=-1), F.normalize(torch.stack(self.z2), dim=-1)
            out["retrieval_top1"] = float(((z1 @ z2.t()).argmax(1) == torch.arange(len(z1))).float().mean())
        return out


@register_task
class HybridPretrainingTask(Task):
    """Task type ``hybrid``. Options: ``patch_size``, ``mask_ratio``, ``temperature``,
    ``proj_dim``, ``encoder`` (as ``mim``'s); ``num_classes`` = label columns; ``loss_weights``:
    ``mim``, ``multilabel``, ``contrastive`` (0 switches a term off)."""

    type_name = "hybrid"
    loss_defaults = {"mim": 1.0, "multilabel": 1.0, "contrastive": 0.5}
    queries_from_targets = True

    def __init__(self, name: str, num_classes: int = 0, loss_weights: dict | None = None, **options) -> None:
        super().__init__(name, num_classes, loss_weights, **options)
        check_encoder_input(name, self.options.setdefault("encoder", "visible"))
        self.terms = {k for k in self.loss_defaults if self.loss_weight(k) > 0}
        if not self.terms:
            raise ValueError(f"tasks.{name}.loss_weights switch off every term; keep at least one of "
                             f"{sorted(self.loss_defaults)}")
        if "multilabel" in self.terms and self.num_classes < 1:
            raise ValueError(f"tasks.{name}.num_classes must be the number of label columns for the multi-label term")
        self.primary_metric = "mse" if "mim" in self.terms else "ml_acc" if "multilabel" in self.terms \
            else "retrieval_top1"

    def build_head(self, dim: int) -> nn.Module:
        p = int(self.options["patch_size"])
        proj = int(self.options.get("proj_dim", 128))
        return nn.ModuleDict({"mim": nn.Linear(dim, p * p * 3), "ml": nn.Linear(dim, max(1, self.num_classes)),
                              "proj": nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, proj))})

    def visible_patches(self, targets, device):
        if self.options["encoder"] != "visible" or targets is None or "mim" not in self.terms:
            return None
        return visible_indices(torch.stack([t["mask"] for t in targets]).flatten(0, 1), device)

    def check_decoder(self, num_queries: int) -> None:
        if num_queries < 2:
            raise ValueError(f"hybrid pre-training needs decoder.num_queries >= 2, got {num_queries}")

    def forward(self, head, decoder, feats, image_size, deep_supervision=False, targets=None):
        if targets is None:
            raise ValueError("hybrid pre-training needs its targets (masks) at every forward")
        masks = torch.stack([t["mask"] for t in targets]).flatten(0, 1)  # [B V, N], the images' order
        idx = masked_indices(masks, feats.memory_BMD.device)
        answers = ask_masked_patches(decoder, feats, image_size, int(self.options["patch_size"]), idx)
        cls = answers[:, 0]
        out = {"idx_BNm": idx, "z": head["proj"](cls), "ml": head["ml"](cls)}
        if idx.shape[1]:
            out["mim"] = head["mim"](answers[:, 1:])
        return out

    def loss(self, outputs, targets):
        B = len(targets)
        terms = {}
        if "mim" in self.terms:
            patches = torch.stack([t["patches"] for t in targets]).flatten(0, 1)
            terms["mim"] = reconstruction_loss(outputs["mim"], patches, outputs["idx_BNm"])
        if "multilabel" in self.terms:
            present = torch.stack([t["ml"] for t in targets]).repeat_interleave(VIEWS, 0).to(outputs["ml"].device)
            known = torch.stack([t["ml_known"] for t in targets]).repeat_interleave(VIEWS, 0).to(present.device)
            terms["multilabel"] = masked_bce(outputs["ml"], present, known.float())
        if "contrastive" in self.terms:
            z = outputs["z"].reshape(B, VIEWS, -1)
            terms["contrastive"] = info_nce(z[:, 0], z[:, 1], float(self.options.get("temperature", 0.2)))
        total = sum(self.loss_weight(k) * v for k, v in terms.items())
        return {"loss": total, **terms}

    def postprocess(self, outputs, targets):
        B = len(targets)
        z = outputs["z"].float().detach().cpu().reshape(B, VIEWS, -1)
        ml = outputs["ml"].float().detach().cpu().reshape(B, VIEWS, -1).mean(1)
        mim = outputs.get("mim")
        mim = mim.float().detach().cpu().reshape(B, VIEWS, *mim.shape[1:]) if mim is not None else [None] * B
        return [{"z": z[i], "ml": ml[i], "mim": mim[i]} for i in range(B)]

    def evaluator(self, dataset) -> Evaluator:
        return HybridEvaluator(self.terms)

    def chance_predictions(self, dataset, targets):
        g = torch.Generator().manual_seed(0)
        out = []
        for t in targets:  # the patch mean, "absent" everywhere, random embeddings
            out.append({"z": torch.randn(VIEWS, 8, generator=g), "ml": torch.full((max(1, self.num_classes),), -1.0),
                        "mim": torch.zeros_like(t["patches"][t["mask"]])})
        return out

    def write_pictures(self, model, task: str, dataset, run_dir) -> None:
        if "mim" in self.terms:
            from .visualize import plot_reconstructions
            plot_reconstructions(model, task, dataset, run_dir / "reconstructions.png")

