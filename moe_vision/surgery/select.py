"""Rules that pick, per MoE layer, which experts a task keeps.

Usage rules read how often the task's router chose each expert on calibration images
(:func:`select_layer`); ``allowed`` reads the router's mask (:func:`allowed_experts`: the experts
a budget-trained task may choose at all, exact on every input); ``search`` tries every subset of a
given size per layer and keeps the one whose layer output moves least (:func:`search_subsets`).
"""
from __future__ import annotations

import copy
import itertools

import torch

USAGE_RULES = ("threshold", "coverage", "top_n", "selected")
RULES = ("auto", "allowed", *USAGE_RULES, "search")


def select_layer(counts_E: torch.Tensor, rule: str, value: float | None, top_k: int, layer: str = "") -> list[int]:
    """Kept expert indices (sorted) of one layer from the task's selection counts ``[E]``.

    - ``threshold``: experts with at least ``value`` of the task's selections (a fraction);
    - ``coverage``: the most used experts until they cover ``value`` of the selections;
    - ``top_n``: the ``value`` most used experts;
    - ``selected``: every expert the router selected at least once (the lossless rule).

    A rule that keeps fewer than ``top_k`` experts raises: the router must still find k experts.
    """
    if rule not in USAGE_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; expected one of {list(USAGE_RULES)}")
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


def allowed_experts(modules: dict, task: str) -> dict[str, list[int]]:
    """Per MoE layer, the experts ``task``'s router may choose (its mask)."""
    return {layer: torch.nonzero(m.router.allowed_mask(task)).flatten().tolist() for layer, m in modules.items()}


def is_budgeted(modules: dict, task: str) -> bool:
    """Whether ``task``'s routers are narrowed in any layer (a model trained with an expert budget)."""
    return any(not bool(m.router.allowed_mask(task).all()) for m in modules.values())


SEARCH_ERRORS = ("output", "layer")


def _float_outputs(out: dict) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()}


def match_rows(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], keys) -> dict[str, torch.Tensor]:
    """``out``'s tensors with the rows of ``keys`` (``[B, Q, ...]``, a set per image) put in the
    order that matches ``ref``'s best: per image the one-to-one assignment of least squared
    difference over all those keys (each scaled by its reference's size). Other tensors unchanged."""
    keys = [k for k in keys if k in ref and ref[k].dim() >= 2]
    if not keys:
        return out
    from scipy.optimize import linear_sum_assignment
    scale = {k: ref[k].square().mean().clamp(min=1e-30).sqrt() for k in keys}
    rows = lambda d, b: torch.cat([(d[k][b] / scale[k]).reshape(d[k].shape[1], -1) for k in keys], 1)
    order = []
    for b in range(ref[keys[0]].shape[0]):
        cost = torch.cdist(rows(ref, b).double(), rows(out, b).double()).square()
        r, c = linear_sum_assignment(cost.numpy())
        order.append(torch.as_tensor(c[r.argsort()]))
    order_BQ = torch.stack(order)
    return {k: (v.gather(1, order_BQ.view(*order_BQ.shape, *[1] * (v.dim() - 2)).expand_as(v)) if k in keys else v)
            for k, v in out.items()}


def output_error(model, task: str, batches, reference: list[dict]) -> float:
    """Sum over output tensors of their squared difference from ``reference``, each relative to
    its own size (a task's outputs differ in scale: class logits against boxes in [0, 1]). Rows
    that form a set (the task's ``unordered_outputs``, e.g. detection queries, whose order follows
    their proposals' scores) are matched first, so two models that find the same boxes in another
    order do not differ."""
    unordered = model.spec(task).unordered_outputs
    err: dict[str, float] = {}
    size: dict[str, float] = {}
    for (images, targets), ref in zip(batches, reference):
        out = match_rows(_float_outputs(model(images, task, targets=targets)), ref, unordered)
        for k, v in ref.items():
            err[k] = err.get(k, 0.0) + float((out[k] - v).square().sum())
            size[k] = size.get(k, 0.0) + float(v.square().sum())
    return sum(err[k] / max(size[k], 1e-30) for k in err)


@torch.no_grad()
def search_subsets(model, task: str, batches, size: int, log=print, error: str = "output") -> dict[str, list[int]]:
    """Per MoE layer in forward order (the earlier layers already cut to their choice), the ``size``
    experts among those the task may choose whose cut changes the least (NAEE's layer-wise
    enumeration of expert subsets; Lu et al., 2024): with ``error="output"`` the task's outputs on
    the calibration images (relative squared error, summed over output tensors, detection's query
    rows matched first: :func:`output_error`), with ``"layer"`` the layer's own output on the
    tokens it receives (MLP or attention layer alike). ``batches``: calibration ``(images, targets)``
    pairs. Not exact: the bundle differs from the full model where a token's own choices were cut."""
    if error not in SEARCH_ERRORS:
        raise ValueError(f"search error {error!r}; expected one of {list(SEARCH_ERRORS)}")
    probe = copy.deepcopy(model).eval()
    modules = probe.backbone.moe_modules()
    batches = list(batches)
    reference = [_float_outputs(probe(images, task, targets=targets)) for images, targets in batches]
    kept = {}
    for layer, module in modules.items():
        allowed = module.router.allowed_mask(task).clone()
        if size < module.top_k or size > int(allowed.sum()):
            raise ValueError(f"--rule search --value {size}: {layer} needs top_k={module.top_k} <= value <= "
                             f"{int(allowed.sum())} (the experts {task} may choose there)")
        if error == "layer":
            calls = []  # the layer's inputs as the model called it ([B, N, D] tokens, attention masks)
            hook = module.register_forward_hook(
                lambda mod, args, kwargs, out: calls.append((args, kwargs)), with_kwargs=True)
            for images, targets in batches:
                probe(images, task, targets=targets)
            hook.remove()
            want = [module(*args, **kwargs)[0] for args, kwargs in calls]
            scale = sum(float(w.square().sum()) for w in want) or 1e-30
            measure = lambda: sum(float((module(*args, **kwargs)[0] - w).square().sum())
                                  for (args, kwargs), w in zip(calls, want)) / scale
        else:
            measure = lambda: output_error(probe, task, batches, reference)
        best, best_err = None, float("inf")
        candidates = list(itertools.combinations(torch.nonzero(allowed).flatten().tolist(), size))
        for subset in candidates:
            module.router.set_allowed(task, torch.zeros_like(allowed).index_fill(0, torch.tensor(subset), True))
            err = measure()
            if err < best_err:
                best, best_err = list(subset), err
        module.router.set_allowed(task, torch.zeros_like(allowed).index_fill(0, torch.tensor(best), True))
        kept[layer] = best
        log(f"  {layer}: kept {best} of {len(candidates)} subsets ({error} error {best_err:.4f})")
    return kept
