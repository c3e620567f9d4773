"""Parameter-efficient fine-tuning of a bundle on a new dataset of the same task type, with the
bundle's head or a new one sized from the data (a label space of its own)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ..engine.builders import data_label_space
from ..engine.optim import TRAINABLE, set_trainable as _set_trainable
from ..engine.trainer import Trainer
from .bundle import bundle_task, load_bundle
from .continual_run import CONFIGS, data_entry

__all__ = ["TRAINABLE", "finetune_bundle", "set_trainable"]


def set_trainable(model, which: str) -> dict[str, int]:
    """:func:`moe_vision.engine.optim.set_trainable` with errors naming the tool's ``--trainable``."""
    return _set_trainable(model, which, "--trainable")


def finetune_bundle(bundle: str | Path, data_dir: str | Path, out: str | Path, trainable: str = "head",
                    steps: int = 200, lr: float = 5e-4, batch_size: int = 32, log=print,
                    task: str | None = None, new_head: bool = False, num_classes: int | None = None) -> dict | None:
    """Fine-tune ``task`` of a bundle (its only task by default) on a dataset in the task's layout.

    ``new_head``: replace the task's head with a new one sized from the data (``num_classes`` where
    the data does not name its classes); without it the data's classes must match the head's."""
    model = load_bundle(bundle)
    task = bundle_task(model.bundle_info, task)
    spec = model.spec(task)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    if num_classes is not None and not new_head:
        raise ValueError("--num-classes sizes a new head; add --new-head (the bundle's head keeps its "
                         f"{spec.num_classes} classes)")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"+task@tasks.{task}={spec.type_name}", "data.synthetic=null",
                                          f"data.img_size={model.backbone.config['img_size']}", f"output_dir={out}",
                                          f"train.steps={steps}", f"train.lr={lr}", "train.warmup_steps=10",
                                          f"tasks.{task}.batch_size={batch_size}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["data"]["tasks"] = {task: data_entry(spec.type_name, str(data_dir))}
    if spec.type_name in ("cls", "det", "seg"):
        n, names = data_label_space(task, cfg["tasks"][task], cfg["data"], num_classes)
        if new_head:
            model.new_head(task, n, names)
            log(f"new '{task}' head for {n} classes" + (f" ({', '.join(names[:4])}{', ...' if n > 4 else ''})"
                                                        if names else ""))
        elif n != spec.num_classes:
            raise ValueError(f"--data {data_dir} has {n} classes but the bundle's '{task}' head has "
                             f"{spec.num_classes}; add --new-head to fine-tune a new head sized from the data")
    elif new_head:
        raise ValueError(f"--new-head: task '{task}' ({spec.type_name}) has no classes; its head is fine-tuned as it is")
    spec = model.spec(task)
    cfg["tasks"][task].update({k: v for k, v in spec.config().items() if k != "loss_weights"})
    counts = set_trainable(model, trainable)
    log(f"fine-tuning '{task}' ({trainable}): {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    trainer = Trainer(cfg, model=model)
    result = trainer.fit()
    trainer.dist.shutdown()
    if not trainer.dist.is_main:  # under torchrun only rank 0 evaluates and reports
        return None
    return {"task": task, "trainable": trainable, "new_head": new_head, "num_classes": spec.num_classes,
            "parameters": counts, "metrics": result["metrics"][task]}
