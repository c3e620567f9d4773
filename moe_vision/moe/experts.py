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

from .grouped import autocast_inputs, check_kernel, grouped_linear

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


def grouped_mlp(x_AD: torch.Tensor, counts_E: torch.Tensor, w1_EDH: torch.Tensor, b1_EH: torch.Tensor | None,
                w2_EHD: torch.Tensor, b2_ED: torch.Tensor | None, act: Callable, kernel: str = "auto") -> torch.Tensor:
    """``fc2(act(fc1(x)))`` of every expert on its rows of the expert-sorted buffer: two
    :func:`~moe_vision.moe.grouped.grouped_linear` operators (``kernel``: see
    :mod:`~moe_vision.moe.grouped`), in autocast's dtype when it is on. Shapes never depend on the
    counts."""
    x, w1, b1, w2, b2 = autocast_inputs(x_AD, w1_EDH, b1_EH, w2_EHD, b2_ED)
    return grouped_linear(act(grouped_linear(x, counts_E, w1, b1, kernel)), counts_E, w2, b2, kernel)


class GroupedExperts(nn.Module):
    """E two-layer MLP experts ``fc2(act(fc1(x)))`` with stacked weights.

    Args:
        num_experts: E.
        dim: D, input and output width.
        hidden: H, hidden width of each expert.
        activation: name of the activation (see :data:`ACTIVATIONS`).
        bias: whether both layers carry a bias.
        kernel: how the grouped matmuls run (``auto``, ``grouped_mm``, ``loop``; see
            :mod:`~moe_vision.moe.grouped`).
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        activation: str = "gelu",
        bias: bool = True,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.kernel = check_kernel(kernel)
        if num_experts < 1 or dim < 1 or hidden < 1:
            raise ValueError(f"GroupedExperts needs num_experts, dim, hidden >= 1, got {num_experts}, {dim}, {hidden}")
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.activation = activation
        self.act = get_activation(activation)
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
        """Run rows sorted by expert; ``counts_E[e]`` consecutive rows belong to expert e
        (:func:`grouped_mlp`)."""
        return grouped_mlp(x_TD, counts_E, self.w1, self.b1, self.w2, self.b2, self.act, self.kernel)
