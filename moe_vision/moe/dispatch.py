"""Token dispatch: permute token-expert assignments so each expert's rows are contiguous,
and combine expert outputs back per token.

Legend: T tokens, K experts per token, A = T*K assignments, R buffer rows, D dim, E experts.

The three steps are separate on purpose::

    plan = dispatcher.plan(idx_TK, weights_TK)          # who goes where, capacity
    x_RD = dispatcher.permute(x_TD, plan)               # gather, grouped by expert
    ...an expert-parallel all-to-all would exchange x_RD / plan.rows_E here...
    y_RD = experts(x_RD, plan.rows_E)
    y_TD = dispatcher.unpermute(y_RD, plan, T)          # weighted scatter-add

Nothing here reads a value on the host or makes a shape depend on the data, so the layer runs
without device synchronisation and compiles into one graph: counts are a scatter-add, the
permutation an argsort, drops a mask. Dropless, the buffer holds the A assignments sorted by
expert. With a capacity C, it holds E x C slots (GShard's layout): an expert's first C
assignments fill its slots, the rest are dropped, and unused slots are empty rows of weight 0.

Assignments are ranked slot-major (every token's first choice before any second choice),
then by token order, so capacity drops are deterministic and first choices win.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def count_per_expert(expert_A: torch.Tensor, num_experts: int) -> torch.Tensor:
    """How many assignments each expert received ``[E]`` (``bincount`` with a fixed length)."""
    return torch.zeros(num_experts, dtype=torch.long, device=expert_A.device).index_add_(
        0, expert_A, torch.ones_like(expert_A))


@dataclass
class DispatchPlan:
    """Where each buffer row comes from and goes back to. All tensors are on the tokens' device."""

    token_idx: torch.Tensor  # [R] source token of each buffer row (token 0 for an empty slot)
    weights: torch.Tensor  # [R] combine weight of each row (0 for an empty slot)
    counts_E: torch.Tensor  # [E] assignments each expert keeps
    rows_E: torch.Tensor  # [E] buffer rows of each expert (counts_E dropless; C each with capacity)
    assignment_idx: torch.Tensor  # [R] flat slot-major assignment index (k * T + t)
    capacity: int | None  # tokens per expert, None when dropless
    dropped_assignments: torch.Tensor | int  # a 0-d tensor with capacity (read it only when logging)
    dropped_tokens: torch.Tensor | int  # tokens whose every assignment was dropped (the residual carries them)


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
        weight_A = weights_TK.t().reshape(-1)
        order_A = torch.argsort(expert_A, stable=True)
        counts_E = count_per_expert(expert_A, E)
        capacity = self.capacity(T, K)
        if capacity is None:
            return DispatchPlan(order_A % T, weight_A[order_A], counts_E, counts_E, order_A, None, 0, 0)
        # Rank of each sorted assignment within its expert; the first `capacity` keep a slot.
        sorted_expert = expert_A[order_A]
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        position = torch.arange(order_A.numel(), device=idx_TK.device) - starts_E[sorted_expert]
        keep = position < capacity
        slots = E * capacity
        slot = torch.where(keep, sorted_expert * capacity + position, slots)  # dropped -> a discarded slot
        token_idx = torch.zeros(slots + 1, dtype=torch.long, device=idx_TK.device).scatter_(0, slot, order_A % T)
        weights = weight_A.new_zeros(slots + 1).scatter_(0, slot, torch.where(keep, weight_A[order_A], 0))
        assignment = torch.zeros(slots + 1, dtype=torch.long, device=idx_TK.device).scatter_(0, slot, order_A)
        kept_tokens = torch.zeros(T, dtype=torch.long, device=idx_TK.device).index_add_(0, order_A % T, keep.long())
        return DispatchPlan(token_idx[:slots], weights[:slots], counts_E.clamp(max=capacity),
                            torch.full((E,), capacity, dtype=torch.long, device=idx_TK.device), assignment[:slots],
                            capacity, (~keep).sum(), (kept_tokens == 0).sum())

    @staticmethod
    def permute(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Gather token rows into the expert-sorted buffer ``[R, D]``."""
        return x_TD.index_select(0, plan.token_idx)

    @staticmethod
    def unpermute(y_RD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
        """Weight each row by its gate and sum rows back into their tokens ``[T, D]``.

        Tokens with no kept assignment get zeros (the residual carries them).
        """
        y_RD = y_RD * plan.weights.to(y_RD.dtype).unsqueeze(1)
        out_TD = y_RD.new_zeros(num_tokens, y_RD.shape[1])
        return out_TD.index_add_(0, plan.token_idx, y_RD)
