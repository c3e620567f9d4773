"""Longer checks, excluded from `make test` (run with `make test-slow`)."""
import pytest


@pytest.mark.slow
def test_demo_recipe_learns_every_task_far_above_chance(tmp_path):
    """The demo's configuration, trained for half its steps on a smaller copy of the benchmark
    (about 5 minutes on 2 CPU cores): every task's metric is far above its chance level."""
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
    out = Trainer(prepare_config(OmegaConf.to_container(cfg, resolve=True))).fit()
    metrics, chance = out["metrics"], out["chance"]
    assert metrics["cls"]["top1"] > 4 * chance["cls"]["top1"]
    assert metrics["seg"]["mIoU"] > 2 * chance["seg"]["mIoU"]
    assert metrics["det"]["mAP50"] > 0.1 and chance["det"]["mAP50"] < 0.01
