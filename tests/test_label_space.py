"""Adapting to a dataset with its own label space: a 10-class dataset on the 13-class tiny model,
through finetune (``--new-head``), add_task (a head sized from the data) and ``model.init_from``
(a head of another shape stays new)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from moe_vision.engine.builders import build_generalist
from moe_vision.pretrain.transfer import init_from_pretrained
from moe_vision.surgery.continual_run import add_task_run
from moe_vision.surgery.finetune import finetune_bundle
from moe_vision.surgery.pipeline import extract_bundle
from tests.tool_run import run_child


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def cls_bundle(tiny_run):
    out = tiny_run / "experts" / "cls"
    if not out.exists():
        extract_bundle(tiny_run / "run", "cls", out, "selected", latency_calls=4, log=_quiet)
    return out


def test_finetune_refuses_another_label_space_without_new_head_and_sizes_a_new_head_from_the_data(
        cls_bundle, ten_classes, tmp_path):
    with pytest.raises(ValueError, match="has 10 classes but the bundle's 'cls' head has 13; add --new-head"):
        finetune_bundle(cls_bundle, ten_classes, tmp_path / "a", steps=1, batch_size=4, log=_quiet)
    with pytest.raises(ValueError, match="--num-classes sizes a new head; add --new-head"):
        finetune_bundle(cls_bundle, ten_classes, tmp_path / "b", steps=1, num_classes=10, log=_quiet)
    with pytest.raises(ValueError, match="--num-classes 9 but .* has 10 classes"):
        finetune_bundle(cls_bundle, ten_classes, tmp_path / "c", steps=1, new_head=True, num_classes=9, log=_quiet)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before anything is written

    out = tmp_path / "ft"
    rep = finetune_bundle(cls_bundle, ten_classes, out, "all", steps=2, batch_size=4, new_head=True, log=_quiet)
    names = sorted(p.name for p in (ten_classes / "train").iterdir())
    assert rep["num_classes"] == 10 and 0 <= rep["metrics"]["top1"] <= 1
    cfg = json.loads((out / "config.json").read_text())["tasks"]["cls"]
    assert cfg["num_classes"] == 10 and cfg["class_names"] == names
    weights = load_file(str(out / "model.safetensors"))
    assert weights["heads.cls.weight"].shape[0] == 10
    # the rest of the bundle was fine-tuned from its trained values, not re-initialised
    parent = load_file(str(cls_bundle / "model.safetensors"))
    kept = [k for k in parent if k in weights and "backbone.blocks.0" in k and parent[k].is_floating_point()]
    assert kept and all((weights[k] - parent[k]).abs().max() < 0.1 for k in kept)


def test_finetune_tool_names_the_flag_in_one_line(cls_bundle, ten_classes, tmp_path):
    r = run_child("tools/finetune.py", "--bundle", cls_bundle, "--data", ten_classes, "--steps", "1",
                  "--out", tmp_path / "x")
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [
        f"error: --data {ten_classes} has 10 classes but the bundle's 'cls' head has 13; add --new-head to fine-tune "
        "a new head sized from the data"]


def test_add_task_sizes_a_new_classification_head_from_its_data(tiny_run, ten_classes, tmp_path):
    out = tmp_path / "grown"
    rep = add_task_run(tiny_run / "run", "fashion", ten_classes, out, new_experts=1, steps=2, task_type="cls",
                       overrides={"batch_size": 4}, log=_quiet)
    assert rep["old_tasks_bit_identical"] is True
    cfg = json.loads((out / "config.json").read_text())["tasks"]
    assert cfg["fashion"]["num_classes"] == 10 and len(cfg["fashion"]["class_names"]) == 10
    assert cfg["cls"]["num_classes"] == 13  # the parent's own cls task keeps its head
    assert load_file(str(out / "model.safetensors"))["heads.fashion.weight"].shape[0] == 10
    with pytest.raises(ValueError, match="--num-classes: a depth task has no classes"):
        add_task_run(tiny_run / "run", "depth", tiny_run, tmp_path / "d", task_type="depth", num_classes=3, log=_quiet)


def test_init_from_leaves_a_head_of_another_shape_new(tiny_run):
    run = tiny_run / "run"
    cfg = json.loads((run / "config.json").read_text())
    cfg["tasks"]["cls"] = {**cfg["tasks"]["cls"], "num_classes": 10}
    torch.manual_seed(1)
    model = build_generalist(cfg)
    fresh_head = model.heads["cls"].weight.detach().clone()
    rep = init_from_pretrained(model, run)
    assert rep["heads_reshaped"] == ["heads.cls.bias", "heads.cls.weight"]
    assert "heads.cls.weight" in rep["new"] and "heads.det.class_linear.weight" in rep["loaded"]
    assert torch.equal(model.heads["cls"].weight, fresh_head)
    src = load_file(str(run / "model.safetensors"))
    assert torch.equal(model.state_dict()["backbone.patch_embed.proj.weight"], src["backbone.patch_embed.proj.weight"])
