"""Routing maps: for each MoE layer, which expert every patch token of one image went to.

Built from the :class:`~moe_vision.moe.RoutingOutput` list the model returns with its outputs
(no hooks into the MoE layer). Legend: P prefix tokens, gh x gw patch grid, K experts per token.
"""
from __future__ import annotations

from typing import Sequence

import torch


def routing_maps(routing: Sequence, grid: tuple[int, int], num_prefix: int = 1,
                 kept_experts: dict[str, list[int]] | None = None) -> list[dict]:
    """Per MoE layer of a one-image forward: ``top1`` ``[gh][gw]`` (the highest-weighted expert of
    each patch), ``topk`` and ``weights`` ``[gh][gw][K]``, and ``usage`` (share of the image's
    selections per expert). Expert ids are the original model's: a bundle's local indices are
    mapped through ``kept_experts``."""
    gh, gw = grid
    maps = []
    for r in routing:
        idx_TK, w_TK = r.idx_TK.detach().cpu(), r.weights_TK.detach().float().cpu()
        if idx_TK.shape[0] != num_prefix + gh * gw:
            raise ValueError(f"{r.layer}: {idx_TK.shape[0]} routed tokens for a {gh}x{gw} grid; expected one image")
        if kept_experts and r.layer in kept_experts:
            idx_TK = torch.tensor(kept_experts[r.layer])[idx_TK]
        order = w_TK.argsort(-1, descending=True)  # highest weight first
        idx_TK, w_TK = idx_TK.gather(1, order)[num_prefix:], w_TK.gather(1, order)[num_prefix:]
        ids, counts = idx_TK.reshape(-1).unique(return_counts=True)
        maps.append({"layer": r.layer, "task": r.task, "grid": [gh, gw],
                     "top1": idx_TK[:, 0].reshape(gh, gw).tolist(),
                     "topk": idx_TK.reshape(gh, gw, -1).tolist(),
                     "weights": [[[round(v, 4) for v in cell] for cell in row] for row in w_TK.reshape(gh, gw, -1).tolist()],
                     "usage": {int(i): round(float(c) / idx_TK.numel(), 4) for i, c in zip(ids, counts)}})
    return maps
