"""The extraction pipeline behind ``tools/extract_experts.py``: usage -> selection -> slicing ->
lossless check -> metrics, parameters, FLOPs and latency of both models -> bundle."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..engine import report
from ..engine.builders import build_dataset, load_generalist
from ..engine.evaluate import evaluate, iterate_batches
from ..moe import ExpertUsage
from ..tasks import GeneralistModel
from .bundle import sha256_of, write_bundle
from ..engine.optim import parameter_counts
from .extract import extract_task, flops_per_image
from .select import select_layer


def relocate_data(data_cfg: dict, new_root: str) -> dict:
    """The run's data config with its ``root`` moved: every path under the old root follows."""
    old = str(data_cfg["root"])
    move = (lambda v: new_root + v[len(old):] if isinstance(v, str) and v.startswith(old) else v)
    return {**data_cfg, "root": new_root,
            "tasks": {t: {k: move(v) for k, v in d.items()} for t, d in data_cfg["tasks"].items()}}


@torch.no_grad()
def task_usage(model: GeneralistModel, task: str, dataset, batch_size: int = 64, max_batches: int | None = None,
               usage: ExpertUsage | None = None) -> ExpertUsage:
    """Selection counts of ``task``'s routers on ``dataset``, added to ``usage`` (a new one if None)."""
    usage = usage or ExpertUsage(model.backbone.moe_layers(), [task])
    model.eval()
    for images, _ in iterate_batches(dataset, batch_size, max_batches):
        usage.update(model(images, task, return_routing=True)[1])
    return usage


@torch.no_grad()
def outputs_identical(full: GeneralistModel, small: GeneralistModel, task: str, dataset, batch_size: int = 64,
                      max_batches: int | None = None) -> tuple[bool, float]:
    """Whether every output tensor of both models is bit-identical on ``dataset``; and the max difference."""
    full.eval(), small.eval()
    same, worst = True, 0.0
    for images, _ in iterate_batches(dataset, batch_size, max_batches):
        a, b = full(images, task), small(images, task)
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                same &= torch.equal(v, b[k])
                worst = max(worst, float((v.float() - b[k].float()).abs().max()))
    return same, worst


@torch.no_grad()
def median_call_ms(fn, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn(x)`` over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def latency_ms(model: GeneralistModel, task: str, image_size: int, repeats: int = 20) -> float:
    """Median milliseconds of one single-image forward pass (after warm-up)."""
    model.eval()
    return median_call_ms(lambda x: model(x, task), torch.randn(1, 3, image_size, image_size), repeats)


def extract_bundle(checkpoint: str | Path, task: str, out: str | Path, rule: str = "selected",
                   value: float | None = None, data_root: str | None = None, calibration_split: str = "val",
                   eval_split: str = "val", batch_size: int = 64, max_batches: int | None = None,
                   force: bool = False, log=print) -> dict:
    """Run the whole extraction and write the bundle; returns ``bundle.json``'s content."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    full, model_file, run_cfg = load_generalist(checkpoint)
    full.spec(task)  # unknown task -> lists the known ones
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass the training run directory")
    data_cfg = relocate_data(run_cfg["data"], data_root) if data_root else run_cfg["data"]
    task_cfg = {**full.spec(task).config(), **run_cfg["tasks"].get(task, {})}
    calib = build_dataset(task, task_cfg, data_cfg, calibration_split, False)
    evalset = calib if eval_split == calibration_split else build_dataset(task, task_cfg, data_cfg, eval_split, False)
    log(f"expert usage of '{task}' on the {calibration_split} split ({len(calib)} images) ...")
    usage = task_usage(full, task, calib, batch_size, max_batches)
    layers = full.backbone.moe_layers()
    modules = {name: m for name, m in full.backbone.named_modules() if name in layers}
    # A task added later may see only some of a layer's experts: choose among those.
    kept = {layer: select_layer(usage.counts[li, 0, :modules[layer].router.num_experts_for(task)], rule, value,
                                modules[layer].top_k, layer)
            for li, layer in enumerate(usage.layers)}
    small = extract_task(full, task, kept)
    lossless = None
    if rule == "selected":
        same, worst = outputs_identical(full, small, task, calib, batch_size, max_batches)
        lossless = {"identical": same, "max_abs_diff": worst, "split": calibration_split}
        log(f"lossless check on the {calibration_split} split: outputs "
            + ("bit-identical to the full model" if same else f"differ (max |diff| {worst:.3g})"))
    size = int(full.backbone.config["img_size"])
    metrics = {"full": evaluate(full, {task: evalset}, batch_size, max_batches, progress=False)[task],
               "bundle": evaluate(small, {task: evalset}, batch_size, max_batches, progress=False)[task]}
    info = {
        "task": task,
        "parent_checkpoint": str(model_file),
        "parent_sha256": sha256_of(model_file),
        "kept_experts": kept,
        "num_experts": layers,
        "rule": {"name": rule, "value": value},
        "calibration_split": calibration_split,
        "eval_split": eval_split,
        "params": {"full": parameter_counts(full)["total"], "bundle": parameter_counts(small)["total"]},
        "flops_per_image": {"full": flops_per_image(full, task, size), "bundle": flops_per_image(small, task, size)},
        "latency_ms": {"full": latency_ms(full, task, size), "bundle": latency_ms(small, task, size)},
        "metrics": metrics,
        "lossless_check": lossless,
        "usage_frequency": {layer: usage.frequency()[li, 0, :layers[layer]].tolist()
                            for li, layer in enumerate(usage.layers)},
    }
    write_bundle(out, small, info, force=force)
    return info


def run_usage(checkpoint: str | Path, split: str = "val", out: str | Path | None = None, batch_size: int = 64,
              max_batches: int | None = None) -> tuple[ExpertUsage, Path]:
    """Expert usage of every task of a run on ``split``; writes expert_usage.json/.png into ``out``
    (default: the run directory)."""
    model, model_file, run_cfg = load_generalist(checkpoint)
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass a training run directory")
    usage = ExpertUsage(model.backbone.moe_layers(), model.tasks)
    for task in model.tasks:
        task_cfg = {**model.spec(task).config(), **run_cfg["tasks"].get(task, {})}
        task_usage(model, task, build_dataset(task, task_cfg, run_cfg["data"], split, False), batch_size,
                   max_batches, usage)
    out = Path(out) if out else model_file.parent
    report.write_usage(out, usage, split=split)
    return usage, out
