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
        # unbind() hands out per-expert views whose backward stacks the E gradients into one
        # buffer; indexing w[e] instead would allocate a full [E, D, H] gradient per expert.
        w1s, w2s = self.w1.unbind(0), self.w2.unbind(0)
        b1s = self.b1.unbind(0) if self.b1 is not None else [None] * self.num_experts
        b2s = self.b2.unbind(0) if self.b2 is not None else [None] * self.num_experts
        outs = []
        for e, x_e in enumerate(torch.split(x_TD, counts_E.tolist())):
            h = x_e @ w1s[e] if b1s[e] is None else torch.addmm(b1s[e], x_e, w1s[e])
            h = self.act(h)
            outs.append(h @ w2s[e] if b2s[e] is None else torch.addmm(b2s[e], h, w2s[e]))
        return torch.cat(outs, dim=0)

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
