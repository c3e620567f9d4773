"""Real data at real resolution: the standard layouts train with experiment=real, images keep their
shape, padding changes no prediction, worker loading equals in-process loading and resumes, class
counts come from the data, and bad files give one clear line."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from moe_vision.data import ADE20KDataset, CocoDetectionDataset, ImageFolderDataset, InfiniteBatches, collate
from moe_vision.data.fixtures import SIZES, VARIANTS, FixtureSizes, make_real_layout
from moe_vision.data.readers import read_image
from moe_vision.data.transforms import build_transforms
from moe_vision.engine.builders import build_dataset, build_generalist, drop_missing_optional, prepare_config
from moe_vision.engine.trainer import Trainer

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    return make_real_layout(tmp_path_factory.mktemp("real") / "datasets", FixtureSizes(nyu=2))


def real_cfg(root, out, *overrides):
    """experiment=real as written, shrunk only in size (model, resolutions, batches, steps)."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=real", f"data.root={root}", "model=moe_vit_nano", "model.img_size=64",
            "model.moe.num_experts=4", "decoder.dim=32", "decoder.num_layers=1", "decoder.num_heads=2",
            "tasks.cls.img_size=64", "tasks.det.img_size=96", "tasks.seg.img_size=80", "tasks.depth.img_size=64",
            "tasks.cls.batch_size=2", "tasks.det.batch_size=2", "tasks.seg.batch_size=2", "tasks.depth.batch_size=2",
            "train.epochs=null", "train.steps=2", "train.warmup_steps=1", "train.eval_every=0", "data.num_workers=0",
            "data.tasks.cls.num_workers=0",
            "eval.batch_size=4", "device=cpu", f"output_dir={out}", *overrides])
    return prepare_config(OmegaConf.to_container(cfg, resolve=True))


def test_real_recipe_trains_on_the_standard_layouts_with_classes_from_the_data(real_root, tmp_path):
    import timm
    dense = timm.models.vision_transformer.VisionTransformer(img_size=48, patch_size=8, embed_dim=96, depth=4,
                                                             num_heads=3, num_classes=7)
    torch.save(dense.state_dict(), tmp_path / "vit_dense.pth")
    out = tmp_path / "run"
    trainer = Trainer(real_cfg(real_root, out, f"model.upcycle_from={tmp_path / 'vit_dense.pth'}"))
    model = trainer.model
    assert model.spec("cls").num_classes == 3 and model.spec("det").num_classes == 5  # folders; COCO categories
    assert model.decoder.num_queries == 150  # auto: one per ADE20K class
    result = trainer.fit()
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"cls", "det", "seg", "depth"}
    assert all(0 <= v <= 1 for t in ("cls", "det", "seg") for v in metrics[t].values())
    assert result["metrics"]["depth"]["rmse"] > 0
    upcycled = json.loads((out / "upcycle.json").read_text())
    assert "pos_embed" in upcycled["loaded"] and "head.weight" in upcycled["ignored"]  # 6x6 grid resampled to 8x8
    assert any(k.startswith("task_embed.") for k in upcycled["new"]) and len(upcycled["upcycled"]) == 2
    assert (out / "predictions.png").is_file() and (out / "det_results.json").is_file()
    # The COCO results are in each image's own pixels: every box lies inside its image.
    sizes = {im["id"]: (im["width"], im["height"]) for im in
             json.loads((real_root / "coco/annotations/instances_val2017.json").read_text())["images"]}
    for r in json.loads((out / "det_results.json").read_text()):
        x, y, w, h = r["bbox"]
        W, H = sizes[r["image_id"]]
        assert -0.01 <= x and x + w <= W + 0.01 and y + h <= H + 0.01


def test_optional_task_is_left_out_when_its_folder_is_missing(real_root, tmp_path):
    cfg = real_cfg(real_root, tmp_path / "x", "data.tasks.depth.root=/nonexistent/nyu")
    kept, dropped = drop_missing_optional(cfg)
    assert dropped == ["depth"] and list(kept["tasks"]) == ["cls", "det", "seg"]


def test_given_num_classes_must_agree_with_the_data(real_root, tmp_path):
    with pytest.raises(ValueError, match=r"tasks.det.num_classes=80 but the det dataset has 5 classes"):
        Trainer(real_cfg(real_root, tmp_path / "a", "tasks.det.num_classes=80"))
    with pytest.raises(ValueError, match=r"tasks.seg.num_classes is null and .*ADEChallengeData2016.* does not name"):
        Trainer(real_cfg(real_root, tmp_path / "b", "tasks.seg.num_classes=null"))


def test_grayscale_cmyk_and_exif_rotated_jpegs_are_read_as_displayed(real_root):
    ds = ImageFolderDataset(real_root / "imagenet", "train")
    for k, (path, _) in enumerate(ds.samples[:len(VARIANTS)]):
        w, h = SIZES[k % len(SIZES)]
        image = read_image(path)
        assert image.shape == (3, h, w) and image.dtype == torch.uint8, (VARIANTS[k], path)
        pil = read_image(path, decoder="pil")  # PIL and libjpeg-turbo agree on every variant
        assert pil.shape == image.shape and (pil.float() - image.float()).abs().mean() < 3
    assert ".JPEG" in str(ds.samples[0][0]) and len(ds.classes) == 3


def test_box_on_a_640x480_image_comes_back_at_the_same_place(real_root):
    """Resize (aspect kept) -> padded batch with a portrait image -> boxes normalised by the
    frame -> postprocess: the box returns in original pixels within 1 px."""
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 64, "moe": {"num_experts": 4}},
                              "tasks": {"det": {"type": "det", "num_classes": 3, "img_size": 160}},
                              "decoder": {"dim": 32, "num_queries": 4, "num_layers": 1, "num_heads": 2}}).eval()
    spec = model.spec("det")
    box = torch.tensor([[123.0, 57.0, 391.0, 400.0]])
    landscape = torch.zeros(3, 480, 640, dtype=torch.uint8)
    portrait = torch.zeros(3, 500, 375, dtype=torch.uint8)
    tf = build_transforms("det", False, 160)
    from torchvision import tv_tensors
    items = [tf(landscape, {"boxes": tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=(480, 640)),
                            "labels": torch.tensor([1])}),
             tf(portrait, {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(500, 375)),
                           "labels": torch.zeros(0, dtype=torch.long)})]
    images, targets = collate(items)
    assert tuple(items[0][0].shape[-2:]) == (120, 160) and tuple(items[1][0].shape[-2:]) == (160, 120)
    assert tuple(images.shape[-2:]) == (160, 160)
    _, frame, _ = model.frame_inputs(images, spec, targets, None)
    frame = frame or tuple(images.shape[-2:])
    fh, fw = frame
    xyxy = torch.as_tensor(targets[0]["boxes"]) / torch.tensor([fw, fh, fw, fh])  # what the loss learns
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], -1)
    logits = torch.full((2, 4, 3), -9.0)
    logits[0, 0, 1] = 9.0
    outputs = {"logits": logits, "boxes": cxcywh[:, None].expand(2, 4, 4).clone(), "image_size": frame}
    pred = spec.postprocess(outputs, targets)[0]
    torch.testing.assert_close(pred["boxes"][0], box[0], atol=1.0, rtol=0)
    assert int(pred["labels"][0]) == 1


@pytest.mark.parametrize("stem", ["patch", "conv"])
def test_padding_into_a_larger_batch_changes_no_prediction(stem):
    torch.manual_seed(0)
    tasks = {"cls": {"type": "cls", "num_classes": 5}, "det": {"type": "det", "num_classes": 3},
             "seg": {"type": "seg", "num_classes": 4}, "depth": {"type": "depth"},
             "segq": {"type": "seg", "num_classes": 4, "mode": "queries"}}
    model = build_generalist({"model": {"name": "moe_vit_nano_patch8", "img_size": 64, "stem": stem,
                                        "moe": {"num_experts": 4, "mlp_blocks": "all"}},
                              "data": {"img_size": 64}, "tasks": tasks,
                              "decoder": {"dim": 32, "num_queries": 6, "num_layers": 2, "num_heads": 2,
                                          "stem_skip": stem == "conv"}}).eval()
    a, b = torch.randn(3, 48, 56), torch.randn(3, 64, 40)  # 56: not a whole number of patches
    alone = torch.nn.functional.pad(a, (0, 8))[None]  # the model's own patch padding, zeros
    batch = torch.zeros(2, 3, 64, 64)
    batch[0, :, :48, :56], batch[1, :, :64, :40] = a, b
    one, two = torch.tensor([[48, 56]]), torch.tensor([[48, 56], [64, 40]])
    from moe_vision.tasks.base import to_image
    with torch.no_grad():
        for task in tasks:
            x, y = model(alone, task, input_sizes=one), model(batch, task, input_sizes=two)
            if task == "cls":
                pairs = [(x["logits"][0], y["logits"][0])]
            elif task == "det":
                pairs = [(x["logits"][0], y["logits"][0]), (x["boxes"][0], y["boxes"][0])]
            elif task == "depth":
                pairs = [(x["log_depth"][0, :48, :56], y["log_depth"][0, :48, :56])]
            else:
                t = {"input_size": (48, 56)}
                pairs = [(to_image(x["masks"][:1], x["image_size"], t, (48, 56)),
                          to_image(y["masks"][:1], y["image_size"], t, (48, 56)))]
            for p, q in pairs:
                torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda m: f"{task}: {m}")


def _det_loader(root, workers):
    ds = build_dataset("det", {"type": "det", "img_size": 64, "transforms": {"hflip": 0.5, "jitter": [0.5, 1.5]}},
                       {"img_size": 64, "tasks": {"det": {"format": "coco",
                                                          "train_ann": root / "coco/annotations/instances_train2017.json",
                                                          "train_images": root / "coco/train2017"}}}, "train", True)
    return InfiniteBatches(ds, 2, collate, seed=3, name="det", num_workers=workers)


def _same(batch_a, batch_b):
    (ia, ta), (ib, tb) = batch_a, batch_b
    assert torch.equal(ia, ib)
    for x, y in zip(ta, tb):
        assert torch.equal(torch.as_tensor(x["boxes"]), torch.as_tensor(y["boxes"]))
        assert torch.equal(x["input_size"], y["input_size"])


def test_worker_loading_equals_in_process_loading_and_resumes_exactly(real_root):
    serial = _det_loader(real_root, 0)
    want = [next(serial) for _ in range(5)]  # 6 images, batch 2: crosses two epoch boundaries
    assert len({tuple(b[0].shape[-2:]) for b in want}) > 1  # jittered, aspect-kept sizes: padded batches
    workers = _det_loader(real_root, 2)
    for w in want[:2]:
        _same(next(workers), w)
    state = workers.state_dict()  # the batches consumed, not those the workers prefetched
    workers.close()
    resumed = _det_loader(real_root, 2)
    resumed.load_state_dict(state)
    for w in want[2:]:
        _same(next(resumed), w)
    resumed.close()


def test_unreadable_files_give_one_line_naming_them(real_root, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(real_root / "imagenet", root / "imagenet")
    bad = sorted((root / "imagenet/train").rglob("*.JPEG"))[0]
    bad.write_bytes(bad.read_bytes()[:2000])  # truncated
    ds = ImageFolderDataset(root / "imagenet", "train", build_transforms("cls", True, 32))
    with pytest.raises(ValueError, match=rf"image {bad} is corrupt or not an image") as e:
        ds[0]
    assert "\n" not in str(e.value)
    for workers in (0, 1):  # in a worker process too: one line, not a worker traceback
        it = InfiniteBatches(ds, len(ds), collate, name="cls", num_workers=workers)
        with pytest.raises(ValueError, match=rf"image {bad} is corrupt") as e:
            next(it)
        assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
        it.close()


def test_coco_with_missing_images_and_ade20k_with_a_wrong_size_label(real_root, tmp_path):
    shutil.copytree(real_root / "coco", tmp_path / "coco")
    ann = tmp_path / "coco/annotations/instances_val2017.json"
    first = json.loads(ann.read_text())["images"][0]["file_name"]
    (tmp_path / "coco/val2017" / first).unlink()
    with pytest.raises(FileNotFoundError, match=rf"image id 1001 references .*{first}, which does not exist"):
        CocoDetectionDataset(ann, tmp_path / "coco/val2017")
    shutil.copytree(real_root / "ADEChallengeData2016", tmp_path / "ade")
    ds = ADE20KDataset(tmp_path / "ade", "val")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(ds.labels[0])
    with pytest.raises(ValueError, match=r"annotation .*\.png is 12x10 but image .* is 500x375; expected the same size"):
        ds[0]


def test_segmentation_label_above_num_classes_is_refused(real_root):
    from moe_vision.tasks.seg import MIoUEvaluator
    spec_cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 64, "moe": {"num_experts": 4}},
                "tasks": {"seg": {"type": "seg", "num_classes": 10}},
                "decoder": {"dim": 32, "num_queries": 10, "num_layers": 1, "num_heads": 2}}
    model = build_generalist(spec_cfg)
    ds = ADE20KDataset(real_root / "ADEChallengeData2016", "train", build_transforms("seg", True, 64))
    images, targets = collate([ds[2], ds[3]])  # the fourth label map holds labels 10..12 (reduce_zero_label)
    with pytest.raises(ValueError, match=r"segmentation label \d+ is outside \[0, num_classes=10\)"):
        model.task_loss("seg", model(images, "seg", targets=targets), targets)
    with pytest.raises(ValueError, match=r"segmentation label \d+ is outside \[0, num_classes=10\)"):
        MIoUEvaluator(10).update([torch.zeros(600, 800, dtype=torch.long)], [ds.raw_target(3)])


def test_bench_data_reports_loader_rates_and_the_gpu_side(tmp_path):
    from moe_vision.bench.data import data_report, format_report
    report = data_report("real", ["model=moe_vit_nano", "model.img_size=64", "model.moe.num_experts=4",
                                  "decoder.dim=32", "decoder.num_layers=1", "decoder.num_heads=2",
                                  "tasks.cls.img_size=64", "tasks.det.img_size=96", "tasks.seg.img_size=64",
                                  "tasks.depth.img_size=64"],
                         tmp_path / "fixtures", images=8, workers=1, gpus=2)
    assert set(report["loader"]) == {"cls", "det", "seg", "depth"}
    for r in report["loader"].values():
        assert all(v > 0 for v in r["per_worker"].values()) and r["pool"] > 0 and r["workers_needed"] >= 1
    cost = report["cost"]
    assert cost["per_task"]["det"]["train_gflops"] > cost["per_task"]["cls"]["train_gflops"] > 0  # 96 px vs 64 px
    assert cost["memory_gb"] > cost["activation_gb"] > 0 and cost["steps_per_epoch"] > 0
    text = format_report(report)
    assert "GPU img/s" in text and "memory per GPU" in text


def test_loader_workers_beyond_the_cores_are_capped_with_one_line():
    from moe_vision.engine.setup import cap_workers
    capped, note = cap_workers({"(evaluation)": 6, "cls": 12, "det": 1}, cores=2)
    assert capped == {"(evaluation)": 2, "cls": 2, "det": 1}
    assert note == ("data loader workers asked for ((evaluation) 6, cls 12) exceed the 2 CPU core(s) here: "
                    "using 2 per loader")
    assert cap_workers({"cls": 2, "det": 0}, cores=2) == ({"cls": 2, "det": 0}, None)
