"""The extraction pipeline behind ``tools/extract_experts.py``: usage -> selection -> slicing ->
lossless check -> metrics, parameters, FLOPs and latency of both models -> bundle."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from ..data import collate
from ..engine.builders import build_dataset
from ..engine.evaluate import evaluate
from ..models import load_model
from ..moe import ExpertUsage
from ..tasks import GeneralistModel
from .bundle import sha256_of, write_bundle
from .extract import count_params, extract_task, flops_per_image
from .select import select_layer


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, dict | None]:
    """A run directory or a model file -> (model file, the run's resolved config if there is one)."""
    checkpoint = Path(checkpoint)
    model_file = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    if not model_file.is_file():
        raise FileNotFoundError(f"checkpoint {model_file} does not exist (pass a run directory or a .safetensors)")
    cfg_file = model_file.parent / "config.json"
    return model_file, json.loads(cfg_file.read_text()) if cfg_file.is_file() else None


@torch.no_grad()
def task_usage(model: GeneralistModel, task: str, dataset, batch_size: int = 64,
               max_batches: int | None = None) -> ExpertUsage:
    """Selection counts of ``task``'s routers on ``dataset``."""
    usage = ExpertUsage(model.backbone.moe_layers(), [task])
    model.eval()
    n = len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)
    for s in range(0, n, batch_size):
        images, _ = collate([dataset[i] for i in range(s, min(n, s + batch_size))])
        _, routing = model(images, task, return_routing=True)
        usage.update(routing)
    return usage


@torch.no_grad()
def outputs_identical(full: GeneralistModel, small: GeneralistModel, task: str, dataset, batch_size: int = 64,
                      max_batches: int | None = None) -> tuple[bool, float]:
    """Whether every output tensor of both models is bit-identical on ``dataset``; and the max difference."""
    full.eval(), small.eval()
    n = len(dataset) if not max_batches else min(len(dataset), max_batches * batch_size)
    same, worst = True, 0.0
    for s in range(0, n, batch_size):
        images, _ = collate([dataset[i] for i in range(s, min(n, s + batch_size))])
        a, b = full(images, task), small(images, task)
        for k, v in a.items():
            if isinstance(v, torch.Tensor):
                same &= torch.equal(v, b[k])
                worst = max(worst, float((v.float() - b[k].float()).abs().max()))
    return same, worst


@torch.no_grad()
def latency_ms(model: GeneralistModel, task: str, image_size: int, repeats: int = 20) -> float:
    """Median milliseconds of one single-image forward pass (after warm-up)."""
    model.eval()
    x = torch.randn(1, 3, image_size, image_size)
    for _ in range(3):
        model(x, task)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x, task)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def extract_bundle(checkpoint: str | Path, task: str, out: str | Path, rule: str = "selected",
                   value: float | None = None, data_cfg: dict | None = None, calibration_split: str = "val",
                   eval_split: str = "val", batch_size: int = 64, max_batches: int | None = None,
                   force: bool = False, log=print) -> dict:
    """Run the whole extraction and write the bundle; returns ``bundle.json``'s content."""
    model_file, run_cfg = resolve_checkpoint(checkpoint)
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    full = load_model(model_file)
    if not isinstance(full, GeneralistModel):
        raise ValueError(f"{model_file} holds a backbone only; extraction needs a trained generalist")
    full.spec(task)  # unknown task -> lists the known ones
    data_cfg = data_cfg or (run_cfg or {}).get("data")
    if not data_cfg:
        raise ValueError(f"{model_file} has no config.json beside it; pass the data config (--data-config)")
    task_cfg = {**full.spec(task).config(), **((run_cfg or {}).get("tasks", {}).get(task, {}))}
    calib = build_dataset(task, task_cfg, data_cfg, calibration_split, False)
    evalset = calib if eval_split == calibration_split else build_dataset(task, task_cfg, data_cfg, eval_split, False)
    log(f"expert usage of '{task}' on the {calibration_split} split ({len(calib)} images) ...")
    usage = task_usage(full, task, calib, batch_size, max_batches)
    layers = full.backbone.moe_layers()
    modules = {name: m for name, m in full.backbone.named_modules() if name in layers}
    # A task added later may see only some of a layer's experts: choose among those.
    visible = {name: m.router.gates[task].out_features if m.router.mode == "per_task" else m.num_experts
               for name, m in modules.items()}
    kept = {layer: select_layer(usage.counts[li, 0, :visible[layer]], rule, value, modules[layer].top_k, layer)
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
        "params": {"full": count_params(full), "bundle": count_params(small)},
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
    from ..engine import report
    model_file, run_cfg = resolve_checkpoint(checkpoint)
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; pass a training run directory")
    model = load_model(model_file)
    usage = ExpertUsage(model.backbone.moe_layers(), model.tasks)
    for task in model.tasks:
        task_cfg = {**model.spec(task).config(), **run_cfg["tasks"].get(task, {})}
        dataset = build_dataset(task, task_cfg, run_cfg["data"], split, False)
        part = task_usage(model, task, dataset, batch_size, max_batches)
        usage.counts[:, usage.tasks.index(task)] += part.counts[:, 0]
        usage.gate_sums[:, usage.tasks.index(task)] += part.gate_sums[:, 0]
        usage.tokens[:, usage.tasks.index(task)] += part.tokens[:, 0]
    out = Path(out) if out else model_file.parent
    report.write_json(out / "expert_usage.json", {**usage.to_dict(), "split": split})
    report.plot_usage(usage, out / "expert_usage.png")
    return usage, out
