#!/usr/bin/env python
"""Measure the expert-parallel all-to-all traffic of one MoE layer and compare it with the formula.

    torchrun --standalone --nproc_per_node 2 tools/ep_traffic.py
    torchrun --standalone --nproc_per_node 4 tools/ep_traffic.py --tokens 512 2048 --dim 192 --experts 8

Every rank routes its own random tokens through a MoE layer whose experts are split over all
ranks (expert parallel degree = world size) and counts the bytes it sends to other ranks in one
forward pass (token rows out and back, plus the count exchange). Rank 0 prints the mean over
ranks next to the analytic value for uniform routing, 2 * T * K * (P-1)/P * D * bytes.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from moe_vision.cli import user_errors
from moe_vision.engine.distributed import init_distributed
from moe_vision.moe import MoEMLP
from moe_vision.moe import expert_parallel as ep


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048], help="tokens per rank")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    args = ap.parse_args()
    with user_errors():
        ctx = init_distributed(torch.device("cpu"))
        if not ctx.enabled:
            raise ValueError("run under torchrun with at least 2 processes, e.g. "
                             "torchrun --standalone --nproc_per_node 2 tools/ep_traffic.py")
        torch.manual_seed(0)  # the same layer on every rank before sharding
        layer = MoEMLP(args.dim, 2 * args.dim, ["t"], num_experts=args.experts, top_k=args.top_k)
        layer.shard_experts(dist.group.WORLD)
        rows = []
        for T in args.tokens:
            x = torch.randn(T, args.dim, generator=torch.Generator().manual_seed(100 + ctx.rank))
            _, routing = layer(x, "t")
            sent = torch.tensor([float(routing.exchange.bytes_to_other_ranks(args.dim * 4))])
            dist.all_reduce(sent)
            rows.append((T, float(sent) / ctx.world_size,
                         ep.expected_bytes_per_rank(T, args.top_k, ctx.world_size, args.dim, 4, args.experts)))
        if ctx.is_main:
            print(f"expert parallel degree {ctx.world_size}, E={args.experts}, top-{args.top_k}, D={args.dim}, fp32")
            print("tokens/rank | measured KiB/rank/forward | formula (uniform routing) | measured/formula")
            for T, measured, formula in rows:
                print(f"{T:11d} | {measured / 1024:25.1f} | {formula / 1024:25.1f} | {measured / formula:16.3f}")
        ctx.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
