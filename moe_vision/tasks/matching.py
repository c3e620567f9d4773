"""Hungarian matching of queries to ground-truth objects: scipy's ``linear_sum_assignment`` on the
host, or :func:`device_assignment`, the same shortest-augmenting-path algorithm written with
tensor operations only, so that matching on a GPU never waits for a copy to the host."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch.profiler import record_function


@torch.no_grad()
def hungarian_match(cost_QN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimum-cost one-to-one assignment; returns (query indices, target indices), sorted by query."""
    if cost_QN.shape[1] == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    with record_function("matching/hungarian"):
        # A non-finite cost (a diverged model) still gets an assignment: the loss is non-finite
        # anyway, and the trainer's check names the step instead of the matcher failing first.
        cost = cost_QN.detach().float().cpu().nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8)
        q, t = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(q, dtype=torch.long), torch.as_tensor(t, dtype=torch.long)


@torch.no_grad()
def device_assignment(cost_BNQ: torch.Tensor, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Minimum-cost one-to-one assignment of every image's ``rows[b]`` objects (the first rows of
    ``cost_BNQ[b]``; padding rows beyond are ignored) to ``Q >= max(rows)`` queries, on the cost's
    device and without reading anything back: the loops run a number of times known on the host
    (the object counts), finished images idle through masks. Returns (query indices, object
    indices) per image, sorted by query, as :func:`hungarian_match` does.

    The algorithm is the Jonker-Volgenant shortest augmenting path with dual potentials (the one
    scipy implements): objects are added one at a time; adding object ``r`` walks at most ``r + 1``
    alternating steps to a free query. Padding rows of constant cost cannot change the optimum of
    the real rows, so images with fewer objects share the batch. Optimal like scipy's (the total
    cost is equal; among equal-cost assignments either may be returned)."""
    B, N, Q = cost_BNQ.shape
    if N > Q:
        raise ValueError(f"device_assignment: {N} objects but only {Q} queries")
    device = cost_BNQ.device
    dtype = torch.float64 if device.type != "mps" else torch.float32
    real = torch.arange(N, device=device)[None, :] < torch.as_tensor(rows, device=device)[:, None]
    cost = cost_BNQ.detach().to(dtype).nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8)
    cost = torch.where(real[:, :, None], cost, torch.zeros((), dtype=dtype, device=device))
    batch = torch.arange(B, device=device)
    u = cost.new_zeros(B, N)  # object potentials
    v = cost.new_zeros(B, Q)  # query potentials
    col4row = torch.full((B, N), -1, dtype=torch.long, device=device)
    row4col = torch.full((B, Q), -1, dtype=torch.long, device=device)
    inf = torch.tensor(float("inf"), dtype=dtype, device=device)
    for r in range(N):
        shortest = cost.new_full((B, Q), float("inf"))
        path = torch.full((B, Q), -1, dtype=torch.long, device=device)
        seen_cols = torch.zeros(B, Q, dtype=torch.bool, device=device)
        row = torch.full((B,), r, dtype=torch.long, device=device)
        min_val = cost.new_zeros(B)
        sink = torch.full((B,), -1, dtype=torch.long, device=device)
        searching = torch.ones(B, dtype=torch.bool, device=device)
        # Each step reaches a free query or visits one of the r assigned ones: r + 1 steps suffice,
        # whichever of several equally cheap queries is taken.
        for _ in range(r + 1):
            reduced = min_val[:, None] + cost[batch, row] - u[batch, row][:, None] - v
            better = searching[:, None] & ~seen_cols & (reduced < shortest)
            path = torch.where(better, row[:, None], path)
            shortest = torch.where(better, reduced, shortest)
            lowest, pick = torch.where(seen_cols, inf, shortest).min(dim=1)
            min_val = torch.where(searching, lowest, min_val)
            seen_cols[batch, pick] |= searching
            owner = row4col[batch, pick]
            reached = searching & (owner < 0)
            sink = torch.where(reached, pick, sink)
            searching = searching & ~reached
            row = torch.where(searching, owner, row)  # on through the visited query's object
        # Potentials: keep every reduced cost >= 0 and the assigned pairs' reduced costs at 0. The
        # rows the search went through are those whose query it visited (object r has none yet).
        assigned = col4row.clamp(min=0)
        others = (col4row >= 0) & seen_cols.gather(1, assigned)
        u = u + torch.where(others, min_val[:, None] - shortest.gather(1, assigned), 0)
        u[:, r] += min_val
        v = v - torch.where(seen_cols, min_val[:, None] - shortest, 0)
        # Flip the path from the free query back to object r.
        col, walking = sink, torch.ones(B, dtype=torch.bool, device=device)
        for _ in range(r + 1):
            obj = path[batch, col]
            row4col[batch, col] = torch.where(walking, obj, row4col[batch, col])
            previous = col4row[batch, obj]
            col4row[batch, obj] = torch.where(walking, col, previous)
            col = torch.where(walking, previous, col)
            walking = walking & (obj != r)
    # Sorted by query, all images at once (padding rows sort last); each image keeps its first rows.
    order = torch.where(real, col4row, Q + torch.arange(N, device=device)).argsort(dim=1)
    queries = col4row.gather(1, order)
    return [(queries[b, :n], order[b, :n]) for b, n in enumerate(rows)]


def matched_cross_entropy(logits_BQC1: torch.Tensor, matched: list[tuple[int, torch.Tensor, torch.Tensor]],
                          no_object_weight: float) -> torch.Tensor:
    """Classification loss of set prediction: matched queries target their object's class, every
    other query the last ("no object") class, down-weighted by ``no_object_weight``.

    ``matched`` holds ``(image index, query indices, class labels)`` per image.
    """
    B, Q, C1 = logits_BQC1.shape
    target_BQ = torch.full((B, Q), C1 - 1, dtype=torch.long, device=logits_BQC1.device)
    for b, queries, labels in matched:
        target_BQ[b, queries.to(target_BQ.device)] = labels.to(target_BQ.device)
    weight = logits_BQC1.new_ones(C1)
    weight[-1] = no_object_weight
    return F.cross_entropy(logits_BQC1.reshape(-1, C1), target_BQ.reshape(-1), weight=weight)
