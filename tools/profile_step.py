#!/usr/bin/env python
"""Where one training step's time goes: data, forward, loss (with matching), backward, optimizer.

    python tools/profile_step.py experiment=synthetic                  # the demo's configuration
    python tools/profile_step.py experiment=synthetic +profile.steps=10 tasks.det.batch_size=32

Builds the same trainer as tools/train.py (nothing is written to a run directory), runs warm-up
steps, then times ``profile.steps`` optimizer steps under torch.profiler and prints milliseconds
per step for every named phase.
"""
from __future__ import annotations

import tempfile

import hydra
from omegaconf import DictConfig, OmegaConf

from moe_vision.cli import user_errors
from moe_vision.engine.builders import prepare_config
from moe_vision.engine.profile import phase_table, profile_steps
from moe_vision.engine.trainer import Trainer


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        cfg = prepare_config(OmegaConf.to_container(cfg, resolve=True))
        opts = cfg.pop("profile", None) or {}
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer({**cfg, "output_dir": tmp})
            phases, per_step = profile_steps(trainer, int(opts.get("steps", 5)), int(opts.get("warmup", 2)))
        print(phase_table(phases, per_step))


if __name__ == "__main__":
    main()
