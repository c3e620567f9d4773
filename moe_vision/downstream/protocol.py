"""The downstream benchmark: every method on every dataset, label budget and seed, each run in its
own folder (a finished run is read back, an interrupted one resumes), one row per metric.

Row keys (``docs/results/downstream.json``): dataset, labels, seed, method, metric, value (percent),
trainable_params, params, flops_per_image, train_seconds, machine.
"""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ..engine import report
from ..engine.builders import prepare_config
from ..engine.evaluate import evaluate
from ..engine.setup import usable_cores
from ..engine.trainer import Trainer
from ..models import load_model
from ..models.registry import MODEL_ARGS
from ..surgery.continual_run import CONFIGS, add_task_run, data_entry
from ..surgery.extract import flops_per_image, with_top_k
from .methods import ALL_METHODS, DEFAULT_METHODS, LABEL_SENSITIVE, METHODS, Parents, start_model


@dataclass(frozen=True)
class Dataset:
    """One downstream dataset at one label budget."""

    name: str  # "fashion-mnist" | "trees"
    task: str  # the task type it is labelled for: "cls" | "det"
    root: Path  # its folder in the standard layout
    labels: int | None  # training images used (None: all of a dataset that has no budgets)

    @property
    def key(self) -> str:
        return self.name if self.labels is None else f"{self.name}-{self.labels}"


@dataclass(frozen=True)
class Protocol:
    """What every method shares on a dataset: steps, batch, learning rate, input size."""

    steps: int = 300
    # Per task type. Detection's step (60 queries, Hungarian matching) costs about three of
    # classification's: 16 tiles a step still pass over the 392 training tiles 12 times.
    batch_size: dict = field(default_factory=lambda: {"cls": 32, "det": 16})
    lr: float = 1e-3
    # Fashion-MNIST at about its own 28 px (4 x 4 patches of the generalist's 8 px; its position
    # embedding is resampled): half the cost of 64 px, and the same picture at 600 labels on seed 0
    # (scratch_dense 75.1 vs 75.9, generalist_ft 75.6 vs 76.2). Trees: the 128 px tiles halved
    # (crowns of about 20 px, the synthetic objects' scale).
    img_size: dict = field(default_factory=lambda: {"cls": 32, "det": 64})
    eval_batch_size: int = 64
    max_eval_batches: int | None = None  # quick mode: a few batches of the test split

    def warmup(self) -> int:
        return max(1, self.steps // 10)

    @classmethod
    def from_flags(cls, steps: int | None = None, batch_size: int | None = None, lr: float = 1e-3,
                   img_size: int | None = None, quick: bool = False) -> "Protocol":
        """The protocol of tools/downstream.py's flags (None: the default): ``batch_size`` for both
        task types, ``img_size`` for Fashion-MNIST (trees keep theirs); ``quick``: a smoke run of 4
        steps at batch 4 and 2 evaluation batches, which refuses steps and batch_size. A
        non-positive value is refused."""
        for flag, v in (("--steps", steps), ("--batch-size", batch_size), ("--img-size", img_size)):
            if v is not None and v <= 0:
                raise ValueError(f"{flag} {v}: expected a positive integer")
        if quick and (steps is not None or batch_size is not None):
            raise ValueError("--quick trains 4 steps at batch 4: drop --steps / --batch-size, or drop --quick")
        kw = {} if img_size is None else {"img_size": {**cls().img_size, "cls": img_size}}
        if quick:
            return cls(steps=4, batch_size={"cls": 4, "det": 4}, lr=lr, max_eval_batches=2, **kw)
        if steps is not None:
            kw["steps"] = steps
        if batch_size is not None:
            kw["batch_size"] = {"cls": batch_size, "det": batch_size}
        return cls(lr=lr, **kw)


METRICS = {"cls": ("top1",), "det": ("mAP", "mAP50")}
TASK_OF = {"fashion-mnist": "cls", "trees": "det"}
FULL_LABELS = 60000  # Fashion-MNIST's whole training split
CKPT_EVERY = 1000  # at most this many steps between checkpoints (about 5 minutes of a cls run on 2 cores)


def downstream_datasets(root: Path, names: list[str], labels: list[int]) -> list[Dataset]:
    """The datasets of a plan under ``root`` (make downstream-data's folders), one per label budget
    of Fashion-MNIST; a missing or incomplete folder is refused, naming the command that makes it."""
    out = []
    for name in names:
        if name == "trees":
            out.append(Dataset("trees", "det", root / "trees", None))
            continue
        for n in labels:
            folder = root / ("fashion-mnist" if n == FULL_LABELS else f"fashion-mnist-{n}")
            out.append(Dataset(name, "cls", folder, n))
    for ds in out:
        if not (ds.root / "SOURCE.json").is_file():
            flag = "" if ds.labels in (None, 600, 6000, FULL_LABELS) else f" --labels {ds.labels}"
            raise FileNotFoundError(f"{ds.root} is missing or incomplete: run make downstream-data "
                                    f"(python tools/downstream_data.py{flag})")
    return out


def machine() -> str:
    """CPU model, cores this process may use, torch version: the "machine" of a row."""
    model = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = usable_cores()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{model}, {cores} cores{gpu}, torch {torch.__version__}"


def run_config(ds: Dataset, recipe: str, seed: int, proto: Protocol, out: Path, parent: Path | None = None) -> dict:
    """The training config of one run: the demo's recipe (``moe``) or the dense baseline's
    (``dense``) on the downstream dataset, its head's classes read from the data. With ``parent``
    (the run directory of that recipe's trained model) the model and decoder are the parent's,
    so a run from scratch has the architecture that the fine-tuned ones start from."""
    experiment = "synthetic_single_task" if recipe == "dense" else "synthetic"
    task = ds.task
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[
            f"experiment={experiment}", f"seed={seed}", "data.synthetic=null", f"data.img_size={proto.img_size[task]}",
            f"train.steps={proto.steps}", f"train.lr={proto.lr}", f"train.warmup_steps={proto.warmup()}",
            f"train.ckpt_every={min(max(1, proto.steps // 2), CKPT_EVERY)}", "train.eval_every=0",
            "train.expert_budget.experts=null", "train.sampling.tasks_per_step=1",
            f"tasks.{task}.batch_size={proto.batch_size[task]}", f"tasks.{task}.num_classes=null",
            f"eval.batch_size={proto.eval_batch_size}", "resume=true", f"output_dir={out}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["single_task"] = task
    cfg = prepare_config(cfg)
    cfg["tasks"][task].pop("class_names", None)  # (the synthetic recipe names its own classes)
    cfg["data"]["tasks"] = {task: data_entry(task, str(ds.root))}
    cfg["eval"]["max_batches"] = proto.max_eval_batches
    if parent is not None:
        pcfg = json.loads((Path(parent) / "config.json").read_text())
        cfg["model"] = {**pcfg["model"], "init_from": None, "init_routers_from": None, "upcycle_from": None,
                        "checkpoint": None}
        cfg["decoder"] = pcfg["decoder"]
    if task == "cls":
        cfg["tasks"][task]["transforms"] = {"hflip": 0.5, "scale": [0.6, 1.0]}  # photographs: mirror images
    return cfg


def _rows(ds: Dataset, seed: int, method: str, metrics: dict, trainable: int, params: int, flops: int,
          seconds: float, where: str) -> list[dict]:
    return [{"dataset": ds.name, "labels": ds.labels, "seed": seed, "method": method, "metric": m,
             "value": round(100 * float(metrics[m]), 2), "trainable_params": int(trainable), "params": int(params),
             "flops_per_image": int(flops), "train_seconds": round(float(seconds), 1), "machine": where}
            for m in METRICS[ds.task]]


def check_protocol(out: Path, proto: Protocol) -> None:
    """Record ``proto`` in the run folder ``out`` (``protocol.json``); a folder that another protocol
    (steps, batch, learning rate, input size, evaluation batches) made is refused, not read back or
    resumed under different settings."""
    mine = json.loads(json.dumps(asdict(proto)))
    path = out / "protocol.json"
    if path.is_file():
        theirs = json.loads(path.read_text())
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            said = ", ".join(f"{k}={a} there but {b} now" for k, (a, b) in sorted(diff.items()))
            raise ValueError(f"{out} was made with another protocol ({said}); pass another --runs folder "
                             "or remove that run")
    elif out.is_dir() and (out / "rows.json").is_file():
        return  # (a finished run from before run folders recorded their protocol)
    else:
        out.mkdir(parents=True, exist_ok=True)
        report.write_json(path, mine)


def run_method(ds: Dataset, method: str, seed: int, proto: Protocol, parents: Parents, runs: Path,
               log: Callable = print) -> list[dict]:
    """Train and evaluate one method (reading back a finished run); its rows."""
    out = runs / ds.key / f"{method}-s{seed}"
    check_protocol(out, proto)
    done = out / "rows.json"
    if done.is_file():
        return json.loads(done.read_text())
    where = machine()
    if method == "add_task":
        rows = _add_task(ds, seed, proto, parents, out, where, log)
    else:
        m = METHODS[method]
        cfg = run_config(ds, m.recipe, seed, proto, out,
                         parents.generalist if m.recipe == "moe" else parents.dense.get(ds.task))
        model, made = start_model(m, cfg, parents, log)
        trainer = Trainer(cfg, model=model)
        result = trainer.fit()
        final = trainer.eval_model
        size = proto.img_size[ds.task]
        rows = _rows(ds, seed, method, result["metrics"][ds.task], made["trainable"]["trainable"],
                     sum(p.numel() for p in final.parameters()), flops_per_image(final, ds.task, size),
                     result["train_seconds"], where)
        if method == "generalist_ft":  # the same fine-tuned model, routed top-1 at inference only
            top1 = with_top_k(final, 1)
            metrics = evaluate(top1, {ds.task: trainer.val_sets[ds.task]}, proto.eval_batch_size,
                               proto.max_eval_batches, progress=False)
            rows += _rows(ds, seed, "top1_infer", metrics[ds.task], made["trainable"]["trainable"],
                          sum(p.numel() for p in top1.parameters()), flops_per_image(top1, ds.task, size),
                          result["train_seconds"], where)
        report.write_json(out / "made.json", {k: v for k, v in made.items() if k != "new"})
    report.write_json(done, rows)
    return rows


def _add_task(ds: Dataset, seed: int, proto: Protocol, parents: Parents, out: Path, where: str, log) -> list[dict]:
    if parents.generalist is None:
        raise FileNotFoundError("method add_task grows the generalist, and none was given")
    name = ds.name.replace("-", "_")
    if out.exists() and not (out / "continual_report.json").is_file():
        shutil.rmtree(out)  # an interrupted add_task run starts again (it has no checkpoint to resume)
    rep = add_task_run(parents.generalist, name, ds.root, out, new_experts=2, steps=proto.steps, task_type=ds.task,
                       overrides={"batch_size": proto.batch_size[ds.task], "img_size": proto.img_size[ds.task]}, log=log)
    check_protocol(out, proto)  # (the folder was started afresh above)
    grown = load_model(out / "model.safetensors")
    return _rows(ds, seed, "add_task", rep["new_task_metrics"], rep["parameters"]["trainable"],
                 rep["parameters"]["total"], flops_per_image(grown, name, proto.img_size[ds.task]),
                 rep["train_seconds"], where)


def default_plan(ds: Dataset) -> tuple[str, ...]:
    """The methods ``make downstream`` runs on a dataset: every default one on trees and at the
    smallest Fashion-MNIST budget; at larger budgets those whose comparison depends on the labels
    (transfer against scratch, the cheap variants against full fine-tuning)."""
    return LABEL_SENSITIVE if ds.labels is not None and ds.labels > 600 else DEFAULT_METHODS


def run_all(datasets: Iterable[Dataset], methods: Iterable[str] | None, seeds: Iterable[int], proto: Protocol,
            parents: dict[int, Parents], runs: Path, log: Callable = print) -> list[dict]:
    """Every (dataset, seed, method) in turn (``methods`` None: each dataset's default plan); rows
    of all of them."""
    datasets, seeds = list(datasets), list(seeds)
    plan_of = {ds: list(methods) if methods is not None else list(default_plan(ds)) for ds in datasets}
    unknown = sorted({m for ms in plan_of.values() for m in ms} - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {list(ALL_METHODS)}")
    for seed in seeds:  # refused before hours of training, not in the middle
        for size in {proto.img_size[ds.task] for ds in datasets}:
            check_input_size(size, parents[seed])
        for m in {m for ms in plan_of.values() for m in ms}:
            kind = "generalist" if m == "add_task" else METHODS[m].parent
            for task in {ds.task for ds in datasets}:
                if kind and parents[seed].of(kind, task) is None:
                    raise FileNotFoundError(
                        f"method {m} starts from the {kind} {task} model of seed {seed}, and there is none: run "
                        + (f"make demo SEED={seed}" if kind == "generalist" else f"make baselines SEED={seed}"))
    rows = []
    plan = [(ds, seed, m) for seed in seeds for ds in datasets for m in plan_of[ds]]
    for i, (ds, seed, m) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {ds.key} seed {seed}: {m}")
        rows += run_method(ds, m, seed, proto, parents[seed], runs, log)
    return rows


def check_input_size(size: int, parents: Parents) -> None:
    """Refuse an input size that the parents' patches do not tile (the model would only say so
    at its first training step)."""
    for run in [parents.generalist, *parents.dense.values()]:
        if run is None:
            continue
        model = json.loads((Path(run) / "config.json").read_text())["model"]
        patch = model.get("patch_size") or MODEL_ARGS.get(model["name"], {}).get("patch_size")
        if patch and size % patch:
            raise ValueError(f"input size {size}: expected a multiple of {patch}, the patch size of "
                             f"{model['name']} in {run}")


def find_parents(seed: int, runs: Path = Path("runs"), tasks: Iterable[str] = ("cls", "det")) -> Parents:
    """One seed's parents among ``runs``: the newest complete ``make demo`` run of that seed
    (``synthetic-s<seed>-*``) and, per task, the best of ``make baselines``' dense runs of that seed
    (``dense_<task>-lr*-s<seed>-*``) on their validation split. Missing ones are None / absent."""
    def complete(p: Path) -> bool:
        return (p / "model.safetensors").is_file() and (p / "metrics.json").is_file()
    demos = sorted(p for p in runs.glob(f"synthetic-s{seed}-*") if complete(p))
    dense = {}
    for task in tasks:
        cands = [p for p in runs.glob(f"dense_{task}-lr*-s{seed}-*") if complete(p)]
        if cands:
            dense[task] = report.best_single_task_runs(cands)[task]["run"]
    return Parents(demos[-1] if demos else None, dense)
