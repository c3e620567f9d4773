"""Longer checks, excluded from `make test` (run with `make test-slow`)."""
import pytest


@pytest.mark.slow
def test_demo_model_learns_classification_far_above_chance(tmp_path):
    """The demo configuration trained on classification alone for 200 steps beats chance by 2x."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from moe_vision.data.synthetic import SyntheticConfig, generate
    from moe_vision.engine.builders import prepare_config
    from moe_vision.engine.trainer import Trainer
    from tests.test_engine import CONFIGS

    splits = {"cls": {"train": 2600, "val": 260}}
    root = generate(tmp_path / "syn", SyntheticConfig(seed=1, splits=splits))
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=synthetic", f"data.root={root}", "data.synthetic=null",
                                          "+single_task=cls", "train.sampling.tasks_per_step=1", "train.steps=200",
                                          "train.ckpt_every=0", f"output_dir={tmp_path / 'run'}", "device=cpu"])
    out = Trainer(prepare_config(OmegaConf.to_container(cfg, resolve=True))).fit()
    assert out["metrics"]["cls"]["top1"] > 2 * out["chance"]["cls"]["top1"]
