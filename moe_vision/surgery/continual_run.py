"""``tools/add_task.py``: grow a trained run by one task, train only the new parts, and prove the
old tasks did not move (bit-identical outputs on a probe batch, metrics before/after)."""
from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import OmegaConf

from .. import exactness
from ..data import collate
from ..engine import report
from ..engine.builders import build_dataset
from ..engine.evaluate import evaluate
from ..engine.trainer import Trainer
from ..engine.builders import data_label_space, head_config, load_generalist
from .continual import add_task, bit_identical, outputs_on_probe
from ..engine.optim import parameter_counts

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FORMATS = {"cls": "imagefolder", "det": "coco", "seg": "ade20k", "depth": "nyu_depth"}


def data_entry(task_type: str, root: str) -> dict:
    """The data-config entry of a dataset folder in the standard layout of ``task_type``."""
    if task_type == "det":
        return {"format": "coco", "train_ann": f"{root}/annotations/instances_train.json", "train_images": f"{root}/train",
                "val_ann": f"{root}/annotations/instances_val.json", "val_images": f"{root}/val"}
    entry = {"format": FORMATS[task_type], "root": root}
    if task_type == "seg":
        entry["reduce_zero_label"] = False
    return entry


def default_task_config(task_type: str) -> dict:
    path = CONFIGS / "task" / f"{task_type}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown task type {task_type!r}; expected one of {sorted(FORMATS)}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def add_task_run(checkpoint: str | Path, task: str, data_dir: str | Path, out: str | Path, new_experts: int = 2,
                 steps: int | None = None, task_type: str | None = None, overrides: dict | None = None,
                 probe_size: int = 16, log=print, num_classes: int | None = None) -> dict | None:
    """Grow a trained run by one task and train only the new parts; see tools/add_task.py.

    By default the new task trains with the parent run's schedule: its number of steps and the
    smallest per-task batch size among its tasks (`steps` / `overrides["batch_size"]` change them).
    A task with classes gets a head sized from its data (``num_classes`` where the data does not
    name them), its class names kept in the run's config.
    """
    full, model_file, run_cfg = load_generalist(checkpoint)
    if run_cfg is None:
        raise ValueError(f"{model_file} has no config.json beside it; add_task needs the run directory")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out")
    task_type = task_type or task
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    old_tasks = full.tasks
    steps = int(steps or run_cfg["train"]["steps"])
    parent_batch = min(int(t["batch_size"]) for t in run_cfg["tasks"].values())
    task_cfg = {**default_task_config(task_type), "type": task_type, "batch_size": parent_batch, **(overrides or {})}
    data_cfg = copy.deepcopy(run_cfg["data"])
    data_cfg["tasks"][task] = data_entry(task_type, str(data_dir))
    if task_type in ("cls", "det", "seg"):
        n, names = data_label_space(task, task_cfg, data_cfg, num_classes)
        task_cfg.update(num_classes=n, **({"class_names": names} if names else {}))
    elif num_classes is not None:
        raise ValueError(f"--num-classes: a {task_type} task has no classes")
    grown = add_task(full, task, head_config(task_cfg), new_experts)
    counts = parameter_counts(grown)
    log(f"added task '{task}' with {new_experts} new experts per MoE layer: "
        f"{counts['trainable']:,} trainable of {counts['total']:,} parameters; every old parameter frozen")

    old_val = {t: build_dataset(t, run_cfg["tasks"][t], data_cfg, "val", False) for t in old_tasks}
    probe = {t: collate([ds[i] for i in range(min(probe_size, len(ds)))])[0] for t, ds in old_val.items()}
    before_out = {t: outputs_on_probe(full, [t], probe[t])[t] for t in old_tasks}
    log("old tasks' metrics before ...")
    before = evaluate(full, old_val, progress=False)

    cfg = copy.deepcopy(run_cfg)
    cfg.update(tasks={task: task_cfg}, data=data_cfg, output_dir=str(out), resume=False, single_task=None)
    cfg["train"] = {**cfg["train"], "steps": steps, "sampling": {**cfg["train"]["sampling"], "tasks_per_step": 1}}
    # The grown layers hold old (frozen) and new expert groups; expert parallelism covers only a
    # layer's base experts, so the new task trains with every rank holding every expert.
    cfg["dist"] = {**(cfg.get("dist") or {}), "expert_parallel": 1}
    trainer = Trainer(cfg, model=grown)
    result = trainer.fit()
    trainer.dist.shutdown()
    if not trainer.dist.is_main:  # under torchrun only rank 0 checks, evaluates and reports
        return None

    after_out = {t: outputs_on_probe(trainer.eval_model, [t], probe[t])[t] for t in old_tasks}
    identical = bit_identical(before_out, after_out)
    after = evaluate(trainer.eval_model, old_val, progress=False)
    new_metric = result["metrics"][task]
    report.write_json(out / "metrics.json", {**after, task: new_metric})
    report.write_json(out / "config.json", {**cfg, "tasks": {**run_cfg["tasks"], task: task_cfg}})
    rep = {
        "parent_checkpoint": str(model_file),
        "new_task": task,
        "new_experts_per_layer": new_experts,
        "old_tasks": old_tasks,
        "old_metrics_before": before,
        "old_metrics_after": after,
        "old_metrics_delta": {t: {m: after[t][m] - before[t][m] for m in before[t]} for t in old_tasks},
        "new_task_metrics": new_metric,
        "parameters": counts,
        "old_tasks_bit_identical": identical,
        "bit_identical_conditions": exactness.describe(),
        "probe_images_per_task": {t: int(p.shape[0]) for t, p in probe.items()},
        "train_steps": steps,
        "train_seconds": result["train_seconds"],
    }
    report.write_json(out / "continual_report.json", rep)
    return rep
