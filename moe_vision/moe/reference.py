"""Naive reference MoE: a Python loop over experts held as separate ``nn.Linear`` modules.

Slow on purpose and obviously correct; the tests compare :class:`MoEMLP` against it and
``tools/benchmark.py`` reports how much faster the real layer is.
"""
from __future__ import annotations

import torch
from torch import nn

from .experts import GroupedExperts, get_activation


class NaiveExperts(nn.Module):
    """E separate two-layer MLPs; ``forward(x_TD, idx_TK, weights_TK)`` loops over experts."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str = "gelu") -> None:
        super().__init__()
        self.act = get_activation(activation)
        self.fc1 = nn.ModuleList(nn.Linear(dim, hidden) for _ in range(num_experts))
        self.fc2 = nn.ModuleList(nn.Linear(hidden, dim) for _ in range(num_experts))

    @classmethod
    def from_grouped(cls, g: GroupedExperts) -> "NaiveExperts":
        """Copy of ``g``'s weights as separate Linear modules."""
        ref = cls(g.num_experts, g.dim, g.hidden, g.activation).to(device=g.w1.device, dtype=g.w1.dtype)
        with torch.no_grad():
            for e in range(g.num_experts):
                ref.fc1[e].weight.copy_(g.w1[e].t())
                ref.fc1[e].bias.copy_(g.b1[e])
                ref.fc2[e].weight.copy_(g.w2[e].t())
                ref.fc2[e].bias.copy_(g.b2[e])
        return ref

    def forward(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor,
                keep_TK: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted sum over each token's chosen experts; ``keep_TK`` masks dropped assignments."""
        out = torch.zeros_like(x_TD)
        for e in range(len(self.fc1)):
            mask = idx_TK == e
            if keep_TK is not None:
                mask = mask & keep_TK
            rows, slots = torch.nonzero(mask, as_tuple=True)
            if rows.numel() == 0:
                continue
            y = self.fc2[e](self.act(self.fc1[e](x_TD[rows])))
            out = out.index_add(0, rows, y * weights_TK[rows, slots].unsqueeze(1).to(y.dtype))
        return out
