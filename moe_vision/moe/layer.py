"""The sparse MoE MLP layer: task router -> dispatcher -> grouped experts -> combine.

Legend: B batch, N tokens per image, T = B*N tokens, D dim, H expert hidden, E experts, K top-k.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F

from .dispatch import TokenDispatcher, count_per_expert
from .experts import GroupedExperts, grouped_mlp
from . import expert_parallel as ep
from .losses import load_balancing_loss, router_z_loss
from .router import TaskRouter


@dataclass
class RoutingOutput:
    """What one MoE layer did in one forward call; returned, never stored on the module."""

    layer: str  # module name, e.g. "blocks.3.mlp"
    task: str
    num_tokens: int
    idx_TK: torch.Tensor
    weights_TK: torch.Tensor
    prob_sum_E: torch.Tensor  # differentiable, feeds the mutual-information loss
    balance_loss: torch.Tensor  # over this call's tokens (this rank's, under data parallelism)
    z_loss: torch.Tensor
    task_experts: int  # experts this task's router chooses among
    dropped_tokens: int | torch.Tensor  # a 0-d tensor with capacity (no host read in the forward)
    dropped_assignments: int | torch.Tensor
    exchange: "ep.ExpertExchange | None" = None  # the all-to-all plan under expert parallelism

    @classmethod
    def from_router(cls, layer: str, task: str, r, num_experts: int, plan=None, exchange=None) -> "RoutingOutput":
        """Package a router's output (``RouterOutput``) with its aux losses and the dispatch plan's
        drop counts. ``prob_sum_E`` is padded to the layer's ``num_experts`` for a task whose
        router sees fewer experts."""
        return cls(
            layer=layer, task=task, num_tokens=r.idx_TK.shape[0], idx_TK=r.idx_TK, weights_TK=r.weights_TK,
            prob_sum_E=F.pad(r.probs_TE.sum(dim=0), (0, num_experts - r.probs_TE.shape[1])),
            balance_loss=load_balancing_loss(r.probs_TE, r.idx_TK), z_loss=router_z_loss(r.logits_TE),
            task_experts=r.probs_TE.shape[1], exchange=exchange,
            dropped_tokens=plan.dropped_tokens if plan else 0,
            dropped_assignments=plan.dropped_assignments if plan else 0,
        )

    def selection_counts(self, num_experts: int) -> torch.Tensor:
        """How often each expert was chosen ``[E]`` (dropped assignments included)."""
        return count_per_expert(self.idx_TK.reshape(-1), num_experts)

    def gate_sums(self, num_experts: int) -> torch.Tensor:
        """Sum of the combine weights each expert received ``[E]``."""
        out = torch.zeros(num_experts, device=self.idx_TK.device)
        return out.index_add_(0, self.idx_TK.reshape(-1), self.weights_TK.detach().reshape(-1).float())


class MoEMLP(nn.Module):
    """Sparse mixture-of-experts replacement for a transformer MLP.

    ``forward(x, task)`` takes ``[..., D]`` and returns the same shape plus a
    :class:`RoutingOutput`. ``expert_scale`` multiplies the combined output (upcycling into
    fine-grained experts sets it to the granularity so the function is preserved).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        tasks: Iterable[str],
        num_experts: int = 8,
        top_k: int = 2,
        router_mode: str = "per_task",
        renormalize: bool = True,
        noisy_gating: bool = False,
        capacity_factor: float = 0.0,
        activation: str = "gelu",
        expert_scale: float = 1.0,
        layer_name: str = "moe",
        added_experts: Sequence[int] = (),
        task_added_groups: dict[str, int] | None = None,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        self.layer_name = layer_name
        total = num_experts + sum(added_experts)
        self.num_experts, self.top_k, self.expert_scale = total, top_k, expert_scale
        # A task that sees g added groups chooses among the base experts and the first g groups.
        task_n = {t: num_experts + sum(added_experts[:g]) for t, g in (task_added_groups or {}).items()}
        self.router = TaskRouter(dim, total, top_k, tasks, router_mode, renormalize, noisy_gating,
                                 task_num_experts=task_n)
        self.dispatcher = TokenDispatcher(total, capacity_factor)
        self.experts = GroupedExperts(num_experts, dim, hidden, activation, kernel=kernel)
        # Experts added later (add_task) live in separate tensors so the old ones can be frozen.
        self.added_experts = nn.ModuleList(GroupedExperts(n, dim, hidden, activation, kernel=kernel)
                                           for n in added_experts)
        self.ep_group = None  # set by shard_experts(): this rank then holds only its slice of experts
        # Static-shaped path for export: every expert on every token, combined with the top-k weights
        # (zero for the experts a token did not choose); the same function as the sparse path.
        self.dense_experts = False

    def shard_experts(self, group) -> None:
        """Keep only this rank's experts (expert e on ep-rank e // (E / ep_size)); the forward then
        exchanges tokens with the other ranks of ``group``. Every rank must hold the same full
        layer when this is called (same seed or a loaded checkpoint)."""
        if len(self.added_experts):
            raise ValueError(f"{self.layer_name}: expert parallelism over experts added by add_task is not supported; "
                             "train the grown model with dist.expert_parallel=1")
        local = ep.local_expert_range(self.num_experts, group)
        for name in ("w1", "b1", "w2", "b2"):
            p = getattr(self.experts, name)
            if p is not None:
                setattr(self.experts, name, nn.Parameter(p.detach()[local.start:local.stop].clone(),
                                                         requires_grad=p.requires_grad))
        self.experts.num_experts = len(local)
        self.ep_group = group

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """``(w1_EDH, b1_EH, w2_EHD, b2_ED)`` of every expert, those added by ``add_task`` included
        (they keep their own tensors, so the old ones can stay frozen; gradients flow back through
        the concatenation)."""
        groups = [self.experts, *self.added_experts]
        if len(groups) == 1:
            return self.experts.w1, self.experts.b1, self.experts.w2, self.experts.b2
        cat = (lambda name: None if getattr(self.experts, name) is None
               else torch.cat([getattr(g, name) for g in groups]))
        return cat("w1"), cat("b1"), cat("w2"), cat("b2")

    def run_experts(self, x_RD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Expert-sorted rows through the experts (each expert's rows are contiguous)."""
        return grouped_mlp(x_RD, counts_E, *self.expert_weights(), self.experts.act, self.experts.kernel)

    def all_experts_dense(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """Every expert on every token ``[T, D]``, each token's outputs weighted by its top-k
        weights (zero for unchosen experts): no data-dependent shapes, so it exports to static
        graphs; E/K times the sparse path's expert FLOPs."""
        w1_EDH, b1_EH, w2_EHD, b2_ED = (None if w is None else w.to(x_TD.dtype) for w in self.expert_weights())
        pre_ETH = torch.einsum("td,edh->eth", x_TD, w1_EDH)
        if b1_EH is not None:
            pre_ETH = pre_ETH + b1_EH[:, None]
        y_ETD = torch.einsum("eth,ehd->etd", self.experts.act(pre_ETH), w2_EHD)
        if b2_ED is not None:
            y_ETD = y_ETD + b2_ED[:, None]
        gate_TE = torch.zeros(x_TD.shape[0], w1_EDH.shape[0], dtype=x_TD.dtype, device=x_TD.device)
        gate_TE = gate_TE.scatter(1, idx_TK, weights_TK.to(x_TD.dtype))
        return torch.einsum("te,etd->td", gate_TE, y_ETD)

    def forward(self, x: torch.Tensor, task: str) -> tuple[torch.Tensor, RoutingOutput | None]:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        r = self.router(x_TD, task)
        if self.dense_experts or x_TD.device.type == "meta":
            # export, and shape-only runs on the meta device: no routing statistics (they need
            # data-dependent shapes)
            y_TD = self.all_experts_dense(x_TD, r.idx_TK, r.weights_TK) * self.expert_scale
            return y_TD.reshape(shape), None
        plan = self.dispatcher.plan(r.idx_TK, r.weights_TK)
        x_RD = self.dispatcher.permute(x_TD, plan)
        ex = None
        if self.ep_group is not None:
            ex = ep.exchange_plan(plan.rows_E, self.ep_group)  # (the counts exchange: the one sync here)
            y_RD = ep.combine_rows(self.experts(ep.dispatch_rows(x_RD, ex), ex.local_counts_L), ex)
        else:
            y_RD = self.run_experts(x_RD, plan.rows_E)
        y_TD = self.dispatcher.unpermute(y_RD, plan, T)
        if self.expert_scale != 1.0:
            y_TD = y_TD * self.expert_scale
        return y_TD.reshape(shape), RoutingOutput.from_router(self.layer_name, task, r, self.num_experts, plan, ex)
