"""Build datasets and models from the resolved config (plain dicts)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from ..data import (ADE20KDataset, CocoDetectionDataset, DepthDataset, ImageFolderDataset, build_transforms)
from ..data.readers import set_decoder
from ..decoder import DEFAULT_NUM_QUERIES
from ..models import build_model as build_backbone, load_model
from ..tasks import GeneralistModel

# Keys of a task config that steer training, not the head.
TRAINING_KEYS = ("batch_size", "loss_weight", "transforms")


def head_config(task_cfg: Mapping[str, Any]) -> dict:
    return {k: v for k, v in task_cfg.items() if k not in TRAINING_KEYS}


def task_transforms(task: str, task_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], train: bool):
    """The task's pipeline: input geometry from the task config (``img_size``, default
    ``data.img_size``; ``resize``, ``max_size``, ``crop_pct``), augmentations from its ``transforms``."""
    tf = dict(task_cfg.get("transforms") or {})
    return build_transforms(task_cfg.get("type", task), train, int(task_cfg.get("img_size") or data_cfg["img_size"]),
                            hflip=float(tf.get("hflip", 0.0)), scale=tf.get("scale"), resize=task_cfg.get("resize"),
                            max_size=task_cfg.get("max_size"), jitter=tf.get("jitter"),
                            crop_pct=float(task_cfg.get("crop_pct") or 0.875))


def build_dataset(task: str, task_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], split: str, train: bool):
    """The dataset of ``task`` for ``split`` ("train"/"val") in the format named by ``data.tasks.<task>``."""
    entries = data_cfg.get("tasks") or {}
    if task not in entries:
        raise ValueError(f"task {task!r} has no dataset: add data.tasks.{task} (format and folders) to the "
                         f"data config; it has {sorted(entries)}")
    d = dict(entries[task])
    fmt = d.get("format")
    transform = task_transforms(task, task_cfg, data_cfg, train)
    if fmt == "imagefolder":
        # Label i is the i-th class folder of the training split, whichever split is read.
        train_dir = Path(d["root"]) / d.get("train_split", "train")
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir()) if train_dir.is_dir() else None
        dataset = ImageFolderDataset(d["root"], d.get(f"{split}_split", split), transform, classes)
    elif fmt == "coco":
        dataset = CocoDetectionDataset(d[f"{split}_ann"], d[f"{split}_images"], transform)
    elif fmt == "ade20k":
        dataset = ADE20KDataset(d["root"], split, transform, reduce_zero_label=bool(d.get("reduce_zero_label", True)))
    elif fmt == "nyu_depth":
        dataset = DepthDataset(d["root"], split, transform, max_depth=float(d.get("max_depth", 10.0)))
    elif fmt in ("images", "task_images"):
        dataset = pretraining_dataset(task, task_cfg, data_cfg, d, split, transform)
    else:
        raise ValueError(f"data.tasks.{task}.format={fmt!r}; expected one of imagefolder, coco, ade20k, nyu_depth, "
                         "images, task_images")
    set_decoder(dataset, data_cfg.get("decoder") or "auto")
    return dataset


def pretraining_dataset(task: str, task_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any],
                        entry: Mapping[str, Any], split: str, transform):
    """Pre-training images: ``format: images`` reads ``root/<split>`` (or ``root`` itself when it
    has no such sub-folder) recursively; ``format: task_images`` takes the images of the data
    config's tasks named in ``from``. Masked image modelling ignores their labels; the hybrid
    objective reads them for its multi-label term (``class_names.<task>`` names the classes of
    a source whose reader does not know them, e.g. segmentation label maps)."""
    from ..data.readers import images_under
    from ..pretrain import UnlabelledImages
    p, ratio, norm = int(task_cfg["patch_size"]), float(task_cfg.get("mask_ratio", 0.75)), bool(task_cfg.get("norm_pix", True))
    if entry["format"] == "images":
        root = Path(entry["root"])
        paths = images_under(root / split if (root / split).is_dir() else root)
        sources = {"images": UnlabelledImages(paths, None, p, 0.0)}
    else:
        names = list(entry.get("from") or [])
        if not names:
            raise ValueError(f"data.tasks.{task}.from is empty: name the tasks whose images to pre-train on")
        sources = {}
        for name in names:
            if name not in (data_cfg.get("tasks") or {}) or name == task:
                raise ValueError(f"data.tasks.{task}.from names {name!r}, which is not another task of the data config")
            sources[name] = build_dataset(name, {}, data_cfg, split, False)
        paths = [path for d in sources.values() for path in d.image_paths()]
    if task_cfg.get("type") != "hybrid":
        return UnlabelledImages(paths, transform, p, ratio, norm, held_out=split != "train")
    from ..pretrain.hybrid import HybridPretrainingTask, TwoViewImages
    weights = {**HybridPretrainingTask.loss_defaults, **(task_cfg.get("loss_weights") or {})}
    for d in sources.values():
        d.transform = None  # whole images and labels; the two views are augmented afterwards
    views = task_transforms("mim", {**task_cfg, "type": "mim"}, data_cfg, True)  # random views also for validation
    dataset = TwoViewImages(sources, views, p, ratio if float(weights["mim"]) > 0 else 0.0,
                            entry.get("class_names"), norm, held_out=split != "train")
    if float(weights["multilabel"]) > 0 and not len(dataset.labels):
        raise ValueError(f"data.tasks.{task}: none of the sources has labels for the multi-label term; "
                         f"set tasks.{task}.loss_weights.multilabel=0 or add labelled sources to 'from'")
    return dataset


def check_num_classes(task: str, task_cfg: Mapping[str, Any], dataset) -> None:
    """Readers that know their class names (ImageFolder, COCO) must agree with the head's size."""
    classes = getattr(dataset, "classes", None)
    want = int(task_cfg.get("num_classes") or 0)
    if classes is not None and want and want != len(classes):
        raise ValueError(f"tasks.{task}.num_classes={want} but the {task} dataset has {len(classes)} classes "
                         f"({describe(dataset)}); set tasks.{task}.num_classes={len(classes)} or null (read from the data)")


def describe(dataset) -> str:
    for attr in ("ann_file", "folder"):
        if getattr(dataset, attr, None) is not None:
            return str(getattr(dataset, attr))
    return type(dataset).__name__


def resolve_num_classes(tasks_cfg: dict, train_sets: Mapping[str, Any]) -> None:
    """Fill a task's ``num_classes`` left at null from its training data (class folders, COCO
    categories); refuse a given value that disagrees with the data, and a null one the data
    cannot answer (segmentation label maps do not name their classes)."""
    for task, dataset in train_sets.items():
        tc = tasks_cfg[task]
        if tc.get("type", task) not in ("cls", "det", "seg"):
            continue
        if tc.get("num_classes") is None:
            classes = getattr(dataset, "classes", None)
            if classes is None:
                raise ValueError(f"tasks.{task}.num_classes is null and {describe(dataset)} does not name its classes; "
                                 "state it (ADE20K: 150 with reduce_zero_label)")
            tc["num_classes"] = len(classes)
        check_num_classes(task, tc, dataset)


def data_label_space(task: str, task_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any],
                     num_classes: int | None = None, flag: str = "--num-classes") -> tuple[int, list[str] | None]:
    """``(number of classes, class names or None)`` of ``task``'s training data, for a head sized
    from the data. ``num_classes`` (the tool option ``flag``) is needed where the data does not
    name its classes (segmentation label maps) and must agree with data that does."""
    dataset = build_dataset(task, task_cfg, data_cfg, "train", False)
    if len(dataset) == 0:
        raise ValueError(f"{describe(dataset)} holds no training images")
    names = getattr(dataset, "classes", None)
    if names is None:
        if num_classes is None:
            raise ValueError(f"{describe(dataset)} does not name its classes; give their number with {flag} N")
        return int(num_classes), None
    if num_classes is not None and int(num_classes) != len(names):
        raise ValueError(f"{flag} {num_classes} but {describe(dataset)} has {len(names)} classes ({', '.join(names[:5])}"
                         f"{', ...' if len(names) > 5 else ''})")
    return len(names), list(names)


def drop_missing_optional(cfg: Mapping[str, Any]) -> tuple[dict, list[str]]:
    """The config without the tasks whose data entry is ``optional: true`` and whose folder (or
    annotation file) is missing (e.g. NYU depth in experiment=real), and their names."""
    entries = (cfg.get("data") or {}).get("tasks") or {}
    missing = {}
    for task in cfg["tasks"]:
        d = entries.get(task) or {}
        where = d.get("root") or d.get("train_ann")
        if d.get("optional") and where and not Path(where).exists():
            missing[task] = where
    if missing and len(missing) == len(cfg["tasks"]):
        raise FileNotFoundError(f"no task has its data: {', '.join(map(str, missing.values()))} do not exist")
    return {**cfg, "tasks": {t: c for t, c in cfg["tasks"].items() if t not in missing}}, list(missing)


def command_line_schedule(cfg: Mapping[str, Any], overrides: list[str], log=print) -> dict:
    """The training length as the command line says it: an explicit ``train.steps=N`` replaces a
    recipe's ``train.epochs`` (said in one line); both on the command line is an error."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    epochs = cfg["train"].get("epochs")
    if "train.steps" in keys and "train.epochs" in keys and epochs:
        raise ValueError(f"train.steps={cfg['train']['steps']} and train.epochs={epochs} are both on the command "
                         "line; give one of them")
    if "train.steps" in keys and epochs:
        log(f"train.steps={cfg['train']['steps']} from the command line replaces the recipe's train.epochs={epochs}")
        cfg = {**cfg, "train": {**cfg["train"], "epochs": None}}
    return dict(cfg)


def steps_for_epochs(train_cfg: Mapping[str, Any], tasks_cfg: Mapping[str, Any],
                     sizes: Mapping[str, int]) -> int | None:
    """``train.steps`` for ``train.epochs`` epochs of ``train.epoch_task`` (default: the largest
    training set): its images / (batch size x the expected number of its batches per step)."""
    epochs = train_cfg.get("epochs")
    if not epochs:
        return None
    from ..data import task_probabilities
    task = train_cfg.get("epoch_task") or max(sizes, key=sizes.get)
    if task not in sizes:
        raise ValueError(f"train.epoch_task={task!r} is not among the tasks {sorted(sizes)}")
    sampling = train_cfg.get("sampling") or {}
    share = task_probabilities(sizes, sampling.get("strategy", "temperature"), float(sampling.get("temperature", 2.0)))
    per_step = min(1.0, share[task] * int(sampling.get("tasks_per_step", 1)))
    return max(1, math.ceil(float(epochs) * sizes[task] / (int(tasks_cfg[task]["batch_size"]) * per_step)))


def decoder_queries(decoder_cfg: Mapping[str, Any] | None, tasks: Mapping[str, Mapping[str, Any]]) -> dict:
    """The decoder config with ``num_queries: auto`` resolved: enough for every task (at least
    :data:`~moe_vision.decoder.DEFAULT_NUM_QUERIES`; 100 with a detection task, DETR's count; one
    per class for class-wise segmentation)."""
    dec = dict(decoder_cfg or {})
    if dec.get("num_queries") in (None, "auto"):
        need = [DEFAULT_NUM_QUERIES]
        for t in tasks.values():
            if t.get("type") == "det":
                need.append(100)
            if t.get("type") == "seg" and t.get("mode", "classwise") == "classwise":
                need.append(int(t.get("num_classes") or 0))
        dec["num_queries"] = max(need)
    return dec


def build_generalist(cfg: Mapping[str, Any]) -> GeneralistModel:
    # Each task records its input size, so prediction and serving resize as training did.
    img_size = (cfg.get("data") or {}).get("img_size")
    tasks = {name: {**head_config(t), "img_size": t.get("img_size") or img_size} for name, t in cfg["tasks"].items()}
    if not tasks:
        raise ValueError("no tasks configured: choose an experiment (experiment=synthetic) or set tasks")
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("init_from", "init_routers_from", "init_keep")}
    backbone = build_backbone(model_cfg, list(tasks))
    for name, t in tasks.items():
        if "patch_size" in t and int(t["patch_size"]) != backbone.patch_size:
            raise ValueError(f"tasks.{name}.patch_size={t['patch_size']} but the backbone's patch size is "
                             f"{backbone.patch_size}; set tasks.{name}.patch_size={backbone.patch_size}")
    return GeneralistModel(backbone, tasks, decoder_queries(cfg.get("decoder"), tasks), cfg.get("adapters"),
                           cfg.get("lv"))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


def resolve_checkpoint(checkpoint: str | Path) -> tuple[Path, dict | None]:
    """A run directory or a model file -> (model file, the run's resolved config if there is one)."""
    checkpoint = Path(checkpoint)
    model_file = checkpoint / "model.safetensors" if checkpoint.is_dir() else checkpoint
    if not model_file.is_file():
        raise FileNotFoundError(f"checkpoint {model_file} does not exist (pass a run directory or a .safetensors)")
    cfg_file = model_file.parent / "config.json"
    return model_file, json.loads(cfg_file.read_text()) if cfg_file.is_file() else None


def load_generalist(checkpoint: str | Path) -> tuple[GeneralistModel, Path, dict | None]:
    """(model, model file, run config or None) of a run directory or model file."""
    model_file, run_cfg = resolve_checkpoint(checkpoint)
    model = load_model(model_file)
    if not isinstance(model, GeneralistModel):
        raise ValueError(f"{model_file} holds a backbone only; this needs a trained generalist (tools/train.py)")
    return model, model_file, run_cfg


def run_dir_of(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["output_dir"])


def prepare_config(cfg: Mapping[str, Any]) -> dict:
    """Apply conveniences to a resolved config: ``single_task`` keeps only that task."""
    cfg = dict(cfg)
    single = cfg.get("single_task")
    if single:
        if single not in cfg["tasks"]:
            raise ValueError(f"single_task={single!r} is not among the configured tasks {sorted(cfg['tasks'])}")
        cfg["tasks"] = {single: cfg["tasks"][single]}
    return cfg
