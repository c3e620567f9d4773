#!/usr/bin/env python
"""Train the MoE generalist on heterogeneous single-task datasets (Hydra config: configs/train.yaml).

    python tools/train.py experiment=synthetic                              # the demo's main job
    python tools/train.py experiment=synthetic train.steps=2000 model=moe_vit_tiny
    python tools/train.py experiment=synthetic resume=true                  # continue a killed run
    python tools/train.py experiment=synthetic_single_task single_task=det  # dense single-task baseline
    python tools/train.py experiment=synthetic model.init_from=runs/pretrain_glid \
        train.stage=adapt adapters.enabled=true lv.enabled=true           # adapt: pre-trained tensors frozen
    python tools/train.py experiment=synthetic model.init_from=runs/adapted adapters.enabled=true \
        lv.enabled=true                                                    # then fine-tune everything
    torchrun --nproc_per_node 2 tools/train.py experiment=synthetic          # data parallel (DDP) on 2 ranks
    torchrun --nproc_per_node 2 tools/train.py experiment=synthetic dist.strategy=fsdp dist.expert_parallel=2
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


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        cfg = command_line_schedule(prepare_config(OmegaConf.to_container(cfg, resolve=True)),
                                    list(HydraConfig.get().overrides.task))
        trainer = Trainer(cfg)
        out = fit_to_the_end(trainer)
        if out is None:
            return
        print(f"\n{trainer.run_dir}: trained {trainer.step} steps in {out['train_seconds']:.0f} s")
        print(report.metrics_table(out["metrics"], out["chance"]))
        usage = report.usage_summary(out["usage"])
        if usage:  # a dense model has no experts to report
            print("expert usage (top experts per task, share of selections):")
            print("\n".join("  " + line for line in usage))


if __name__ == "__main__":
    main()
