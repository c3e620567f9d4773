"""Build datasets and models from the resolved config (plain dicts)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ..data import (ADE20KDataset, CocoDetectionDataset, DepthDataset, ImageFolderDataset, build_transforms)
from ..models import build_model as build_backbone, load_model
from ..tasks import GeneralistModel

# Keys of a task config that steer training, not the head.
TRAINING_KEYS = ("batch_size", "loss_weight", "transforms")


def head_config(task_cfg: Mapping[str, Any]) -> dict:
    return {k: v for k, v in task_cfg.items() if k not in TRAINING_KEYS}


def build_dataset(task: str, task_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any], split: str, train: bool):
    """The dataset of ``task`` for ``split`` ("train"/"val") in the format named by ``data.tasks.<task>``."""
    entries = data_cfg.get("tasks") or {}
    if task not in entries:
        raise ValueError(f"task {task!r} has no dataset: add data.tasks.{task} (format and folders) to the "
                         f"data config; it has {sorted(entries)}")
    d = dict(entries[task])
    fmt = d.get("format")
    tf_cfg = dict(task_cfg.get("transforms") or {})
    transform = build_transforms(task_cfg.get("type", task), train, int(data_cfg["img_size"]),
                                 hflip=float(tf_cfg.get("hflip", 0.0)), scale=tf_cfg.get("scale"))
    if fmt == "imagefolder":
        return ImageFolderDataset(d["root"], d.get(f"{split}_split", split), transform)
    if fmt == "coco":
        return CocoDetectionDataset(d[f"{split}_ann"], d[f"{split}_images"], transform)
    if fmt == "ade20k":
        return ADE20KDataset(d["root"], split, transform, reduce_zero_label=bool(d.get("reduce_zero_label", True)))
    if fmt == "nyu_depth":
        return DepthDataset(d["root"], split, transform, max_depth=float(d.get("max_depth", 10.0)))
    if fmt in ("images", "task_images"):
        return pretraining_dataset(task, task_cfg, data_cfg, d, split, transform)
    raise ValueError(f"data.tasks.{task}.format={fmt!r}; expected one of imagefolder, coco, ade20k, nyu_depth, "
                     "images, task_images")


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
    tf = dict(task_cfg.get("transforms") or {})
    views = build_transforms("mim", True, int(data_cfg["img_size"]), hflip=float(tf.get("hflip", 0.0)),
                             scale=tf.get("scale"))  # random views also for validation (retrieval)
    dataset = TwoViewImages(sources, views, p, ratio if float(weights["mim"]) > 0 else 0.0,
                            entry.get("class_names"), norm, held_out=split != "train")
    if float(weights["multilabel"]) > 0 and not len(dataset.labels):
        raise ValueError(f"data.tasks.{task}: none of the sources has labels for the multi-label term; "
                         f"set tasks.{task}.loss_weights.multilabel=0 or add labelled sources to 'from'")
    return dataset


def check_num_classes(task: str, task_cfg: Mapping[str, Any], dataset) -> None:
    """Readers that know their class names (ImageFolder, COCO) must agree with the head's size."""
    classes = getattr(dataset, "classes", None)
    want = int(task_cfg.get("num_classes", 0))
    if classes is not None and want and want != len(classes):
        raise ValueError(f"tasks.{task}.num_classes={want} but the {task} dataset has {len(classes)} classes")


def build_generalist(cfg: Mapping[str, Any]) -> GeneralistModel:
    tasks = {name: head_config(t) for name, t in cfg["tasks"].items()}
    if not tasks:
        raise ValueError("no tasks configured: choose an experiment (experiment=synthetic) or set tasks")
    model_cfg = {k: v for k, v in cfg["model"].items() if k not in ("init_from", "init_routers_from", "init_keep")}
    backbone = build_backbone(model_cfg, list(tasks))
    for name, t in tasks.items():
        if "patch_size" in t and int(t["patch_size"]) != backbone.patch_size:
            raise ValueError(f"tasks.{name}.patch_size={t['patch_size']} but the backbone's patch size is "
                             f"{backbone.patch_size}; set tasks.{name}.patch_size={backbone.patch_size}")
    return GeneralistModel(backbone, tasks, cfg.get("decoder"), cfg.get("adapters"), cfg.get("lv"))


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
