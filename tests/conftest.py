import moe_vision  # noqa: F401  first: it sets MKL's reproducible mode before torch runs (moe_vision/exactness.py)
import pytest
import torch

SERVE_TASKS = {"cls": {"type": "cls", "num_classes": 13}, "det": {"type": "det", "num_classes": 13},
               "seg": {"type": "seg", "num_classes": 14}, "depth": {"type": "depth"}}
TINY_SPLITS = {"cls": {"train": 26, "val": 13}, "det": {"train": 12, "val": 6},
               "seg": {"train": 12, "val": 6}, "depth": {"train": 12, "val": 6}}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic benchmark (all four tasks), generated once per test session."""
    from moe_vision.data.synthetic import SyntheticConfig, generate
    root = tmp_path_factory.mktemp("synthetic") / "data"
    return generate(root, SyntheticConfig(seed=0, img_size=32, splits=TINY_SPLITS, max_size=0.6, min_size=0.2))


@pytest.fixture(scope="session")
def ten_classes(synthetic_root, tmp_path_factory):
    """The synthetic cls data with 10 of its 13 class folders: a dataset with a label space of its own."""
    import shutil
    root = tmp_path_factory.mktemp("ten") / "cls10"
    for split in ("train", "val"):
        for c in sorted(p.name for p in (synthetic_root / "cls" / "train").iterdir())[:10]:
            shutil.copytree(synthetic_root / "cls" / split / c, root / split / c)
    return root


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory):
    """A 2-step cls + det + seg run (``run/``) and its det and seg bundles (``experts/<task>``)."""
    from moe_vision.engine.trainer import Trainer
    from moe_vision.surgery.pipeline import extract_bundle
    from tests.test_engine import make_cfg
    base = tmp_path_factory.mktemp("export")
    run = base / "run"
    Trainer(make_cfg(synthetic_root, run, "train.steps=2", "eval.periodic_images=0")).fit()
    for task in ("det", "seg"):
        extract_bundle(run, task, base / "experts" / task, "selected", latency_calls=4, log=lambda m: None)
    return base


@pytest.fixture(scope="session")
def four_task_run(synthetic_root, tmp_path_factory):
    """An untrained nano generalist with all four task types, saved as a run directory (for the server)."""
    import json
    from moe_vision.engine.builders import build_generalist
    from moe_vision.models import save_model
    from moe_vision.moe import ExpertUsage
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("serve") / "run"
    run.mkdir()
    data = {"root": str(synthetic_root), "img_size": 32, "tasks": {
        "cls": {"format": "imagefolder", "root": str(synthetic_root / "cls")},
        "det": {"format": "coco", "val_ann": str(synthetic_root / "det/annotations/instances_val.json"),
                "val_images": str(synthetic_root / "det/val")},
        "seg": {"format": "ade20k", "root": str(synthetic_root / "seg"), "reduce_zero_label": False},
        "depth": {"format": "nyu_depth", "root": str(synthetic_root / "depth")}}}
    cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}}, "data": data,
           "tasks": SERVE_TASKS, "decoder": {"dim": 32, "num_queries": 14, "num_layers": 1, "num_heads": 2}}
    model = build_generalist(cfg).eval()
    save_model(model, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps(cfg))
    usage = ExpertUsage(model.backbone.moe_layers(), list(SERVE_TASKS))
    with torch.no_grad():
        for task in SERVE_TASKS:
            usage.update(model(torch.randn(2, 3, 32, 32), task, return_routing=True)[1])
    (run / "expert_usage.json").write_text(json.dumps(usage.to_dict()))
    return run
