"""Longer checks, excluded from `make test` (run with `make test-slow`)."""
import pytest


@pytest.mark.slow
def test_demo_recipe_learns_every_task_far_above_chance(tmp_path):
    """The demo's configuration, trained for half its steps on a smaller copy of the benchmark
    (about 5 minutes on 2 CPU cores): every task's metric is far above its chance level, with every
    task narrowed to its expert budget."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_vision.data.synthetic import SyntheticConfig, generate
    from moe_vision.engine.builders import prepare_config
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import CONFIGS

    splits = {"cls": {"train": 2000, "val": 260}, "det": {"train": 1000, "val": 150},
              "seg": {"train": 1000, "val": 150}}
    root = generate(tmp_path / "syn", SyntheticConfig(seed=1, splits=splits))
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic", f"data.root={root}", "data.synthetic=null",
                                          "train.steps=500", "train.ckpt_every=0", "train.eval_every=0",
                                          f"output_dir={tmp_path / 'run'}", "device=cpu"])
    trainer = Trainer(prepare_config(OmegaConf.to_container(cfg, resolve=True)))
    out = trainer.fit()
    metrics, chance = out["metrics"], out["chance"]
    # At 500 steps cls is at the start of its rise: top-1 0.30 with the recipe's expert budget and
    # 0.35 without it (top-5 0.82 and 0.73; 2 threads, 2026-12-06), against chance 0.077 (top-5
    # 0.38). Top-1 moves most from run to run at this point, so the stronger check is on top-5:
    # its error at most half the chance ranking's.
    assert metrics["cls"]["top1"] > 3 * chance["cls"]["top1"], metrics
    assert 1 - metrics["cls"]["top5"] < 0.5 * (1 - chance["cls"]["top5"]), metrics
    assert metrics["seg"]["mIoU"] > 2 * chance["seg"]["mIoU"], metrics
    assert metrics["det"]["mAP50"] > 0.1 and chance["det"]["mAP50"] < 0.01, metrics
    # The recipe's expert budget: every task may choose 2 experts per MoE layer, so its bundle is compact.
    masks = trainer.model.backbone.allowed_experts()
    assert masks and all(len(experts) == 2 for per_task in masks.values() for experts in per_task.values())
