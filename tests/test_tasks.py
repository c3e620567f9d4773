"""Matcher, task losses and metrics against hand computations; GLID model shapes and sharing."""
import json
import math

import pytest
import torch
from torchvision import tv_tensors

from moe_vision.tasks import GeneralistModel, build_task
from moe_vision.tasks.cls import AccuracyEvaluator
from moe_vision.tasks.depth import DepthEvaluator
from moe_vision.tasks.det import CocoEvaluator
from moe_vision.tasks.matching import hungarian_match
from moe_vision.tasks.seg import MIoUEvaluator


def test_hungarian_match_finds_minimum_cost():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [0.5, 9.0, 9.0]])
    q, t = hungarian_match(cost)
    # Brute force over all injective assignments of 3 targets to 4 queries.
    import itertools
    best = min(sum(cost[qq, tt] for tt, qq in enumerate(p)) for p in itertools.permutations(range(4), 3))
    assert float(cost[q, t].sum()) == pytest.approx(float(best))
    assert hungarian_match(torch.zeros(5, 0))[0].numel() == 0


def test_accuracy_evaluator():
    ev = AccuracyEvaluator((1, 2))
    ev.update([torch.tensor([0.1, 0.7, 0.2]), torch.tensor([0.5, 0.2, 0.3]), torch.tensor([0.2, 0.3, 0.5])],
              [{"label": torch.tensor(1)}, {"label": torch.tensor(2)}, {"label": torch.tensor(0)}])
    assert ev.compute() == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(2 / 3)}


def test_miou_hand_computed_with_ignore_and_absent_classes():
    ev = MIoUEvaluator(4)
    gt = torch.tensor([[0, 0, 1, 255]])
    pred = torch.tensor([[0, 1, 1, 2]])
    ev.update([pred], [{"mask": gt}])
    # class 0: inter 1, union 2; class 1: inter 1, union 2; class 2 only on an ignored pixel -> absent;
    # class 3 absent from both -> excluded.
    m = ev.compute()
    assert m["mIoU"] == pytest.approx(0.5)
    assert m["pixel_acc"] == pytest.approx(2 / 3)


def test_depth_metrics_hand_computed():
    ev = DepthEvaluator()
    gt = torch.tensor([[1.0, 2.0, 0.0, 4.0]])
    pred = torch.tensor([[1.1, 1.0, 7.0, 4.0]])
    ev.update([pred], [{"depth": gt}])
    m = ev.compute()
    assert m["rmse"] == pytest.approx(math.sqrt((0.01 + 1.0 + 0.0) / 3), rel=1e-5)
    assert m["absrel"] == pytest.approx((0.1 + 0.5 + 0) / 3, rel=1e-5)
    assert m["delta1"] == pytest.approx(2 / 3)


def _tiny_coco(tmp_path):
    gt = {"images": [{"id": 7, "width": 100, "height": 100, "file_name": "a.png"},
                     {"id": 9, "width": 100, "height": 100, "file_name": "b.png"}],
          "categories": [{"id": 3, "name": "x"}, {"id": 8, "name": "y"}],
          "annotations": [
              {"id": 1, "image_id": 7, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
              {"id": 2, "image_id": 7, "category_id": 8, "bbox": [50, 50, 20, 40], "area": 800, "iscrowd": 0},
              {"id": 3, "image_id": 9, "category_id": 3, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0}]}
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    return path


def test_coco_map_matches_pycocotools_directly(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    ann = _tiny_coco(tmp_path)
    preds = [
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 40.0], [52.0, 50.0, 70.0, 85.0], [0.0, 0.0, 20.0, 20.0]]),
         "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([0, 1, 1])},
        {"boxes": torch.tensor([[5.0, 5.0, 50.0, 50.0]]), "scores": torch.tensor([0.6]), "labels": torch.tensor([0])},
    ]
    targets = [{"image_id": torch.tensor(7)}, {"image_id": torch.tensor(9)}]
    ev = CocoEvaluator(ann, [3, 8], tmp_path / "res.json")
    ev.update(preds, targets)
    ours = ev.compute()
    results = json.loads((tmp_path / "res.json").read_text())
    assert {r["category_id"] for r in results} == {3, 8}  # contiguous labels mapped back
    gt = COCO(str(ann))
    e = COCOeval(gt, gt.loadRes(results), "bbox")
    e.evaluate(), e.accumulate(), e.summarize()
    assert ours["mAP"] == pytest.approx(e.stats[0]) and ours["mAP50"] == pytest.approx(e.stats[1])
    assert 0 < ours["mAP"] < 1 and ours["mAP50"] == pytest.approx(1.0)


TASKS = {"cls": {"num_classes": 5}, "det": {"num_classes": 4}, "seg": {"num_classes": 3}, "depth": {}}


@pytest.fixture(scope="module")
def model():
    import timm
    bb = timm.create_model("moe_vit_nano_patch8", tasks=list(TASKS), img_size=32, moe={"num_experts": 4})
    return GeneralistModel(bb, TASKS, {"dim": 32, "num_queries": 6, "num_layers": 1, "num_heads": 2})


def _targets(B=2, size=32):
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[2.0, 3.0, 20.0, 30.0]]), format="XYXY", canvas_size=(size, size))
    return {
        "cls": [{"label": torch.tensor(i % 5)} for i in range(B)],
        "det": [{"boxes": boxes, "labels": torch.tensor([1]), "image_id": torch.tensor(i),
                 "orig_size": torch.tensor([size, size])} for i in range(B)],
        "seg": [{"mask": torch.randint(0, 3, (size, size))} for _ in range(B)],
        "depth": [{"depth": torch.rand(size, size) * 3 + 0.5} for _ in range(B)],
    }


def test_every_task_trains_and_postprocesses(model):
    x = torch.randn(2, 3, 32, 32)
    targets = _targets()
    for task, spec in model.specs.items():
        model.zero_grad()
        out = model(x, task)
        losses = spec.loss(out, targets[task])
        assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
        losses["loss"].backward()
        assert model.heads[task].weight.grad is not None if task in ("cls", "depth") else True
        assert all(p.grad is None for n, p in model.heads.named_parameters() if not n.startswith(task + "."))
        preds = spec.postprocess(out, targets[task])
        assert len(preds) == 2
    det = model.spec("det").postprocess(model(x, "det"), targets["det"])[0]
    assert det["boxes"].shape[1] == 4 and (det["boxes"] >= 0).all() and (det["boxes"] <= 32).all()


def test_depth_silog_zero_for_scaled_prediction():
    spec = build_task("depth", {"silog_lambda": 1.0})
    gt = torch.rand(1, 8, 8) + 0.5
    out = {"log_depth": torch.log(gt * 3.0)}  # right up to a global scale
    assert float(spec.loss(out, [{"depth": gt[0]}])["loss"]) < 1e-3


def test_unknown_task_type_and_task_name(model):
    with pytest.raises(ValueError, match=r"unknown task type 'pose'"):
        build_task("pose", {})
    with pytest.raises(KeyError, match=r"unknown task 'pose'; this model knows tasks"):
        model(torch.randn(1, 3, 32, 32), "pose")


def test_generalist_checkpoint_roundtrip(model, tmp_path):
    from moe_vision.models import load_model, save_model
    path = save_model(model, tmp_path / "g.safetensors")
    again = load_model(path).eval()
    x = torch.randn(1, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x, "seg")["masks"], again(x, "seg")["masks"])


def test_cls_loss_is_cross_entropy_with_label_smoothing():
    spec = build_task("cls", {"num_classes": 3, "label_smoothing": 0.2})
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.softmax(logits, -1)[0]
    target = torch.tensor([0.8 + 0.2 / 3, 0.2 / 3, 0.2 / 3])
    expected = -(target * p.log()).sum()
    got = spec.loss({"logits": logits}, [{"label": torch.tensor(0)}])["loss"]
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


def test_maskformer_seg_loss_small_for_perfect_masks_and_large_for_swapped():
    spec = build_task("seg", {"num_classes": 2, "mode": "maskformer"})
    gt = torch.zeros(8, 8, dtype=torch.long)
    gt[:, 4:] = 1
    gt[0, 0] = 255  # ignored pixel
    masks = torch.full((1, 3, 8, 8), -20.0)
    masks[0, 0, :, :4] = 20.0  # query 0 covers class 0's region
    masks[0, 1, :, 4:] = 20.0  # query 1 covers class 1's region
    logits = torch.tensor([[[20.0, -20.0, -20.0], [-20.0, 20.0, -20.0], [-20.0, -20.0, 20.0]]])
    good = spec.loss({"logits": logits, "masks": masks}, [{"mask": gt}])
    assert float(good["loss"]) < 1e-3
    swapped = spec.loss({"logits": logits[:, [1, 0, 2]], "masks": masks}, [{"mask": gt}])
    assert float(swapped["loss"]) > 1.0
    pred = spec.postprocess({"logits": logits, "masks": masks}, [{"mask": gt}])[0]
    assert torch.equal(pred[gt != 255], gt[gt != 255])


def test_deep_supervision_adds_earlier_layer_losses_only_in_training():
    import timm
    bb = timm.create_model("moe_vit_nano_patch8", tasks=["det"], img_size=32, moe={"num_experts": 4})
    m = GeneralistModel(bb, {"det": {"num_classes": 4}}, {"dim": 32, "num_queries": 6, "num_layers": 3,
                                                          "num_heads": 2})
    x, targets = torch.randn(2, 3, 32, 32), _targets()["det"]
    out = m.train()(x, "det")
    assert len(out["aux_outputs"]) == 2
    spec = m.spec("det")
    losses = spec.total_loss(out, targets)
    plain = spec.loss(out, targets)
    expected = (plain["loss"] + losses["aux_layers"] + losses["dense"]).detach()
    assert float(losses["loss"].detach()) == pytest.approx(float(expected), rel=1e-5)
    assert not m.eval()(x, "det")["aux_outputs"]


def test_dense_tasks_posed_as_position_queries():
    """seg/depth ``mode=queries``: one mask query per grid cell (MIM's question), a linear layer per
    cell laid out like MIM's patch targets, deep supervision, only the mask query trained."""
    import timm
    from moe_vision.decoder.position_queries import CellHead, MASK_QUERY
    from moe_vision.pretrain import patchify
    tasks = {"seg": {"num_classes": 3, "mode": "queries", "query_stride": 8},
             "depth": {"mode": "queries", "query_stride": 4}}
    bb = timm.create_model("moe_vit_nano_patch8", tasks=list(tasks), img_size=32, moe={"num_experts": 4})
    m = GeneralistModel(bb, tasks, {"dim": 32, "num_queries": 4, "num_layers": 2, "num_heads": 2}).train()
    x, targets = torch.randn(2, 3, 32, 32), _targets()
    out = m(x, "seg")
    assert out["masks"].shape == (2, 3, 32, 32) and len(out["aux_outputs"]) == 1
    m.zero_grad()
    m.spec("seg").total_loss(out, targets["seg"])["loss"].backward()
    grad = m.decoder.query_embed.grad
    assert grad[MASK_QUERY].abs().sum() > 0 and grad[[0, 2, 3]].abs().sum() == 0  # only the mask query asks
    assert m.eval()(x, "depth")["log_depth"].shape == (2, 32, 32)
    assert m.spec("seg").postprocess(m(x, "seg"), targets["seg"])[0].shape == (32, 32)
    # The cell head lays a cell's values out as patchify orders a patch: (row, column, channel).
    head = CellHead(dim=2 * 2 * 3, stride=2, channels=3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.eye(12)), head.linear.bias.zero_()
    image = torch.randn(3, 4, 6)
    assert torch.equal(head(patchify(image, 2)[None], (2, 3))[0], image)
    with pytest.raises(ValueError, match=r"tasks.depth.query_stride=5: the image size 32x32 must be a multiple"):
        GeneralistModel(bb, {"depth": {"mode": "queries", "query_stride": 5}},
                        {"dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2})(x, "depth")
    with pytest.raises(ValueError, match=r"seg mode='pixels'; expected one of classwise, maskformer, queries"):
        build_task("seg", {"num_classes": 3, "mode": "pixels"}).build_head(8)
    with pytest.raises(ValueError, match=r"decoder.num_queries=1 must be >= 2"):
        build_task("depth", {"mode": "queries"}).check_decoder(1)

