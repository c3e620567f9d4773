"""Per-task expert budgets (``train.expert_budget``): during training each task's router is narrowed,
step by step, to the ``experts`` experts per MoE layer it relies on most, so that the exact bundle
of a task (``tools/extract_experts.py``, which keeps the experts a task may choose) is compact.

Task-specific expert pruning (Chen et al., 2022) drops a task's other experts progressively while
fine-tuning, masking them out of the router; this does the same while training the generalist.
Between ``start`` and ``end`` (fractions of the run's steps) every ``every`` steps each task keeps,
per layer, the ``n(step)`` experts with the largest score among those it may still choose, with
``n`` falling linearly from all experts to ``experts``; the others get ``-inf`` router logits (the
router's mask, :meth:`TaskRouter.set_allowed`, saved with the model). An expert's score is the sum
of the combine weights the task's tokens gave it since the previous narrowing (a token's whole
weight counts, so both how often and how strongly an expert is chosen matter).

Everything stays on the device: scores are scatter-adds of the routing the step already returns,
the narrowing is a top-k and a scatter; under torchrun the scores are summed over ranks every step
of the narrowing phase, so every rank masks the same experts. Only tasks whose router is trainable
are narrowed: after ``tools/add_task.py`` the new task gets its budget over old and new experts,
and the frozen tasks' masks never move.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch

DEFAULTS = {"experts": None, "start": 0.1, "end": 0.5, "every": 25, "tasks": {}}


class ExpertBudget:
    """The schedule of ``train.expert_budget`` for one model (a no-op when ``experts`` is null)."""

    def __init__(self, model: torch.nn.Module, cfg: Mapping[str, Any] | None, steps: int, reduce=None) -> None:
        cfg = {**DEFAULTS, **(cfg or {})}
        unknown = sorted(set(cfg) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"train.expert_budget: unknown option(s) {unknown}; expected {sorted(DEFAULTS)}")
        self.reduce = reduce  # sums a tensor over ranks in place (None in one process)
        self.routers = {name: m.router for name, m in _moe_layers(model)}
        budgets = dict(cfg["tasks"] or {})
        default = cfg["experts"]
        self.budget: dict[tuple[str, str], int] = {}  # (layer, task) -> experts it keeps
        for layer, router in self.routers.items():
            for task in router.tasks:
                n = budgets.get(task, default)
                gate = router.gate_for(task)
                if n is None or not gate.weight.requires_grad:
                    continue  # no budget, or a frozen task (its routing must not move)
                total = router.num_experts_for(task)
                if not router.top_k <= int(n) <= total:
                    raise ValueError(f"train.expert_budget: {task} keeps {n} experts in {layer}; expected "
                                     f"top_k={router.top_k} <= experts <= {total}")
                self.budget[(layer, task)] = int(n)
        start, end, every = float(cfg["start"]), float(cfg["end"]), int(cfg["every"])
        if not 0 <= start <= end <= 1 or every < 1:
            raise ValueError(f"train.expert_budget: start={start}, end={end}, every={every}; expected "
                             "0 <= start <= end <= 1 and every >= 1")
        self.first, self.last, self.every = int(start * steps), max(int(end * steps), 1), every
        self.scores = {key: None for key in self.budget}

    @property
    def active(self) -> bool:
        return bool(self.budget)

    def keep_at(self, step: int, total: int, budget: int) -> int:
        """How many experts a task may choose after ``step`` (all before the narrowing starts)."""
        if step < self.first:
            return total
        progress = min(1.0, (step - self.first) / max(1, self.last - self.first))
        return max(budget, total - math.floor(progress * (total - budget) + 1e-9))

    def narrowing(self, step: int) -> bool:
        """Whether ``step`` (1-based, counted after its update) narrows the masks."""
        return self.first < step <= self.last and ((step - self.first) % self.every == 0 or step == self.last)

    @torch.no_grad()
    def after_step(self, step: int, routing: Iterable) -> None:
        """Add the step's routing to the scores and, on a narrowing step, narrow the masks."""
        if not self.budget or not self.first < step <= self.last:
            return
        sums = {}
        for r in routing:
            key = (r.layer, r.task)
            if key in self.scores:
                got = r.gate_sums(self.routers[r.layer].num_experts_for(r.task))
                sums[key] = got if key not in sums else sums[key] + got
        if self.reduce is not None:  # every rank reduces every key (zeros for tasks it did not see)
            for key in self.scores:
                if key not in sums:
                    router = self.routers[key[0]]
                    sums[key] = torch.zeros(router.num_experts_for(key[1]), device=router.gate_for(key[1]).weight.device)
                self.reduce(sums[key])
        for key, got in sums.items():
            self.scores[key] = got if self.scores[key] is None else self.scores[key] + got
        if self.narrowing(step):
            for (layer, task), score in self.scores.items():
                router = self.routers[layer]
                allowed = router.allowed_mask(task)
                n = self.keep_at(step, allowed.numel(), self.budget[(layer, task)])
                score = torch.zeros(allowed.shape, device=allowed.device) if score is None else score.float()
                # Masked experts last; equal scores (e.g. experts no token chose) keep the lower index first.
                order = torch.sort(score.masked_fill(~allowed, float("-inf")), descending=True, stable=True).indices
                router.set_allowed(task, torch.zeros_like(allowed).scatter(0, order[:n], True) & allowed)
            self.scores = {key: None for key in self.budget}

    def state_dict(self) -> dict:
        """The scores gathered since the last narrowing (identical on every rank), for exact resume."""
        return {f"{layer}|{task}": None if s is None else s.tolist() for (layer, task), s in self.scores.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            layer, task = key.split("|")
            if (layer, task) in self.scores and value is not None:
                device = self.routers[layer].gate_for(task).weight.device
                self.scores[(layer, task)] = torch.tensor(value, device=device)


def _moe_layers(model: torch.nn.Module):
    """(layer name, module) of every MoE layer with a router."""
    seen = set()
    for module in model.modules():
        router = getattr(module, "router", None)
        name = getattr(module, "layer_name", None)
        if router is not None and name is not None and hasattr(router, "allowed_mask") and name not in seen:
            seen.add(name)
            yield name, module
