"""Expert usage statistics: per layer and task, how often each expert is selected.

Accumulated explicitly from the routing outputs the model returns (no hooks, no globals).
"""
from __future__ import annotations

from typing import Iterable

import torch

from .layer import RoutingOutput


class ExpertUsage:
    """Selection counts and gate-weight sums as ``[layers, tasks, experts]`` tensors.

    Layers may have different expert counts; shorter rows are zero-padded to the widest layer.
    """

    def __init__(self, layers: dict[str, int], tasks: Iterable[str],
                 allowed: dict[str, dict[str, list[int]]] | None = None) -> None:
        self.layers = list(layers)
        # Per layer and task, the experts the task may choose, kept only when a budget narrowed some.
        narrowed = allowed and any(len(e) < layers[layer] for layer, per in allowed.items() for e in per.values())
        self.allowed = {layer: {t: list(e) for t, e in per.items()} for layer, per in allowed.items()} if narrowed else None
        self.num_experts = dict(layers)
        self.tasks = list(tasks)
        L, S, E = len(self.layers), len(self.tasks), max(layers.values(), default=0)
        self.counts = torch.zeros(L, S, E, dtype=torch.float64)
        self.gate_sums = torch.zeros(L, S, E, dtype=torch.float64)
        self.tokens = torch.zeros(L, S, dtype=torch.float64)

    def update(self, routing: Iterable[RoutingOutput]) -> None:
        for r in routing:
            li, si = self.layers.index(r.layer), self.tasks.index(r.task)
            E = self.num_experts[r.layer]
            self.counts[li, si, :E] += r.selection_counts(E).cpu().double()
            self.gate_sums[li, si, :E] += r.gate_sums(E).cpu().double()
            self.tokens[li, si] += r.num_tokens

    def frequency(self) -> torch.Tensor:
        """Fraction of a task's selections that went to each expert ``[L, S, E]`` (rows sum to 1)."""
        total = self.counts.sum(-1, keepdim=True)
        return self.counts / total.clamp(min=1)

    def mean_gate(self) -> torch.Tensor:
        """Mean combine weight an expert got when selected ``[L, S, E]`` (0 where never selected)."""
        return self.gate_sums / self.counts.clamp(min=1)

    def to_dict(self) -> dict:
        return {
            "layers": self.layers,
            "tasks": self.tasks,
            "num_experts": self.num_experts,
            "counts": self.counts.tolist(),
            "gate_sums": self.gate_sums.tolist(),
            "tokens": self.tokens.tolist(),
            "frequency": self.frequency().tolist(),
            **({"allowed": self.allowed} if self.allowed else {}),
        }

    @classmethod
    def of(cls, backbone, tasks: Iterable[str]) -> "ExpertUsage":
        """Empty usage for ``backbone``'s MoE layers (``moe_layers()``) and the experts each task may
        choose there (``allowed_experts()``)."""
        return cls(backbone.moe_layers(), tasks, backbone.allowed_experts())

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertUsage":
        usage = cls(d["num_experts"], d["tasks"], d.get("allowed"))
        usage.counts = torch.tensor(d["counts"], dtype=torch.float64)
        usage.gate_sums = torch.tensor(d["gate_sums"], dtype=torch.float64)
        usage.tokens = torch.tensor(d["tokens"], dtype=torch.float64)
        return usage
