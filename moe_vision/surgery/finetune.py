"""Parameter-efficient fine-tuning of a bundle on a new dataset of the same task."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

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
                    task: str | None = None) -> dict | None:
    """Fine-tune ``task`` of a bundle (its only task by default) on a dataset in the task's layout."""
    model = load_bundle(bundle)
    task = bundle_task(model.bundle_info, task)
    spec = model.spec(task)
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    counts = set_trainable(model, trainable)
    log(f"fine-tuning '{task}' ({trainable}): {counts['trainable']:,} trainable of {counts['total']:,} parameters")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=[f"+task@tasks.{task}={spec.type_name}", "data.synthetic=null",
                                          f"data.img_size={model.backbone.config['img_size']}", f"output_dir={out}",
                                          f"train.steps={steps}", f"train.lr={lr}", "train.warmup_steps=10",
                                          f"tasks.{task}.batch_size={batch_size}"])
    cfg = OmegaConf.to_container(cfg, resolve=True)
    cfg["tasks"][task].update({k: v for k, v in spec.config().items() if k != "loss_weights"})
    cfg["data"]["tasks"] = {task: data_entry(spec.type_name, str(data_dir))}
    trainer = Trainer(cfg, model=model)
    result = trainer.fit()
    trainer.dist.shutdown()
    if not trainer.dist.is_main:  # under torchrun only rank 0 evaluates and reports
        return None
    return {"task": task, "trainable": trainable, "parameters": counts, "metrics": result["metrics"][task]}
