"""Grouped experts: E feed-forward experts whose weights are stored stacked.

Legend: T tokens (here: token-expert assignments, sorted by expert), D model dim,
H expert hidden dim, E experts.

Storage is stacked (``w1_EDH``, ``w2_EHD``) so that slicing experts out of a layer,
sharding experts across ranks, or loading an upcycled checkpoint are plain tensor
operations. Compute runs over contiguous per-expert groups of a token buffer that
the dispatcher has already sorted by expert.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up an element-wise activation by name (``gelu``, ``gelu_tanh``, ``relu``, ``silu``)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def _grouped_mm_available(x: torch.Tensor) -> bool:
    # torch._grouped_mm has fast kernels only for CUDA half types; elsewhere the loop is better.
    return hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


class GroupedExperts(nn.Module):
    """E two-layer MLP experts ``fc2(act(fc1(x)))`` with stacked weights.

    Args:
        num_experts: E.
        dim: D, input and output width.
        hidden: H, hidden width of each expert.
        activation: name of the activation (see :data:`ACTIVATIONS`).
        bias: whether both layers carry a bias.
        use_grouped_mm: ``"auto"`` uses ``torch._grouped_mm`` on CUDA half types,
            ``"never"`` always runs the per-expert loop (useful for debugging).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = True,
        use_grouped_mm: str = "auto",
    ) -> None:
        super().__init__()
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"GroupedExperts needs num_experts, dim, hidden >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation = activation
        self.act = get_activation(activation)
        self.use_grouped_mm = use_grouped_mm
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, per expert.
        for w, fan_in in ((self.w1, self.dim), (self.w2, self.hidden)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        if self.b1 is not None:
            nn.init.zeros_(self.b1)
            nn.init.zeros_(self.b2)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, activation={self.activation}"

    def forward(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run tokens sorted by expert; ``counts_E[e]`` rows in a row belong to expert e."""
        if self.use_grouped_mm == "auto" and _grouped_mm_available(x_TD):
            return self._forward_grouped_mm(x_TD, counts_E)
        return self._forward_loop(x_TD, counts_E)

    def _forward_loop(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if self.b1 is None:
            zeros = (x_TD.new_zeros(self.num_experts, self.hidden), x_TD.new_zeros(self.num_experts, self.dim))
            return _ExpertLoop.apply(x_TD, counts_E, self.w1, zeros[0], self.w2, zeros[1], self.activation)
        return _ExpertLoop.apply(x_TD, counts_E, self.w1, self.b1, self.w2, self.b2, self.activation)

    def _forward_grouped_mm(self, x_TD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts_E, dim=0, dtype=torch.int32)
        dtype = x_TD.dtype
        h = torch._grouped_mm(x_TD, self.w1.to(dtype), offs=offs)
        if self.b1 is not None:
            h = h + torch.repeat_interleave(self.b1.to(dtype), counts_E, dim=0, output_size=x_TD.shape[0])
        h = self.act(h)
        y = torch._grouped_mm(h, self.w2.to(dtype), offs=offs)
        if self.b2 is not None:
            y = y + torch.repeat_interleave(self.b2.to(dtype), counts_E, dim=0, output_size=x_TD.shape[0])
        return y


# Backward of each activation given (grad of output, pre-activation input).
_ACT_BACKWARD: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda g, x: torch.ops.aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    "relu": lambda g, x: g * (x > 0).to(g.dtype),
    "silu": lambda g, x: torch.ops.aten.silu_backward(g, x),
}


def _segments(counts: list[int]):
    """``(expert, row slice)`` of every expert that has rows in the expert-sorted buffer."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


class _ExpertLoop(torch.autograd.Function):
    """The per-expert loop with hand-written backward.

    Plain autograd over a loop of E small matmuls pays for an output ``cat``, one gradient
    stack per stacked parameter and per-expert bias reductions; here every matmul writes into a
    preallocated buffer (``out=``), the activation runs once over the whole buffer and bias
    gradients are one ``index_add``. First-order gradients only.
    """

    @staticmethod
    def forward(ctx, x_AD, counts_E, w1_EDH, b1_EH, w2_EHD, b2_ED, activation):
        counts = counts_E.tolist()
        A, D = x_AD.shape
        expert_A = torch.repeat_interleave(torch.arange(len(counts), device=x_AD.device), counts_E,
                                           output_size=A)
        pre_AH = x_AD.new_empty(A, w1_EDH.shape[2])
        for e, s in _segments(counts):
            torch.addmm(b1_EH[e], x_AD[s], w1_EDH[e], out=pre_AH[s])
        h_AH = get_activation(activation)(pre_AH)
        y_AD = x_AD.new_empty(A, D)
        for e, s in _segments(counts):
            torch.addmm(b2_ED[e], h_AH[s], w2_EHD[e], out=y_AD[s])
        ctx.save_for_backward(x_AD, expert_A, w1_EDH, w2_EHD, pre_AH, h_AH)
        ctx.counts, ctx.activation = counts, activation
        return y_AD

    @staticmethod
    def backward(ctx, g_AD):
        x_AD, expert_A, w1_EDH, w2_EHD, pre_AH, h_AH = ctx.saved_tensors
        counts, E = ctx.counts, len(ctx.counts)
        g_AD = g_AD.contiguous()
        # Every expert with tokens has its weight gradient written in full below; only idle
        # experts need zeros (zero-filling the whole stack costs ~8% of a step on CPU).
        g_w1 = torch.empty_like(w1_EDH)
        g_w2 = torch.empty_like(w2_EHD)
        idle = [e for e, n in enumerate(counts) if n == 0]
        if idle:
            g_w1[idle] = 0
            g_w2[idle] = 0
        g_h = torch.empty_like(h_AH)
        for e, s in _segments(counts):
            torch.mm(g_AD[s], w2_EHD[e].t(), out=g_h[s])
            torch.mm(h_AH[s].t(), g_AD[s], out=g_w2[e])
        g_b2 = g_AD.new_zeros(E, g_AD.shape[1]).index_add_(0, expert_A, g_AD)
        g_pre = _ACT_BACKWARD[ctx.activation](g_h, pre_AH)
        del g_h
        g_b1 = g_pre.new_zeros(E, g_pre.shape[1]).index_add_(0, expert_A, g_pre)
        g_x = torch.empty_like(x_AD) if ctx.needs_input_grad[0] else None
        for e, s in _segments(counts):
            if g_x is not None:
                torch.mm(g_pre[s], w1_EDH[e].t(), out=g_x[s])
            torch.mm(x_AD[s].t(), g_pre[s], out=g_w1[e])
        return g_x, None, g_w1, g_b1, g_w2, g_b2, None
