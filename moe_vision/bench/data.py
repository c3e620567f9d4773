"""``tools/bench_data.py``: how fast the data pipeline delivers training images (decode + augment,
per worker process and for a pool of workers, for each task of an experiment, on real-size JPEG
fixtures), next to what a GPU training step consumes."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

from ..data.readers import set_decoder
from ..data.sampler import InfiniteBatches, SeededItems, collate, item_seed

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# Training-set sizes of the public datasets, for time per epoch (ImageNet-1k, COCO train2017, ADE20K
# training, NYU depth v2's common 24,231-frame training subset).
REAL_TRAIN_IMAGES = {"imagefolder": 1_281_167, "coco": 118_287, "ade20k": 20_210, "nyu_depth": 24_231}
REAL_CLASSES = {"cls": 1000, "det": 80}  # for a num_classes left to the data (ImageNet-1k, COCO)


def check_experiment(experiment: str) -> None:
    """One line naming the experiments that exist when ``experiment`` is not one of them."""
    known = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
    if experiment not in known:
        raise ValueError(f"--experiment {experiment!r} does not exist; the experiments are {', '.join(known)}")


def compose_experiment(experiment: str, overrides: list[str], root: Path) -> dict:
    """The resolved training config of ``experiment`` with its data under ``root``; an experiment
    that does not exist is one line naming those that do."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from ..engine.builders import prepare_config
    check_experiment(experiment)
    from hydra.errors import HydraException
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"data.root={root}", *overrides])
    except HydraException as e:
        raise ValueError(f"overrides {' '.join(overrides)}: {str(e).splitlines()[0]}") from None
    return prepare_config(OmegaConf.to_container(cfg, resolve=True))


def data_report(experiment: str, overrides: list[str], fixtures: Path, images: int = 48, workers: int = 2,
                gpus: int = 1, peak_tflops: float = 989.0, mfu: float = 0.35, cost: bool = True) -> dict:
    """Generate fixtures, time each task's training pipeline, and (``cost``) count the step."""
    from ..data.fixtures import FixtureSizes, make_real_layout
    from ..engine.builders import build_dataset
    check_experiment(experiment)  # before the fixtures, which take a while
    n = max(8, images)
    make_real_layout(fixtures, FixtureSizes(classes=8, per_class=max(1, n // 8), coco=n, ade=n, nyu=n))
    cfg = compose_experiment(experiment, overrides, fixtures)
    tasks = cfg["tasks"]
    datasets = {t: build_dataset(t, tc, cfg["data"], "train", True) for t, tc in tasks.items()}
    rates = loader_rates(datasets, images, workers)
    size = {t: int(tc.get("img_size") or cfg["data"]["img_size"]) for t, tc in tasks.items()}
    report = {"experiment": experiment, "overrides": overrides, "loader": rates, "input_size": size,
              "batch_size": {t: int(tc["batch_size"]) for t, tc in tasks.items()}, "gpus": gpus}
    if cost:
        from ..engine.setup import task_workers
        c = report["cost"] = step_report(cfg, gpus, peak_tflops, mfu)
        loader_step = 0.0
        for t, r in rates.items():
            need = c["images_per_second"][t]
            per_worker = r["per_worker"][r["decoder"]]
            r["gpu_consumes"], r["workers_needed"] = need, math.ceil(need / per_worker)
            r["configured_workers"] = task_workers(cfg["data"], t)
            # what the configured workers deliver bounds the step from below (1 process when 0)
            loader_step = max(loader_step, need * c["step_seconds"] / (max(1, r["configured_workers"]) * per_worker))
        c["loader_step_seconds"] = loader_step
        c["hours_per_epoch_loader_bound"] = c["steps_per_epoch"] * max(loader_step, c["step_seconds"]) / 3600
    return report


def step_report(cfg: dict, gpus: int, peak_tflops: float, mfu: float) -> dict:
    """FLOPs, activations, memory per GPU, seconds per step and hours per epoch of the recipe."""
    import torch
    from ..engine.builders import build_generalist
    from .cost import recipe_costs, step_estimate
    tasks = {t: {**tc, "num_classes": tc.get("num_classes") or REAL_CLASSES.get(tc.get("type", t), 1)}
             for t, tc in cfg["tasks"].items()}
    cfg = {**cfg, "tasks": tasks}
    torch.manual_seed(0)
    model = build_generalist(cfg)
    costs = recipe_costs(model, tasks, int(cfg["data"]["img_size"]))
    batches = {t: int(tc["batch_size"]) for t, tc in tasks.items()}
    tps = int(cfg["train"]["sampling"].get("tasks_per_step", 1))
    est = step_estimate(costs, batches, tps, sum(p.numel() for p in model.parameters()), gpus, peak_tflops, mfu)
    epoch_task = cfg["train"].get("epoch_task") or max(
        tasks, key=lambda t: REAL_TRAIN_IMAGES.get(cfg["data"]["tasks"][t]["format"], 0))
    per_step = batches[epoch_task] * min(1.0, tps / len(tasks))
    steps_per_epoch = REAL_TRAIN_IMAGES.get(cfg["data"]["tasks"][epoch_task]["format"], 0) / per_step
    return {**est, "per_task": {t: {"img_size": c.img_size, "train_gflops": c.train_flops / 1e9,
                                    "activation_mb": c.activation_bytes / 1e6} for t, c in costs.items()},
            "parameters": sum(p.numel() for p in model.parameters()), "epoch_task": epoch_task,
            "steps_per_epoch": steps_per_epoch, "hours_per_epoch": steps_per_epoch * est["step_seconds"] / 3600,
            "peak_tflops": peak_tflops, "mfu": mfu}


def format_report(r: dict) -> str:
    lines = [f"experiment={r['experiment']} {' '.join(r['overrides'])}".rstrip(), "",
             f"{'task':<7}{'input':>7}{'pil img/s':>11}{'tv img/s':>10}{'decoder':>13}"
             f"{'pool img/s':>12}{'GPU img/s':>11}{'workers (set)':>15}",
             "-" * 80]
    for t, x in r["loader"].items():
        per = x["per_worker"]
        lines.append(f"{t:<7}{r['input_size'][t]:>7}{per.get('pil', float('nan')):>11.1f}"
                     f"{per.get('torchvision', float('nan')):>10.1f}{x['decoder']:>13}"
                     f"{x['pool']:>12.1f}{x.get('gpu_consumes', float('nan')):>11.0f}"
                     f"{x.get('workers_needed', 0):>6} ({x.get('configured_workers', '-')})")
    lines.append(f"(img/s per worker: one process decoding + augmenting; pool: {r['loader'][t]['workers']} worker "
                 "processes on this machine; GPU img/s: what one GPU's training step consumes; workers: needed per task "
                 "and GPU at the faster decoder (configured))")
    c = r.get("cost")
    if c:
        lines += ["", f"step cost on {r['gpus']} GPU(s), computed at {c['mfu']:.0%} of {c['peak_tflops']:.0f} TFLOP/s "
                      f"(bf16), {c['parameters'] / 1e6:.1f} M parameters:",
                  f"{'task':<7}{'input':>7}{'batch/GPU':>11}{'GFLOP/img':>11}{'act MB/img':>12}", "-" * 48]
        for t, x in c["per_task"].items():
            lines.append(f"{t:<7}{x['img_size']:>7}{r['batch_size'][t] / r['gpus']:>11.0f}{x['train_gflops']:>11.1f}"
                         f"{x['activation_mb']:>12.1f}")
        lines.append(f"step: {c['step_seconds'] * 1e3:.0f} ms; memory per GPU ~{c['memory_gb']:.1f} GB "
                     f"({c['activation_gb']:.1f} GB activations + 16 B/parameter); one epoch of {c['epoch_task']} "
                     f"({c['steps_per_epoch']:,.0f} steps) ~{c['hours_per_epoch']:.2f} h compute-bound")
        if c["loader_step_seconds"] > c["step_seconds"]:
            lines.append(f"the configured workers load a step in {c['loader_step_seconds'] * 1e3:.0f} ms "
                         f"({c['loader_step_seconds'] / c['step_seconds']:.1f}x the compute): the loader is the "
                         f"bottleneck, ~{c['hours_per_epoch_loader_bound']:.2f} h per epoch; raise the workers above "
                         "(cores permitting)")
    return "\n".join(lines)


# ---------------------------------------------------------------- loader rates
def in_process_rate(dataset, images: int, passes: int = 3) -> float:
    """Images per second that one process (= one worker) loads: read, decode, augment; the best
    of ``passes`` passes over the same images (the machine's other work only slows a pass down)."""
    items = SeededItems(dataset)
    n = min(images, len(dataset))
    items[(0, 0)]  # warm up (imports, first-call costs)
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for i in range(n):
            items[(item_seed(0, 0, i), i)]
        best = max(best, n / (time.perf_counter() - t0))
    return best


def pool_rate(dataset, images: int, workers: int, batch_size: int = 8) -> float:
    """Images per second that ``workers`` DataLoader worker processes deliver (collated, padded
    batches), after the first batch (worker start-up is not counted)."""
    it = InfiniteBatches(dataset, min(batch_size, len(dataset)), collate, name="bench", num_workers=workers)
    next(it)
    batches = max(1, images // it.batch_size)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * it.batch_size / (time.perf_counter() - t0)
    it.close()
    return rate


def loader_rates(datasets: Mapping[str, Any], images: int = 64, workers: int = 2,
                 decoders: tuple[str, ...] = ("pil", "torchvision")) -> dict[str, dict]:
    """``{task: {"per_worker": {decoder: img/s}, "pool": img/s with the better decoder, "decoder": ...}}``."""
    out = {}
    for task, ds in datasets.items():
        per = {}
        for name in decoders:
            set_decoder(ds, name)
            per[name] = in_process_rate(ds, images)
        best = max(per, key=per.get)
        set_decoder(ds, best)
        out[task] = {"per_worker": per, "decoder": best,
                     "pool": pool_rate(ds, images, workers) if workers else per[best], "workers": workers}
    return out
