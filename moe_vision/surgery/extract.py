"""Cut one or several tasks' experts out of a trained generalist into a compact stand-alone model.

Legend: E experts in the full layer, E' kept experts, D dim.

Kept: every shared parameter (embeddings, attention, norms, the GLID decoder and queries, shared
adapters) once, the kept experts of each MoE layer (stacked weights sliced along E: for several
tasks, the union of their kept experts), each kept task's router rows for those experts,
its task embedding, adapters, LV-Adapter and head. Dropped: other experts, other tasks' routers,
task embeddings and heads, and the heads' training-only parameters (detection's denoising label
embedding).
"""
from __future__ import annotations

import copy
import re

import torch

from ..tasks import GeneralistModel

# State-dict keys of expert-indexed tensors (first dim = E) inside an MoE layer.
_EXPERT_PARAM = re.compile(r"\.(experts\.(w1|w2|b1|b2)|q_experts\.(weight|bias)|o_experts\.(weight|bias))$")
_ADDED_GROUP = re.compile(r"^(.*)\.added_experts\.(\d+)\.(w1|w2|b1|b2)$")
_ROUTER = re.compile(r"\.router\.(?:(?:gates|noise)\.([^.]+)\.weight|allowed\.([^.]+))$")  # rows/entries per expert
# Keys that belong to one task (the captured name), each with the other names a bundle also keeps.
_PER_TASK_KEYS = (
    (_ROUTER, ("shared",)),
    (re.compile(r"\.router\.task_embed\.([^.]+)$"), ()),
    (re.compile(r"^backbone\.task_embed\.([^.]+)$"), ()),
    (re.compile(r"^heads\.([^.]+)\."), ()),
    (re.compile(r"^(?:adapters\.(?:blocks|levels)\.\d+|lv\.texts)\.([^.]+)\."), ("shared",)),  # adapters, texts
    (re.compile(r"\.per_task\.([^.]+)\."), ()),  # per-task normalisation (model.task_norm)
)


def belongs_elsewhere(key: str, tasks: str | list[str]) -> bool:
    """True for a key owned by a task not in ``tasks`` (its router, embeddings, head, adapters, texts)."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    for pattern, also_kept in _PER_TASK_KEYS:
        m = pattern.search(key)
        if m and m.group(m.lastindex) not in (*tasks, *also_kept):
            return True
    return False


def moe_layer_of(key: str) -> str | None:
    """``backbone.blocks.3.mlp.experts.w1`` -> ``blocks.3.mlp`` (None outside MoE layers)."""
    m = re.match(r"^backbone\.(blocks\.\d+\.(mlp|attn))\.(experts|q_experts|o_experts|router)\.", key)
    return m.group(1) if m else None


def union_of(kept_per_task: dict[str, dict[str, list[int]]]) -> dict[str, list[int]]:
    """Per layer, the sorted union of every task's kept experts."""
    layers = dict.fromkeys(layer for kept in kept_per_task.values() for layer in kept)
    return {layer: sorted({e for kept in kept_per_task.values() for e in kept.get(layer, [])}) for layer in layers}


def extract_task(model: GeneralistModel, task: str | list[str], kept: dict[str, list[int]]) -> GeneralistModel:
    """A new :class:`GeneralistModel` for ``task`` (a name, or several: one model answering each)
    with ``kept[layer]`` experts per MoE layer; each task's router chooses among those experts (its
    rows for them, re-indexed), so a task whose own choices are all kept routes exactly as before."""
    tasks = [task] if isinstance(task, str) else list(task)
    if not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks to extract must be distinct and at least one, got {tasks}")
    for t in tasks:
        model.spec(t)  # unknown task -> clear error
    layers = model.backbone.moe_layers()
    missing = sorted(set(layers) - set(kept))
    if missing:
        raise ValueError(f"no kept experts given for MoE layer(s) {missing}")
    if len(tasks) > 1:
        for name, module in model.backbone.named_modules():
            seen = {t: module.router.num_experts_for(t) for t in tasks} if name in layers else {}
            if len(set(seen.values())) > 1:
                raise ValueError(f"tasks {tasks} choose among different experts in {name} ({seen}: a task added "
                                 "with add_task sees its new experts, the older ones do not); extract them one at "
                                 "a time")
    cfg = copy.deepcopy(model.config)
    # (training-only parts, e.g. detection's denoising, are dropped)
    cfg["tasks"] = {t: model.spec(t).inference_config() for t in tasks}
    cfg["backbone"]["tasks"] = tasks
    cfg["backbone"]["moe"]["layer_num_experts"] = {layer: len(kept[layer]) for layer in layers}
    cfg["backbone"]["moe"]["added_experts"] = []  # every kept expert lands in one group
    cfg["backbone"]["moe"]["task_added_groups"] = {}
    small = GeneralistModel(**cfg)
    full_state = model.state_dict()
    n_groups = len(model.config["backbone"]["moe"].get("added_experts", []))
    state = {}
    for key, value in full_state.items():
        if _ADDED_GROUP.match(key):
            continue  # merged into the base group below
        base = re.match(r"^(.*)\.experts\.(w1|w2|b1|b2)$", key)
        if base and n_groups:
            value = torch.cat([value] + [full_state[f"{base.group(1)}.added_experts.{j}.{base.group(2)}"]
                                         for j in range(n_groups)])
        layer = moe_layer_of(key)
        if belongs_elsewhere(key, tasks):
            continue
        if any(key.startswith(f"heads.{t}.{name}.") for t in tasks for name in model.spec(t).training_only):
            continue
        if layer is not None and (_ROUTER.search(key) or _EXPERT_PARAM.search(key)):
            value = value[torch.tensor(kept[layer], dtype=torch.long)]
        state[key] = value.clone()
    small.load_state_dict(state)
    return small.train(model.training)


def route_among_own(small: GeneralistModel, kept: dict[str, list[int]],
                    kept_per_task: dict[str, dict[str, list[int]]]) -> None:
    """In a bundle of several tasks (``kept``: per layer the union of their experts), let each task's
    router choose only among its own kept experts, so that a task routes in the bundle as it did
    when its experts were chosen, alone (with a lossy rule, a task could otherwise pick another
    task's experts, and its measured error would not describe the bundle)."""
    for layer, module in small.backbone.moe_modules().items():
        position = {e: i for i, e in enumerate(kept[layer])}
        for task, own in kept_per_task.items():
            mask = torch.zeros(len(kept[layer]), dtype=torch.bool)
            mask[[position[e] for e in own[layer]]] = True
            module.router.set_allowed(task, module.router.allowed_mask(task) & mask)


def flops_per_image(model: GeneralistModel, task: str, image_size: int) -> int:
    """Multiply-accumulates x 2 of one forward pass, counted by torch's FLOP counter on one image
    (routing picks top_k experts per token whatever E is, so sparse layers count only active experts)."""
    from torch.utils.flop_counter import FlopCounterMode
    was = model.training
    model.eval()
    x = torch.zeros(1, model.backbone.config["in_chans"], image_size, image_size,
                    device=next(model.parameters()).device)
    # Grad mode stays on: the counter's module tracker expects autograd graphs (one image is cheap).
    with FlopCounterMode(display=False) as counter:
        model(x, task)
    model.train(was)
    return int(counter.get_total_flops())


def with_top_k(model: GeneralistModel, k: int) -> GeneralistModel:
    """A copy of ``model`` whose MoE layers route each token to ``k`` experts (same weights): fewer
    experts per token cost less compute in the sparse path and change the outputs."""
    cfg = copy.deepcopy(model.config)
    cfg["backbone"]["moe"] = {**cfg["backbone"]["moe"], "top_k": k}
    other = GeneralistModel(cfg["backbone"], cfg["tasks"], cfg["decoder"], cfg["adapters"], cfg["language"])
    other.load_state_dict(model.state_dict())
    return other.eval()
