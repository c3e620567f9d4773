"""The downstream protocol on tiny parents: every method runs, rows carry what the results page
needs, the methods differ as they claim (trainable counts, kept experts, top-1 FLOPs), finished
runs are read back."""
import json
import shutil

import pytest

from moe_vision.downstream import ALL_METHODS, Dataset, Parents, Protocol, run_all
from moe_vision.downstream.protocol import downstream_datasets, find_parents
from moe_vision.downstream.summary import plot, table
from moe_vision.engine.trainer import Trainer
from tests.test_engine import make_cfg

KEYS = {"dataset", "labels", "seed", "method", "metric", "value", "trainable_params", "params", "flops_per_image",
        "train_seconds", "machine"}


@pytest.fixture(scope="module")
def parents(tiny_run, synthetic_root, tmp_path_factory):
    runs = tmp_path_factory.mktemp("parents")
    shutil.copytree(tiny_run / "run", runs / "synthetic-s0-20260101-000000")
    Trainer(make_cfg(synthetic_root, runs / "dense_cls-lr0.001-s0-x", "+single_task=cls",
                     "train.sampling.tasks_per_step=1", "train.steps=2", "model.moe.mlp_blocks=none",
                     "eval.periodic_images=0")).fit()
    return find_parents(0, runs)


@pytest.fixture(scope="module")
def fashion(ten_classes):
    return Dataset("fashion-mnist", "cls", ten_classes, 20)


@pytest.mark.slow
def test_every_method_runs_and_differs_as_it_claims(parents, fashion, tmp_path):
    assert parents.generalist is not None and set(parents.dense) == {"cls"}
    proto = Protocol(steps=2, batch_size={"cls": 4, "det": 4}, img_size={"cls": 32, "det": 32}, max_eval_batches=1)
    rows = run_all([fashion], ALL_METHODS, [0], proto, {0: parents}, tmp_path / "runs", log=lambda m: None)
    by = {r["method"]: r for r in rows}
    assert set(by) == {*ALL_METHODS, "top1_infer"} and all(set(r) == KEYS for r in rows)
    assert all(0 <= r["value"] <= 100 and r["train_seconds"] > 0 and r["flops_per_image"] > 0 for r in rows)
    full = by["generalist_ft"]
    assert by["head"]["trainable_params"] < by["router_head"]["trainable_params"] < full["trainable_params"]
    assert by["head"]["trainable_params"] < by["stem_head"]["trainable_params"] < 0.2 * full["trainable_params"]
    assert by["scratch_head"]["trainable_params"] == by["head"]["trainable_params"]
    assert full["trainable_params"] == full["params"] and by["head"]["params"] == full["params"]
    assert by["pruned"]["params"] < full["params"]  # 2 of the tiny model's 4 experts per layer
    bundle = json.loads((tmp_path / "runs" / "fashion-mnist-20" / "bundle_ft-s0" / "made.json").read_text())
    assert all(len(v) == 4 for v in bundle["kept_experts"].values())  # (the budget-less tiny parent: all allowed)
    assert by["top1"]["flops_per_image"] < 0.95 * full["flops_per_image"]
    assert abs(by["pruned"]["flops_per_image"] - full["flops_per_image"]) < 0.01 * full["flops_per_image"]
    assert by["top1_infer"]["flops_per_image"] == by["top1"]["flops_per_image"]
    assert by["scratch_dense"]["params"] < by["scratch_moe"]["params"] == full["params"]
    assert by["add_task"]["trainable_params"] < by["add_task"]["params"]
    assert all((tmp_path / "runs" / "fashion-mnist-20" / f"{m}-s0" / "protocol.json").is_file() for m in ALL_METHODS)
    made = json.loads((tmp_path / "runs" / "fashion-mnist-20" / "pruned-s0" / "made.json").read_text())
    assert all(len(v) == 2 for v in made["kept_experts"].values())
    cfg = json.loads((tmp_path / "runs" / "fashion-mnist-20" / "generalist_ft-s0" / "config.json").read_text())
    assert cfg["tasks"]["cls"]["num_classes"] == 10 and cfg["train"]["steps"] == 2

    # finished runs are read back, not trained again
    again = run_all([fashion], ["generalist_ft"], [0], proto, {0: parents}, tmp_path / "runs", log=lambda m: None)
    assert again == [r for r in rows if r["method"] in ("generalist_ft", "top1_infer")]
    text = table(rows, [*ALL_METHODS, "top1_infer"])
    assert "| generalist_ft |" in text and "fashion-mnist**, 20 training labels: top1" in text
    assert plot(rows, tmp_path / "p.png").stat().st_size > 0


def test_detection_and_classification_rows_from_the_generalist(parents, fashion, synthetic_root, tmp_path):
    """The quick path of make test: det rows (mAP and mAP50 by pycocotools) and the cls methods
    that reshape the model (a pruned bundle, top-1 at inference)."""
    proto = Protocol(steps=2, batch_size={"cls": 4, "det": 4}, img_size={"cls": 32, "det": 32}, max_eval_batches=1)
    trees = Dataset("trees", "det", synthetic_root / "det", None)
    rows = run_all([trees, fashion], ["generalist_ft", "pruned"], [0], proto, {0: parents}, tmp_path,
                   log=lambda m: None)
    det = [r for r in rows if r["dataset"] == "trees"]
    assert {(r["method"], r["metric"]) for r in det} == {(m, k) for m in ("generalist_ft", "top1_infer", "pruned")
                                                         for k in ("mAP", "mAP50")}
    assert all(r["labels"] is None and 0 <= r["value"] <= 100 for r in det)
    cfg = json.loads((tmp_path / "trees" / "generalist_ft-s0" / "config.json").read_text())
    assert cfg["tasks"]["det"]["num_classes"] == 13 and list(cfg["tasks"]) == ["det"]
    cls = {r["method"]: r for r in rows if r["dataset"] == "fashion-mnist"}
    assert cls["pruned"]["params"] < cls["generalist_ft"]["params"]
    assert cls["top1_infer"]["flops_per_image"] < cls["generalist_ft"]["flops_per_image"]


def test_a_method_without_its_parent_and_an_unknown_method_are_refused(fashion, tmp_path):
    proto = Protocol(steps=1, batch_size={"cls": 2, "det": 2}, img_size={"cls": 32, "det": 32}, max_eval_batches=1)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['finetune'\]"):
        run_all([fashion], ["finetune"], [0], proto, {0: Parents(None, {})}, tmp_path, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match="method dense_specialist_ft starts from the dense cls model of seed 0, "
                                                "and there is none: run make baselines SEED=0"):
        run_all([fashion], ["dense_specialist_ft"], [0], proto, {0: Parents(None, {})}, tmp_path, log=lambda m: None)
    with pytest.raises(FileNotFoundError, match=r"fashion-mnist-300 is missing or incomplete: run make downstream-data "
                                                r"\(python tools/downstream_data.py --labels 300\)"):
        downstream_datasets(tmp_path, ["fashion-mnist"], [300])


def test_a_run_folder_made_with_another_protocol_is_refused(parents, fashion, tmp_path):
    """Reading back (or resuming) a run trained with other settings would put its figures in rows
    of this protocol; the folder records its protocol and another one is refused before training."""
    from moe_vision.downstream.protocol import check_protocol
    made = Protocol(steps=2, batch_size={"cls": 4, "det": 4})
    check_protocol(tmp_path / "fashion-mnist-20" / "head-s0", made)
    check_protocol(tmp_path / "fashion-mnist-20" / "head-s0", made)  # the same one: accepted
    other = Protocol(steps=3, batch_size={"cls": 4, "det": 4}, max_eval_batches=1)
    with pytest.raises(ValueError, match=r"head-s0 was made with another protocol \(max_eval_batches=None there "
                                         r"but 1 now, steps=2 there but 3 now\); pass another --runs folder"):
        run_all([fashion], ["head"], [0], other, {0: parents}, tmp_path, log=lambda m: None)
    assert not (tmp_path / "fashion-mnist-20" / "head-s0" / "config.json").exists()


def test_flags_make_the_protocol_and_a_flag_that_cannot_act_is_refused(parents):
    """--img-size changes Fashion-MNIST's input only; --quick refuses the step and batch flags it
    would ignore; an input that the parents' 8 px patches do not tile is refused before training."""
    from moe_vision.downstream.protocol import check_input_size
    assert Protocol.from_flags() == Protocol()
    proto = Protocol.from_flags(steps=20000, img_size=48)
    assert proto.steps == 20000 and proto.img_size == {"cls": 48, "det": 64} and proto.batch_size == {"cls": 32, "det": 16}
    quick = Protocol.from_flags(quick=True, img_size=48)
    assert (quick.steps, quick.batch_size["cls"], quick.max_eval_batches, quick.img_size["cls"]) == (4, 4, 2, 48)
    with pytest.raises(ValueError, match=r"--quick trains 4 steps at batch 4: drop --steps / --batch-size"):
        Protocol.from_flags(steps=100, quick=True)
    with pytest.raises(ValueError, match=r"--img-size 0: expected a positive integer"):
        Protocol.from_flags(img_size=0)
    check_input_size(48, parents)
    with pytest.raises(ValueError, match=r"input size 44: expected a multiple of 8, the patch size of moe_vit_"):
        check_input_size(44, parents)
