"""Readers round-trip through the synthetic generator; transforms; sampler; bad input."""
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from moe_vision.data import (ADE20KDataset, CocoDetectionDataset, DepthDataset, ImageFolderDataset, InfiniteBatches,
                             TaskSampler, build_transforms, collate, task_probabilities)
from moe_vision.data.synthetic import CLASS_NAMES, SyntheticConfig, coco_category_id, generate, is_complete


def test_generator_is_deterministic_and_heterogeneous(synthetic_root, tmp_path):
    from tests.conftest import TINY_SPLITS
    again = generate(tmp_path / "again", SyntheticConfig(seed=0, img_size=32, splits=TINY_SPLITS, max_size=0.6,
                                                         min_size=0.2))
    a = (synthetic_root / "det/annotations/instances_train.json").read_text()
    b = (again / "det/annotations/instances_train.json").read_text()
    assert a == b
    assert np.array_equal(np.asarray(Image.open(synthetic_root / "seg/annotations/training/00003.png")),
                          np.asarray(Image.open(again / "seg/annotations/training/00003.png")))
    assert len(CLASS_NAMES) >= 10 and is_complete(synthetic_root)
    # Each task has its own image set: no image carries labels for two tasks.
    cls_imgs = {p.read_bytes() for p in (synthetic_root / "cls").rglob("*.png")}
    det_imgs = {p.read_bytes() for p in (synthetic_root / "det").rglob("*.png")}
    assert not cls_imgs & det_imgs


def test_unlabelled_split_for_pretraining(synthetic_root, tmp_path):
    """The unlabelled split is images only, deterministic, drawn apart from the benchmark's images,
    and readable by the pre-training ``images`` format; a config with fewer tasks draws each
    remaining task's images exactly as the full benchmark does (fixed stream ids)."""
    from moe_vision.pretrain import images_under
    kw = dict(seed=0, img_size=32, max_size=0.6, min_size=0.2)
    unl = generate(tmp_path / "unl", SyntheticConfig(splits={"unlabelled": {"train": 10, "val": 3}}, **kw))
    assert sorted(p.name for p in (unl / "unlabelled").iterdir()) == ["train", "val"]
    train = images_under(unl / "unlabelled" / "train")
    assert len(train) == 10 and len(images_under(unl / "unlabelled" / "val")) == 3
    assert all(np.asarray(Image.open(p)).shape == (32, 32, 3) for p in train)
    again = generate(tmp_path / "again", SyntheticConfig(splits={"unlabelled": {"train": 10, "val": 3}}, **kw))
    assert [p.read_bytes() for p in train] == [p.read_bytes() for p in images_under(again / "unlabelled" / "train")]
    benchmark = {p.read_bytes() for p in synthetic_root.rglob("*.png")}
    assert not benchmark & {p.read_bytes() for p in train}
    from tests.conftest import TINY_SPLITS
    det_only = generate(tmp_path / "det", SyntheticConfig(splits={"det": TINY_SPLITS["det"]}, **kw))
    assert ((det_only / "det/annotations/instances_train.json").read_text()
            == (synthetic_root / "det/annotations/instances_train.json").read_text())


def test_imagefolder_reader(synthetic_root):
    ds = ImageFolderDataset(synthetic_root / "cls", "train", build_transforms("cls", True, 32, 0.5, [0.5, 1.0]))
    assert len(ds) == 26
    img, t = ds[0]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert ds.classes[int(t["label"])] == ds.samples[0][0].parent.name


def test_coco_reader_maps_noncontiguous_ids_and_keeps_boxes(synthetic_root):
    ann = synthetic_root / "det/annotations/instances_train.json"
    ds = CocoDetectionDataset(ann, synthetic_root / "det/train", build_transforms("det", False, 64))
    data = json.loads(ann.read_text())
    assert ds.category_ids == [coco_category_id(c) for c in range(len(CLASS_NAMES))]
    img, t = ds[0]
    first = [a for a in data["annotations"] if a["image_id"] == data["images"][0]["id"]]
    assert len(t["boxes"]) == len(first) >= 1
    # Resizing 32 -> 64 doubles the boxes; labels map back to the JSON's category ids.
    x, y, w, h = first[0]["bbox"]
    torch.testing.assert_close(t["boxes"][0], torch.tensor([x, y, x + w, y + h]) * 2)
    assert ds.category_ids[int(t["labels"][0])] == first[0]["category_id"]


def test_ade20k_and_depth_readers(synthetic_root):
    seg = ADE20KDataset(synthetic_root / "seg", "val", build_transforms("seg", True, 32, 1.0), reduce_zero_label=False)
    img, t = seg[0]
    raw = np.asarray(Image.open(seg.labels[0]))
    assert torch.equal(t["mask"], torch.from_numpy(raw[:, ::-1].astype(np.int64)))  # flipped with the image
    reduced = ADE20KDataset(synthetic_root / "seg", "val", reduce_zero_label=True)
    m = reduced[0][1]["mask"]
    assert torch.equal(m == 255, torch.from_numpy(raw == 0))
    depth = DepthDataset(synthetic_root / "depth", "train")
    _, t = depth[0]
    raw = np.asarray(Image.open(depth.depths[0])).astype(np.float32)
    torch.testing.assert_close(t["depth"].as_subclass(torch.Tensor), torch.from_numpy(raw / 1000))
    assert (t["depth"] == 0).any() and float(t["depth"].max()) > 1.0


def _copy_det(synthetic_root, tmp_path):
    root = tmp_path / "det"
    shutil.copytree(synthetic_root / "det", root)
    ann = root / "annotations/instances_train.json"
    return root, ann, json.loads(ann.read_text())


@pytest.mark.filterwarnings("ignore:.*degenerate box")  # asserted where it matters
def test_coco_bad_inputs(synthetic_root, tmp_path):
    root, ann, data = _copy_det(synthetic_root, tmp_path)
    data["annotations"][0]["category_id"] = 999
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"instances_train.json: annotation id 1 has category_id 999"):
        CocoDetectionDataset(ann, root / "train")
    data["annotations"][0]["category_id"] = 10
    data["annotations"][0]["bbox"] = [1, 1, -3, 4]
    ann.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"annotation id 1 has a negative-size bbox"):
        CocoDetectionDataset(ann, root / "train")
    data["annotations"][0]["bbox"] = [1, 1, 0, 4]
    ann.write_text(json.dumps(data))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds = CocoDetectionDataset(ann, root / "train")
    assert ds.num_skipped == 1 and "skipped 1 degenerate" in str(w[0].message)
    (root / "train" / data["images"][2]["file_name"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"image id 1002 references .*00002.png, which does not exist"):
        CocoDetectionDataset(ann, root / "train")


def test_corrupt_image_and_wrong_size_mask_and_empty_folder(synthetic_root, tmp_path):
    seg_root = tmp_path / "seg"
    shutil.copytree(synthetic_root / "seg", seg_root)
    ds = ADE20KDataset(seg_root, "train", reduce_zero_label=False)
    ds.images[0].write_bytes(b"\x89PNG garbage")
    with pytest.raises(ValueError, match=r"image .*00000.jpg is corrupt or not an image"):
        ds[0]
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(ds.labels[1])
    with pytest.raises(ValueError, match=r"annotation .*00001.png is 12x10 but image .* is 32x32; expected the same size"):
        ds[1]
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"empty/train holds no images"):
        ImageFolderDataset(tmp_path / "empty", "train")
    with pytest.raises(ValueError, match="holds no images"):
        ADE20KDataset(tmp_path / "empty", "train")


def test_task_probabilities_and_sampler_proportions():
    sizes = {"a": 900, "b": 100}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"a": 0.9, "b": 0.1})
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx({"a": 30 / 40, "b": 10 / 40})
    assert task_probabilities(sizes, "round_robin") == {"a": 0.5, "b": 0.5}
    s = TaskSampler(sizes, "temperature", 2.0, seed=3)
    draws = [next(s)[0] for _ in range(4000)]
    assert abs(draws.count("a") / 4000 - 0.75) < 0.03
    s2 = TaskSampler(sizes, "temperature", 2.0, seed=3)
    assert [next(s2)[0] for _ in range(50)] == draws[:50]  # deterministic given the seed
    rr = TaskSampler({"a": 1, "b": 1, "c": 1}, "round_robin", tasks_per_step=2)
    assert [next(rr) for _ in range(3)] == [["a", "b"], ["c", "a"], ["b", "c"]]
    with pytest.raises(ValueError, match="unknown sampling strategy"):
        TaskSampler(sizes, "greedy")


def test_infinite_batches_reshuffle_and_resume():
    data = [(torch.full((1, 2, 2), float(i)), {"i": i}) for i in range(10)]
    it = InfiniteBatches(data, 4, collate, seed=0, name="x")
    seen = [tuple(int(t["i"]) for t in next(it)[1]) for _ in range(6)]
    epoch0 = set(seen[0] + seen[1])
    assert len(epoch0) == 8 and seen[:2] != seen[2:4]  # reshuffled each epoch, last partial batch dropped
    it2 = InfiniteBatches(data, 4, collate, seed=0, name="x")
    next(it2), next(it2), next(it2)
    state = it2.state_dict()
    it3 = InfiniteBatches(data, 4, collate, seed=0, name="x")
    it3.load_state_dict(state)
    assert [tuple(int(t["i"]) for t in next(it3)[1]) for _ in range(3)] == seen[3:6]
    with pytest.raises(ValueError, match="fewer than batch_size"):
        InfiniteBatches(data, 20, collate, name="x")
