import pytest
import torch

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
