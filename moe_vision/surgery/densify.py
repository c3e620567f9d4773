"""A dense specialist from a generalist: one task, no router, no dispatch, no MoE code in its forward.

Legend: E experts, K = top_k kept experts, D dim, H expert hidden width, T tokens.

In every MoE layer the task keeps exactly K experts (those with the largest mean gate weight on
the calibration images). A token's MoE output is ``sum_e w_e(x) f_e(x)``; folding replaces each
kept expert's gate ``w_e(x)`` by its mean over the calibration tokens ``g_e`` (zero where the
expert was not chosen) and concatenates the K experts' hidden units into one plain MLP::

    fc1 = [w1_e1 | ... | w1_eK]^T             (K*H x D),  b1 concatenated
    fc2 = [g_e1 w2_e1 ; ... ; g_eK w2_eK]^T    (D x K*H),  b2 = sum_e g_e b2_e

so with top-K of experts of width H = dense width / K the block is exactly a dense ViT MLP. The
fold is exact for a token whose gates equal the means (e.g. a router that always picks the same
K experts with the same weights) and an approximation otherwise; ``distill`` then trains the
folded MLPs, without labels, to match the MoE model's features and outputs.
"""
from __future__ import annotations

import copy
import itertools
import re

import torch
import torch.nn.functional as F

from ..moe import MoEMLP
from ..tasks import GeneralistModel


def mean_gates(model: GeneralistModel, task: str, batches) -> dict[str, torch.Tensor]:
    """Per MoE layer, each expert's mean combine weight ``[E]`` for ``task`` over every real token
    of ``batches`` (``(images, targets)`` pairs; 0 where the expert was not chosen)."""
    sums, tokens = {}, {}
    model.eval()
    with torch.no_grad():
        for images, targets in batches:
            _, routing = model(images, task, return_routing=True, targets=targets)
            for r in routing:
                E = model.backbone.moe_layers()[r.layer]
                sums[r.layer] = sums.get(r.layer, 0) + r.gate_sums(E).double()
                tokens[r.layer] = tokens.get(r.layer, 0) + r.num_tokens
    return {layer: (s / max(1, tokens[layer])).float() for layer, s in sums.items()}


def check_foldable(model: GeneralistModel) -> None:
    moe = model.backbone.moe_config
    if moe.attn_blocks not in ("none", [], ()):
        raise ValueError("--dense folds MoE MLPs; this model also has attention experts (moe.attn_blocks="
                         f"{moe.attn_blocks!r}), which have no dense form here")
    if moe.activation != "gelu":
        raise ValueError(f"--dense builds timm MLPs (GELU); the experts use moe.activation={moe.activation!r}")
    if moe.top_k != moe.granularity:
        raise ValueError(f"--dense needs top_k experts to make one dense MLP: moe.top_k={moe.top_k} must equal "
                         f"moe.granularity={moe.granularity} (expert width = MLP width / granularity)")
    if moe.added_experts:
        raise ValueError("--dense of a model grown by add_task: extract its task as a MoE bundle first")


def fold(model: GeneralistModel, task: str, gates: dict[str, torch.Tensor]) -> tuple[GeneralistModel, dict]:
    """The dense model of ``task`` and, per layer, the kept experts (original ids) with their
    folded gates."""
    check_foldable(model)
    model.spec(task)
    cfg = copy.deepcopy(model.config)
    cfg["tasks"] = {task: model.spec(task).inference_config()}
    cfg["backbone"]["tasks"] = [task]
    moe = cfg["backbone"]["moe"]
    moe.update(mlp_blocks="none", layer_num_experts={}, aux_weights={k: 0.0 for k in moe["aux_weights"]})
    dense = GeneralistModel(**cfg)
    from .extract import belongs_elsewhere
    state, kept = {}, {}
    layers = {name: m for name, m in model.backbone.named_modules() if isinstance(m, MoEMLP)}
    for key, value in model.state_dict().items():
        if belongs_elsewhere(key, task) or re.search(r"\.mlp\.(experts|router|added_experts)\.", key):
            continue
        if any(key.startswith(f"heads.{task}.{n}.") for n in model.spec(task).training_only):
            continue
        state[key] = value.clone()
    for name, layer in layers.items():
        g = gates[name] * layer.expert_scale
        top = sorted(torch.argsort(gates[name], descending=True, stable=True)[:layer.top_k].tolist())
        w1, b1, w2, b2 = layer.expert_weights()
        prefix = f"backbone.{name}"
        state[f"{prefix}.fc1.weight"] = torch.cat([w1[e].t() for e in top]).detach().clone()
        state[f"{prefix}.fc1.bias"] = torch.cat([b1[e] for e in top]).detach().clone()
        state[f"{prefix}.fc2.weight"] = torch.cat([g[e] * w2[e].t() for e in top], dim=1).detach().clone()
        state[f"{prefix}.fc2.bias"] = sum(g[e] * b2[e] for e in top).detach().clone()
        kept[name] = {"experts": top, "gates": [round(float(g[e]), 6) for e in top]}
    dense.load_state_dict(state)
    return dense.train(model.training), kept


def _stable_outputs(model: GeneralistModel, task: str, out: dict) -> list[torch.Tensor]:
    """The head outputs indexed by position or by image, which a small change of the weights does
    not reorder: detection's queries are seeded from the best-scoring tokens, so their order can
    flip, and its dense per-token predictions stand in for them."""
    if model.spec(task).type_name == "det":
        out = out.get("dense") or {}
    return [v.float() for k, v in out.items() if isinstance(v, torch.Tensor) and v.is_floating_point()
            and k not in ("centres", "strides")]


def _features_and_outputs(model: GeneralistModel, task: str, images, targets) -> list[torch.Tensor]:
    """The backbone's multi-scale maps, the pixel decoder's per-pixel features and memory, and the
    head's stable outputs, from one forward pass."""
    seen = []
    hook = model.pixel_decoder.register_forward_hook(
        lambda mod, args, feats: seen.extend([*args[0], feats.pixel_BDhw, feats.memory_BMD]))
    try:
        out = model(images, task, targets=targets)
    finally:
        hook.remove()
    return [t.float() for t in seen] + _stable_outputs(model, task, out)


def _distill_loss(student, teacher, task: str, images, targets) -> torch.Tensor:
    """Mean over the compared tensors of their squared difference, each scaled by the teacher
    tensor's variance (so every tensor counts alike whatever its units)."""
    with torch.no_grad():
        t_all = _features_and_outputs(teacher, task, images, targets)
    s_all = _features_and_outputs(student, task, images, targets)
    return sum(F.mse_loss(s, t) / t.var().clamp(min=1e-6) for s, t in zip(s_all, t_all)) / len(t_all)


def student_gap(student, teacher, task: str, batches) -> float:
    """The distillation loss (variance-scaled squared difference of features and outputs), mean
    over ``batches``."""
    total, n = 0.0, 0
    student.eval(), teacher.eval()
    with torch.no_grad():
        for images, targets in batches:
            total += float(_distill_loss(student, teacher, task, images, targets))
            n += 1
    return total / max(1, n)


def distill(student: GeneralistModel, teacher: GeneralistModel, task: str, batches, steps: int, lr: float = 1e-4,
            progress=None) -> list[float]:
    """``steps`` AdamW steps on the folded MLPs (the only approximated weights) of ``student`` so
    that its features and head outputs match ``teacher``'s on unlabelled images (the targets only
    say each image's size); returns the loss of every step."""
    params = [p for n, p in student.named_parameters() if re.search(r"\.mlp\.fc\d\.", n)]
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    teacher.eval()
    student.eval()  # (normalisation statistics stay the teacher's)
    losses = []
    for step, (images, targets) in zip(range(steps), itertools.cycle(batches)):
        loss = _distill_loss(student, teacher, task, images, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, losses[-1])
    for p in student.parameters():
        p.requires_grad_(True)
    return losses


def timm_state_dict(model: GeneralistModel, task: str) -> dict[str, torch.Tensor]:
    """The dense backbone's weights under timm's ``VisionTransformer`` names (patch stem only): the
    task embedding, which our backbone adds to every token, folded into the position embedding."""
    bb = model.backbone
    if bb.config["stem"] != "patch":
        raise ValueError("timm's ViT has a patch stem; this backbone has stem="
                         f"{bb.config['stem']!r} (load it with moe_vision.load_bundle instead)")
    if bb.moe_layers():
        raise ValueError("timm's ViT has dense MLPs; fold the experts first (--dense)")
    state = {k: v for k, v in bb.state_dict().items() if not k.startswith("task_embed.")}
    state["pos_embed"] = state["pos_embed"] + bb.task_embed[task].detach()
    return state


def timm_name(model: GeneralistModel) -> str | None:
    """The timm model name whose architecture the dense backbone has (``vit_small_patch16_224``), or
    None (a conv stem, or a size timm does not name)."""
    c = model.backbone.config
    sizes = {(192, 12, 3): "vit_tiny", (384, 12, 6): "vit_small", (768, 12, 12): "vit_base"}
    size = sizes.get((c["embed_dim"], c["depth"], c["num_heads"]))
    if c["stem"] != "patch" or size is None or model.backbone.moe_layers():
        return None
    return f"{size}_patch{c['patch_size']}_{c['img_size']}"


def timm_model_args(model: GeneralistModel) -> dict:
    """Keyword arguments of ``timm.models.vision_transformer.VisionTransformer`` matching the dense
    backbone (no classification head: features as our backbone gives them)."""
    c = model.backbone.config
    return {"img_size": c["img_size"], "patch_size": c["patch_size"], "in_chans": c["in_chans"],
            "embed_dim": c["embed_dim"], "depth": c["depth"], "num_heads": c["num_heads"],
            "mlp_ratio": c["mlp_ratio"], "qkv_bias": c["qkv_bias"], "init_values": c["init_values"],
            "num_classes": 0, "global_pool": "token"}
