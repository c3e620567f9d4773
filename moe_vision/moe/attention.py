"""Attention experts: Mod-Squad's mixture of attention heads.

Legend: B batch, N tokens per image, T = B*N, D dim, E experts, K experts per token,
A = T*K assignments, h heads per expert, d head dim, I = h*d.

Each expert owns a query projection ``D -> I`` and an output projection ``I -> D``; the key and
value projections are shared by all experts. Every token asks its K experts' queries, each
attends over the shared keys/values, and the K outputs are combined with the gate weights.
With ``h = num_heads / K`` the active compute equals a dense attention with ``num_heads`` heads.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

from .dispatch import TokenDispatcher
from .grouped import autocast_inputs, check_kernel, grouped_linear
from .layer import RoutingOutput
from .router import TaskRouter


class GroupedLinear(nn.Module):
    """E linear maps ``[E, in, out]`` applied to expert-sorted rows."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, bias: bool = True,
                 kernel: str = "auto") -> None:
        super().__init__()
        self.num_experts, self.kernel = num_experts, check_kernel(kernel)
        self.weight = nn.Parameter(torch.empty(num_experts, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(num_experts, out_features)) if bias else None
        nn.init.uniform_(self.weight, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x_AI: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        x, w, b = autocast_inputs(x_AI, self.weight, self.bias)
        return grouped_linear(x, counts_E, w, b, self.kernel)


class MoEAttention(nn.Module):
    """Mixture of attention heads with per-task routing (dropless)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        tasks: Iterable[str],
        num_experts: int = 8,
        top_k: int = 2,
        qkv_bias: bool = True,
        router_mode: str = "per_task",
        renormalize: bool = True,
        noisy_gating: bool = False,
        layer_name: str = "attn",
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        if num_heads % top_k:
            raise ValueError(f"attention experts: num_heads={num_heads} must be divisible by attn_top_k={top_k}")
        self.layer_name = layer_name
        self.num_experts, self.top_k = num_experts, top_k
        self.heads_per_expert = num_heads // top_k
        self.head_dim = dim // num_heads
        inner = self.heads_per_expert * self.head_dim
        self.router = TaskRouter(dim, num_experts, top_k, tasks, router_mode, renormalize, noisy_gating)
        self.dispatcher = TokenDispatcher(num_experts, capacity_factor=0.0)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.q_experts = GroupedLinear(num_experts, dim, inner, bias=qkv_bias, kernel=kernel)
        self.o_experts = GroupedLinear(num_experts, inner, dim, bias=True, kernel=kernel)

    def forward(self, x_BND: torch.Tensor, task: str,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RoutingOutput]:
        """``attn_mask``: boolean ``[B, 1, 1, N]``, True for keys that may be attended (padding)."""
        B, N, D = x_BND.shape
        T, K, h, d = B * N, self.top_k, self.heads_per_expert, self.head_dim
        x_TD = x_BND.reshape(T, D)
        r = self.router(x_TD, task)
        plan = self.dispatcher.plan(r.idx_TK, r.weights_TK)
        q_AI = self.q_experts(self.dispatcher.permute(x_TD, plan), plan.rows_E)
        # Back to slot-major order (a = k*T + t) so the K query sets line up as extra query rows.
        q_KTI = q_AI.new_zeros(K * T, h * d).index_copy(0, plan.assignment_idx, q_AI)
        q = q_KTI.view(K, B, N, h, d).permute(1, 3, 0, 2, 4).reshape(B, h, K * N, d)
        k, v = self.kv(x_BND).view(B, N, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B, h, K*N, d]
        o_KTI = o.view(B, h, K, N, d).permute(2, 0, 3, 1, 4).reshape(K * T, h * d)
        y_AD = self.o_experts(o_KTI.index_select(0, plan.assignment_idx), plan.rows_E)
        y_TD = self.dispatcher.unpermute(y_AD, plan, T)
        return y_TD.view(B, N, D), RoutingOutput.from_router(self.layer_name, task, r, self.num_experts)
