"""Expert parallelism: the token exchange between the dispatcher's permute and the experts.

Legend: A rows of this rank's expert-sorted buffer, R rows this rank receives, D dim,
E experts in all, P ranks in the expert-parallel group, L = E / P experts per rank.

Expert e lives on ep-rank ``e // L``. One MoE layer's forward under expert parallelism::

    plan = dispatcher.plan(idx_TK, weights_TK)              # global expert ids, as in one process
    x_AD = dispatcher.permute(x_TD, plan)                   # rows grouped by global expert
    ex = exchange_plan(plan.counts_E, group)                # counts exchanged first (a value, not module state)
    x_RD = dispatch_rows(x_AD, ex)                          # all-to-all; rows now grouped by local expert
    y_RD = local_experts(x_RD, ex.local_counts_L)
    y_AD = combine_rows(y_RD, ex)                           # reverse all-to-all, original row order
    y_TD = dispatcher.unpermute(y_AD, plan, T)

Both exchanges go through ``all_to_all_single_autograd``, so gradients flow back to the
sending rank. Every rank issues the same collectives in the same order, with zero-sized splits
when it has nothing to send or receive.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .._compat import require_distributed_torch


@dataclass
class ExpertExchange:
    """Who sends how many rows to whom for one layer call."""

    send_splits: list[int]  # [P] rows this rank sends to each ep-rank
    recv_splits: list[int]  # [P] rows this rank receives from each ep-rank
    recv_counts_PL: torch.Tensor  # [P, L] rows received from source rank p for local expert l
    group: dist.ProcessGroup | None

    def bytes_to_other_ranks(self, row_bytes: int) -> int:
        """Bytes this rank sends to other ranks in one forward (dispatch and combine; the rows
        it keeps for its own experts do not travel, the [P, L] count exchange is included)."""
        me = dist.get_rank(self.group)
        rows = sum(n for p, n in enumerate(self.send_splits) if p != me)
        back = sum(n for p, n in enumerate(self.recv_splits) if p != me)
        counts = self.recv_counts_PL.numel() * self.recv_counts_PL.element_size() * (len(self.send_splits) - 1) \
            // len(self.send_splits)
        return (rows + back) * row_bytes + counts

    @property
    def local_counts_L(self) -> torch.Tensor:
        """Rows per local expert after regrouping ``[L]``."""
        return self.recv_counts_PL.sum(dim=0)


def ep_group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group)


def exchange_plan(counts_E: torch.Tensor, group: dist.ProcessGroup | None = None) -> ExpertExchange:
    """Exchange per-expert row counts so every rank knows what it will receive.

    ``counts_E`` are this rank's rows per global expert (the dispatcher's ``plan.counts_E``).
    """
    require_distributed_torch()
    P = ep_group_size(group)
    E = counts_E.numel()
    if E % P:
        raise ValueError(f"{E} experts cannot be split evenly over an expert-parallel group of {P} ranks")
    L = E // P
    send_PL = counts_E.reshape(P, L).to(torch.int64)
    recv_PL = torch.empty_like(send_PL)
    # gloo runs CPU collectives; NCCL needs the counts on the device.
    dist.all_to_all_single(recv_PL, send_PL.contiguous(), group=group)
    return ExpertExchange(send_PL.sum(1).tolist(), recv_PL.sum(1).tolist(), recv_PL, group)


def _source_major_to_expert_major(recv_counts_PL: torch.Tensor) -> torch.Tensor:
    """Row order that turns a buffer grouped (source rank, local expert) into (local expert, source rank)."""
    P, L = recv_counts_PL.shape
    counts = recv_counts_PL.reshape(-1)
    starts = torch.cumsum(counts, 0) - counts  # start of block (p, l) in the received buffer
    blocks = [torch.arange(int(starts[p * L + l]), int(starts[p * L + l] + counts[p * L + l]))
              for l in range(L) for p in range(P)]
    return torch.cat(blocks) if blocks else torch.zeros(0, dtype=torch.long)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor
    group = group if group is not None else dist.group.WORLD
    return wait_tensor(all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group))


def dispatch_rows(x_AD: torch.Tensor, ex: ExpertExchange) -> torch.Tensor:
    """Send each row to the rank holding its expert; return the received rows grouped by local expert."""
    x_RD = _all_to_all(x_AD, ex.recv_splits, ex.send_splits, ex.group)
    order = _source_major_to_expert_major(ex.recv_counts_PL).to(x_RD.device)
    return x_RD.index_select(0, order)


def combine_rows(y_RD: torch.Tensor, ex: ExpertExchange) -> torch.Tensor:
    """Undo :func:`dispatch_rows`: back to (source rank, local expert) order and home to the sender."""
    order = _source_major_to_expert_major(ex.recv_counts_PL).to(y_RD.device)
    y_src = y_RD.index_select(0, torch.argsort(order))
    return _all_to_all(y_src, ex.send_splits, ex.recv_splits, ex.group)


def expected_bytes_per_rank(tokens: int, top_k: int, ep_size: int, dim: int, elem_bytes: int,
                            num_experts: int) -> float:
    """Analytic bytes one rank sends in one forward under uniform routing: each of its T*K
    assignments lands on another rank with probability (P-1)/P, travels there and back
    (D * elem_bytes each way), plus its share of the int64 count exchange (E/P counts to each
    of the P-1 others)."""
    rows = tokens * top_k * (ep_size - 1) / ep_size
    return 2 * rows * dim * elem_bytes + 8 * num_experts * (ep_size - 1) / ep_size


def local_expert_range(num_experts: int, group: dist.ProcessGroup | None = None) -> range:
    """Global ids of the experts this rank holds (expert e on ep-rank e // L)."""
    P, r = ep_group_size(group), dist.get_rank(group)
    L = num_experts // P
    return range(r * L, (r + 1) * L)
