"""The built-in synthetic heterogeneous benchmark.

Scenes of real handwritten digits (scikit-learn's bundled 8x8 digits, upscaled, recoloured and
rotated) and geometric shapes on textured, noisy backgrounds. Each task gets its own disjoint set
of images, written in that task's standard on-disk format, so the same readers that load real
datasets are exercised:

- cls:   ImageFolder ``cls/{train,val}/<class>/*.png``; label = the one large object, with smaller
         distractors around it.
- det:   COCO ``det/{train,val}/*.png`` + ``det/annotations/instances_{train,val}.json``; category
         ids are deliberately non-contiguous.
- seg:   ADE20K ``seg/images/{training,validation}/*.jpg`` + ``seg/annotations/.../*.png``;
         0 = background ("other"), 1..C = object classes.
- depth: NYU-style ``depth/{train,val}/rgb/*.png`` + ``depth/{train,val}/depth/*.png`` (uint16 mm,
         0 = invalid).
- unlabelled (not in the default splits; ``tools/make_synthetic.py --unlabelled N``): images only,
         ``unlabelled/{train,val}/*.png``, for pre-training. Each scene is drawn in the style of a
         classification image or of a multi-object (det/seg/depth) image, in the proportion of the
         default benchmark's training images.

Everything is a deterministic function of the seed.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
CLASS_NAMES = tuple(f"digit_{d}" for d in range(10)) + SHAPES
MANIFEST = "synthetic.json"


def coco_category_id(c: int) -> int:
    """Non-contiguous COCO ids (10, 13, 16, ...) so that readers must map them."""
    return 10 + 3 * c


@dataclass
class SyntheticConfig:
    """Sizes of each task's disjoint image sets and the scene parameters."""

    seed: int = 0
    img_size: int = 64
    splits: dict = field(default_factory=lambda: {
        "cls": {"train": 4000, "val": 500},
        "det": {"train": 2000, "val": 300},
        "seg": {"train": 2000, "val": 300},
        "depth": {"train": 1500, "val": 300},
    })
    min_objects: int = 1
    max_objects: int = 6
    min_size: float = 0.16  # object size as a fraction of the image side (3x range with max_size)
    max_size: float = 0.5
    min_visible: float = 0.5  # an object must keep this fraction of its pixels after occlusion


class SceneRenderer:
    """Draws objects onto textured backgrounds; every random draw comes from ``rng``."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        from sklearn.datasets import load_digits  # bundled with scikit-learn, no download
        digits = load_digits()
        self.digits_by_class = [digits.images[digits.target == d] / 16.0 for d in range(10)]
        self.size, self.rng = size, rng

    def background(self) -> np.ndarray:
        s, rng = self.size, self.rng
        base = rng.uniform(40, 130) + rng.uniform(-25, 25, size=3)  # darkish, a muted tint
        coarse = rng.normal(0, 22, size=(4, 4, 3))
        tex = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((s, s), Image.BICUBIC))
                        for c in range(3)], -1)
        fine = rng.normal(0, 6, size=(s, s, 3))
        stripes = 8 * np.sin(np.arange(s)[:, None] * rng.uniform(0.2, 1.2) + rng.uniform(0, 6)) * rng.integers(0, 2)
        return np.clip(base + tex + fine + stripes[..., None], 0, 255)

    def object_mask(self, cls: int, px: int) -> np.ndarray:
        """Boolean mask of one object of class ``cls`` inside a ``px`` x ``px`` box."""
        rng = self.rng
        if cls < 10:
            pool = self.digits_by_class[cls]
            glyph = pool[rng.integers(len(pool))]
            img = Image.fromarray((glyph * 255).astype(np.uint8)).resize((px, px), Image.BICUBIC)
            img = img.rotate(float(rng.uniform(-25, 25)), resample=Image.BILINEAR)
            return np.asarray(img) > 90
        img = Image.new("L", (px, px), 0)
        draw = ImageDraw.Draw(img)
        m = max(1, px // 10)
        shape = SHAPES[cls - 10]
        if shape == "circle":
            draw.ellipse([m, m, px - 1 - m, px - 1 - m], fill=255)
        else:
            n = 4 if shape == "square" else 3
            rot = rng.uniform(0, 2 * math.pi)
            r = (px / 2 - m) * (1.0 if n == 3 else 0.95)
            pts = [(px / 2 + r * math.cos(rot + 2 * math.pi * i / n), px / 2 + r * math.sin(rot + 2 * math.pi * i / n))
                   for i in range(n)]
            draw.polygon(pts, fill=255)
        return np.asarray(img) > 127

    def colour(self, avoid: np.ndarray) -> np.ndarray:
        """A random hue, brighter than the background (edges carry luminance, not only colour)."""
        c = self.rng.uniform(30, 255, size=3)
        target = max(avoid.mean() + 70, self.rng.uniform(170, 235))
        return np.clip(c * target / c.mean(), 0, 255)

    def scene(self, objects: list[tuple[int, float]], min_visible: float):
        """Render objects ``(class, size_fraction)`` back to front.

        Returns image ``[H, W, 3]`` uint8, the visible masks and classes of the objects that stay
        (objects too occluded are dropped) and their indices in ``objects``.
        """
        s, rng = self.size, self.rng
        img = self.background()
        owner = np.full((s, s), -1, dtype=np.int64)
        placed = []
        for src, (cls, frac) in enumerate(objects):
            px = max(6, int(round(frac * s)))
            mask = self.object_mask(cls, px)
            if mask.sum() < 6:
                continue
            y0, x0 = rng.integers(0, s - px + 1, size=2)
            full = np.zeros((s, s), dtype=bool)
            full[y0:y0 + px, x0:x0 + px] = mask
            col = self.colour(img[full].mean(0))
            shade = rng.uniform(0.9, 1.05, size=(s, s, 1))
            img = np.where(full[..., None], np.clip(col * shade + rng.normal(0, 4, (s, s, 3)), 0, 255), img)
            owner[full] = len(placed)
            placed.append((src, cls, full))
        keep, visible, sources = [], [], []
        for i, (src, cls, full) in enumerate(placed):
            vis = owner == i
            if vis.sum() >= max(4, min_visible * full.sum()):
                keep.append(cls)
                visible.append(vis)
                sources.append(src)
        return img.astype(np.uint8), visible, keep, sources


def _save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def _random_objects(rng: np.random.Generator, cfg: SyntheticConfig, n: int) -> list[tuple[int, float]]:
    return [(int(rng.integers(len(CLASS_NAMES))), float(rng.uniform(cfg.min_size, cfg.max_size))) for _ in range(n)]


def _single_object_scene(rng: np.random.Generator, cfg: SyntheticConfig,
                         label: int | None = None) -> list[tuple[int, float]]:
    """Smaller distractors first (behind), the labelled object (random if None) last and large, so
    it stays whole."""
    distractors = [(c, min(f, 0.26)) for c, f in _random_objects(rng, cfg, int(rng.integers(0, 3)))]
    if label is None:
        label = int(rng.integers(len(CLASS_NAMES)))
    return distractors + [(label, float(rng.uniform(0.55, 0.8)))]


def _multi_object_scene(rng: np.random.Generator, cfg: SyntheticConfig) -> list[tuple[int, float]]:
    return _random_objects(rng, cfg, int(rng.integers(cfg.min_objects, cfg.max_objects + 1)))


def _gen_cls(r: SceneRenderer, cfg: SyntheticConfig, split: str, n: int, root: Path) -> None:
    rng = r.rng
    for name in CLASS_NAMES:  # every class folder exists, so label indices never shift
        (root / "cls" / split / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        label = i % len(CLASS_NAMES)  # balanced classes
        img, _, classes, _ = r.scene(_single_object_scene(rng, cfg, label), 0.0)
        _save_png(img, root / "cls" / split / CLASS_NAMES[label] / f"{i:05d}.png")


def _gen_det(r: SceneRenderer, cfg: SyntheticConfig, split: str, n: int, root: Path) -> None:
    rng = r.rng
    images, anns = [], []
    for i in range(n):
        img, masks, classes, _ = r.scene(_multi_object_scene(rng, cfg), cfg.min_visible)
        name = f"{i:05d}.png"
        _save_png(img, root / "det" / split / name)
        images.append({"id": 1000 + i, "file_name": name, "height": cfg.img_size, "width": cfg.img_size})
        for cls, m in zip(classes, masks):
            box = _bbox(m)
            anns.append({"id": len(anns) + 1, "image_id": 1000 + i, "category_id": coco_category_id(cls),
                         "bbox": box, "area": float(m.sum()), "iscrowd": 0})
    cats = [{"id": coco_category_id(c), "name": name} for c, name in enumerate(CLASS_NAMES)]
    ann_path = root / "det" / "annotations" / f"instances_{split}.json"
    ann_path.parent.mkdir(parents=True, exist_ok=True)
    ann_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))


def _gen_seg(r: SceneRenderer, cfg: SyntheticConfig, split: str, n: int, root: Path) -> None:
    rng = r.rng
    ade_split = {"train": "training", "val": "validation"}[split]
    for i in range(n):
        img, masks, classes, _ = r.scene(_multi_object_scene(rng, cfg), cfg.min_visible)
        label = np.zeros((cfg.img_size, cfg.img_size), dtype=np.uint8)
        for cls, m in zip(classes, masks):
            label[m] = cls + 1
        path = root / "seg" / "images" / ade_split / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path, quality=95)
        _save_png(label, root / "seg" / "annotations" / ade_split / f"{i:05d}.png")


def _gen_unlabelled(r: SceneRenderer, cfg: SyntheticConfig, split: str, n: int, root: Path) -> None:
    rng = r.rng
    default_train = {task: sizes["train"] for task, sizes in SyntheticConfig().splits.items()}
    single_object_share = default_train["cls"] / sum(default_train.values())  # as in the benchmark
    out = root / "unlabelled" / split
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        if rng.random() < single_object_share:
            objs = _single_object_scene(rng, cfg)
        else:
            objs = _multi_object_scene(rng, cfg)
        img, _, _, _ = r.scene(objs, 0.0)
        _save_png(img, out / f"{i:05d}.png")


def _gen_depth(r: SceneRenderer, cfg: SyntheticConfig, split: str, n: int, root: Path) -> None:
    rng, s = r.rng, cfg.img_size
    yy = np.arange(s, dtype=np.float64)[:, None] / s
    xx = np.arange(s, dtype=np.float64)[None, :] / s
    for i in range(n):
        k = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        # Back to front: larger depth first, so nearer objects occlude farther ones.
        depths = np.sort(rng.uniform(800, 2500, size=k))[::-1]
        objs = _random_objects(rng, cfg, k)
        img, masks, classes, sources = r.scene(objs, 0.0)
        far, near = rng.uniform(4500, 7000), rng.uniform(2600, 3500)
        depth = far + (near - far) * yy + rng.uniform(-300, 300) * xx  # floor plane: nearer at the bottom
        depth = np.broadcast_to(depth, (s, s)).copy()
        for m, src in zip(masks, sources):
            depth[m] = depths[src] + 200 * yy.repeat(s, 1)[m]
        holes = rng.random((s, s)) < 0.01
        depth_mm = np.clip(depth, 1, 65535).astype(np.uint16)
        depth_mm[holes] = 0
        _save_png(img, root / "depth" / split / "rgb" / f"{i:05d}.png")
        path = root / "depth" / split / "depth" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(depth_mm).save(path)  # 16-bit PNG (mode I;16)


GENERATORS: dict[str, Callable] = {"cls": _gen_cls, "det": _gen_det, "seg": _gen_seg, "depth": _gen_depth,
                                   "unlabelled": _gen_unlabelled}
# The random stream of each task's sets; fixed ids (not positions), so a config with fewer tasks
# draws each remaining task's images exactly as the full benchmark does.
STREAM_IDS = {"cls": 0, "depth": 1, "det": 2, "seg": 3, "unlabelled": 4}


def is_complete(root: str | Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def generate(root: str | Path, cfg: SyntheticConfig | None = None, force: bool = False,
             progress: Callable[[str], None] | None = None) -> Path:
    """Write the benchmark under ``root``; skip if a complete one is there (unless ``force``).

    The data is written to a temporary sibling folder and renamed into place at the end, so an
    interrupted run never leaves a half-written benchmark under ``root``.
    """
    cfg = cfg or SyntheticConfig()
    root = Path(root)
    if is_complete(root) and not force:
        return root
    unknown = sorted(set(cfg.splits) - set(GENERATORS))
    if unknown:
        raise ValueError(f"synthetic benchmark: unknown task(s) {unknown}; expected some of {sorted(GENERATORS)}")
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for task, splits in sorted(cfg.splits.items()):
        for si, (split, n) in enumerate(sorted(splits.items())):
            if progress:
                progress(f"{task}/{split}: {n} images")
            # One independent stream per (task, split): sets are disjoint and reproducible one by one.
            rng = np.random.default_rng([cfg.seed, STREAM_IDS[task], si])
            GENERATORS[task](SceneRenderer(cfg.img_size, rng), cfg, split, int(n), tmp)
    (tmp / MANIFEST).write_text(json.dumps({**asdict(cfg), "classes": list(CLASS_NAMES)}, indent=2))
    if root.exists():
        shutil.rmtree(root)
    tmp.rename(root)
    return root
