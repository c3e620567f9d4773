"""Task-conditioned top-k routers.

Legend: T tokens, D dim, E experts, K experts per token.

Two ways of conditioning on the task:
- ``per_task``: one gate per task in a ``ModuleDict`` keyed by task name; adding a task adds a gate
  and cannot change any other task's routing.
- ``shared``: one gate for all tasks, fed the token plus a learned per-task embedding.

Each task also has a mask of the experts it may choose (``allowed.<task>``, a bool buffer saved
with the model, all true unless ``train.expert_budget`` narrowed it): the others get ``-inf``
logits, so a bundle that keeps only a task's allowed experts routes exactly as the full model on
every input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
import torch.nn.functional as F

ROUTER_MODES = ("per_task", "shared")


@dataclass
class RouterOutput:
    logits_TE: torch.Tensor  # clean logits (fp32), used by the z-loss
    probs_TE: torch.Tensor  # softmax over all E (fp32), used by the aux losses
    idx_TK: torch.Tensor  # chosen experts, best first
    weights_TK: torch.Tensor  # combine weights of the chosen experts


def check_task(task: str, known: Iterable[str]) -> None:
    """Raise a one-line error naming ``task`` and the known task names."""
    known = list(known)
    if task not in known:
        raise KeyError(f"unknown task {task!r}; this model knows tasks {known}")


def top_k_lowest_index(logits_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits per row and their indices, best first; equal logits go to the lower
    expert index. ``torch.topk`` leaves ties to the kernel, and on the CPU its choice changes with
    the number of columns, so a model with unused experts cut out could pick the other of two tied
    experts. ``argmax`` returns the first maximum; k rounds of it (each masking the one found)
    make the choice depend only on the experts' order, which cutting experts out keeps, and
    export to ONNX (ArgMax) and compile like ``topk``. (k is small: 1 to 4.)"""
    values, indices, rest_TE = [], [], logits_TE
    for _ in range(k):
        idx_T1 = rest_TE.argmax(dim=-1, keepdim=True)
        values.append(logits_TE.gather(-1, idx_T1))
        indices.append(idx_T1)
        rest_TE = rest_TE.scatter(-1, idx_T1, float("-inf"))
    return torch.cat(values, -1), torch.cat(indices, -1)


class TaskRouter(nn.Module):
    """Top-k softmax gating conditioned on the task.

    Args:
        dim: D.
        num_experts: E.
        top_k: K, experts per token.
        tasks: task names.
        mode: ``per_task`` or ``shared`` (see module docstring).
        renormalize: renormalise the chosen K probabilities to sum to 1.
        noisy_gating: add learned, input-dependent Gaussian noise to the logits while training
            (Shazeer et al. 2017); evaluation is always noise-free.
        init_std: std of the gates' normal initialisation.
        task_num_experts: per-task number of experts the task may choose from (the first n);
            tasks not listed choose among all ``num_experts``. Lets a task added later get new
            experts that older tasks' routers never see.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int,
        tasks: Iterable[str],
        mode: str = "per_task",
        renormalize: bool = True,
        noisy_gating: bool = False,
        init_std: float = 0.02,
        task_num_experts: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        if not tasks:
            raise ValueError("TaskRouter needs at least one task name")
        if mode not in ROUTER_MODES:
            raise ValueError(f"unknown router mode {mode!r}; expected one of {list(ROUTER_MODES)}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.mode, self.renormalize, self.noisy_gating, self.init_std = mode, renormalize, noisy_gating, init_std
        self.task_num_experts = dict(task_num_experts or {})
        if self.task_num_experts and mode != "per_task":
            raise ValueError("per-task expert counts need router_mode=per_task")
        bad = {t: n for t, n in self.task_num_experts.items() if not top_k <= n <= num_experts}
        if bad:
            raise ValueError(f"task expert counts {bad} must be in [top_k={top_k}, num_experts={num_experts}]")
        self.gates = nn.ModuleDict()
        self.noise = nn.ModuleDict()
        self.task_embed = nn.ParameterDict()
        self.allowed = nn.Module()  # allowed.<task>: bool [experts the task's router sees]
        if mode == "shared":
            self.gates["shared"] = self._new_gate()
            if noisy_gating:
                self.noise["shared"] = self._new_gate(zero=True)
        for task in tasks:
            self.add_task(task)

    def _new_gate(self, zero: bool = False, num_experts: int | None = None) -> nn.Linear:
        gate = nn.Linear(self.dim, num_experts or self.num_experts, bias=False)
        if zero:
            nn.init.zeros_(gate.weight)
        else:
            nn.init.normal_(gate.weight, std=self.init_std)
        return gate

    @property
    def tasks(self) -> list[str]:
        return list(self.task_embed.keys()) if self.mode == "shared" else list(self.gates.keys())

    def add_task(self, task: str) -> None:
        """Add routing for a new task; other tasks' parameters are not touched."""
        if task in self.tasks:
            raise ValueError(f"task {task!r} already has a router")
        if self.mode == "per_task":
            n = self.num_experts_for(task)
            self.gates[task] = self._new_gate(num_experts=n)
            if self.noisy_gating:
                self.noise[task] = self._new_gate(zero=True, num_experts=n)
        else:
            self.task_embed[task] = nn.Parameter(torch.zeros(self.dim))
        self.allowed.register_buffer(task, torch.ones(self.num_experts_for(task), dtype=torch.bool))

    def allowed_mask(self, task: str) -> torch.Tensor:
        """The experts ``task`` may choose, bool ``[E_task]``."""
        return getattr(self.allowed, task)

    def set_allowed(self, task: str, mask: torch.Tensor) -> None:
        """Narrow (or widen) what ``task`` may choose, in place (compiled graphs see the same buffer)."""
        current = self.allowed_mask(task)
        if mask.shape != current.shape:
            raise ValueError(f"an expert mask for {task!r} needs shape {tuple(current.shape)}, got {tuple(mask.shape)}")
        current.copy_(mask.to(torch.bool))

    # Version 2 saves the expert masks. A state dict written by version 1 (torch records each
    # module's version in ``state_dict()._metadata``) predates them: its tasks allow every expert.
    # A state dict without that record (e.g. read from a safetensors file) must bring its masks
    # (moe_vision.models.checkpoint fills them for files that predate them), so a strict load
    # catches a model saved without them.
    _version = 2

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if local_metadata.get("version") is not None and local_metadata["version"] < 2:
            for task in self.tasks:
                state_dict.setdefault(f"{prefix}allowed.{task}", torch.ones_like(self.allowed_mask(task)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def num_experts_for(self, task: str) -> int:
        """How many experts (the first n) ``task``'s router chooses among."""
        return self.task_num_experts.get(task, self.num_experts)

    def gate_for(self, task: str) -> nn.Linear:
        return self.gates[task if self.mode == "per_task" else "shared"]

    def forward(self, x_TD: torch.Tensor, task: str) -> RouterOutput:
        check_task(task, self.tasks)
        key = task if self.mode == "per_task" else "shared"
        if self.mode == "shared":
            x_TD = x_TD + self.task_embed[task].to(x_TD.dtype)
        # Gating logits are computed in fp64 and rounded to fp32: bf16 logits make top-k ties and
        # softmax drift common, and BLAS may sum in a different order for a gate with fewer rows,
        # which the fp64 accumulation hides, so a model with unused experts cut out routes
        # bit-identically. The gate is tiny (D x E), so the cost is negligible.
        gate = self.gates[key]
        logits_TE = F.linear(x_TD.double(), gate.weight.double()).float()
        logits_TE = logits_TE.masked_fill(~self.allowed_mask(task), float("-inf"))  # unchanged where all allowed
        select_logits = logits_TE
        if self.noisy_gating and self.training:
            noise_std = F.softplus(F.linear(x_TD.float(), self.noise[key].weight.float())) + 1e-2
            select_logits = logits_TE + torch.randn_like(logits_TE) * noise_std
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_logits_TK, idx_TK = top_k_lowest_index(select_logits, self.top_k)
        if self.renormalize:
            # Softmax over the chosen logits only: equal to renormalising the top-k probabilities,
            # but independent of the experts not chosen, so a model with unused experts removed
            # computes bit-identical weights.
            weights_TK = torch.softmax(top_logits_TK, dim=-1)
        else:
            select_probs = probs_TE if select_logits is logits_TE else torch.softmax(select_logits, dim=-1)
            weights_TK = select_probs.gather(1, idx_TK)
        return RouterOutput(logits_TE, probs_TE, idx_TK, weights_TK)
