"""The ways a downstream run starts and what it trains: one function per method, each returning
the model to train (its head sized for the downstream classes) and the training options.

Every method trains the same number of steps at the same batch size on the same images; they
differ in where the weights come from (nothing, a dense specialist, the generalist, a bundle of
it), which of them train, and how many experts a token runs through.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..engine.builders import build_generalist, data_label_space
from ..engine.evaluate import fixed_subset
from ..engine.optim import set_trainable
from ..pretrain.transfer import TASK_TENSOR, init_from_pretrained
from ..surgery.extract import extract_task, with_top_k
from ..surgery.pipeline import select_experts, task_usage
from ..surgery.select import allowed_experts
from ..tasks import GeneralistModel


@dataclass(frozen=True)
class Parents:
    """The trained models downstream runs start from (one seed's)."""

    generalist: Path | None  # a make demo run (the MoE generalist)
    dense: Mapping[str, Path]  # task type -> make baselines' dense single-task specialist of it

    def of(self, kind: str | None, task: str) -> Path | None:
        """The run a method whose ``parent`` is ``kind`` starts from, for a task of type ``task``."""
        return self.generalist if kind == "generalist" else self.dense.get(task) if kind == "dense" else None


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    recipe: str  # "dense" (experiment=synthetic_single_task's model) | "moe" (experiment=synthetic's)
    parent: str | None  # "generalist" | "dense" | None (from scratch)
    trainable: str = "all"
    top_k: int | None = None  # experts per token, when not the parent's
    prune_to: int | None = None  # experts per MoE layer kept, chosen on downstream training images
    open_mask: bool = True  # the task may choose among every expert; False: the bundle of its budget's experts
    fresh_routing: bool = False  # the task's routers and embeddings start new, as a new task's would


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("scratch_dense", "dense ViT of equal active compute, from scratch", "dense", None),
    Method("scratch_moe", "the generalist's MoE architecture, from scratch", "moe", None),
    Method("dense_specialist_ft", "the dense single-task specialist, fully fine-tuned", "dense", "dense"),
    Method("generalist_ft", "the generalist, fully fine-tuned (every expert open to the task)", "moe", "generalist"),
    Method("generalist_ft_fresh", "the generalist, fully fine-tuned, its task's routing started new", "moe",
           "generalist", fresh_routing=True),
    Method("bundle_ft", "the task's default bundle (its budget's 2 experts per block, extracted), fully fine-tuned",
           "moe", "generalist", open_mask=False),
    Method("head", "the generalist, head only (GLID's recipe)", "moe", "generalist", trainable="head"),
    Method("router_head", "the generalist, routers + head", "moe", "generalist", trainable="router+head"),
    Method("stem_head", "the generalist, patch stem + position embedding + head", "moe", "generalist",
           trainable="stem+head"),
    Method("scratch_head", "the MoE architecture at random initialisation, head only (what frozen features "
           "carry without pre-training)", "moe", None, trainable="head"),
    Method("pruned", "2 experts per layer chosen on downstream training images, fully fine-tuned", "moe",
           "generalist", prune_to=2),
    Method("top1", "the generalist with top-1 routing, fully fine-tuned", "moe", "generalist", top_k=1),
)}
# add_task (new experts + router + head, every old parameter frozen) runs through
# surgery.continual_run, not through these builders.
ALL_METHODS = (*METHODS, "add_task")
# What make downstream runs (generalist_ft_fresh and scratch_head are diagnostics, run by name).
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m not in ("generalist_ft_fresh", "scratch_head"))
# At larger label budgets: the comparisons that depend on how many labels there are.
LABEL_SENSITIVE = ("scratch_dense", "scratch_moe", "dense_specialist_ft", "generalist_ft", "bundle_ft", "head",
                   "stem_head")
PRUNE_CALIBRATION_IMAGES = 256


def start_model(method: Method, cfg: dict, parents: Parents, log: Callable = print) -> tuple[GeneralistModel, dict]:
    """The model ``method`` trains for the one task of ``cfg`` (its head sized from the data) and a
    report of how it was made (source, tensors loaded, experts kept)."""
    (task, tc), = cfg["tasks"].items()
    n, names = data_label_space(task, tc, cfg["data"])
    cfg["tasks"][task] = {**tc, "num_classes": n, **({"class_names": names} if names else {})}
    if method.top_k:
        cfg["model"] = {**cfg["model"], "moe": {**cfg["model"]["moe"], "top_k": method.top_k}}
    torch.manual_seed(int(cfg["seed"]))
    model = build_generalist(cfg)
    made: dict = {"method": method.name}
    source = parents.of(method.parent, tc.get("type", task))
    if method.parent and source is None:
        raise FileNotFoundError(f"method {method.name} starts from the {method.parent} {task} model, and none was "
                                "given")
    if source is not None:
        fresh = {k: v.clone() for k, v in model.state_dict().items() if _per_task_of(k) == task}
        rep = init_from_pretrained(model, source)
        if method.fresh_routing:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if k in fresh:
                        v.copy_(fresh[k])
            made["fresh"] = sorted(fresh)
        made.update(source=rep["source"], loaded=len(rep["loaded"]), new=rep["new"])
        if method.open_mask:
            for layer in model.backbone.moe_modules().values():
                layer.router.set_allowed(task, torch.ones_like(layer.router.allowed_mask(task)))
        else:  # the bundle extract_experts.py writes by default: the budget's experts only
            kept = allowed_experts(model.backbone.moe_modules(), task)
            model = extract_task(model, task, kept)
            made["kept_experts"] = kept
    if method.prune_to:
        model, kept = prune_on(model, task, cfg, method.prune_to)
        made["kept_experts"] = kept
    made["trainable"] = set_trainable(model, method.trainable, "method")
    return model, made


def _per_task_of(key: str) -> str | None:
    """The task a per-task tensor (router gate, task embedding, per-task normalisation) belongs to."""
    m = TASK_TENSOR.match(key)
    return m.group("task") if m else None


def prune_on(model: GeneralistModel, task: str, cfg: dict, n: int) -> tuple[GeneralistModel, dict]:
    """``model`` cut to the ``n`` experts per MoE layer that ``task`` chooses most often on a fixed
    subset of the downstream training images (evaluation transforms)."""
    from ..engine.builders import build_dataset
    images = build_dataset(task, cfg["tasks"][task], cfg["data"], "train", False)
    usage = task_usage(model, task, fixed_subset(images, PRUNE_CALIBRATION_IMAGES, int(cfg["seed"])), batch_size=64)
    kept = select_experts(usage, model.backbone.moe_modules(), task, "top_n", n)
    small = extract_task(model, task, kept)
    return small, kept
