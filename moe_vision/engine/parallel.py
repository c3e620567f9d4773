"""How a model is spread over ranks: data parallel (DDP) or fully sharded (FSDP2), optionally with
expert parallelism; the gradient fix-ups, the global gradient norm and the state dicts that go
with each layout.

Layouts (W ranks, ``dist.expert_parallel`` = P):

* ``ddp``, P = 1: every rank holds the whole model; DDP averages gradients.
* ``fsdp``, P = 1: ``fully_shard`` on every backbone block and on the step module (the root);
  parameters, gradients and optimizer state are sharded over all W ranks.
* P > 1 (with either): the ranks form a ``(edp, ep)`` mesh of shape ``(W / P, P)``. Each MoE layer
  keeps experts ``[r L, (r + 1) L)`` on ep-rank r (L = E / P) and exchanges tokens within its ep
  group; ranks with the same ep-rank hold the same experts (replicas over ``edp``). Expert
  parameters are left out of DDP / FSDP and reduced here, over ``edp`` only.

Gradient scale: a rank's loss is its local sum over (global count / W) (see
``moe_vision.moe.reduce``), so averaging dense gradients over W ranks gives the single-process
gradient. An expert's gradient already sums the contributions of every rank of its ep group
(through the all-to-all's backward); summed over the replicas and divided by W it is the
single-process gradient too (:meth:`Parallelism.finish_gradients`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DistContext

STRATEGIES = ("ddp", "fsdp")
EXPERT_PARAM_NAMES = ("w1", "b1", "w2", "b2")


def _expert_parallel_layers(module: nn.Module):
    """(full name, layer) of every MoE MLP inside ``module``: the layers whose experts expert
    parallelism shards (MoE attention keeps its experts on every rank)."""
    from ..moe import MoEMLP
    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoEMLP)]


def check_parallel_config(dist_cfg: Mapping[str, Any], world_size: int, num_experts: list[int]) -> tuple[str, int]:
    """``(strategy, P)`` from the ``dist`` group, or one clear error."""
    strategy = str(dist_cfg.get("strategy", "ddp"))
    if strategy not in STRATEGIES:
        raise ValueError(f"dist.strategy={strategy!r}; expected one of {list(STRATEGIES)}")
    ep = int(dist_cfg.get("expert_parallel", 1))
    if ep < 1 or world_size % ep:
        raise ValueError(f"dist.expert_parallel={ep} must be >= 1 and divide the number of ranks ({world_size})")
    for e in num_experts:
        if ep > 1 and e % ep:
            raise ValueError(f"dist.expert_parallel={ep} does not divide the {e} experts of an MoE layer")
    return strategy, ep


def shards_model(ctx: DistContext, dist_cfg: Mapping[str, Any]) -> bool:
    """True when the layout leaves no rank with the whole model (FSDP or expert parallelism)."""
    return ctx.enabled and (dist_cfg.get("strategy", "ddp") == "fsdp" or int(dist_cfg.get("expert_parallel", 1)) > 1)


@dataclass
class Parallelism:
    """The layout of one run's step module over the ranks (a world of one: no-ops everywhere)."""

    ctx: DistContext
    strategy: str = "none"
    ep: int = 1
    mesh: Any = None  # DeviceMesh (edp, ep) when ep > 1
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)  # FQN -> this rank's slice

    @property
    def sharded(self) -> bool:
        """True when no single rank holds the whole model (see :func:`shards_model`)."""
        return self.strategy == "fsdp" or self.ep > 1

    # ---------------------------------------------------------------- gradients
    def finish_gradients(self) -> None:
        """Bring expert gradients to the single-process scale (sum over replicas, / W); no-op
        without expert parallelism (DDP / FSDP already reduced the rest during backward)."""
        if self.ep == 1:
            return
        edp = self.mesh["edp"].get_group() if self.mesh.size(0) > 1 else None
        for p in self.expert_params.values():
            if not p.requires_grad:
                continue
            if p.grad is None:  # every rank must join the same collectives
                p.grad = torch.zeros_like(p)
            if edp is not None:
                dist.all_reduce(p.grad, group=edp)
            p.grad.div_(self.ctx.world_size)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` by the norm of the whole model's gradient (as one process would)
        and return that norm as a 0-d tensor on the device (read it when logging): replicated
        gradients count once, FSDP shards are summed over all ranks, expert slices over their ep
        group."""
        if not self.sharded:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor
        expert_ids = {id(p) for p in self.expert_params.values()}
        device = next(iter(params)).device
        sq = torch.zeros(3, dtype=torch.float64, device=device)  # replicated, fsdp shards, expert slices
        grads = []
        for p in params:
            if p.grad is None:
                continue
            g = p.grad
            grads.append(g)
            if isinstance(g, DTensor):
                sq[1] += g.to_local().double().pow(2).sum()
            elif id(p) in expert_ids:
                sq[2] += g.double().pow(2).sum()
            else:
                sq[0] += g.double().pow(2).sum()
        if self.strategy == "fsdp":
            dist.all_reduce(sq[1:2])
        if self.ep > 1:
            dist.all_reduce(sq[2:3], group=self.mesh["ep"].get_group())
        total = sq.sum().sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)  # (on the device: no host read)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return total.float()

    # ---------------------------------------------------------------- state dicts
    def sharded_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """``module``'s state dict with every sharded tensor as a DTensor (FSDP parameters already
        are; expert slices are wrapped, sharing storage): what distributed checkpoints save and
        load in place, resharding to any other layout."""
        if self.strategy == "fsdp":
            # Buffers (BatchNorm statistics) are per rank under FSDP; rank 0's are the ones DDP would
            # keep (it broadcasts them from rank 0), so every rank saves those.
            for b in module.buffers():
                dist.broadcast(b, 0)
        return {name: self.as_stored(name, t) for name, t in module.state_dict().items()}

    def as_stored(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """A per-parameter tensor (the parameter or its optimizer state) as checkpoints store it:
        an expert slice as a DTensor, anything else unchanged."""
        return self.as_expert_dtensor(t) if name in self.expert_params else t

    def as_local(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`as_stored`."""
        return t.to_local() if name in self.expert_params else t

    def as_expert_dtensor(self, local: torch.Tensor) -> torch.Tensor:
        """A tensor holding this rank's expert slice ``[L, ...]`` as a DTensor ``[E, ...]``
        (replicated over ``edp``, sharded over ``ep``); shares ``local``'s storage."""
        from torch.distributed.tensor import DTensor, Replicate, Shard
        shape = (local.shape[0] * self.ep, *local.shape[1:])
        return DTensor.from_local(local, self.mesh, [Replicate(), Shard(0)], run_check=False,
                                  shape=torch.Size(shape), stride=torch.empty(shape, device="meta").stride())

    def full_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of ``module``'s state gathered whole (a collective: every rank calls it)."""
        from torch.distributed.tensor import DTensor
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v)
                for k, v in self.sharded_state(module).items()}


def parallelize(step_module: nn.Module, ctx: DistContext, dist_cfg: Mapping[str, Any],
                device: torch.device) -> tuple[nn.Module, Parallelism]:
    """Spread ``step_module`` (a :class:`MultiTaskStep`) over the ranks as ``dist_cfg`` says.

    Returns ``(runner, parallelism)``: call ``runner`` for the step's forward. Must run before the
    optimizer is built (sharding replaces parameters).
    """
    if not ctx.enabled:
        return step_module, Parallelism(ctx)
    layers = _expert_parallel_layers(step_module)
    strategy, ep = check_parallel_config(dist_cfg, ctx.world_size, [m.num_experts for _, m in layers])
    par = Parallelism(ctx, strategy, ep)
    if ep > 1:
        from torch.distributed.device_mesh import init_device_mesh
        par.mesh = init_device_mesh(device.type, (ctx.world_size // ep, ep), mesh_dim_names=("edp", "ep"))
        for name, layer in layers:
            layer.shard_experts(par.mesh["ep"].get_group())
            for pname in EXPERT_PARAM_NAMES:
                p = getattr(layer.experts, pname)
                if p is not None:
                    par.expert_params[f"{name}.experts.{pname}"] = p
    if strategy == "fsdp":
        blocks = [b for name, m in step_module.named_modules()
                  if name.split(".")[-1] == "blocks" and isinstance(m, nn.ModuleList) for b in m]
        shard_fully(step_module, blocks, ctx, device, set(par.expert_params.values()),
                    bool(dist_cfg.get("reshard_after_forward", True)))
        return step_module, par
    from torch.nn.parallel import DistributedDataParallel
    if par.expert_params:  # each rank holds different experts: they are reduced in finish_gradients
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step_module, list(par.expert_params))
    runner = DistributedDataParallel(step_module, device_ids=[device.index] if device.type == "cuda" else None,
                                     find_unused_parameters=bool(dist_cfg.get("find_unused_parameters", True)))
    return runner, par


def shard_fully(root: nn.Module, blocks: list[nn.Module], ctx: DistContext, device: torch.device,
                ignored: set[nn.Parameter], reshard_after_forward: bool = True) -> None:
    """FSDP2: ``fully_shard`` each block, then the root (which takes every remaining parameter).
    ``ignored`` parameters (expert slices) stay plain local tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (ctx.world_size,), mesh_dim_names=("dp",))
    for block in blocks:
        own = {p for p in block.parameters() if p in ignored}
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=own or None)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored or None)

