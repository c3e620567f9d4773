"""Fashion-MNIST (Zalando's 28x28 grayscale product photos, 10 classes) from its IDX files into the
ImageFolder layout (``train/<class>/``, ``val/<class>/``: the dataset's own 60,000 / 10,000
split), and label-budget subsets that link the same images (class-balanced, fixed)."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from PIL import Image

# The dataset's own class names, in label order (its README).
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
_IMAGES, _LABELS = 0x803, 0x801  # IDX magic numbers: unsigned bytes, 3 or 1 dimensions


def read_idx(name: str, raw: bytes) -> np.ndarray:
    """The array in an IDX file (gzip-compressed or not); ``name`` names it in errors."""
    try:
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError) as e:
        raise ValueError(f"{name}: unreadable gzip ({e})") from None
    if len(data) < 8:
        raise ValueError(f"{name}: too short for an IDX file ({len(data)} bytes)")
    magic = struct.unpack(">I", data[:4])[0]
    if magic not in (_IMAGES, _LABELS):
        raise ValueError(f"{name}: IDX magic {magic:#x}, expected {_IMAGES:#x} (images) or {_LABELS:#x} (labels)")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)):
        raise ValueError(f"{name}: header says {'x'.join(map(str, dims))} = {int(np.prod(dims))} bytes of data, "
                         f"the file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def write_imagefolder(files: Mapping[str, bytes], out: Path, progress: Callable = lambda it, **_: it) -> dict:
    """Write the IDX ``files`` (by base name) as PNGs under ``out/{train,val}/<class>/``; returns
    the image count per split."""
    counts = {}
    for split, (img_name, lbl_name) in IDX_FILES.items():
        for name in (img_name, lbl_name):
            if name not in files:
                raise FileNotFoundError(f"{name} is missing from the Fashion-MNIST files")
        images, labels = read_idx(img_name, files[img_name]), read_idx(lbl_name, files[lbl_name])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{img_name} holds {images.shape} and {lbl_name} {labels.shape}: expected N images "
                             "of HxW and N labels")
        if labels.max(initial=0) >= len(CLASSES):
            raise ValueError(f"{lbl_name}: label {int(labels.max())} outside the 10 classes")
        for c in CLASSES:
            (out / split / c).mkdir(parents=True, exist_ok=True)
        for i in progress(range(len(images)), desc=f"fashion-mnist {split}", total=len(images)):
            Image.fromarray(images[i], mode="L").save(out / split / CLASSES[labels[i]] / f"{i:05d}.png")
        counts[split] = int(len(images))
    return counts


def label_budget(full: Path, out: Path, labels: int, seed: int = 0) -> dict[str, int]:
    """``out``: the training images of ``full`` cut to ``labels`` images, the same number per class
    (a fixed draw: ``seed``), linked not copied; ``val`` links to the full test split."""
    classes = sorted(p.name for p in (full / "train").iterdir() if p.is_dir())
    if labels < len(classes) or labels % len(classes):
        raise ValueError(f"label budget {labels}: expected a positive multiple of the {len(classes)} classes")
    per_class = labels // len(classes)
    rng = np.random.default_rng(seed)
    counts = {}
    for c in classes:
        files = sorted((full / "train" / c).iterdir())
        if len(files) < per_class:
            raise ValueError(f"label budget {labels}: class {c} has {len(files)} training images, fewer than "
                             f"{per_class}")
        (out / "train" / c).mkdir(parents=True)
        for f in sorted(files[i] for i in rng.permutation(len(files))[:per_class]):
            _link(f, out / "train" / c / f.name)
        counts[c] = per_class
    os.symlink(os.path.relpath(full / "val", out), out / "val")
    return counts


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # (a file system without hard links)
        dst.write_bytes(src.read_bytes())
