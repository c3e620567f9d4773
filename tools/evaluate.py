#!/usr/bin/env python
"""Evaluate a trained model on the validation splits (same Hydra config as training).

    python tools/evaluate.py experiment=synthetic eval.checkpoint=runs/synthetic
    python tools/evaluate.py experiment=synthetic eval.checkpoint=runs/synthetic/model.safetensors eval.max_batches=2

Writes metrics.json, chance_metrics.json, expert_usage.json/.png and the detection results JSON
into ``eval.out`` (default: the checkpoint's run directory) and prints the metrics table.
"""
from __future__ import annotations


import hydra
from omegaconf import DictConfig, OmegaConf

from moe_vision.cli import user_errors
from moe_vision.engine.evaluate import evaluate_run
from moe_vision.engine import report


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        out = evaluate_run(OmegaConf.to_container(cfg, resolve=True))
        print(report.metrics_table(out["metrics"], out["chance"]))
        for line in report.usage_summary(out["usage"]):
            print("  " + line)
        print(f"wrote {out['out_dir']}/metrics.json")


if __name__ == "__main__":
    main()
