#!/usr/bin/env python
"""Benchmark our MoE layer against a dense MLP of equal active FLOPs, a naive loop and fairscale.

    python tools/benchmark.py                       # all cases, CPU fp32, eager, prints a table
    python tools/benchmark.py --compile             # each case eager and under torch.compile
    python tools/benchmark.py --cases a b --json out.json
    python tools/benchmark.py --device cuda --compile --json benchmark_gpu.json   # bf16 on CUDA
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moe_vision.bench.moe import (CASES, LayerCase, format_table, results_to_json,
                                  run_layer_case, run_model_case)
from moe_vision.io_utils import atomic_path

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="which configurations")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bf16 on CUDA, fp32 on the CPU")
    ap.add_argument("--compile", action="store_true", help="also run every case under torch.compile (fullgraph)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per implementation (median reported)")
    ap.add_argument("--tokens", type=int, default=None, help="override T for the layer cases")
    ap.add_argument("--batch", type=int, default=None, help="override the batch of case c")
    ap.add_argument("--no-fairscale", action="store_true", help="skip the fairscale baseline")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    print(f"device={device} dtype={dtype_name} threads={torch.get_num_threads()} torch={torch.__version__}",
          flush=True)
    results = []
    for name in args.cases:
        case = CASES[name]
        for compiled in ([False, True] if args.compile else [False]):
            mode = "compiled" if compiled else "eager"
            say = lambda msg, n=name, m=mode: print(f"  case {n} {m}: {msg}", end="\r", flush=True)  # noqa: E731
            if isinstance(case, LayerCase):
                if args.tokens:
                    case.tokens = args.tokens
                results.append(run_layer_case(case, device, dtype, args.warmup, args.repeats,
                                              with_fairscale=not args.no_fairscale, compiled=compiled, progress=say))
            else:
                if args.batch:
                    case.batch = args.batch
                results.append(run_model_case(case, device, dtype, args.warmup, max(3, args.repeats // 2),
                                              compiled, say))
            print(" " * 60, end="\r")
    print(format_table(results))
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(results_to_json(results, device, dtype), indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
