"""Optimiser and schedule: AdamW without weight decay on norms, biases, embeddings, queries and
router gates; linear warm-up then cosine decay."""
from __future__ import annotations

import math
import re

import torch
from torch import nn

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "task_embed", "query_embed", "query_pos", "level_embed",
                   ".router.", "log_vars")


TRAINABLE = ("head", "router+head", "stem+head", "experts+head", "all")


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"trainable": n, "total": n}`` parameters."""
    return {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "total": sum(p.numel() for p in model.parameters())}


def set_trainable(model: nn.Module, which: str, setting: str = "train.trainable") -> dict[str, int]:
    """``head``: the task heads only, the topmost linear layers (GLID's recipe); ``router+head``;
    ``stem+head`` (the patch stem and position embedding, where new pixels differ most from the
    pre-training images: under 5% of the demo model); ``experts+head``; ``all``. The rest is
    frozen. ``setting`` names the option in errors."""
    if which not in TRAINABLE:
        raise ValueError(f"{setting}={which!r}; expected one of {list(TRAINABLE)}")
    for name, p in model.named_parameters():
        on = which == "all" or name.startswith("heads.")
        on |= which == "router+head" and ".router." in name
        on |= which == "stem+head" and name.startswith(("backbone.patch_embed.", "backbone.pos_embed"))
        on |= which == "experts+head" and (".experts." in name or ".added_experts." in name)
        p.requires_grad_(on)
    return parameter_counts(model)


_BLOCK = re.compile(r"backbone\.blocks\.(\d+)\.")


def layer_id(name: str, num_blocks: int) -> int:
    """Depth of a parameter for layer-wise learning-rate decay (BEiT / MAE fine-tuning): the
    backbone's input side (stem, position, [CLS] and task embeddings) is 0, block i is i + 1,
    everything above the blocks (final norm, decoders, adapters, heads) is ``num_blocks + 1``."""
    m = _BLOCK.match(name)
    if m:
        return int(m.group(1)) + 1
    if name.startswith(("backbone.patch_embed.", "backbone.pos_embed", "backbone.cls_token", "backbone.task_embed.")):
        return 0
    return num_blocks + 1


def param_groups(model: nn.Module, weight_decay: float, extra: list[nn.Parameter] | None = None,
                 lr: float | None = None, head_lr_mult: float = 1.0, layer_decay: float = 1.0) -> list[dict]:
    """Groups by weight decay (on / off) and by learning rate: with ``head_lr_mult != 1`` the task
    heads (``heads.*``) run at ``lr * head_lr_mult``; with ``layer_decay < 1`` a parameter at depth
    d (see ``layer_id``) runs at ``lr * layer_decay ** (num_blocks + 1 - d)``. Only trainable
    parameters are included and empty groups are left out."""
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"train.layer_decay={layer_decay}; expected a value in (0, 1]")
    num_blocks = 1 + max((int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.match(n))),
                         default=-1)
    split_heads = head_lr_mult != 1.0
    # Keyed by (decay, head, depth); the depth is the top one unless layer decay is on, so without
    # it the groups (and their order, which checkpoints record) are the plain decay/no-decay pair.
    groups: dict[tuple[bool, bool, int], list[nn.Parameter]] = {
        (d, h, num_blocks + 1): [] for d in (True, False) for h in (False, True)}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Stacked expert biases (b1, b2, GroupedLinear bias) are 2-D but still biases.
        no_decay = p.ndim <= 1 or name.endswith(("bias", ".b1", ".b2")) or any(k in name for k in _NO_DECAY_NAMES)
        depth = layer_id(name, num_blocks) if layer_decay < 1.0 else num_blocks + 1
        groups.setdefault((not no_decay, split_heads and name.startswith("heads."), depth), []).append(p)
    groups[(False, False, num_blocks + 1)] += [p for p in (extra or []) if p.requires_grad]
    out = []
    for (decay, head, depth), params in groups.items():
        plain = not head and not split_heads and depth == num_blocks + 1
        if params or plain:  # the plain two groups always exist
            group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
            scale = (head_lr_mult if head else 1.0) * layer_decay ** (num_blocks + 1 - depth)
            if lr is not None and scale != 1.0:
                group["lr"] = lr * scale
            out.append(group)
    return out


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999),
                    extra: list[nn.Parameter] | None = None, head_lr_mult: float = 1.0,
                    layer_decay: float = 1.0) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay, extra, lr, head_lr_mult, layer_decay),
                             lr=lr, betas=tuple(betas))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                       min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossWeighting(nn.Module):
    """Per-task loss weights: ``fixed`` (from config) or ``uncertainty`` (Kendall et al.: a learned
    log-variance s per task, loss = exp(-s) * L + s, times the fixed weight)."""

    def __init__(self, weights: dict[str, float], mode: str = "fixed") -> None:
        super().__init__()
        if mode not in ("fixed", "uncertainty"):
            raise ValueError(f"train.loss_weighting={mode!r}; expected 'fixed' or 'uncertainty'")
        self.mode, self.weights = mode, dict(weights)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in weights}) \
            if mode == "uncertainty" else nn.ParameterDict()

    def forward(self, task: str, loss: torch.Tensor) -> torch.Tensor:
        loss = self.weights[task] * loss
        if self.mode == "uncertainty":
            s = self.log_vars[task]
            loss = torch.exp(-s) * loss + s
        return loss
