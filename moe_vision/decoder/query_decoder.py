"""GLID's query decoder: one shared set of learnable queries, self-attention among queries and
cross-attention to the multi-scale memory. Every task reads its answer from the same queries.

Legend: B batch, Q queries, M memory tokens, D decoder dim.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), always computed the same way (scaled_dot_product_attention).

    ``nn.MultiheadAttention`` switches to a fused inference kernel depending on ``training`` and on
    whether its parameters require grad; freezing a model must not change its outputs by a bit.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, q_BQD: torch.Tensor, k_BMD: torch.Tensor, v_BMD: torch.Tensor) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        B, h = q_BQD.shape[0], self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, x.shape[1], h, -1).transpose(1, 2)
        o = F.scaled_dot_product_attention(heads(F.linear(q_BQD, w_q, b_q)), heads(F.linear(k_BMD, w_k, b_k)),
                                           heads(F.linear(v_BMD, w_v, b_v)),
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(o.transpose(1, 2).reshape(B, q_BQD.shape[1], -1))


class QueryDecoderLayer(nn.Module):
    """Pre-norm: self-attention, cross-attention, feed-forward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = Attention(dim, num_heads, dropout)
        self.cross_attn = Attention(dim, num_heads, dropout)
        hidden = int(dim * mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, q_BQD, query_pos_BQD, memory_BMD, memory_pos_BMD):
        h = self.norm1(q_BQD)
        q_BQD = q_BQD + self.self_attn(h + query_pos_BQD, h + query_pos_BQD, h)
        h = self.norm2(q_BQD)
        q_BQD = q_BQD + self.cross_attn(h + query_pos_BQD, memory_BMD + memory_pos_BMD, memory_BMD)
        return q_BQD + self.ffn(self.norm3(q_BQD))


class QueryDecoder(nn.Module):
    """``forward(memory, memory_pos)`` -> query answers ``[B, Q, D]``."""

    def __init__(self, dim: int = 128, num_queries: int = 20, num_layers: int = 3, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.query_embed = nn.Parameter(torch.zeros(num_queries, dim))
        self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))
        nn.init.normal_(self.query_embed, std=0.02)
        nn.init.normal_(self.query_pos, std=0.02)
        self.layers = nn.ModuleList(QueryDecoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, memory_BMD: torch.Tensor, memory_pos_BMD: torch.Tensor,
                return_all: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Final answers ``[B, Q, D]``; with ``return_all`` every layer's (normed) answers, last last,
        for deep supervision."""
        B = memory_BMD.shape[0]
        q = self.query_embed.unsqueeze(0).expand(B, -1, -1).to(memory_BMD.dtype)
        pos = self.query_pos.unsqueeze(0).expand(B, -1, -1).to(memory_BMD.dtype)
        outs = []
        for layer in self.layers:
            q = layer(q, pos, memory_BMD, memory_pos_BMD)
            if return_all:
                outs.append(self.norm(q))
        return outs if return_all else self.norm(q)
