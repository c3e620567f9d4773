"""Sparse upcycling: initialise an MoE-ViT from a dense timm ViT checkpoint on local disk.

Embeddings, attention and norms are copied. Each expert starts as the dense MLP; with
fine-grained experts (granularity g) expert e holds hidden slice ``e % g`` of the dense MLP and
experts ``[c*g, (c+1)*g)`` form one "virtual copy" whose router rows are tied at init, so top-k
(k a multiple of g) picks whole copies and, with the output scaled by g, the layer computes the
dense MLP exactly. Right after upcycling the model's features equal the dense model's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from timm.layers import resample_abs_pos_embed

from ..moe import MoEAttention, MoEMLP
from .moe_vit import MoEViT


def load_dense_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a dense checkpoint (``.safetensors``, or a torch file holding a state dict,
    possibly under ``"model"`` / ``"state_dict"``). Never touches a hub."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dense checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"dense checkpoint {path} could not be read as a torch state dict ({e})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"dense checkpoint {path} does not hold a state dict of tensors")
    return obj


def _take(dense: dict, key: str, shape: torch.Size, src: str) -> torch.Tensor:
    if key not in dense:
        raise ValueError(f"dense checkpoint {src} has no {key!r}; is it a timm VisionTransformer?")
    t = dense[key]
    if t.shape != shape:
        raise ValueError(f"dense checkpoint {src}: {key} has shape {tuple(t.shape)}, the MoE model expects "
                         f"{tuple(shape)}; choose a model size with the same embed_dim/depth/mlp_ratio")
    return t


def _position_embedding(model: MoEViT, pos: torch.Tensor, src: str) -> torch.Tensor:
    """A dense checkpoint's position embedding on the model's grid (resampled when the checkpoint
    was trained at another resolution)."""
    own = model.pos_embed
    if pos.shape == own.shape:
        return pos
    P = model.num_prefix_tokens
    n = pos.shape[1] - P
    side = int(round(n ** 0.5))
    if pos.ndim != 3 or pos.shape[-1] != own.shape[-1] or side * side != n:
        raise ValueError(f"dense checkpoint {src}: pos_embed has shape {tuple(pos.shape)}; expected [1, {P} + a square "
                         f"grid, {own.shape[-1]}]")
    return resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                  num_prefix_tokens=P)


@torch.no_grad()
def upcycle_from_dense(model: MoEViT, dense: str | Path | dict[str, torch.Tensor]) -> MoEViT:
    """Fill ``model`` (in place) from a dense ViT state dict or checkpoint path; returns it.

    Every tensor of the MoE model whose name the dense checkpoint has is copied (the position
    embedding resampled to the model's grid when the checkpoint used another resolution); each
    MoE MLP's experts start from the dense MLP and its routers are new; task embeddings start at
    zero. A tensor the checkpoint lacks (or holds in another shape) is an error. What happened is
    recorded in ``model.upcycle_report``: ``loaded``, ``upcycled`` (MoE layers), ``new`` and
    ``ignored`` (checkpoint tensors the model has no place for, e.g. the classifier ``head``)."""
    src = str(dense) if not isinstance(dense, dict) else "<state dict>"
    dense_sd = load_dense_state_dict(dense) if not isinstance(dense, dict) else dense
    cfg = model.moe_config
    g = cfg.granularity
    own = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, MoEAttention):
            raise ValueError(f"{name}: attention experts cannot be upcycled function-preservingly; "
                             "set moe.attn_blocks=none for upcycling")
    if not any(k in dense_sd for k in own):
        raise ValueError(f"dense checkpoint {src} shares no tensor name with the model (e.g. {next(iter(dense_sd), '')!r}); "
                         "expected a timm VisionTransformer state dict")
    exact = cfg.top_k % g == 0 and cfg.num_experts % g == 0
    if g > 1 and not exact:
        warnings.warn(f"upcycling with granularity {g}, top_k {cfg.top_k}, num_experts {cfg.num_experts}: "
                      "top_k and num_experts should be multiples of the granularity for the upcycled "
                      "model to equal the dense one", stacklevel=2)
    report = {"source": src, "loaded": [], "upcycled": [], "new": [], "ignored": []}
    used = set()
    for key, value in own.items():
        if ".mlp." in key and (".experts." in key or ".router." in key):
            if ".router." in key:
                report["new"].append(key)
            continue  # filled below
        if key.startswith("task_embed."):
            value.zero_()
            report["new"].append(key)
            continue
        found = {key: _position_embedding(model, dense_sd[key], src)} if key == "pos_embed" and key in dense_sd \
            else dense_sd
        value.copy_(_take(found, key, value.shape, src))
        report["loaded"].append(key)
        used.add(key)
    for bi, blk in enumerate(model.blocks):
        if not isinstance(blk.mlp, MoEMLP):
            continue
        p = f"blocks.{bi}.mlp."
        ex = blk.mlp.experts
        H = ex.hidden * g
        fc1_w = _take(dense_sd, p + "fc1.weight", torch.Size([H, ex.dim]), src)
        fc1_b = _take(dense_sd, p + "fc1.bias", torch.Size([H]), src)
        fc2_w = _take(dense_sd, p + "fc2.weight", torch.Size([ex.dim, H]), src)
        fc2_b = _take(dense_sd, p + "fc2.bias", torch.Size([ex.dim]), src)
        used.update(p + n for n in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))
        h = ex.hidden
        for e in range(ex.num_experts):
            s = slice((e % g) * h, (e % g + 1) * h)
            ex.w1[e].copy_(fc1_w[s].t())
            ex.b1[e].copy_(fc1_b[s])
            ex.w2[e].copy_(fc2_w[:, s].t())
            ex.b2[e].copy_(fc2_b / g)
        if g > 1:
            for gate in blk.mlp.router.gates.values():
                groups = gate.weight.view(-1, g, gate.weight.shape[1])
                groups.copy_(groups[:, :1].expand_as(groups))
            blk.mlp.expert_scale = float(g)
        report["upcycled"].append(p.rstrip("."))
    model.moe_config.expert_scale = float(g)
    model.config["moe"]["expert_scale"] = float(g)
    report["ignored"] = sorted(k for k in dense_sd if k not in used)
    model.upcycle_report = report
    return model
