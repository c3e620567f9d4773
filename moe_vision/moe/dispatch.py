"""Token dispatch: permute token-expert assignments so each expert's rows are contiguous,
and combine expert outputs back per token.

Legend: T tokens, K experts per token, A = T*K assignments (A_kept after capacity), D dim, E experts.

The three steps are separate on purpose::

    plan = dispatcher.plan(idx_TK, weights_TK)          # who goes where, capacity
    x_AD = dispatcher.permute(x_TD, plan)               # gather, grouped by expert
    ...an expert-parallel all-to-all would exchange x_AD / plan.counts_E here...
    y_AD = experts(x_AD, plan.counts_E)
    y_TD = dispatcher.unpermute(y_AD, plan, T)          # weighted scatter-add

Assignments are ranked slot-major (every token's first choice before any second choice),
then by token order, so capacity drops are deterministic and first choices win.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Where each kept assignment goes. All tensors are on the tokens' device."""

    token_idx: torch.Tensor  # [A_kept] source token of each row of the sorted buffer
    weights: torch.Tensor  # [A_kept] combine weight of each row
    counts_E: torch.Tensor  # [E] rows per expert in the sorted buffer
    assignment_idx: torch.Tensor  # [A_kept] flat slot-major assignment index (k * T + t)
    capacity: int | None  # tokens per expert, None when dropless
    dropped_assignments: int
    dropped_tokens: int  # tokens whose every assignment was dropped (they pass through the residual)


class TokenDispatcher:
    """Sort-based dispatcher with optional per-expert capacity.

    Args:
        num_experts: E.
        capacity_factor: 0 means dropless. Otherwise each expert takes at most
            ``ceil(capacity_factor * T * K / E)`` assignments; later ones are dropped.
    """

    def __init__(self, num_experts: int, capacity_factor: float = 0.0) -> None:
        if capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = dropless), got {capacity_factor}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int, top_k: int) -> int | None:
        if self.capacity_factor == 0:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * top_k / self.num_experts))

    def plan(self, idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> DispatchPlan:
        T, K = idx_TK.shape
        E = self.num_experts
        # Slot-major flattening: assignment a = k * T + t.
        expert_A = idx_TK.t().reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = torch.bincount(expert_A, minlength=E)
        capacity = self.capacity(T, K)
        dropped_assignments = dropped_tokens = 0
        if capacity is not None:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            sorted_expert = expert_A[order_A]
            position = torch.arange(order_A.numel(), device=idx_TK.device) - starts_E[sorted_expert]
            keep = position < capacity
            dropped_assignments = int((~keep).sum())
            if dropped_assignments:
                kept_tokens = torch.zeros(T, dtype=torch.bool, device=idx_TK.device)
                kept_tokens[order_A[keep] % T] = True
                dropped_tokens = int(T - kept_tokens.sum())
                order_A = order_A[keep]
                counts_E = counts_E.clamp(max=capacity)
        token_idx = order_A % T
        weights = weights_TK.t().reshape(-1)[order_A]
        return DispatchPlan(token_idx, weights, counts_E, order_A, capacity, dropped_assignments, dropped_tokens)

    @staticmethod
    def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Gather token rows into the expert-sorted buffer ``[A_kept, D]``."""
        return x_TD.index_select(0, plan.token_idx)

    @staticmethod
    def unpermute(y_AD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        """Weight each row by its gate and sum rows back into their tokens ``[T, D]``.

        Tokens with no kept assignment get zeros (the residual carries them).
        """
        y_AD = y_AD * plan.weights.to(y_AD.dtype).unsqueeze(1)
        out_TD = y_AD.new_zeros(num_tokens, y_AD.shape[1])
        return out_TD.index_add_(0, plan.token_idx, y_AD)
