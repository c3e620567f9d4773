"""``tools/export.py``: a bundle (or one task of a full model) -> an exported file whose outputs
match PyTorch's, checked before the file is kept; and the latency table."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from ..engine.builders import build_dataset, load_generalist
from ..engine.evaluate import fixed_subset, iterate_batches
from ..engine.report import write_json
from ..surgery.pipeline import median_call_ms, relocate_data
from .graph import dense_experts, moe_cost, task_graph
from .runtime import check_format, compare_outputs, export_graph, load_runner, require_onnx, task_metrics

TOLERANCE = 1e-4  # max |difference| of any fp32 output between PyTorch and the exported file
# Task metrics are fractions; outputs that agree to ~1e-6 can still swap two near-tied detection
# scores and move mAP in the 6th decimal, so "identical" is reported and 0.01 points is the bar.
METRIC_TOLERANCE = 1e-4


def load_source(bundle: str | Path | None, checkpoint: str | Path | None, task: str | None):
    """``(model, task, run_config or None, info)`` for a bundle folder or a full model's checkpoint."""
    if bool(bundle) == bool(checkpoint):
        raise ValueError("pass exactly one of --bundle DIR or --checkpoint RUN (with --task)")
    if bundle:
        from ..surgery.bundle import bundle_task, load_bundle
        model = load_bundle(bundle)
        info = model.bundle_info
        task = bundle_task(info, task)
        parent_run = Path(info["parent_checkpoint"]).parent / "config.json"
        run_cfg = json.loads(parent_run.read_text()) if parent_run.is_file() else None
        return model, task, run_cfg, {"bundle": str(bundle), "parent_checkpoint": info["parent_checkpoint"]}
    model, model_file, run_cfg = load_generalist(checkpoint)
    if task is None:
        if len(model.tasks) != 1:
            raise ValueError(f"--task is required; {checkpoint} knows tasks {model.tasks}")
        task = model.tasks[0]
    model.spec(task)
    return model, task, run_cfg, {"checkpoint": str(model_file)}


def calibration_set(model, task: str, run_cfg: dict | None, data_root: str | None, split: str, n: int):
    """A fixed random subset of ``n`` images of the task's ``split`` from the run's data config
    (None when the run's data config is unknown or its folders are missing)."""
    if run_cfg is None or n <= 0:
        return None
    data_cfg = relocate_data(run_cfg["data"], data_root) if data_root else run_cfg["data"]
    task_cfg = {**model.spec(task).config(), **(run_cfg.get("tasks") or {}).get(task, {})}
    try:
        dataset = build_dataset(task, task_cfg, data_cfg, split, False)
    except (FileNotFoundError, ValueError):
        if data_root:
            raise
        return None
    return fixed_subset(dataset, n)


def export_model(out: str | Path, fmt: str = "onnx", bundle=None, checkpoint=None, task: str | None = None,
                 postprocess: bool = False, data_root: str | None = None, split: str = "val",
                 calib_images: int = 64, batch_size: int = 32, tolerance: float = TOLERANCE, force: bool = False,
                 log=print) -> dict:
    """Export, check parity (random images at batch 1 and 3, and the calibration images) and keep
    the file only if every float output is within ``tolerance`` and the task metric agrees.
    Writes ``<out>.json`` beside the file with the report, and returns it. (Metrics are compared
    to ``METRIC_TOLERANCE``; whether they are bit-identical is reported.)"""
    check_format(fmt)
    if fmt == "onnx":
        require_onnx()
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    model, task, run_cfg, source = load_source(bundle, checkpoint, task)
    graph = task_graph(model, task, postprocess)
    size = int(model.backbone.config["img_size"])
    calib = calibration_set(model, task, run_cfg, data_root, split, calib_images)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.check")
    log(f"exporting task '{task}' ({graph.kind}) to {fmt} ...")
    t0 = time.perf_counter()
    export_graph(graph, torch.randn(2, 3, size, size), tmp, fmt)
    export_s = time.perf_counter() - t0
    try:
        run = load_runner(tmp, fmt)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(b, 3, size, size, generator=g) for b in (1, 3)]
        if calib is not None:
            batches += [images for images, _ in iterate_batches(calib, batch_size)]
        outputs = compare_outputs(graph, run, batches)
        worst = max(v["max_abs_diff"] for v in outputs.values())
        metrics = None
        if calib is not None:
            metrics = {"pytorch": task_metrics(graph, lambda x: graph(x), calib, batch_size),
                       "exported": task_metrics(graph, run, calib, batch_size)}
            metrics["identical"] = metrics["pytorch"] == metrics["exported"]
            metrics["max_abs_diff"] = max(abs(metrics["pytorch"][k] - metrics["exported"][k]) for k in metrics["pytorch"])
        ok = worst <= tolerance and (metrics is None or metrics["max_abs_diff"] <= METRIC_TOLERANCE)
        report = {"task": task, "type": graph.kind, "format": fmt, "file": str(out), **source,
                  "outputs": graph.output_names(), "input": {"name": "images", "shape": ["batch", 3, size, size]},
                  "postprocess": postprocess, "tolerance": tolerance, "parity": outputs, "max_abs_diff": worst,
                  "parity_images": {"random": 4, "calibration": len(calib) if calib is not None else 0,
                                    "split": split if calib is not None else None},
                  "metrics": metrics, "passed": ok, "export_seconds": round(export_s, 1),
                  "moe_cost": moe_cost(model), "flops_per_image": flops(model, task, size)}
        if not ok:
            why = (f"max |diff| {worst:.3g} > {tolerance:g}" if worst > tolerance
                   else f"metrics differ by {metrics['max_abs_diff']:.2g}: PyTorch {metrics['pytorch']} vs exported "
                        f"{metrics['exported']}")
            raise ValueError(f"parity check failed for {out} ({why}); nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    write_json(out.with_name(out.name + ".json"), report)
    return report


def flops(model, task: str, size: int) -> dict:
    """FLOPs of one image on the sparse path (PyTorch eager) and on the exported all-experts path."""
    from ..surgery.extract import flops_per_image
    sparse = flops_per_image(model, task, size)
    with dense_experts(model):
        dense = flops_per_image(model, task, size)
    return {"sparse": sparse, "exported": dense}


def latency_table(exported: str | Path, fmt: str, bundle_model, task: str, full_model=None,
                  batches=(1, 8), repeats: int = 10) -> list[dict]:
    """Rows ``{"model", "batch", "ms", "ms_per_image"}``: the eager full model (if given), the
    eager bundle and the exported bundle, measured back to back in this process."""
    size = int(bundle_model.backbone.config["img_size"])
    run = load_runner(exported, fmt)
    candidates = []
    if full_model is not None:
        candidates.append(("PyTorch eager, full model", lambda x: full_model.eval()(x, task)))
    candidates.append(("PyTorch eager, bundle", lambda x: bundle_model.eval()(x, task)))
    candidates.append((f"{'ONNX Runtime' if fmt == 'onnx' else 'torch.export'}, bundle", run))
    rows = []
    for b in batches:
        x = torch.randn(b, 3, size, size)
        for name, fn in candidates:
            ms = median_call_ms(fn, x, repeats)
            rows.append({"model": name, "batch": b, "ms": ms, "ms_per_image": ms / b})
    return rows
