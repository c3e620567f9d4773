"""Evaluation: run each task's split through the model, score with the task's evaluator,
accumulate expert usage, and compute each metric's chance level."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from ..progress import progress_bar
from ..data import collate
from ..data.sampler import SeededItems, collate_or_error, raise_load_error
from ..data.item_cache import EVAL_ITEMS
from ..moe import ExpertUsage
from ..tasks import GeneralistModel


class SubsetView:
    """``indices`` of a dataset, forwarding every other attribute (ann_file, classes, ...) to it."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]

    def __getattr__(self, name: str):
        return getattr(self.__dict__["dataset"], name)

    def raw_target(self, i: int) -> dict:
        return eval_target(self.dataset, self.indices[i])


def eval_target(dataset, i: int) -> dict:
    """Item ``i``'s target as evaluation sees it, without decoding the image when the reader can."""
    return dataset.raw_target(i) if hasattr(dataset, "raw_target") else dataset[i][1]


def fixed_subset(dataset, n: int, seed: int = 0):
    """A fixed random subset of ``n`` items (the whole dataset when ``n`` is 0 or larger)."""
    if not n or n >= len(dataset):
        return dataset
    g = torch.Generator().manual_seed(seed)
    return SubsetView(dataset, sorted(torch.randperm(len(dataset), generator=g)[:n].tolist()))


def iterate_batches(dataset, batch_size: int, max_batches: int | None = None, num_workers: int = 0):
    """``(images, targets)`` batches over ``dataset`` in order, at most ``max_batches`` of them,
    loaded in ``num_workers`` worker processes (0: in this process, reusing the items an earlier
    evaluation of the same split read, see :mod:`~moe_vision.data.item_cache`). An unreadable
    image stops with one error naming it."""
    n = len(dataset)
    if max_batches:
        n = min(n, max_batches * batch_size)
    keys = [[(0, i) for i in range(start, min(n, start + batch_size))] for start in range(0, n, batch_size)]
    items, run = SeededItems(dataset), collate_or_error(collate)
    if num_workers:
        from torch.utils.data import DataLoader
        batches = iter(DataLoader(items, batch_sampler=keys, num_workers=num_workers, collate_fn=run))
    else:
        item = EVAL_ITEMS.loader(dataset, lambda i: items[(0, i)])
        batches = (run([item(i) for _, i in batch]) for batch in keys)
    for batch in batches:
        yield raise_load_error(batch)


@torch.no_grad()
def evaluate(model: GeneralistModel, datasets: Mapping[str, object], batch_size: int = 64,
             max_batches: int | None = None, device: torch.device | str = "cpu", usage: ExpertUsage | None = None,
             results_dir: Path | None = None, progress: bool = True, autocast_dtype: torch.dtype | None = None,
             num_workers: int = 0):
    """Metrics per task (``{task: {metric: value}}``) and, in ``usage``, expert selection counts.

    With ``results_dir``, detection also writes its COCO results JSON there (``<task>_results.json``).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    metrics = {}
    for task, dataset in datasets.items():
        spec = model.spec(task)
        if spec.type_name == "det" and results_dir is not None:
            ev = spec.evaluator(dataset, Path(results_dir) / f"{task}_results.json")
        else:
            ev = spec.evaluator(dataset)
        total = -(-min(len(dataset), (max_batches or 10 ** 9) * batch_size) // batch_size)
        for images, targets in progress_bar(iterate_batches(dataset, batch_size, max_batches, num_workers), total=total,
                                    desc=f"eval {task}",
                                    leave=False, disable=not progress):
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out, routing = model(images.to(device), task, return_routing=True, targets=targets)
            if usage is not None:
                usage.update(routing)
            ev.update(spec.postprocess(out, targets), targets)
        metrics[task] = ev.compute()
    model.train(was_training)
    return metrics


def chance_metrics(model: GeneralistModel, datasets: Mapping[str, object], max_items: int | None = None) -> dict:
    """Each metric for an input-blind predictor (most frequent class / one full-image box / constant depth)."""
    out = {}
    for task, dataset in datasets.items():
        spec = model.spec(task)
        n = min(len(dataset), max_items or len(dataset))
        targets = [eval_target(dataset, i) for i in range(n)]
        ev = spec.evaluator(dataset)
        ev.update(spec.chance_predictions(dataset, targets), targets)
        out[task] = ev.compute()
    return out


def apply_task_options(model: GeneralistModel, task_options: Mapping[str, Mapping]) -> None:
    """Override stored task options for this evaluation only, e.g. ``{"det": {"inference": "queries_nms"}}``.
    Only options the task already has may be set, so a typo fails instead of being ignored."""
    for task, options in task_options.items():
        spec = model.spec(task)
        for key, value in (options or {}).items():
            if key not in spec.options:
                raise ValueError(f"eval.task_options.{task}.{key}: task {task!r} has no option {key!r}; "
                                 f"it has {sorted(spec.options)}")
            spec.options[key] = value


def evaluate_run(cfg: dict) -> dict:
    """Load ``cfg['eval']['checkpoint']`` (a run directory or model file), evaluate every task the
    model and the config share, and write the run-directory reports into ``eval.out``."""
    from . import report
    from .builders import build_dataset, load_generalist, resolve_device
    ckpt = cfg["eval"].get("checkpoint")
    if not ckpt:
        raise ValueError("eval.checkpoint is not set: pass a run directory or a model .safetensors file")
    model, model_file, _ = load_generalist(ckpt)
    out_dir = Path(cfg["eval"].get("out") or model_file.parent)
    device = resolve_device(cfg.get("device", "auto"))
    model.to(device)
    tasks = [t for t in model.tasks if t in cfg["tasks"]] or model.tasks
    apply_task_options(model, cfg["eval"].get("task_options") or {})
    datasets = {t: build_dataset(t, {**model.spec(t).config(), **cfg["tasks"].get(t, {})}, cfg["data"],
                                 cfg["eval"].get("split", "val"), False) for t in tasks}
    usage = ExpertUsage.of(model.backbone, tasks)
    metrics = evaluate(model, datasets, int(cfg["eval"]["batch_size"]), cfg["eval"].get("max_batches"), device,
                       usage=usage, results_dir=out_dir, num_workers=int(cfg["data"].get("num_workers") or 0))
    chance = chance_metrics(model, datasets)
    report.write_run_reports(out_dir, metrics, chance, usage)
    return {"metrics": metrics, "chance": chance, "usage": usage, "out_dir": out_dir}
