"""Small datasets in the exact on-disk layouts of ImageNet, COCO 2017, ADE20K and NYU depth, with
real-sized JPEGs (500x375 to 800x600, landscape and portrait, RGB, grayscale, CMYK and EXIF-rotated):
what ``tools/bench_data.py`` times the loaders on and what the tests train on.

Each image is a smooth background with a few filled rectangles; the rectangles are the COCO boxes
(and polygons) and the ADE20K label regions, so annotations agree with the pixels a person sees
(an EXIF-rotated file stores its pixels turned and is annotated as displayed).

    root/imagenet/{train,val}/n0xxxxxxx/*.JPEG
    root/coco/{train2017,val2017}/*.jpg + root/coco/annotations/instances_{train,val}2017.json
    root/ADEChallengeData2016/images/{training,validation}/*.jpg + annotations/.../*.png
    root/nyu/{train,val}/{rgb,depth}/*.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((500, 375), (640, 480), (375, 500), (800, 600), (480, 640))  # (width, height)
VARIANTS = ("rgb", "rgb", "gray", "cmyk", "exif")  # cycled over the images
COCO_CATEGORIES = ((1, "person"), (3, "car"), (18, "dog"), (44, "bottle"), (90, "toothbrush"))  # ids with gaps
EXIF_ORIENTATION = 0x0112


@dataclass
class FixtureSizes:
    """How many images each split of each layout gets."""

    classes: int = 3
    per_class: int = 2  # ImageNet: images per class and split
    coco: int = 6  # per split; every third has no annotations
    ade: int = 4
    nyu: int = 0
    ade_classes: int = 150


def _scene(rng: np.random.Generator, w: int, h: int, n: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """An RGB image ``[h, w, 3]`` and ``n`` rectangles (x0, y0, x1, y1) drawn on it."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = rng.uniform(40, 200, size=3)
    img = (base + 30 * np.sin(xx[..., None] / rng.uniform(20, 80) + rng.uniform(0, 6, 3))
           + 30 * np.cos(yy[..., None] / rng.uniform(20, 80))).clip(0, 255)
    boxes = []
    for _ in range(n):
        bw, bh = int(rng.uniform(0.1, 0.4) * w), int(rng.uniform(0.1, 0.4) * h)
        x0, y0 = int(rng.uniform(0, w - bw)), int(rng.uniform(0, h - bh))
        img[y0:y0 + bh, x0:x0 + bw] = rng.uniform(0, 255, size=3)
        boxes.append((x0, y0, x0 + bw, y0 + bh))
    return img.astype(np.uint8), boxes


def save_jpeg(arr: np.ndarray, path: Path, variant: str) -> None:
    """Write ``arr`` (as displayed) as a JPEG of the given variant: rgb, gray, cmyk or exif (pixels
    stored turned by 90 degrees with the EXIF orientation that turns them back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr)
    if variant == "gray":
        im.convert("L").save(path, quality=90)
    elif variant == "cmyk":
        im.convert("CMYK").save(path, quality=90)
    elif variant == "exif":
        stored = im.transpose(Image.Transpose.ROTATE_90)  # orientation 6 displays it turned back
        exif = stored.getexif()
        exif[EXIF_ORIENTATION] = 6
        stored.save(path, quality=90, exif=exif)
    else:
        im.save(path, quality=90)


def _imagenet(root: Path, rng, n: FixtureSizes) -> None:
    k = 0
    for split in ("train", "val"):
        for c in range(n.classes):
            for i in range(n.per_class):
                w, h = SIZES[k % len(SIZES)]
                arr, _ = _scene(rng, w, h, 1 + c)
                save_jpeg(arr, root / "imagenet" / split / f"n{1440764 + c * 7:08d}" / f"{split}_{c}_{i}.JPEG",
                          VARIANTS[k % len(VARIANTS)])
                k += 1


def _coco(root: Path, rng, n: FixtureSizes) -> None:
    ann_id = 1
    for split in ("train", "val"):
        images, annotations = [], []
        for i in range(n.coco):
            w, h = SIZES[i % len(SIZES)]
            empty = i % 3 == 2  # images without annotations are part of COCO
            arr, boxes = _scene(rng, w, h, 0 if empty else 1 + i % 3)
            name = f"{i + 1:012d}.jpg"
            save_jpeg(arr, root / "coco" / f"{split}2017" / name, VARIANTS[i % len(VARIANTS)])
            image_id = 1000 * (split == "val") + i + 1
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for j, (x0, y0, x1, y1) in enumerate(boxes):
                cat = COCO_CATEGORIES[(i + j) % len(COCO_CATEGORIES)][0]
                crowd = int(j == 2)  # one crowd region (RLE in real COCO; skipped for training, as there)
                seg = {"counts": [h * w], "size": [h, w]} if crowd else [[x0, y0, x1, y0, x1, y1, x0, y1]]
                annotations.append({"id": ann_id, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0),
                                    "segmentation": seg})
                ann_id += 1
        data = {"info": {"description": "moe-vision fixture"}, "licenses": [], "images": images,
                "annotations": annotations,
                "categories": [{"id": cid, "name": name, "supercategory": "thing"} for cid, name in COCO_CATEGORIES]}
        out = root / "coco" / "annotations" / f"instances_{split}2017.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data))


def _ade(root: Path, rng, n: FixtureSizes) -> None:
    for split, sub in (("train", "training"), ("val", "validation")):
        for i in range(n.ade):
            w, h = SIZES[i % len(SIZES)]
            arr, boxes = _scene(rng, w, h, 3)
            label = np.zeros((h, w), np.uint8)  # 0: "other", ignored with reduce_zero_label
            label[h // 2:, :] = 1  # a "floor" below the middle
            for j, (x0, y0, x1, y1) in enumerate(boxes):
                label[y0:y1, x0:x1] = 2 + (i * 3 + j) % (n.ade_classes - 1)
            name = f"ADE_{split}_{i + 1:08d}"
            # (an EXIF-rotated photo's label map is stored as displayed)
            save_jpeg(arr, root / "ADEChallengeData2016" / "images" / sub / f"{name}.jpg", VARIANTS[i % len(VARIANTS)])
            png = root / "ADEChallengeData2016" / "annotations" / sub / f"{name}.png"
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label).save(png)


def _nyu(root: Path, rng, n: FixtureSizes) -> None:
    for split in ("train", "val"):
        for i in range(n.nyu):
            w, h = 640, 480
            arr, _ = _scene(rng, w, h, 2)
            depth = (1000 * (1 + 4 * np.linspace(0, 1, h)[:, None] * np.ones((1, w)))).astype(np.uint16)
            for sub, im in (("rgb", Image.fromarray(arr)), ("depth", Image.fromarray(depth))):
                path = root / "nyu" / split / sub / f"{i:05d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                im.save(path)


def make_real_layout(root: str | Path, sizes: FixtureSizes | None = None, seed: int = 0) -> Path:
    """Write the fixture datasets under ``root`` (see the module docstring); returns ``root``."""
    root, n = Path(root), sizes or FixtureSizes()
    rng = np.random.default_rng(seed)
    _imagenet(root, rng, n)
    _coco(root, rng, n)
    _ade(root, rng, n)
    if n.nyu:
        _nyu(root, rng, n)
    return root
