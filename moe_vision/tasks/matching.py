"""Hungarian matching of queries to ground-truth objects (scipy's linear_sum_assignment)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.profiler import record_function


@torch.no_grad()
def hungarian_match(cost_QN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment; returns (query indices, target indices), sorted by query."""
    if cost_QN.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    with record_function("matching/hungarian"):
        # A non-finite cost (a diverged model) still gets an assignment: the loss is non-finite
        # anyway, and the trainer's check names the step instead of the matcher failing first.
        cost = cost_QN.detach().float().cpu().nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8)
        q, t = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


def matched_cross_entropy(logits_BQC1: torch.Tensor, matched: list[tuple[int, torch.Tensor, torch.Tensor]],
                          no_object_weight: float) -> torch.Tensor:
    """Classification loss of set prediction: matched queries target their object's class, every
    other query the last ("no object") class, down-weighted by ``no_object_weight``.

    ``matched`` holds ``(image index, query indices, class labels)`` per image.
    """
    B, Q, C1 = logits_BQC1.shape
    target_BQ = torch.full((B, Q), C1 - 1, dtype=torch.long, device=logits_BQC1.device)
    for b, queries, labels in matched:
        target_BQ[b, queries.to(target_BQ.device)] = labels.to(target_BQ.device)
    weight = logits_BQC1.new_ones(C1)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits_BQC1.reshape(-1, C1), target_BQ.reshape(-1), weight=weight)
