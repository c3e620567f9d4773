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

A task that received no token since the previous narrowing (sampling gave its steps to other
tasks) is not narrowed then: its experts have no score, and masks never widen, so a narrowing by
index would be for good. It catches up at its next narrowing (``n`` follows the step, not the
count of narrowings). If a task is still above its budget at the end of the narrowing phase, the
narrowing goes on every ``every`` steps for such tasks until they reach it; :meth:`ExpertBudget.unfinished`
names any that never do.

Everything stays on the device: scores are scatter-adds of the routing the step already returns
into one flat vector; the narrowing is a top-k and a scatter. Under torchrun each rank adds its own
tokens and the vector is summed over ranks once per narrowing (and before a checkpoint), so every
rank masks the same experts. The end of the narrowing phase reads on the host once, to know whether
a task is still above its budget. Only tasks whose router is trainable are narrowed: after
``tools/add_task.py`` the new task gets its budget over old and new experts, and the frozen tasks'
masks never move.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import torch

OPTIONS = ("experts", "tasks", "start", "end", "every")  # the keys of train.expert_budget (configs/train.yaml)


class ExpertBudget:
    """The schedule of ``train.expert_budget`` for one model (a no-op when ``experts`` is null and no
    task has a budget of its own).

    Args:
        layers: MoE layer name -> layer (``MoEViT.moe_modules()``).
        cfg: ``train.expert_budget`` with every key of :data:`OPTIONS`.
        steps: the run's ``train.steps``.
        reduce: sums a tensor over ranks in place (None in one process).
        rank: this process's rank (checkpointed scores are summed over ranks and kept by rank 0).
    """

    def __init__(self, layers: Mapping[str, torch.nn.Module], cfg: Mapping[str, Any] | None, steps: int,
                 reduce: Callable | None = None, rank: int = 0) -> None:
        cfg = dict(cfg or {"experts": None, "tasks": {}, "start": 0.0, "end": 1.0, "every": 1})
        unknown, missing = sorted(set(cfg) - set(OPTIONS)), sorted(set(OPTIONS) - set(cfg))
        if unknown or missing:
            raise ValueError("train.expert_budget: " + (f"unknown option(s) {unknown}; " if unknown else "")
                             + (f"missing option(s) {missing}; " if missing else "") + f"expected {list(OPTIONS)}")
        self.reduce, self.rank = reduce, rank
        self.routers = {name: m.router for name, m in layers.items()}
        budgets, default = dict(cfg["tasks"] or {}), cfg["experts"]
        known = sorted({t for r in self.routers.values() for t in r.tasks})
        typo = sorted(set(budgets) - set(known))
        if typo:
            raise ValueError(f"train.expert_budget.tasks names {typo}, which this model does not have; its tasks "
                             f"are {known}")
        self.targets: dict[tuple[str, str], int] = {}  # (layer, task) -> experts it keeps
        self.frozen: list[str] = []  # tasks with a budget whose routers are frozen (never narrowed)
        for layer, router in self.routers.items():
            for task in router.tasks:
                n = budgets.get(task, default)
                if n is None:
                    continue
                if isinstance(n, bool) or not isinstance(n, int):
                    raise ValueError(f"train.expert_budget: {task} keeps {n!r} experts; expected a whole number")
                if not router.gate_for(task).weight.requires_grad:
                    if task in budgets:
                        raise ValueError(f"train.expert_budget.tasks.{task}={n}: {task}'s router is frozen (an old "
                                         "task after add_task or a frozen stage), so its experts cannot be narrowed")
                    self.frozen.append(task)
                    continue
                total = router.num_experts_for(task)
                if not router.top_k <= n <= total:
                    raise ValueError(f"train.expert_budget: {task} keeps {n} experts in {layer}; expected "
                                     f"top_k={router.top_k} <= experts <= {total}")
                self.targets[(layer, task)] = n
        self.frozen = sorted(set(self.frozen))
        if default is not None and not self.targets and self.routers:
            raise ValueError(f"train.expert_budget.experts={default}, but every task's router is frozen "
                             f"({', '.join(self.frozen)}): nothing would be narrowed; set it to null")
        start, end, every = float(cfg["start"]), float(cfg["end"]), int(cfg["every"])
        if not 0 <= start <= end <= 1 or every < 1:
            raise ValueError(f"train.expert_budget: start={start}, end={end}, every={every}; expected "
                             "0 <= start <= end <= 1 and every >= 1")
        self.first, self.last, self.every = int(start * steps), int(end * steps), every
        if self.targets:
            if self.last <= self.first:
                raise ValueError(f"train.expert_budget: start={start} and end={end} of train.steps={steps} give "
                                 f"steps {self.first} and {self.last}: no step narrows; widen the window")
            capacity_factor = max(float(getattr(getattr(m, "dispatcher", None), "capacity_factor", 0.0) or 0.0)
                                  for m in layers.values())
            if capacity_factor > 0:
                raise ValueError(f"train.expert_budget needs dropless routing, but model.moe.capacity_factor="
                                 f"{capacity_factor}: capacity is counted over all experts while a narrowed task "
                                 "sends its tokens to a few, and a bundle with fewer experts has another capacity "
                                 "(not exact); set model.moe.capacity_factor=0")
        # One flat score vector; each (layer, task) owns a slice of it.
        self.slices: dict[tuple[str, str], slice] = {}
        offset = 0
        for key in self.targets:
            n = self.routers[key[0]].num_experts_for(key[1])
            self.slices[key] = slice(offset, offset + n)
            offset += n
        device = next((self.routers[layer].gate_for(task).weight.device for layer, task in self.targets),
                      torch.device("cpu"))
        self.scores = torch.zeros(offset, device=device)
        self.pending = set(self.targets)  # keys not yet at their budget (as far as the host knows)

    def describe(self) -> str | None:
        """One line: what the budget will do (None without a budget)."""
        if not self.targets:
            return None
        per_task: dict[str, set[int]] = {}
        for (layer, task), n in self.targets.items():
            per_task.setdefault(task, set()).add(n)
        layers = len({layer for layer, _ in self.targets})
        tasks = ", ".join(f"{t} {'/'.join(map(str, sorted(n)))}" for t, n in per_task.items())
        frozen = f"; frozen, not narrowed: {', '.join(self.frozen)}" if self.frozen else ""
        return (f"expert budget: experts kept per MoE layer {tasks} ({layers} layers), narrowed every {self.every} "
                f"steps from step {self.first} to {self.last}{frozen}")

    def keep_at(self, step: int, total: int, budget: int) -> int:
        """How many experts a task may choose after ``step`` (all before the narrowing starts)."""
        if step < self.first:
            return total
        progress = min(1.0, (step - self.first) / max(1, self.last - self.first))
        return max(budget, total - math.floor(progress * (total - budget) + 1e-9))

    def narrowing(self, step: int) -> bool:
        """Whether ``step`` (1-based, counted after its update) narrows the masks: every ``every``
        steps of the window and at its end; after it, every ``every`` steps while a task is above
        its budget."""
        if step <= self.first:
            return False
        on_beat = (step - self.first) % self.every == 0
        if step <= self.last:
            return on_beat or step == self.last
        return bool(self.pending) and on_beat

    def scoring(self, step: int) -> bool:
        """Whether ``step``'s routing adds to the scores."""
        return bool(self.targets) and step > self.first and (step <= self.last or bool(self.pending))

    @torch.no_grad()
    def after_step(self, step: int, routing: Iterable) -> None:
        """Add the step's routing to the scores and, on a narrowing step, narrow the masks. A step
        that made no update (a non-finite loss skipped) passes no routing."""
        if not self.scoring(step):
            return
        for r in routing:
            where = self.slices.get((r.layer, r.task))
            if where is not None:
                self.scores[where] += r.gate_sums(where.stop - where.start)
        if not self.narrowing(step):
            return
        if self.reduce is not None:
            self.reduce(self.scores)  # one collective per narrowing: every rank's tokens
        for key in sorted(self.pending):
            layer, task = key
            router, score = self.routers[layer], self.scores[self.slices[key]]
            allowed = router.allowed_mask(task)
            n = self.keep_at(step, allowed.numel(), self.targets[key])
            # Masked experts last; equal scores (experts no token chose) keep the lower index first.
            order = torch.sort(score.masked_fill(~allowed, float("-inf")), descending=True, stable=True).indices
            narrowed = torch.zeros_like(allowed).scatter(0, order[:n], True) & allowed
            seen = score.sum() > 0  # a task with no tokens since the last narrowing keeps its mask
            router.set_allowed(task, torch.where(seen, narrowed, allowed))
        self.scores.zero_()
        if step >= self.last:  # the one host read: who is still above budget
            counts = torch.stack([self.routers[layer].allowed_mask(task).sum() for layer, task in sorted(self.pending)])
            self.pending = {key for key, c in zip(sorted(self.pending), counts.tolist()) if c > self.targets[key]}

    def unfinished(self) -> dict[str, list[str]]:
        """Task -> the layers where it still may choose more experts than its budget (it saw no
        token after the narrowing phase; as counted at the last narrowing); empty when every task
        reached its budget."""
        out: dict[str, list[str]] = {}
        for layer, task in sorted(self.pending):
            out.setdefault(task, []).append(layer)
        return out

    def state_dict(self) -> dict:
        """The scores gathered since the last narrowing, summed over ranks (every rank calls this,
        and gets the same answer), and the keys still above budget, for exact resume."""
        if self.reduce is not None:
            self.reduce(self.scores)
            if self.rank != 0:  # rank 0 holds the sum from here on; the others start again from zero
                total = self.scores.clone()
                self.scores.zero_()
            else:
                total = self.scores
        else:
            total = self.scores
        flat = total.tolist()
        return {"scores": {f"{layer}|{task}": flat[where] for (layer, task), where in self.slices.items()},
                "pending": sorted(f"{layer}|{task}" for layer, task in self.pending)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        if "scores" not in state:  # written before the flat vector: {"layer|task": list or None}
            state = {"scores": {k: v for k, v in state.items() if v is not None},
                     "pending": [f"{layer}|{task}" for (layer, task), n in self.targets.items()
                                 if int(self.routers[layer].allowed_mask(task).sum()) > n]}
        self.scores.zero_()
        if self.rank == 0:
            for key, value in state["scores"].items():
                where = self.slices.get(tuple(key.split("|")))
                if where is not None:
                    self.scores[where] = torch.tensor(value, device=self.scores.device)
        self.pending = {tuple(k.split("|")) for k in state["pending"]} & set(self.targets)
