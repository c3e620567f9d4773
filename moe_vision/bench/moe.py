"""Speed benchmark of the MoE layer, measured as ratios in one process on the same tokens.

Each configuration times forward+backward of several implementations, interleaved round-robin
(so drift in machine speed hits all of them alike) and reports medians after warm-up:

- ``ours``: :class:`moe_vision.moe.MoEMLP`,
- ``dense``: a dense MLP with the same active FLOPs (hidden = top_k * expert hidden),
- ``naive``: a Python loop over experts held as separate ``nn.Linear`` modules,
- ``fairscale``: fairscale's ``MOELayer`` + ``Top2Gate`` (world size 1, gloo), when installed.

Configuration ``c`` times a whole MoE-ViT-small training step (forward, backward, AdamW) against
the dense ViT-small with the same active FLOPs. With ``compiled=True`` ours and dense (and the
ViTs of case c) run under ``torch.compile`` (fullgraph), so the ratio compares like with like.
A profile of one step of ours splits its time into the expert GEMMs (the grouped operators) and
everything else (routing, sort, gather, combine).
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from timm.layers import Mlp

from ..engine.compile import quiet_cpu_compiler
from ..models import MoEViT
from ..models.registry import MODEL_ARGS
from ..moe import MoEMLP
from ..moe.reference import NaiveExperts


@dataclass
class LayerCase:
    name: str
    description: str
    tokens: int = 1568
    dim: int = 384
    hidden: int = 1536  # dense MLP hidden; experts get hidden // granularity
    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    target_ratio_cpu: float = 1.10
    target_ratio_gpu: float | None = 1.50


@dataclass
class ModelCase:
    name: str
    description: str
    batch: int = 8
    img_size: int = 224
    num_experts: int = 8
    top_k: int = 2
    granularity: int = 2  # top-2 of experts with hidden H/2 = the dense MLP's FLOPs
    target_ratio_cpu: float = 1.15
    target_ratio_gpu: float | None = 1.30


CASES: dict[str, LayerCase | ModelCase] = {
    "a": LayerCase("a", "MoE MLP T=1568 D=384 H=1536 E=8 top-2"),
    "b": LayerCase("b", "Mod-Squad-like E=16 top-4 expert hidden H/4", num_experts=16, top_k=4, granularity=4,
                   target_ratio_cpu=1.30, target_ratio_gpu=None),
    "c": ModelCase("c", "MoE-ViT-small train step (E=8 top-2, hidden H/2, every 2nd block) vs dense ViT-small"),
}


@dataclass
class Result:
    case: str
    description: str
    compiled: bool
    times_ms: dict[str, float]
    ratio_vs_dense: float
    speedup_vs_fairscale: float | None
    speedup_vs_naive: float | None
    target_ratio: float | None
    expert_share: float | None = None  # of ours' profiled step: time in the expert GEMMs
    notes: list[str] = field(default_factory=list)

    @property
    def met(self) -> bool | None:
        return None if self.target_ratio is None else self.ratio_vs_dense <= self.target_ratio


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int,
                     progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Median milliseconds of each zero-argument function, run round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) * 1e3)
        if progress:
            progress(f"repeat {i + 1}/{repeats}")
    return {k: statistics.median(v) for k, v in samples.items()}


def _fwd_bwd(module_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_out: torch.Tensor,
             params: list[nn.Parameter]) -> Callable[[], None]:
    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        y = module_fn(x)
        y.backward(grad_out)
    return step


class _FairscaleExpert(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _init_single_process_group() -> None:
    import torch.distributed as dist
    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(prefix="moe_bench_"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)


def _fairscale_layer(case: LayerCase, hidden: int) -> nn.Module:
    from fairscale.nn.moe import MOELayer, Top2Gate  # imported lazily: dev-only dependency
    _init_single_process_group()
    experts = nn.ModuleList(_FairscaleExpert(case.dim, hidden) for _ in range(case.num_experts))
    return MOELayer(Top2Gate(case.dim, case.num_experts), experts)


def expert_gemm_share(step: Callable[[], None], device: torch.device) -> float:
    """Share of one profiled step's time spent in the expert GEMMs (the ``moe_vision::grouped_linear``
    operators, forward and backward); the rest is routing, sort, gather, combine and the glue.
    Device time on CUDA, CPU time elsewhere."""
    from torch.profiler import ProfilerActivity, record_function
    from ..engine.profile import quiet_profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    step()
    _sync(device)
    with quiet_profile(activities) as prof:
        with record_function("bench_step"):
            step()
        _sync(device)
    events = prof.key_averages()
    if cuda:
        total = sum(e.self_device_time_total for e in events)
        gemm = sum(e.device_time_total for e in events if e.key.startswith("moe_vision::grouped_linear"))
    else:
        total = sum(e.cpu_time_total for e in events if e.key == "bench_step")
        gemm = sum(e.cpu_time_total for e in events if e.key.startswith("moe_vision::grouped_linear"))
    return gemm / total if total else 0.0


def _maybe_compile(fn: Callable, compiled: bool) -> Callable:
    quiet_cpu_compiler()
    return torch.compile(fn, fullgraph=True) if compiled else fn


def run_layer_case(case: LayerCase, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                   with_fairscale: bool = True, with_naive: bool = True, compiled: bool = False,
                   progress: Callable[[str], None] | None = None) -> Result:
    torch.manual_seed(0)
    H = case.hidden // case.granularity
    ours = MoEMLP(case.dim, H, ["bench"], case.num_experts, case.top_k).to(device, dtype)
    dense = Mlp(case.dim, case.top_k * H).to(device, dtype)
    x = torch.randn(case.tokens, case.dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    ours_fn = _maybe_compile(lambda t: ours(t, "bench")[0], compiled)
    fns = {
        "ours": _fwd_bwd(ours_fn, x, grad_out, list(ours.parameters())),
        "dense": _fwd_bwd(_maybe_compile(dense, compiled), x, grad_out, list(dense.parameters())),
    }
    notes = []
    if with_naive and not compiled:
        naive = NaiveExperts.from_grouped(ours.experts).to(device, dtype)

        def naive_fn(t: torch.Tensor) -> torch.Tensor:
            r = ours.router(t, "bench")
            return naive(t, r.idx_TK, r.weights_TK)
        fns["naive"] = _fwd_bwd(naive_fn, x, grad_out, list(naive.parameters()) + list(ours.router.parameters()))
    if with_fairscale and not compiled:
        try:
            fs = _fairscale_layer(case, H).to(device, dtype)
            # fairscale wants [S, T, M] with S divisible by the expert count: one token per "sequence".
            fs_step = _fwd_bwd(lambda t: fs(t.view(-1, 1, case.dim)).view_as(t), x, grad_out, list(fs.parameters()))
            fs_step()  # fail here, not mid-timing
            fns["fairscale"] = fs_step
            if case.top_k != 2:
                notes.append("fairscale has top-2 gating only: its row runs top-2 (fewer FLOPs than ours)")
        except Exception as e:  # an optional baseline must not break the benchmark
            notes.append(f"fairscale unavailable: {type(e).__name__}: {e}")
    times = time_interleaved(fns, device, warmup, repeats, progress)
    gpu = device.type == "cuda"
    return Result(
        case=case.name, description=case.description, compiled=compiled, times_ms=times,
        ratio_vs_dense=times["ours"] / times["dense"],
        speedup_vs_fairscale=times["fairscale"] / times["ours"] if "fairscale" in times else None,
        speedup_vs_naive=times["naive"] / times["ours"] if "naive" in times else None,
        target_ratio=case.target_ratio_gpu if gpu else case.target_ratio_cpu,
        expert_share=expert_gemm_share(fns["ours"], device), notes=notes,
    )


def run_model_case(case: ModelCase, device: torch.device, dtype: torch.dtype, warmup: int, repeats: int,
                   compiled: bool = False, progress: Callable[[str], None] | None = None) -> Result:
    torch.manual_seed(0)
    args = {**MODEL_ARGS["moe_vit_small_patch16"], "img_size": case.img_size}
    moe = MoEViT(tasks=["cls"], **args, moe=dict(num_experts=case.num_experts, top_k=case.top_k,
                                                  granularity=case.granularity)).to(device, dtype)
    dense = MoEViT(tasks=["cls"], **args, moe=dict(mlp_blocks="none")).to(device, dtype)
    x = torch.randn(case.batch, 3, case.img_size, case.img_size, device=device, dtype=dtype)

    def train_step(model: MoEViT) -> Callable[[], None]:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def loss_of(images: torch.Tensor) -> torch.Tensor:
            tokens, routing = model.forward_tokens(images, "cls", return_routing=True)
            return tokens.float().pow(2).mean() + model.aux_losses(routing).total.to(tokens.device)
        loss_fn = _maybe_compile(loss_of, compiled)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss_fn(x).backward()
            opt.step()
        return step

    steps = {"ours": train_step(moe), "dense": train_step(dense)}
    times = time_interleaved(steps, device, warmup, repeats, progress)
    n_moe = sum(p.numel() for p in moe.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    return Result(
        case=case.name, description=case.description, compiled=compiled, times_ms=times,
        ratio_vs_dense=times["ours"] / times["dense"], speedup_vs_fairscale=None, speedup_vs_naive=None,
        target_ratio=case.target_ratio_gpu if device.type == "cuda" else case.target_ratio_cpu,
        expert_share=expert_gemm_share(steps["ours"], device),
        notes=[f"batch {case.batch}x{case.img_size}px; parameters {n_moe / 1e6:.1f}M (MoE) vs "
               f"{n_dense / 1e6:.1f}M (dense); AdamW step included"],
    )


def format_table(results: list[Result]) -> str:
    cols = ["case", "mode", "ours ms", "dense ms", "vs dense", "target", "met", "expert GEMMs", "naive/ours",
            "fairscale/ours"]

    def f(v: float | None, fmt: str = "{:.1f}") -> str:
        return "-" if v is None else fmt.format(v)
    rows = [[r.case, "compiled" if r.compiled else "eager", f(r.times_ms.get("ours")), f(r.times_ms.get("dense")),
             f(r.ratio_vs_dense, "{:.2f}x"), f(r.target_ratio, "<={:.2f}"),
             {True: "yes", False: "NO", None: "-"}[r.met], f(r.expert_share, "{:.0%}"),
             f(r.speedup_vs_naive, "{:.2f}x"), f(r.speedup_vs_fairscale, "{:.2f}x")] for r in results]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(cols, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    for r in {r.case: r for r in results}.values():
        lines.append(f"({r.case}) {r.description}" + "".join(f"; {n}" for n in r.notes))
    lines.append("expert GEMMs: share of ours' profiled step in the grouped expert matmuls (the rest: routing, "
                 "sort, gather, combine)")
    return "\n".join(lines)


def results_to_json(results: list[Result], device: torch.device, dtype: torch.dtype) -> dict:
    return {
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "configs": {f"{r.case}-{'compiled' if r.compiled else 'eager'}": {
            "case": r.case, "compiled": r.compiled, "description": r.description, "times_ms": r.times_ms,
            "ratio_vs_dense": r.ratio_vs_dense, "speedup_vs_fairscale": r.speedup_vs_fairscale,
            "speedup_vs_naive": r.speedup_vs_naive, "target_ratio_vs_dense": r.target_ratio, "met": r.met,
            "expert_gemm_share": r.expert_share, "notes": r.notes} for r in results},
    }
