"""Detection on the shared GLID decoder, built to converge in a few epochs from scratch.

The task's parameters are two linear layers: ``class_linear`` (sigmoid score per class, no
"no object" class) and ``box_linear`` (offsets of a normalised cxcywh box, in logit space, from a
reference box). They are applied to three kinds of features:

1. every memory token (dense, two-stage): the box is relative to an anchor at the token's
   centre; trained with a one-to-many assignment (a token whose centre lies in a ground-truth
   box, near its centre, predicts it; the smallest such box wins), matching-free;
2. the decoder's queries: the ``num_queries`` best tokens become the reference boxes of the
   shared queries (mixed query selection, DINO); every decoder layer refines the boxes through
   the same ``box_linear`` (iterative refinement); trained one-to-one with Hungarian matching on
   every layer, so inference needs no NMS;
3. while training only, denoising queries (DN-DETR / DINO): noised ground-truth boxes with label
   embeddings as content, which must reconstruct their box and class; an attention mask keeps
   the matching queries from seeing them. The label embedding (``dn_label_embed``) is the only
   training-only parameter; bundles drop it.

Classification uses the varifocal loss (IoU-aware targets: a positive's target score is the IoU
of its box with the ground truth) so that scores rank boxes by localisation quality.

Legend: B batch, Q queries, M memory tokens, C classes, N ground-truth boxes, G denoising groups.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from torchvision.ops import batched_nms, generalized_box_iou

from ..decoder import Queries
from .base import Evaluator, Task, loss_normaliser, register_task
from .det_boxes import (assign_tokens, box_losses, denoising_mask, focal_loss, normalised_cxcywh, paired_iou,
                        top_detections, varifocal_loss, xyxy)
from .det_eval import CocoEvaluator
from .matching import device_assignment, hungarian_match

__all__ = ["CocoEvaluator", "DetHead", "DetectionTask", "assign_tokens", "denoising_mask", "focal_loss",
           "top_detections", "varifocal_loss"]

INFERENCE_MODES = ("queries", "queries_nms", "dense_nms")
MATCHERS = ("auto", "scipy", "device")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    x = x.clamp(eps, 1 - eps)
    return torch.log(x / (1 - x))


class DetHead(nn.Module):
    """The task's topmost linear layers (+ the training-only denoising label embedding)."""

    def __init__(self, dim: int, num_classes: int, denoising: bool = False) -> None:
        super().__init__()
        self.class_linear = nn.Linear(dim, num_classes)
        self.box_linear = nn.Linear(dim, 4)
        # Focal-loss prior: every class starts at probability 0.01, so the many negatives do not
        # swamp the first steps; the box starts exactly at its reference.
        nn.init.constant_(self.class_linear.bias, -math.log(99.0))
        nn.init.zeros_(self.box_linear.weight)
        nn.init.zeros_(self.box_linear.bias)
        self.dn_label_embed = nn.Embedding(num_classes, dim) if denoising else None

    def boxes(self, features: torch.Tensor, reference_4: torch.Tensor) -> torch.Tensor:
        """Normalised cxcywh boxes: ``reference`` moved by ``box_linear`` in logit space."""
        return (self.box_linear(features).float() + inverse_sigmoid(reference_4.float())).sigmoid()


@register_task
class DetectionTask(Task):
    """Options (task config keys): ``dense_radius`` (centre-sampling radius in strides, 0 = the
    whole box), ``class_loss`` (``varifocal`` | ``focal``), ``denoising_groups`` (0 disables
    denoising), ``dn_box_noise``, ``dn_label_noise``, ``query_content`` (``learned``: the shared
    query embeddings, ``token``: the selected tokens' features), ``inference`` (``queries``:
    one-to-one, no NMS; ``queries_nms`` (the default): the same + class-wise NMS, which removes the
    duplicate boxes a briefly trained one-to-one decoder still makes; ``dense_nms``: dense token
    predictions + NMS), ``nms_iou``."""

    type_name, primary_metric = "det", "mAP"
    loss_defaults = {"class": 2.0, "l1": 5.0, "giou": 2.0, "dense": 1.0, "denoising": 1.0}
    training_only = ("dn_label_embed",)
    unordered_outputs = ("logits", "boxes")  # queries come in the order of their proposals' scores

    def option(self, key: str, default):
        """The task option ``key`` (``tasks.<name>.<key>``), ``default`` when the config leaves it out."""
        return self.options.get(key, default)

    @property
    def dn_groups(self) -> int:
        return int(self.option("denoising_groups", 0))

    def inference_config(self) -> dict:
        return {**self.config(), "denoising_groups": 0}

    def forward_uses_targets(self, training: bool) -> bool:
        return training and self.dn_groups > 0  # the denoising queries are built from the boxes

    def build_head(self, dim: int) -> nn.Module:
        if self.option("inference", "queries_nms") not in INFERENCE_MODES:
            raise ValueError(f"det inference={self.option('inference', None)!r}; expected one of {list(INFERENCE_MODES)}")
        if self.option("class_loss", "varifocal") not in ("varifocal", "focal"):
            raise ValueError(f"det class_loss={self.option('class_loss', None)!r}; expected 'varifocal' or 'focal'")
        if self.option("matcher", "auto") not in MATCHERS:
            raise ValueError(f"tasks.{self.name}.matcher={self.option('matcher', None)!r}: expected auto, scipy or device")
        return DetHead(dim, self.num_classes, denoising=self.dn_groups > 0)

    # ------------------------------------------------------------------ forward
    def anchors(self, feats, image_size) -> torch.Tensor:
        """A square anchor at each memory token's centre, two strides wide ``[M, 4]``."""
        side = (2 * feats.strides_M / max(image_size)).clamp(max=0.9)
        return torch.cat([feats.centres_M2, side[:, None], side[:, None]], -1)

    def forward(self, head, decoder, feats, image_size, deep_supervision=False, targets=None):
        # Boxes are normalised by the frame (the canvas unless the batch is padded into a larger one).
        image_size = tuple(feats.frame) if feats.frame is not None else image_size
        tokens_BMD = decoder.proposal_norm(feats.memory_BMD)
        anchors_M4 = self.anchors(feats, image_size)
        dense_logits = head.class_linear(tokens_BMD)
        dense_boxes = head.boxes(tokens_BMD, anchors_M4.expand(tokens_BMD.shape[0], -1, -1))
        B, M, _ = tokens_BMD.shape
        K = min(decoder.num_queries, M)
        score_BM = dense_logits.detach().float().amax(-1)
        if feats.memory_valid_BM is not None:  # padding never proposes a box
            score_BM = score_BM.masked_fill(~feats.memory_valid_BM, float("-inf"))
        top_BK = score_BM.topk(K, dim=1).indices
        reference = dense_boxes.detach().gather(1, top_BK[..., None].expand(-1, -1, 4))
        if self.option("query_content", "learned") == "token":
            content = tokens_BMD.detach().gather(1, top_BK[..., None].expand(-1, -1, tokens_BMD.shape[-1]))
        else:
            content = decoder.query_embed[:K].unsqueeze(0).expand(B, -1, -1)
        mask, dn = None, None
        if head.training and targets is not None and self.dn_groups > 0:
            dn = self.denoising_queries(head, targets, image_size, content.device)
            if dn is not None:
                content = torch.cat([dn["content"].to(content.dtype), content], 1)
                reference = torch.cat([dn["reference"], reference], 1)
                mask = denoising_mask(dn["num"], self.dn_groups, K, content.device)
        layers = decoder(feats.memory_BMD, feats.memory_pos_BMD, return_all=True,
                         queries=Queries(content, None, reference, head.boxes, mask), centres_M2=feats.centres_M2,
                         memory_valid_BM=feats.memory_valid_BM)
        if not (head.training and deep_supervision):
            layers = layers[-1:]
        n_dn = 0 if dn is None else self.dn_groups * dn["num"]
        outs = [{"logits": head.class_linear(a[:, n_dn:]), "boxes": b[:, n_dn:], "image_size": image_size}
                for a, b in layers]
        out = outs[-1]
        out["aux_outputs"] = outs[:-1]
        out["dense"] = {"logits": dense_logits, "boxes": dense_boxes, "centres": feats.centres_M2,
                        "strides": feats.strides_M, "valid": feats.memory_valid_BM}
        if dn is not None:
            out["denoising"] = {**dn, "layers": [{"logits": head.class_linear(a[:, :n_dn]), "boxes": b[:, :n_dn]}
                                                 for a, b in layers]}
        return out

    def denoising_queries(self, head, targets, image_size, device):
        """Noised copies of each image's ground truth, ``G`` groups padded to the batch's
        largest box count: label embeddings (some labels flipped) as content, jittered boxes as
        references."""
        with torch.no_grad():
            noised = self._noised_ground_truth(targets, image_size, device)
        if noised is None:
            return None
        return {**noised, "content": head.dn_label_embed(noised["noised_labels"])}

    def _noised_ground_truth(self, targets, image_size, device):
        gts = [normalised_cxcywh(t, image_size) for t in targets]
        n = max(len(g) for g in gts)
        if n == 0:
            return None
        B, G = len(targets), self.dn_groups
        boxes = torch.zeros(B, n, 4, device=device)
        boxes[..., :2], boxes[..., 2:] = 0.5, 0.1
        labels = torch.zeros(B, n, dtype=torch.long, device=device)
        valid = torch.zeros(B, n, dtype=torch.bool, device=device)
        for b, (g, t) in enumerate(zip(gts, targets)):
            boxes[b, :len(g)] = g.to(device)
            labels[b, :len(g)] = torch.as_tensor(t["labels"]).to(device)
            valid[b, :len(g)] = True
        boxes, labels, valid = boxes.repeat(1, G, 1), labels.repeat(1, G), valid.repeat(1, G)
        flip = torch.rand(labels.shape, device=device) < float(self.option("dn_label_noise", 0.2))
        noised_labels = torch.where(flip, torch.randint_like(labels, self.num_classes), labels)
        lam = float(self.option("dn_box_noise", 0.4))
        jitter = (torch.rand_like(boxes) * 2 - 1) * lam
        noised = boxes.clone()
        noised[..., :2] += jitter[..., :2] * boxes[..., 2:] / 2
        noised[..., 2:] *= 1 + jitter[..., 2:]
        noised = noised.clamp(1e-3, 1.0)
        return {"noised_labels": noised_labels, "reference": noised, "num": n,
                "gt_boxes": boxes, "gt_labels": labels, "valid": valid}

    # ------------------------------------------------------------------ losses
    def _class_loss(self, logits, target) -> torch.Tensor:
        if self.option("class_loss", "varifocal") == "focal":
            return focal_loss(logits, (target > 0).to(logits.dtype))
        return varifocal_loss(logits, target)

    def _score_targets(self, logits, idx, labels, pred_boxes, gt_boxes) -> torch.Tensor:
        """Classification targets: zeros, and at each positive (``idx`` into the flattened
        leading dims) its class set to the IoU of its box with the ground truth (varifocal) or 1."""
        target = torch.zeros_like(logits, dtype=torch.float32)
        flat = target.view(-1, target.shape[-1])
        score = paired_iou(pred_boxes.detach(), gt_boxes).clamp(min=0.01) \
            if self.option("class_loss", "varifocal") == "varifocal" else torch.ones(len(idx), device=logits.device)
        flat[idx, labels] = score.to(flat.dtype)
        return target

    def matcher(self, gts, num_queries: int, device: torch.device) -> str:
        """``tasks.det.matcher``: ``device`` (tensor operations, no copy to the host), ``scipy``
        (the cost matrices go to the host), or ``auto``: device on CUDA while no image of the
        batch has more than ``matcher_device_max_objects`` objects (the device solver's sequential
        steps grow with the square of that count), scipy otherwise. Decided on the host from the
        targets, which are there anyway."""
        choice = self.option("matcher", "auto")
        most = max((len(g) for _, g in gts), default=0)
        if most > num_queries:  # more objects than queries: only scipy's rectangular solver
            return "scipy"
        if choice == "auto":
            small = most <= int(self.option("matcher_device_max_objects", 16))
            return "device" if device.type == "cuda" and small else "scipy"
        return choice

    def _match_cost(self, logits_BQC, boxes_BQ4, labels, gt) -> torch.Tensor:
        """(B, Q, G) cost of every query against every object of the batch (DETR's trick: one
        matrix for the whole batch, each image then takes its own columns)."""
        B, Q, _ = logits_BQC.shape
        p = logits_BQC.float().sigmoid().reshape(B * Q, -1)[:, labels]
        cost_class = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log() - 0.75 * p ** 2 * -(1 - p + 1e-8).log()
        boxes = boxes_BQ4.float().reshape(B * Q, 4)
        return (self.loss_weight("class") * cost_class + self.loss_weight("l1") * torch.cdist(boxes, gt, p=1)
                - self.loss_weight("giou") * generalized_box_iou(xyxy(boxes), xyxy(gt))).reshape(B, Q, -1)

    @record_function("matching/det")
    def match(self, layers: list[dict], gts) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """One-to-one matching of every decoder layer's predictions (``layers``: outputs with
        ``logits`` and ``boxes``) at once: per layer, per image (query indices, object indices)
        on the predictions' device."""
        with torch.no_grad():
            B, Q, _ = layers[0]["logits"].shape
            device = layers[0]["logits"].device
            counts = [len(g) for _, g in gts]
            empty = torch.zeros(0, dtype=torch.long, device=device)
            if sum(counts) == 0:
                return [[(empty, empty)] * B for _ in layers]
            labels = torch.cat([lab for lab, _ in gts])
            gt = torch.cat([g for _, g in gts])
            cost_LBQG = torch.stack([self._match_cost(o["logits"], o["boxes"], labels, gt) for o in layers])
            starts = [sum(counts[:b]) for b in range(B)]
            if self.matcher(gts, Q, device) == "device":
                # Each image's own columns, padded to the batch's largest count: (L*B, N, Q) (the
                # padding rows read any column: the solver ignores them).
                most = max(counts)
                columns = (torch.tensor(starts, device=device)[:, None] + torch.arange(most, device=device)).clamp(
                    max=len(gt) - 1)
                own_LBQN = cost_LBQG.gather(3, columns[None, :, None, :].expand(len(layers), B, Q, most))
                flat = device_assignment(own_LBQN.transpose(2, 3).reshape(-1, most, Q), counts * len(layers))
                return [flat[i * B:(i + 1) * B] for i in range(len(layers))]
            cost = cost_LBQG.cpu()  # the one copy to the host: all layers together
            return [[tuple(t.to(device) for t in hungarian_match(cost[i, b, :, s:s + n]))
                     for b, (s, n) in enumerate(zip(starts, counts))] for i in range(len(layers))]

    def set_loss(self, out, gts, num_boxes: float, matches=None) -> dict[str, torch.Tensor]:
        """One-to-one loss of one decoder layer's predictions (``matches``: from :meth:`match`,
        computed here when not given)."""
        logits, boxes = out["logits"].float(), out["boxes"].float()
        if matches is None:
            matches = self.match([out], gts)[0]
        Q = logits.shape[1]
        most = max((len(g) for _, g in gts), default=0)
        if most > Q and not getattr(self, "_warned_queries", False):
            self._warned_queries = True
            warnings.warn(f"det: an image has {most} objects, more objects than queries ({Q}); only {Q} can be "
                          "matched and detected per image: raise decoder.num_queries", stacklevel=2)
        idx = torch.cat([b * Q + qi for b, (qi, _) in enumerate(matches)])
        labels = torch.cat([gts[b][0][ti] for b, (_, ti) in enumerate(matches)])
        gt = torch.cat([gts[b][1][ti] for b, (_, ti) in enumerate(matches)])
        pred = boxes.reshape(-1, 4)[idx]
        cls = self._class_loss(logits, self._score_targets(logits, idx, labels, pred, gt)) / num_boxes
        l1, giou = box_losses(pred, gt)
        return {"class": cls, "l1": l1 / num_boxes, "giou": giou / num_boxes}

    def dense_loss(self, dense, gts, image_size) -> dict[str, torch.Tensor]:
        """One-to-many, matching-free loss of every memory token."""
        logits, boxes = dense["logits"].float(), dense["boxes"].float()
        B, M, _ = logits.shape
        radius = float(self.option("dense_radius", 1.5))
        idx, labels, gt = [], [], []
        for b, (lab, g) in enumerate(gts):
            assigned = assign_tokens(dense["centres"], dense["strides"], g.to(logits.device), image_size, radius)
            pos = (assigned >= 0).nonzero().squeeze(1)
            idx.append(b * M + pos)
            labels.append(lab.to(logits.device)[assigned[pos]])
            gt.append(g.to(logits.device)[assigned[pos]])
        idx, labels, gt = torch.cat(idx), torch.cat(labels), torch.cat(gt)
        num_pos = loss_normaliser(len(idx), logits.device)
        pred = boxes.reshape(-1, 4)[idx]
        target = self._score_targets(logits, idx, labels, pred, gt)
        if dense.get("valid") is not None:  # padding is not background: no loss there at all
            logits, target = logits[dense["valid"]], target[dense["valid"]]
        cls = self._class_loss(logits, target) / num_pos
        l1, giou = box_losses(pred, gt)
        return {"class": cls, "l1": l1 / num_pos, "giou": giou / num_pos}

    def denoising_loss(self, dn) -> dict[str, torch.Tensor]:
        """Each denoising query reconstructs the ground truth it was made from (no matching)."""
        valid = dn["valid"].reshape(-1)
        idx = valid.nonzero().squeeze(1)
        n = loss_normaliser(len(idx), valid.device)
        labels, gt = dn["gt_labels"].reshape(-1)[idx], dn["gt_boxes"].reshape(-1, 4)[idx]
        terms = []
        for layer in dn["layers"]:
            logits, boxes = layer["logits"].float(), layer["boxes"].float()
            pred = boxes.reshape(-1, 4)[idx]
            cls = self._class_loss(logits, self._score_targets(logits, idx, labels, pred, gt)) / n
            l1, giou = box_losses(pred, gt)
            terms.append(self.loss_weight("class") * cls + self.loss_weight("l1") * l1 / n + self.loss_weight("giou") * giou / n)
        return torch.stack(terms).mean()

    def _weighted(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_weight("class") * terms["class"] + self.loss_weight("l1") * terms["l1"] + self.loss_weight("giou") * terms["giou"]

    def _ground_truth(self, outputs, targets):
        """Per image ``(labels, normalised cxcywh boxes)`` on the predictions' device, and the box
        count the losses divide by."""
        size, device = outputs["image_size"], outputs["logits"].device
        gts = [(torch.as_tensor(t["labels"]).long().to(device), normalised_cxcywh(t, size).to(device))
               for t in targets]
        return gts, loss_normaliser(sum(len(g) for _, g in gts), device)

    def _layer_loss(self, outputs, gts, num_boxes, matches=None) -> dict[str, torch.Tensor]:
        terms = self.set_loss(outputs, gts, num_boxes, matches)
        return {"loss": self._weighted(terms), **terms}

    def loss(self, outputs, targets):
        """Loss of the final decoder layer alone (one-to-one)."""
        return self._layer_loss(outputs, *self._ground_truth(outputs, targets))

    def total_loss(self, outputs, targets):
        """Final layer + mean of the earlier layers (deep supervision) + the dense token loss +
        the denoising loss, each term reported (the ground truth is prepared once for all)."""
        gts, num_boxes = self._ground_truth(outputs, targets)
        aux = outputs.get("aux_outputs") or []
        matches = self.match([outputs, *aux], gts)
        losses = self._layer_loss(outputs, gts, num_boxes, matches[0])
        if aux:
            losses["aux_layers"] = torch.stack([self._layer_loss(o, gts, num_boxes, m)["loss"]
                                                for o, m in zip(aux, matches[1:])]).mean()
            losses["loss"] = losses["loss"] + losses["aux_layers"]
        if "dense" in outputs and self.loss_weight("dense") > 0:
            losses["dense"] = self._weighted(self.dense_loss(outputs["dense"], gts, outputs["image_size"]))
            losses["loss"] = losses["loss"] + self.loss_weight("dense") * losses["dense"]
        if "denoising" in outputs:
            losses["denoising"] = self.denoising_loss(outputs["denoising"])
            losses["loss"] = losses["loss"] + self.loss_weight("denoising") * losses["denoising"]
        return losses

    # ------------------------------------------------------------------ inference
    def postprocess(self, outputs, targets, max_detections: int = 100):
        """Top-scoring (box, class) pairs per image, boxes in original image pixels (XYXY): from
        the frame to the resized image (``input_size``, clipped to it), then to ``orig_size``.

        ``inference=queries``: the decoder's one-to-one predictions, no NMS; ``queries_nms``: the
        same with class-wise NMS at ``nms_iou`` (removes the duplicates a briefly trained
        one-to-one decoder still makes); ``dense_nms``: the dense token predictions + NMS."""
        mode = self.option("inference", "queries_nms")
        src = outputs["dense"] if mode == "dense_nms" else outputs
        nms = mode != "queries"
        scores_BK, labels_BK, boxes_BK4 = top_detections(src["logits"], src["boxes"],
                                                         max_detections * (4 if nms else 1))
        preds = []
        for b, t in enumerate(targets):
            h, w = [int(v) for v in t["orig_size"]]
            # The frame boxes are normalised by; outputs without one (exported graphs) fill the input.
            fh, fw = outputs.get("image_size") or t.get("input_size", (h, w))
            ih, iw = [int(v) for v in t.get("input_size", (fh, fw))]  # where the resized image ends
            scores, c = scores_BK[b], labels_BK[b]
            px = boxes_BK4[b] * boxes_BK4.new_tensor([fw, fh, fw, fh])
            px = torch.minimum(px, px.new_tensor([iw, ih, iw, ih]))
            xyxy = px * px.new_tensor([w / iw, h / ih, w / iw, h / ih])
            if nms:
                keep = batched_nms(xyxy, scores, c, float(self.option("nms_iou", 0.6)))[:max_detections]
                xyxy, scores, c = xyxy[keep], scores[keep], c[keep]
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
