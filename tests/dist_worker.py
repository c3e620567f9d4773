"""Worker for the 2-rank tests in tests/test_distributed.py; run under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py SCENARIO OUT_JSON

Each rank computes the distributed result and, from the same seeds, the single-process
reference on the concatenated batch, and raises on a mismatch. Rank 0 writes the largest
differences to OUT_JSON.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_vision.engine.distributed import init_distributed  # noqa: E402
from moe_vision.moe import MoEMLP  # noqa: E402
from moe_vision.moe import expert_parallel as ep  # noqa: E402

TOL = 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a.detach() - b.detach()).abs().max()) if a.numel() else 0.0


def check(name: str, a: torch.Tensor, b: torch.Tensor, report: dict) -> None:
    d = max_diff(a, b)
    report[name] = max(report.get(name, 0.0), d)
    if not d <= TOL:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs by {d:.3g} (tolerance {TOL})")


def scenario_all_to_all(report: dict) -> None:
    """Uneven and zero splits: rank r sends SPLITS[r][q] rows to rank q."""
    rank = dist.get_rank()
    splits = [[0, 3], [2, 0]]
    send = splits[rank]
    recv = [splits[q][rank] for q in range(2)]
    # Row i sent by rank r to rank q holds the value 100 r + 10 q + i in every column.
    rows = [torch.full((1, 4), 100.0 * rank + 10 * q + i) for q in range(2) for i in range(send[q])]
    x = torch.cat(rows).requires_grad_(True)
    y = ep._all_to_all(x, recv, send, None)
    expected = torch.cat([torch.full((1, 4), 100.0 * q + 10 * rank + i) for q in range(2) for i in range(recv[q])])
    check("a2a_forward", y, expected, report)
    # d(sum(y * w)) / dx: each sent row gets the weight its receiver applied to it.
    w = torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape) + 1000 * rank
    (y * w).sum().backward()
    # Analytic: the receiver q applied w_q[j] to the j-th row it got from us.
    expected_grad = []
    for q in range(2):
        offset = sum(splits[p][q] for p in range(rank))  # rows q received from lower ranks first
        w_q = torch.arange(sum(splits[p][q] for p in range(2)) * 4, dtype=torch.float32).reshape(-1, 4) + 1000 * q
        expected_grad.append(w_q[offset:offset + send[q]])
    check("a2a_input_grad", x.grad, torch.cat(expected_grad), report)


def _layer(seed: int, skew: bool, kernel: str = "auto") -> MoEMLP:
    torch.manual_seed(seed)
    layer = MoEMLP(8, 16, ["a"], num_experts=4, top_k=2, capacity_factor=0.0, layer_name="moe", kernel=kernel)
    if skew:  # feature 0 is a constant 1: experts 0 and 1 (rank 0's) always win
        with torch.no_grad():
            layer.router.gates["a"].weight[:, 0] = torch.tensor([6.0, 5.0, -6.0, -6.0])
    return layer


def _inputs(seed: int, skew: bool, tokens_per_rank=(5, 7)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(sum(tokens_per_rank), 8, generator=g)
    if skew:
        x[:, 0] = 1.0
    return x


def scenario_expert_parallel(report: dict) -> None:
    rank = dist.get_rank()
    tokens = (5, 7)  # uneven tokens per rank
    for skew, kernel in ((False, "loop"), (True, "loop"), (False, "grouped_mm"), (True, "grouped_mm")):
        x_full = _inputs(0, skew, tokens)
        g_full = torch.randn(x_full.shape, generator=torch.Generator().manual_seed(7))
        ref = _layer(0, skew)
        xr = x_full.clone().requires_grad_(True)
        y_ref, _ = ref(xr, "a")
        (y_ref * g_full).sum().backward()

        layer = _layer(0, skew, kernel)  # the local expert slices through either kernel
        layer.shard_experts(dist.group.WORLD)
        lo = sum(tokens[:rank])
        sl = slice(lo, lo + tokens[rank])
        x = x_full[sl].clone().requires_grad_(True)
        runs = []
        for _ in range(2):  # a rerun must be bit-identical
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, _ = layer(x, "a")
            (y * g_full[sl]).sum().backward()
            runs.append((y.detach().clone(), x.grad.clone(), layer.experts.w1.grad.clone()))
        tag = ("skewed_" if skew else "") + ("gmm_" if kernel == "grouped_mm" else "")
        check(f"{tag}ep_output", y, y_ref[sl], report)
        check(f"{tag}ep_input_grad", x.grad, xr.grad[sl], report)
        local = ep.local_expert_range(4, dist.group.WORLD)
        for name in ("w1", "b1", "w2", "b2"):
            check(f"{tag}ep_expert_grad_{name}", getattr(layer.experts, name).grad,
                  getattr(ref.experts, name).grad[local.start:local.stop], report)
        router_grad = layer.router.gates["a"].weight.grad.clone()
        dist.all_reduce(router_grad)  # each rank saw its own tokens; the sum is the full batch's
        check(f"{tag}ep_router_grad", router_grad, ref.router.gates["a"].weight.grad, report)
        if not all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])):
            raise AssertionError("expert-parallel rerun is not bit-identical")
        if skew and kernel == "loop":
            received = torch.tensor(float(sum(ep.exchange_plan(torch.bincount(
                layer.router(x.detach(), "a").idx_TK.reshape(-1), minlength=4), dist.group.WORLD).recv_splits)))
            report[f"rows_received_rank{rank}"] = float(received)


class _Block(torch.nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.moe = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2, layer_name=f"blocks.{i}.moe")

    def forward(self, x, task):
        return x + self.moe(self.proj(x), task)[0]


class _TwoTaskNet(torch.nn.Module):
    """Two blocks (a dense projection and an MoE layer each) and a head per task."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.blocks = torch.nn.ModuleList(_Block(i) for i in range(2))
        self.heads = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 3), "b": torch.nn.Linear(8, 3)})

    def forward(self, x, task):
        for block in self.blocks:
            x = block(x, task)
        return self.heads[task](x)


def _strategy_vs_one_process(strategy: str, ep: int, report: dict) -> None:
    """A step uses one task (the other router and head get no gradient): no hang, and the global
    gradient norm and gradients after step 1 and parameters after 2 SGD steps (the second one
    clipped) equal the single-process run on the global batch."""
    from torch.distributed.tensor import DTensor
    from moe_vision.engine.distributed import current_context
    from moe_vision.engine.parallel import parallelize
    rank, tag = dist.get_rank(), f"{strategy}_ep{ep}"
    x_full = torch.randn(12, 8, generator=torch.Generator().manual_seed(5))
    t_full = torch.randn(12, 3, generator=torch.Generator().manual_seed(6))
    n = 12 // dist.get_world_size()  # 2 ranks, or 4 (then ep = 2 has two replicas of each expert)
    sl = slice(n * rank, n * rank + n)
    ref, model = _TwoTaskNet(), _TwoTaskNet()
    runner, par = parallelize(model, current_context(), {"strategy": strategy, "expert_parallel": ep},
                              torch.device("cpu"))
    names = dict(model.named_parameters())

    def full(name, t):
        if isinstance(t, DTensor):
            return t.full_tensor()
        return par.as_expert_dtensor(t).full_tensor() if name in par.expert_params else t

    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    max_norm = float("inf")
    for step, task in enumerate(["a", "b"]):
        opt_ref.zero_grad()
        torch.nn.functional.mse_loss(ref(x_full, task), t_full).backward()
        norm_ref = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm))
        opt.zero_grad()
        torch.nn.functional.mse_loss(runner(x_full[sl], task), t_full[sl]).backward()
        par.finish_gradients()
        norm = par.clip_grad_norm(list(model.parameters()), max_norm)
        check(f"{tag}_grad_norm", torch.as_tensor(norm, dtype=torch.float32).detach().cpu(), torch.tensor(norm_ref), report)
        for name, q in ref.named_parameters():
            p = names[name]
            got = full(name, p.grad) if p.grad is not None else torch.zeros(q.shape)
            check(f"{tag}_grad_step{step + 1}", got, q.grad if q.grad is not None else torch.zeros_like(q), report)
        opt_ref.step()
        opt.step()
        max_norm = 0.5 * norm_ref  # the second step is clipped
    for name, q in ref.named_parameters():
        check(f"{tag}_params_after_2_sgd_steps", full(name, names[name].detach()), q, report)


def scenario_strategies(report: dict) -> None:
    for strategy in ("ddp", "fsdp"):
        for ep_size in (1, 2):
            _strategy_vs_one_process(strategy, ep_size, report)


def scenario_aux_losses(report: dict) -> None:
    """MI and balance losses of a 2-rank step equal the 1-process values on the concatenated batch,
    and so do their router gradients once averaged over ranks (what DDP does)."""
    from moe_vision.moe import AuxLossWeights, compute_aux_losses
    from moe_vision.moe.reduce import over_ranks
    rank = dist.get_rank()
    weights = AuxLossWeights(mutual_information=1.0, load_balance=1.0, z_loss=0.0)
    xs = {t: torch.randn(10, 8, generator=torch.Generator().manual_seed(20 + i)) for i, t in enumerate("ab")}
    sl = slice(0, 4) if rank == 0 else slice(4, 10)  # uneven: 4 and 6 tokens

    def run(layer, part):
        routing = [layer(xs[t][part], t)[1] for t in "ab"]
        return routing

    torch.manual_seed(11)
    ref = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2, layer_name="moe")
    aux_ref = compute_aux_losses(run(ref, slice(0, 10)), weights)
    aux_ref.total.backward()
    torch.manual_seed(11)
    layer = MoEMLP(8, 16, ["a", "b"], num_experts=4, top_k=2, layer_name="moe")
    with over_ranks():
        aux = compute_aux_losses(run(layer, sl), weights)
    aux.total.backward()
    check("mi_loss", aux.mutual_information, aux_ref.mutual_information, report)
    check("balance_loss", aux.load_balance, aux_ref.load_balance, report)
    for t in "ab":
        g = layer.router.gates[t].weight.grad.clone()
        dist.all_reduce(g)
        check("aux_router_grad_mean_over_ranks", g / dist.get_world_size(), ref.router.gates[t].weight.grad, report)
    # Outside over_ranks() the same call stays local (evaluation on one rank must not block).
    local = compute_aux_losses(run(layer, sl), weights)
    gap = abs(float(local.mutual_information.detach()) - float(aux_ref.mutual_information))
    report["local_mi_differs"] = float(gap > 1e-6)


def scenario_stop_agreement(report: dict) -> None:
    """Only rank 1 receives SIGUSR1; after the same step every rank agrees to stop on it."""
    import os
    import signal
    from moe_vision.engine.distributed import current_context
    from moe_vision.engine.preemption import StopSignals
    ctx = current_context()
    with StopSignals(lambda m: None) as signals:
        before = signals.agreed(ctx)
        if ctx.rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        after = signals.agreed(ctx)
    report[f"rank{ctx.rank}_nothing_before"] = float(before is None)
    report[f"rank{ctx.rank}_stops_on_sigusr1"] = float(after == "SIGUSR1")


SCENARIOS = {"all_to_all": scenario_all_to_all, "expert_parallel": scenario_expert_parallel, "strategies": scenario_strategies,
             "aux_losses": scenario_aux_losses, "stop_agreement": scenario_stop_agreement}


def main() -> int:
    """``dist_worker.py SCENARIO[,SCENARIO...] OUT.json``: the scenarios in turn, one report."""
    scenarios, out = sys.argv[1].split(","), Path(sys.argv[2])
    init_distributed(torch.device("cpu"), {"timeout_s": 60})
    report: dict = {}
    for scenario in scenarios:
        SCENARIOS[scenario](report)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, report)
    if dist.get_rank() == 0:
        merged: dict = {}
        for r in gathered:
            for k, v in r.items():
                merged[k] = max(merged.get(k, 0.0), v)
        out.write_text(json.dumps(merged, indent=2))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
