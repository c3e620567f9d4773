"""Detection's box geometry and losses: box formats, the top detections of a query set, focal and
varifocal classification losses, L1 + GIoU box losses, paired IoU, the one-to-many token
assignment of the dense head and the denoising attention mask (used by :mod:`.det`).

Legend: B batch, Q queries, M memory tokens, C classes, N ground-truth boxes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.profiler import record_function
from torchvision.ops import box_convert, box_iou, generalized_box_iou


def normalised_cxcywh(target: dict, image_size: tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    boxes = torch.as_tensor(target["boxes"]).float().reshape(-1, 4)
    scale = boxes.new_tensor([w, h, w, h])
    return box_convert(boxes / scale, "xyxy", "cxcywh")


def xyxy(b: torch.Tensor) -> torch.Tensor:
    return box_convert(b, "cxcywh", "xyxy")


def top_detections(logits_BQC: torch.Tensor, boxes_BQ4: torch.Tensor, k: int):
    """The ``k`` best (query, class) pairs of each image by sigmoid score: ``scores [B, K]``,
    ``labels [B, K]`` and their query's box ``[B, K, 4]`` as normalised XYXY inside the image."""
    prob_BQC = logits_BQC.float().sigmoid()
    C = prob_BQC.shape[-1]
    scores_BK, flat_BK = prob_BQC.flatten(1).topk(min(k, prob_BQC[0].numel()), dim=1)
    boxes_BQ4 = xyxy(boxes_BQ4.float()).clamp(0, 1)
    return scores_BK, flat_BK % C, boxes_BQ4.gather(1, (flat_BK // C)[..., None].expand(-1, -1, 4))


def varifocal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Summed varifocal loss (VarifocalNet): positives (target q > 0) weighted by q, negatives by
    ``alpha * p^gamma``; targets are IoU-aware scores in [0, 1]."""
    p = logits.sigmoid()
    weight = torch.where(target > 0, target, alpha * p.detach().pow(gamma))
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed sigmoid focal loss (RetinaNet) with binary targets."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * ce * (1 - p_t) ** gamma).sum()


def box_losses(pred_N4: torch.Tensor, gt_N4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed L1 and (1 - GIoU) between matched normalised cxcywh boxes."""
    if len(pred_N4) == 0:
        zero = pred_N4.sum() * 0
        return zero, zero
    giou = torch.diag(generalized_box_iou(xyxy(pred_N4), xyxy(gt_N4)))
    return F.l1_loss(pred_N4, gt_N4, reduction="sum"), (1 - giou).sum()


def paired_iou(a_N4: torch.Tensor, b_N4: torch.Tensor) -> torch.Tensor:
    """IoU of each box in ``a`` with the box at the same index in ``b`` (cxcywh)."""
    if len(a_N4) == 0:
        return a_N4.new_zeros(0)
    return torch.diag(box_iou(xyxy(a_N4), xyxy(b_N4)))


@torch.no_grad()
@record_function("matching/dense_assign")
def assign_tokens(centres_M2: torch.Tensor, strides_M: torch.Tensor, gt_N4: torch.Tensor, image_size: tuple[int, int],
                  radius: float = 1.5) -> torch.Tensor:
    """One-to-many assignment of memory tokens to ground-truth boxes ``[M]`` (-1 = background).

    A token is a candidate for a box when its centre lies inside the box and, with ``radius`` > 0,
    within ``radius`` strides of the box centre (FCOS centre sampling). A token with several
    candidate boxes takes the smallest. A box that no token's centre falls into gets the token nearest its centre, so
    every object has at least one positive.
    """
    M, N = len(centres_M2), len(gt_N4)
    assigned = torch.full((M,), -1, dtype=torch.long, device=centres_M2.device)
    if N == 0:
        return assigned
    h, w = image_size
    x0y0, x1y1 = xyxy(gt_N4)[:, :2], xyxy(gt_N4)[:, 2:]
    c = centres_M2[:, None, :]  # [M, 1, 2]
    inside = ((c > x0y0[None]) & (c < x1y1[None])).all(-1)  # [M, N]
    if radius > 0:
        reach = radius * strides_M[:, None, None] / centres_M2.new_tensor([w, h])  # [M, 1, 2]
        inside &= ((c - gt_N4[None, :, :2]).abs() < reach).all(-1)
    area = (gt_N4[:, 2] * gt_N4[:, 3])[None].expand(M, N)
    area = torch.where(inside, area, torch.full_like(area, float("inf")))
    best_area, best = area.min(1)
    assigned = torch.where(torch.isfinite(best_area), best, assigned)
    # An object no centre falls into takes its nearest token (no data-dependent branch: every
    # object's nearest token is computed, and only the missing ones are written).
    counts_N = torch.zeros(N + 1, dtype=torch.long, device=assigned.device).index_add_(
        0, assigned + 1, torch.ones_like(assigned))[1:]
    missing_N = counts_N == 0
    nearest_N = ((centres_M2[:, None] - gt_N4[None, :, :2]) ** 2).sum(-1).argmin(0)
    claim_N = torch.where(missing_N, torch.arange(N, device=assigned.device), -1)
    claimed_M = torch.full_like(assigned, -1).scatter_reduce(0, nearest_N, claim_N, "amax")
    return torch.where(claimed_M >= 0, claimed_M, assigned)


def denoising_mask(num_dn: int, groups: int, num_queries: int, device=None) -> torch.Tensor:
    """Self-attention mask ``[G*n + Q, G*n + Q]``, True where row may attend to column. The
    ``G`` denoising groups of ``n`` queries come first: each sees itself and the matching
    queries; the ``Q`` matching queries see only each other (they must not learn from noised
    ground truth, which inference does not have)."""
    total = groups * num_dn + num_queries
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    dn_end = groups * num_dn
    allowed[dn_end:, dn_end:] = True
    for g in range(groups):
        s = slice(g * num_dn, (g + 1) * num_dn)
        allowed[s, s] = True
        allowed[s, dn_end:] = True
    return allowed
