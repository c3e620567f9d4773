#!/usr/bin/env python
"""Pre-train the generalist's encoder, decoder and queries on unlabelled images (Hydra config:
configs/train.yaml with a pre-training experiment).

    python tools/pretrain.py experiment=pretrain_glid                         # synthetic benchmark images
    python tools/pretrain.py experiment=pretrain_glid data.tasks.pretrain.format=images \\
        +data.tasks.pretrain.root=/path/to/images                             # any folder, searched recursively
    python tools/pretrain.py experiment=pretrain_glid resume=true             # continue a killed run
    python tools/pretrain.py experiment=pretrain_hybrid                       # multi-label + MIM + contrastive
    python tools/train.py experiment=synthetic model.init_from=runs/pretrain_glid   # then fine-tune

The run directory is a training run's (checkpoints, TensorBoard, logs, metrics.json with the
held-out reconstruction error next to its chance level) plus reconstructions.png.
"""
from __future__ import annotations


import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from moe_vision.cli import user_errors
from moe_vision.engine import report
from moe_vision.engine.builders import command_line_schedule, prepare_config
from moe_vision.engine.preemption import fit_to_the_end
from moe_vision.engine.trainer import Trainer

PRETRAIN_TYPES = ("mim", "hybrid")


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        cfg = command_line_schedule(prepare_config(OmegaConf.to_container(cfg, resolve=True)),
                                    list(HydraConfig.get().overrides.task))
        other = {t: c.get("type", t) for t, c in cfg["tasks"].items() if c.get("type", t) not in PRETRAIN_TYPES}
        if not cfg["tasks"] or other:
            raise ValueError(f"tools/pretrain.py trains pre-training objectives ({', '.join(PRETRAIN_TYPES)}); "
                             f"got tasks {other or 'none'}: pass experiment=pretrain_glid or "
                             "experiment=pretrain_hybrid, or use tools/train.py")
        trainer = Trainer(cfg)
        out = fit_to_the_end(trainer)
        if out is None:
            return
        print(f"\n{trainer.run_dir}: pre-trained {trainer.step} steps in {out['train_seconds']:.0f} s")
        print(report.metrics_table(out["metrics"], out["chance"]))


if __name__ == "__main__":
    main()
