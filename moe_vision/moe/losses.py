"""Auxiliary router losses, as pure functions of the routing outputs.

Legend: T tokens, E experts, K experts per token, S tasks present in the step.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from .dispatch import count_per_expert
from .reduce import active_world_size, sum_over_ranks

_EPS = 1e-9


def global_load_balancing_loss(r) -> torch.Tensor:
    """:func:`load_balancing_loss` of one routing output over the tokens of every rank: the
    assignment counts and router probability sums are summed over ranks first."""
    E, K = r.task_experts, r.idx_TK.shape[1]
    counts_E = count_per_expert(r.idx_TK.reshape(-1), E).to(r.prob_sum_E.dtype)
    stats = sum_over_ranks(torch.cat([counts_E, counts_E.new_tensor([r.num_tokens])]).detach())
    counts_E, tokens = stats[:E], stats[E]
    prob_sum_E = sum_over_ranks(r.prob_sum_E[:E])
    return E * torch.sum(counts_E / (tokens * K) * prob_sum_E / tokens)


def load_balancing_loss(probs_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of assignments that went to expert e, ``P_e`` the mean router
    probability of e. Equals 1 under perfectly uniform routing.
    """
    T, E = probs_TE.shape
    f_E = count_per_expert(idx_TK.reshape(-1), E).to(probs_TE.dtype) / idx_TK.numel()
    return E * torch.sum(f_E * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean squared log-sum-exp of the router logits."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


def mutual_information_loss(prob_sum_SE: torch.Tensor, tokens_S: torch.Tensor) -> torch.Tensor:
    """Mod-Squad loss: minus the mutual information between task and expert.

    ``prob_sum_SE[s, e]`` is the sum of p(e | x) over the tokens of task s in the step and
    ``tokens_S[s]`` the token count of task s. With ``P(t, e) = prob_sum[t, e] / all tokens``::

        L = - sum_{t,e} P(t,e) log( P(t,e) / (P(t) P(e)) )

    Minimising it makes each task use a sharp set of experts while all experts stay in use.
    It is identically 0 when the step holds a single task.
    """
    P_SE = prob_sum_SE / tokens_S.sum()
    P_S = P_SE.sum(dim=1, keepdim=True)
    P_E = P_SE.sum(dim=0, keepdim=True)
    return -torch.sum(P_SE * (torch.log(P_SE + _EPS) - torch.log(P_S * P_E + _EPS)))


@dataclass
class AuxLossWeights:
    mutual_information: float = 0.0
    load_balance: float = 0.01
    z_loss: float = 0.001


@dataclass
class AuxLosses:
    """Each loss averaged over MoE layers, and their weighted sum ``total``."""

    mutual_information: torch.Tensor
    load_balance: torch.Tensor
    z_loss: torch.Tensor
    total: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in vars(self).items()}


def compute_aux_losses(routing: Sequence, weights: AuxLossWeights) -> AuxLosses:
    """Combine per-layer routing outputs of one optimiser step (possibly several tasks).

    ``routing`` holds :class:`moe_vision.moe.layer.RoutingOutput` objects from any number of
    forward calls; the MI loss groups them by layer and compares the tasks within a layer.
    """
    if not routing:
        zero = torch.zeros(())
        return AuxLosses(zero, zero, zero, zero)
    # Under data parallelism (inside moe.reduce.over_ranks) the batch-wide statistics of the balance
    # and MI losses are summed over ranks, so both equal their single-process values.
    distributed = active_world_size() > 1
    balance = torch.stack([global_load_balancing_loss(r) if distributed else r.balance_loss for r in routing]).mean()
    z = torch.stack([r.z_loss for r in routing]).mean()
    by_layer: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in routing:
        by_layer[r.layer][r.task].append(r)
    mi_terms = []
    for tasks in by_layer.values():
        prob_sum_SE = sum_over_ranks(torch.stack([sum(r.prob_sum_E for r in rs) for rs in tasks.values()]))
        tokens_S = sum_over_ranks(torch.tensor([float(sum(r.num_tokens for r in rs)) for rs in tasks.values()],
                                               device=prob_sum_SE.device))
        mi_terms.append(mutual_information_loss(prob_sum_SE, tokens_S))
    mi = torch.stack(mi_terms).mean()
    total = weights.mutual_information * mi + weights.load_balance * balance + weights.z_loss * z
    return AuxLosses(mi, balance, z, total)


def aux_losses_by_task(routing: Sequence, weights: AuxLossWeights) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The weighted auxiliary loss of :func:`compute_aux_losses` (in one process) split into what
    each task's routing alone contributes (the balance and z losses are means over routing
    outputs, one per task and layer) and the part that couples the tasks (the MI loss, 0 when its
    weight is): ``sum(per_task.values()) + coupled == compute_aux_losses(...).total``. Lets a
    balancing method treat each task's routing losses with that task's gradient, without a
    separate backward pass through every task's graph."""
    n = max(1, len(routing))
    per_task: dict[str, torch.Tensor] = {}
    for r in routing:
        term = (weights.load_balance * r.balance_loss + weights.z_loss * r.z_loss) / n
        per_task[r.task] = per_task[r.task] + term if r.task in per_task else term
    coupled = torch.zeros(())
    if weights.mutual_information and routing:
        coupled = weights.mutual_information * compute_aux_losses(
            routing, AuxLossWeights(weights.mutual_information, 0.0, 0.0)).mutual_information
    return per_task, coupled
