#!/usr/bin/env python
"""Build a backbone from the Hydra model config and show what it is.

    python tools/inspect_model.py                                  # nano model, tasks cls/det/seg
    python tools/inspect_model.py model=moe_vit_small model.moe.num_experts=16 model.moe.granularity=4
    python tools/inspect_model.py model.upcycle_from=vit_s16.safetensors model=moe_vit_small
"""
from __future__ import annotations


import hydra
from omegaconf import DictConfig, OmegaConf

from moe_vision.cli import user_errors
from moe_vision.models import build_model, save_model
from moe_vision.models.summary import summarize


@hydra.main(config_path="../configs", config_name="inspect", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        tasks = list(cfg.tasks)
        model = build_model(OmegaConf.to_container(cfg.model, resolve=True), tasks)
        text, _ = summarize(model, tasks, cfg.batch_size, cfg.seed, cfg.device)
        print(text)
        if cfg.save:
            print(f"saved {save_model(model, cfg.save)}")


if __name__ == "__main__":
    main()
