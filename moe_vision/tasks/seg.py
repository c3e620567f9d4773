"""Semantic segmentation on the shared queries: a mask embedding (the task's linear layer) of a
query answer dotted with the per-pixel features gives a mask. Two ways to read classes from the
queries: class-wise (the default; query c is class c's, per-pixel cross-entropy + dice, no
matching) or MaskFormer's mask classification (per-query class logits + no-object, Hungarian
matching, binary cross-entropy + dice on masks). A third, GLID's query-to-answer: one mask query per
cell of a grid (``mode=queries``), the question masked image modelling pre-trains, and a linear
layer turns each answer into the class logits of the cell's pixels. mIoU over the whole dataset
from a confusion matrix.

Legend: B batch, Q queries, C classes, N classes present in one image, H x W target size.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from ..decoder import Queries
from ..decoder.position_queries import CellHead, check_mask_query
from ..data.labels import classes_present
from .base import Evaluator, Task, loss_normaliser, register_task, target_size, to_image
from .matching import hungarian_match, matched_cross_entropy

IGNORE = 255
SEG_MODES = ("classwise", "maskformer", "queries")


class SegHead(nn.Module):
    """MaskFormer head: class linear (+ no-object) and mask-embedding linear."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.class_linear = nn.Linear(dim, num_classes + 1)
        self.mask_linear = nn.Linear(dim, dim)


class ClasswiseSegHead(nn.Module):
    """Class-wise head: the mask-embedding linear only (query c answers for class c)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mask_linear = nn.Linear(dim, dim)


def _dice_cost(pred_QP: torch.Tensor, gt_NP: torch.Tensor) -> torch.Tensor:
    p = pred_QP.sigmoid()
    num = 2 * p @ gt_NP.t()
    den = p.sum(-1)[:, None] + gt_NP.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def _bce_cost(pred_QP: torch.Tensor, gt_NP: torch.Tensor) -> torch.Tensor:
    pos = F.binary_cross_entropy_with_logits(pred_QP, torch.ones_like(pred_QP), reduction="none")
    neg = F.binary_cross_entropy_with_logits(pred_QP, torch.zeros_like(pred_QP), reduction="none")
    return (pos @ gt_NP.t() + neg @ (1 - gt_NP).t()) / pred_QP.shape[-1]


def canvas_logits(outputs: dict, size, stride: int = 1) -> torch.Tensor:
    """Mask logits upsampled to the canvas and cropped to ``size`` (a training batch's label maps:
    the canvas, or a part of it when the model padded the canvas to whole patches); with
    ``stride`` > 1, at every stride-th pixel (see :func:`strided_labels`)."""
    masks = outputs["masks"].float()
    canvas = tuple(outputs.get("image_size") or size)
    out = (-(-canvas[0] // stride), -(-canvas[1] // stride))
    logits = F.interpolate(masks, size=out, mode="bilinear", align_corners=False)
    return logits[..., :-(-size[0] // stride), :-(-size[1] // stride)]


def strided_labels(gt: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th label (from the first pixel): the loss at 1/stride resolution, which
    with 150 classes at 512 px saves gigabytes of activations per image."""
    return gt if stride == 1 else gt[..., ::stride, ::stride]


class MIoUEvaluator(Evaluator):
    """Confusion matrix over the whole dataset; 255 ignored; classes absent from both prediction
    and ground truth are left out of the mean."""

    def __init__(self, num_classes: int) -> None:
        self.C = num_classes
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, preds, targets):
        for p, t in zip(preds, targets):
            gt = torch.as_tensor(t["mask"]).long().reshape(-1)
            p = p.reshape(-1).long()
            keep = gt != IGNORE
            bad = gt[keep & ((gt < 0) | (gt >= self.C))]
            if len(bad):
                raise ValueError(f"segmentation label {int(bad[0])} is outside [0, num_classes={self.C}) and is not "
                                 f"the ignore value {IGNORE}; set num_classes to cover every label")
            self.confusion += torch.bincount(gt[keep] * self.C + p[keep], minlength=self.C ** 2).reshape(self.C, self.C)

    def compute(self) -> dict[str, float]:
        cm = self.confusion.double()
        inter = cm.diag()
        union = cm.sum(0) + cm.sum(1) - inter
        present = union > 0
        miou = float((inter[present] / union[present]).mean()) if present.any() else 0.0
        acc = float(inter.sum() / cm.sum().clamp(min=1))
        return {"mIoU": miou, "pixel_acc": acc}


@register_task
class SegmentationTask(Task):
    """Options: ``mode`` = ``classwise`` (default: query c of the shared query set answers for
    class c, its mask embedding dotted with the pixel features gives class c's per-pixel logit;
    per-pixel cross-entropy + dice, no matching, as Segmenter / MaskFormer's fixed matching; needs
    ``decoder.num_queries >= num_classes``) or ``maskformer`` (every query predicts a class and a
    mask; Hungarian matching; BCE + dice on masks, cross-entropy on classes) or ``queries`` (GLID:
    one mask query per ``query_stride`` x ``query_stride`` cell, placed at the cell's centre, the
    question masked image modelling asks; a linear layer maps each answer to the class logits of
    the cell's pixels; the class-wise loss)."""

    type_name, primary_metric = "seg", "mIoU"
    loss_defaults = {"class": 1.0, "bce": 5.0, "dice": 5.0, "no_object": 0.1, "ce": 1.0}
    uses_deep_supervision = True

    @property
    def mode(self) -> str:
        return self.options.get("mode", "classwise")

    @property
    def loss_stride(self) -> int:
        """The training loss is computed at every ``loss_stride``-th pixel (1: every pixel)."""
        return int(self.options.get("loss_stride") or 1)

    def build_head(self, dim: int) -> nn.Module:
        if self.mode not in SEG_MODES:
            raise ValueError(f"seg mode={self.mode!r}; expected one of {', '.join(SEG_MODES)}")
        if self.mode == "queries":
            return CellHead(dim, self.query_stride, self.num_classes)
        return SegHead(dim, self.num_classes) if self.mode == "maskformer" else ClasswiseSegHead(dim)

    def check_decoder(self, num_queries: int) -> None:
        if self.mode == "classwise" and num_queries < self.num_classes:
            raise ValueError(f"seg mode=classwise needs one query per class: decoder.num_queries={num_queries} < "
                             f"num_classes={self.num_classes}; raise decoder.num_queries or use mode=maskformer")
        if self.mode == "queries":
            check_mask_query("seg", num_queries)

    def decoder_queries(self, decoder, batch_size: int) -> Queries | None:
        if self.mode != "classwise":
            return None
        C = self.num_classes
        return Queries(decoder.query_embed[:C].unsqueeze(0).expand(batch_size, -1, -1),
                       decoder.query_pos[:C].unsqueeze(0).expand(batch_size, -1, -1))

    def head_forward(self, head, queries_BQD, pixel_BDhw, image_size):
        if self.mode == "queries":
            return {"masks": head(queries_BQD, self.query_cells(image_size)), "image_size": image_size}
        masks = torch.einsum("bqd,bdhw->bqhw", head.mask_linear(queries_BQD), pixel_BDhw)
        if self.mode == "classwise":
            return {"masks": masks, "image_size": image_size}
        return {"logits": head.class_linear(queries_BQD), "masks": masks, "image_size": image_size}

    def loss(self, outputs, targets):
        if self.mode != "maskformer":  # classwise and queries: one logit map per class
            return self.classwise_loss(outputs, targets)
        return self.maskformer_loss(outputs, targets)

    def classwise_loss(self, outputs, targets):
        # The label maps are checked and counted on the host, where they come from, before they
        # go to the device: the loss never reads the device back.
        gt = torch.stack([torch.as_tensor(t["mask"]).long() for t in targets])
        self.check_labels(gt)
        logits = canvas_logits(outputs, gt.shape[-2:], self.loss_stride)
        gt = strided_labels(gt, self.loss_stride)
        num_valid = int((gt != IGNORE).sum())
        num_present = sum(int(len(classes_present("seg", {"mask": g}, self.num_classes))) for g in gt)
        gt = gt.to(logits.device)
        valid = (gt != IGNORE).unsqueeze(1)
        # Sums over normalisers (not means) so that data-parallel ranks reproduce the global batch's loss.
        ce = F.cross_entropy(logits, gt, ignore_index=IGNORE, reduction="sum") / loss_normaliser(num_valid, logits.device)
        prob = logits.softmax(1) * valid
        onehot = F.one_hot(gt.clamp(max=self.num_classes - 1) * valid[:, 0], self.num_classes).permute(0, 3, 1, 2)
        onehot = onehot * valid
        inter, total = (prob * onehot).sum((2, 3)), prob.sum((2, 3)) + onehot.sum((2, 3))
        present = onehot.sum((2, 3)) > 0
        dice = ((1 - (2 * inter + 1) / (total + 1)) * present).sum() / loss_normaliser(num_present, logits.device)
        return {"loss": self.loss_weight("ce") * ce + self.loss_weight("dice") * dice, "ce": ce, "dice": dice}

    def check_labels(self, gt: torch.Tensor) -> None:
        bad = gt[(gt != IGNORE) & ((gt < 0) | (gt >= self.num_classes))]
        if len(bad):
            raise ValueError(f"segmentation label {int(bad[0])} is outside [0, num_classes={self.num_classes}) "
                             f"(and is not the ignore value {IGNORE}); set tasks.<seg>.num_classes to cover every "
                             "label, or map unknown labels to 255")

    def maskformer_loss(self, outputs, targets):
        logits, masks = outputs["logits"].float(), outputs["masks"].float()
        Q = logits.shape[1]
        matched, bce, dice, n_masks = [], logits.new_zeros(()), logits.new_zeros(()), 0
        for b, t in enumerate(targets):
            gt = torch.as_tensor(t["mask"]).long().to(logits.device)
            self.check_labels(gt)
            up = canvas_logits({**outputs, "masks": masks[b:b + 1]}, gt.shape, self.loss_stride)[0]
            gt = strided_labels(gt, self.loss_stride)
            valid = (gt != IGNORE).reshape(-1)
            classes = gt[gt != IGNORE].unique()
            if len(classes) == 0:
                continue
            gt_NP = (gt.reshape(-1)[valid][None, :] == classes[:, None]).float()
            pred_QP = up.reshape(Q, -1)[:, valid]
            with torch.no_grad():
                prob = logits[b].softmax(-1)[:, classes]
                cost = -self.loss_weight("class") * prob + self.loss_weight("bce") * _bce_cost(pred_QP, gt_NP) \
                    + self.loss_weight("dice") * _dice_cost(pred_QP, gt_NP)
            qi, ti = hungarian_match(cost)
            qi, ti = qi.to(logits.device), ti.to(logits.device)
            matched.append((b, qi, classes[ti]))
            p, g = pred_QP[qi], gt_NP[ti]
            bce = bce + F.binary_cross_entropy_with_logits(p, g, reduction="none").mean(-1).sum()
            ps = p.sigmoid()
            dice = dice + (1 - (2 * (ps * g).sum(-1) + 1) / (ps.sum(-1) + g.sum(-1) + 1)).sum()
            n_masks += len(qi)
        ce = matched_cross_entropy(logits, matched, self.loss_weight("no_object"))
        n = max(1, n_masks)
        bce, dice = bce / n, dice / n
        return {"loss": self.loss_weight("class") * ce + self.loss_weight("bce") * bce + self.loss_weight("dice") * dice,
                "ce": ce, "bce": bce, "dice": dice}

    def class_scores(self, masks_BQHW: torch.Tensor, logits_BQC: torch.Tensor | None) -> torch.Tensor:
        """Per-class scores ``[B, C, H, W]`` from mask logits at the wanted size: class-wise
        softmax, or (maskformer) the sum over queries of P(class) x mask probability."""
        if self.mode != "maskformer":
            return masks_BQHW.softmax(1)
        prob = logits_BQC.float().softmax(-1)[..., :-1]
        return torch.einsum("bqc,bqhw->bchw", prob, masks_BQHW.sigmoid())

    def semantic_probs(self, outputs, size) -> torch.Tensor:
        """:meth:`class_scores` of the whole batch at ``size``."""
        masks = F.interpolate(outputs["masks"].float(), size=size, mode="bilinear", align_corners=False)
        return self.class_scores(masks, outputs.get("logits"))

    def postprocess(self, outputs, targets):
        """Label maps at the size of each target's mask (the original image's when there is none)."""
        canvas = tuple(outputs.get("image_size") or outputs["masks"].shape[-2:])
        logits = outputs.get("logits")
        return [self.class_scores(to_image(outputs["masks"][b:b + 1], canvas, t, target_size(t, "mask")),
                                  None if logits is None else logits[b:b + 1]).argmax(1)[0].cpu()
                for b, t in enumerate(targets)]

    def evaluator(self, dataset) -> Evaluator:
        return MIoUEvaluator(self.num_classes)

    def chance_predictions(self, dataset, targets):
        # Every pixel labelled with the class most frequent in these images' ground truth.
        gt = torch.cat([torch.as_tensor(t["mask"]).reshape(-1) for t in targets])
        label = int(torch.bincount(gt[gt != IGNORE].long(), minlength=self.num_classes).argmax())
        return [torch.full(torch.as_tensor(t["mask"]).shape, label) for t in targets]
