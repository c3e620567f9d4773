"""GLID's query decoder: one shared set of learnable queries, self-attention among queries and
cross-attention to the multi-scale memory. Every task reads its answer from the same queries.

Queries may carry reference boxes (detection): their position embedding is then computed from
the box (DAB-DETR), each layer's answer may move the box (iterative refinement, through the
task's own box linear), and cross-attention may be biased towards memory tokens near the box
(a Gaussian spatial prior as in SMCA), which makes global attention converge much faster.

Legend: B batch, Q queries, M memory tokens, D decoder dim, h heads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from .pixel_decoder import sine_embed_points


def gaussian_attention_bias(boxes_BQ4: torch.Tensor, centres_M2: torch.Tensor, strength: float) -> torch.Tensor:
    """Additive cross-attention bias ``[B, 1, Q, M]`` for queries centred in normalised cxcywh
    boxes: a memory token at offset (dx, dy) from a box centre gets
    ``-strength * ((dx / w)^2 + (dy / h)^2)``."""
    d = centres_M2[None, None] - boxes_BQ4[:, :, None, :2]  # [B, Q, M, 2]
    wh = boxes_BQ4[:, :, None, 2:].clamp(min=1e-3)
    return (-strength * ((d / wh) ** 2).sum(-1)).unsqueeze(1)


def masked_memory(cross_mask: torch.Tensor | None, memory_valid_BM: torch.Tensor) -> torch.Tensor:
    """A cross-attention mask that also hides padded memory tokens: boolean ``[B, 1, 1, M]`` when
    there was none, else the additive bias with ``-inf`` at them."""
    keep = memory_valid_BM[:, None, None, :]
    if cross_mask is None:
        return keep
    if cross_mask.dtype == torch.bool:
        return cross_mask & keep
    return cross_mask.masked_fill(~keep, float("-inf"))


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), always computed the same way (scaled_dot_product_attention).

    ``nn.MultiheadAttention`` switches to a fused inference kernel depending on ``training`` and on
    whether its parameters require grad; freezing a model must not change its outputs by a bit.
    ``mask``: a boolean ``[Q, M]`` (True = may attend) or an additive float ``[B, 1|h, Q, M]``.
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

    def forward(self, q_BQD: torch.Tensor, k_BMD: torch.Tensor, v_BMD: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        B, h = q_BQD.shape[0], self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, x.shape[1], h, -1).transpose(1, 2)
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q_BQD.dtype)
        o = F.scaled_dot_product_attention(heads(F.linear(q_BQD, w_q, b_q)), heads(F.linear(k_BMD, w_k, b_k)),
                                           heads(F.linear(v_BMD, w_v, b_v)), attn_mask=mask,
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

    def forward(self, q_BQD, query_pos_BQD, memory_BMD, memory_pos_BMD, self_mask=None, cross_mask=None):
        h = self.norm1(q_BQD)
        q_BQD = q_BQD + self.self_attn(h + query_pos_BQD, h + query_pos_BQD, h, self_mask)
        h = self.norm2(q_BQD)
        q_BQD = q_BQD + self.cross_attn(h + query_pos_BQD, memory_BMD + memory_pos_BMD, memory_BMD, cross_mask)
        return q_BQD + self.ffn(self.norm3(q_BQD))


@dataclass
class Queries:
    """Queries for one decoder pass; ``None`` fields fall back to the shared learned ones.

    ``content_BQD``: query content (default: the shared ``query_embed``).
    ``pos_BQD``: position embedding (default: the shared ``query_pos``; ignored with ``reference``).
    ``reference_BQ4``: normalised cxcywh boxes; the position embedding is computed from them.
    ``refine``: ``(answer_BQD, reference_BQ4) -> boxes_BQ4`` applied after every layer; the
        (detached) result is the next layer's reference.
    ``self_mask_QQ``: boolean, True where query i may attend to query j (denoising groups).
    ``cross_bias_BhQM``: additive cross-attention bias (``[B, 1, Q, M]``), e.g. a locality prior
        around the points that position queries ask about; the box prior replaces it.
    """

    content_BQD: torch.Tensor | None = None
    pos_BQD: torch.Tensor | None = None
    reference_BQ4: torch.Tensor | None = None
    refine: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    self_mask_QQ: torch.Tensor | None = None
    cross_bias_BhQM: torch.Tensor | None = None


# Queries of a decoder whose config does not say (and the least that ``num_queries: auto`` gives).
DEFAULT_NUM_QUERIES = 20


class QueryDecoder(nn.Module):
    """``forward(memory, memory_pos)`` -> query answers ``[B, Q, D]``.

    Args:
        box_prior: strength of the Gaussian cross-attention prior around reference boxes
            (0 disables it): the attention logit of a memory token at offset (dx, dy) from the box
            centre gets ``-box_prior * ((dx / w)^2 + (dy / h)^2)``.
        position_prior: the same Gaussian prior for position queries (MIM's masked patches, the
            cells of dense tasks posed as queries), around the point asked with the asked cell's
            width and height; 0 disables it. Applied by :func:`~.position_queries.ask_positions`.
    """

    def __init__(self, dim: int = 128, num_queries: int = DEFAULT_NUM_QUERIES, num_layers: int = 3, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, box_prior: float = 0.0,
                 position_prior: float = 0.0) -> None:
        super().__init__()
        self.num_queries, self.dim, self.box_prior = num_queries, dim, box_prior
        if position_prior < 0:
            raise ValueError(f"decoder.position_prior={position_prior}: expected >= 0 (0 disables the prior)")
        self.position_prior = float(position_prior)
        self.query_embed = nn.Parameter(torch.zeros(num_queries, dim))
        self.query_pos = nn.Parameter(torch.zeros(num_queries, dim))
        nn.init.normal_(self.query_embed, std=0.02)
        nn.init.normal_(self.query_pos, std=0.02)
        self.layers = nn.ModuleList(QueryDecoderLayer(dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)
        # Reference box (sine of centre and of size) -> query position embedding (DAB-DETR).
        self.box_pos = nn.Sequential(nn.Linear(2 * dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        # Memory tokens -> inputs of a dense task head (proposals of two-stage detection).
        self.proposal_norm = nn.LayerNorm(dim)

    def reference_pos(self, reference_BQ4: torch.Tensor) -> torch.Tensor:
        centre = sine_embed_points(reference_BQ4[..., :2], self.dim)
        size = sine_embed_points(reference_BQ4[..., 2:], self.dim)
        return self.box_pos(torch.cat([centre, size], -1))

    def box_attention_bias(self, reference_BQ4: torch.Tensor, centres_M2: torch.Tensor) -> torch.Tensor:
        """Additive cross-attention bias ``[B, 1, Q, M]``: a Gaussian around each reference box."""
        return gaussian_attention_bias(reference_BQ4, centres_M2, self.box_prior)

    def forward(self, memory_BMD: torch.Tensor, memory_pos_BMD: torch.Tensor, return_all: bool = False,
                queries: Queries | None = None, centres_M2: torch.Tensor | None = None,
                memory_valid_BM: torch.Tensor | None = None):
        """Final answers ``[B, Q, D]``; with ``return_all`` every layer's (normed) answers, last last,
        for deep supervision. With ``queries.refine`` each answer is paired with its refined boxes:
        ``(answers, boxes)`` (or a list of such pairs). ``memory_valid_BM`` (padded batches): only
        memory tokens marked True are attended."""
        B, dtype = memory_BMD.shape[0], memory_BMD.dtype
        qs = queries or Queries()
        q = qs.content_BQD if qs.content_BQD is not None else self.query_embed.unsqueeze(0).expand(B, -1, -1)
        q = q.to(dtype)
        pos = qs.pos_BQD if qs.pos_BQD is not None else self.query_pos[:q.shape[1]].unsqueeze(0).expand(B, -1, -1)
        pos = pos.to(dtype)
        ref = qs.reference_BQ4
        outs = []
        for i, layer in enumerate(self.layers):
            cross_mask = qs.cross_bias_BhQM
            if ref is not None:
                pos = self.reference_pos(ref).to(dtype)
                if self.box_prior > 0 and centres_M2 is not None:
                    cross_mask = self.box_attention_bias(ref, centres_M2)
            if memory_valid_BM is not None:
                cross_mask = masked_memory(cross_mask, memory_valid_BM)
            q = layer(q, pos, memory_BMD, memory_pos_BMD, qs.self_mask_QQ, cross_mask)
            keep = return_all or i == len(self.layers) - 1
            if qs.refine is not None and ref is not None:
                answer = self.norm(q)
                boxes = qs.refine(answer, ref)
                ref = boxes.detach()
                if keep:
                    outs.append((answer, boxes))
            elif keep:
                outs.append(self.norm(q))
        return outs if return_all else outs[-1]
