"""Hungarian matching of queries to ground-truth objects (scipy's linear_sum_assignment)."""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment


@torch.no_grad()
def hungarian_match(cost_QN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment; returns (query indices, target indices), sorted by query."""
    if cost_QN.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    q, t = linear_sum_assignment(cost_QN.detach().float().cpu().numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)
