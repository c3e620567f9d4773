"""Rules that pick, per MoE layer, which experts a task keeps."""
from __future__ import annotations

import torch

RULES = ("threshold", "coverage", "top_n", "selected")


def select_layer(counts_E: torch.Tensor, rule: str, value: float | None, top_k: int, layer: str = "") -> list[int]:
    """Kept expert indices (sorted) of one layer from the task's selection counts ``[E]``.

    - ``threshold``: experts with at least ``value`` of the task's selections (a fraction);
    - ``coverage``: the most used experts until they cover ``value`` of the selections;
    - ``top_n``: the ``value`` most used experts;
    - ``selected``: every expert the router selected at least once (the lossless rule).

    A rule that keeps fewer than ``top_k`` experts raises: the router must still find k experts.
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {list(RULES)}")
    counts_E = counts_E.double()
    total = float(counts_E.sum())
    if total == 0:
        raise ValueError(f"layer {layer}: the task never selected any expert on the calibration data "
                         "(empty calibration split?)")
    order = torch.argsort(counts_E, descending=True, stable=True)
    if rule == "selected":
        kept = (counts_E > 0).nonzero().flatten()
    elif rule == "threshold":
        kept = (counts_E / total >= float(value)).nonzero().flatten()
    elif rule == "coverage":
        if not 0 < float(value) <= 1:
            raise ValueError(f"coverage must be in (0, 1], got {value}")
        cum = torch.cumsum(counts_E[order], 0) / total
        n = int((cum < float(value) - 1e-12).sum()) + 1
        kept = order[:n]
    else:
        kept = order[:int(value)]
    kept = sorted(int(i) for i in kept)
    if len(kept) < top_k:
        raise ValueError(f"layer {layer}: rule {rule}={value} keeps {len(kept)} expert(s) {kept}, fewer than "
                         f"top_k={top_k}; loosen the rule (e.g. a lower threshold or higher coverage)")
    return kept
