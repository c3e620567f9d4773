"""Readers for the standard on-disk formats, one per task; each item is ``(image, target)``.

- :class:`ImageFolderDataset`: ``root/<split>/<class>/*.png|jpg``.
- :class:`CocoDetectionDataset`: COCO instances JSON + image folder; boxes are COCO xywh on
  disk, XYXY :class:`~torchvision.tv_tensors.BoundingBoxes` in memory; category ids are mapped to
  contiguous labels (``category_ids[label]`` maps back).
- :class:`ADE20KDataset`: ``images/<split>/*.jpg`` + ``annotations/<split>/*.png``, 255 = ignore.
- :class:`DepthDataset`: NYU-style ``<split>/rgb/*`` + ``<split>/depth/*.png`` (uint16 millimetres,
  0 = invalid), returned in metres.

Every problem with the files raises one error that names the file and what was expected.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def images_under(folder: str | Path) -> list[Path]:
    """Every image file below ``folder`` (recursively), sorted; a clear error if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ValueError(f"image folder {folder} holds no images (searched recursively for {', '.join(IMAGE_SUFFIXES)})")
    return paths


JPEG_SUFFIXES = (".jpg", ".jpeg")
DECODERS = ("auto", "pil", "torchvision")  # data.decoder: auto = torchvision for JPEG, PIL for the rest


def _decode_torchvision(path: Path) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    try:
        with warnings.catch_warnings():  # torchvision 0.29 announces a move of its decoders to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError:  # e.g. truncated or an unusual colour space: PIL decides (and names the file)
        return None


# Images with more pixels than this are refused before they are decoded (a 30000 x 30000 PNG can be
# a 1 MB file that decodes to 2.7 GB); tools/predict.py and tools/serve.py take --max-megapixels.
DEFAULT_MAX_PIXELS = 40_000_000


class ImageTooLarge(ValueError):
    """An image with more pixels than a set limit."""


def check_pixels(name, width: int, height: int, max_pixels: int | None) -> None:
    """Raise :class:`ImageTooLarge` naming ``name`` when ``width x height`` exceeds ``max_pixels``."""
    if max_pixels and width * height > max_pixels:
        raise ImageTooLarge(f"{name} is {width}x{height} pixels; the limit is {max_pixels / 1e6:g} megapixels "
                            "(--max-megapixels)")


@contextlib.contextmanager
def _opened(source, name: str, max_pixels: int | None):
    """``PIL.Image.open`` (the header only) with the pixel limit checked; PIL's own refusal of a
    possible decompression bomb (above ~179 megapixels) becomes the same one-line error."""
    try:
        im = Image.open(source)
    except Image.DecompressionBombError:
        limit = f"; the limit is {max_pixels / 1e6:g} megapixels (--max-megapixels)" if max_pixels else ""
        raise ImageTooLarge(f"{name} has more than {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, which PIL "
                            f"refuses to decode (a possible decompression bomb){limit}") from None
    with im:
        check_pixels(name, im.width, im.height, max_pixels)
        yield im


def read_image(path: Path, decoder: str = "auto", max_pixels: int | None = None) -> tv_tensors.Image:
    """RGB uint8 ``[3, H, W]`` in display orientation (EXIF rotation applied; grayscale and CMYK
    converted); a missing, truncated or corrupt file raises one clear error naming it, and so does
    an image above ``max_pixels`` (checked from its header, before decoding). ``decoder`` (one of
    :data:`DECODERS`): ``auto`` and ``torchvision`` decode JPEGs with libjpeg-turbo through
    ``torchvision.io`` (PIL takes what it cannot read), ``pil`` uses PIL for everything."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with _opened(path, f"image {path}", max_pixels) as im:
            if decoder == "pil" or path.suffix.lower() not in JPEG_SUFFIXES:
                return _displayed_rgb(im)
        image = _decode_torchvision(path)
        if image is not None:
            return tv_tensors.Image(image)
        with _opened(path, f"image {path}", max_pixels) as im:  # (what libjpeg-turbo could not read)
            return _displayed_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} is corrupt or not an image ({e}); re-encode or remove it") from None


def _displayed_rgb(im: Image.Image) -> tv_tensors.Image:
    """A PIL image as RGB uint8 ``[3, H, W]``, turned as its EXIF orientation says."""
    arr = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return tv_tensors.Image(torch.from_numpy(arr.copy()).permute(2, 0, 1))


def decode_image(data: bytes, name: str = "upload", max_pixels: int | None = None) -> tv_tensors.Image:
    """An image file's bytes as RGB uint8 ``[3, H, W]`` in display orientation (as
    :func:`read_image`); bytes that are no image, or an image above ``max_pixels``, raise one
    error naming ``name``."""
    import io
    try:
        with _opened(io.BytesIO(data), name, max_pixels) as im:
            return _displayed_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{name} is not an image that can be read ({type(e).__name__}: {e})") from None


def read_label_png(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"annotation {path} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"annotation {path} is corrupt or not a PNG ({e})") from None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


class _Base(Dataset):
    decoder = "auto"  # the JPEG decoder (data.decoder); an attribute so worker processes inherit it

    def __init__(self, transform: Callable | None) -> None:
        self.transform = transform

    def _apply(self, image, target):
        return self.transform(image, target) if self.transform else (image, target)


class ImageFolderDataset(_Base):
    """Classification in ImageFolder layout; classes are the sorted sub-folder names."""

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 classes: list[str] | None = None) -> None:
        super().__init__(transform)
        self.folder = Path(root) / split
        if not self.folder.is_dir():
            raise FileNotFoundError(f"classification split folder {self.folder} does not exist "
                                    f"(expected {Path(root)}/{split}/<class>/*.png)")
        found = sorted(p.name for p in self.folder.iterdir() if p.is_dir())
        self.classes = list(classes) if classes else found
        unknown = sorted(set(found) - set(self.classes))
        if unknown:
            raise ValueError(f"{self.folder}: class folders {unknown} are not among the classes {self.classes}")
        self.samples = [(p, ci) for ci, c in enumerate(self.classes) for p in _images_in(self.folder / c)]
        if not self.samples:
            raise ValueError(f"{self.folder} holds no images (expected <class>/*.png|jpg)")

    def __len__(self) -> int:
        return len(self.samples)

    def image_paths(self) -> list[Path]:
        return [p for p, _ in self.samples]

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        return self._apply(read_image(path, self.decoder), {"label": torch.tensor(label)})

    def raw_target(self, i: int) -> dict:
        """The target without reading the image (chance levels)."""
        return {"label": torch.tensor(self.samples[i][1])}

    def reuse_key(self) -> tuple | None:
        """What makes two readings of this split give the same items (see
        :mod:`~moe_vision.data.item_cache`): None when the transform draws at random or a file
        cannot be looked at (reading it will name it)."""
        signature = getattr(self.transform, "signature", None) if self.transform is not None else "none"
        if signature is None:
            return None
        files = hashlib.sha1()
        try:
            for path, label in self.samples:
                st = path.stat()
                files.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            return None
        return (type(self).__name__, str(self.folder.resolve()), tuple(self.classes), signature, self.decoder,
                files.hexdigest())


class CocoDetectionDataset(_Base):
    """COCO instances; images without annotations are kept (empty targets)."""

    def __init__(self, ann_file: str | Path, img_dir: str | Path, transform: Callable | None = None) -> None:
        super().__init__(transform)
        self.ann_file, self.img_dir = Path(ann_file), Path(img_dir)
        if not self.ann_file.is_file():
            raise FileNotFoundError(f"COCO annotation file {self.ann_file} does not exist")
        try:
            data = json.loads(self.ann_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.ann_file} is not valid JSON ({e})") from None
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{self.ann_file} has no '{key}' field (expected COCO instances format)")
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [c["id"] for c in self.categories]
        self.classes = [c["name"] for c in self.categories]
        cat_to_label = {cid: i for i, cid in enumerate(self.category_ids)}
        self.images = sorted(data["images"], key=lambda im: im["id"])
        if not self.images:
            raise ValueError(f"{self.ann_file} lists no images")
        by_image: dict[int, list] = {im["id"]: [] for im in self.images}
        degenerate = 0
        for a in data["annotations"]:
            if a["category_id"] not in cat_to_label:
                raise ValueError(f"{self.ann_file}: annotation id {a.get('id')} has category_id {a['category_id']}, "
                                 f"which is not among the categories {self.category_ids}")
            if a["image_id"] not in by_image:
                raise ValueError(f"{self.ann_file}: annotation id {a.get('id')} refers to image_id {a['image_id']}, "
                                 "which is not in 'images'")
            x, y, w, h = a["bbox"]
            if w < 0 or h < 0:
                raise ValueError(f"{self.ann_file}: annotation id {a.get('id')} has a negative-size bbox {a['bbox']} "
                                 "(COCO bbox is [x, y, width, height] with width, height >= 0)")
            if w == 0 or h == 0 or a.get("iscrowd", 0):
                degenerate += w == 0 or h == 0
                continue
            by_image[a["image_id"]].append((x, y, x + w, y + h, cat_to_label[a["category_id"]]))
        if degenerate:
            warnings.warn(f"{self.ann_file}: skipped {degenerate} degenerate box(es) with zero width or height",
                          stacklevel=2)
        self.num_skipped = degenerate
        self.targets = [by_image[im["id"]] for im in self.images]
        for im in self.images:
            if not (self.img_dir / im["file_name"]).is_file():
                raise FileNotFoundError(f"{self.ann_file}: image id {im['id']} references "
                                        f"{self.img_dir / im['file_name']}, which does not exist")

    def __len__(self) -> int:
        return len(self.images)

    def image_paths(self) -> list[Path]:
        return [self.img_dir / im["file_name"] for im in self.images]

    def __getitem__(self, i: int):
        info = self.images[i]
        image = read_image(self.img_dir / info["file_name"], self.decoder)
        rows = torch.tensor(self.targets[i], dtype=torch.float32).reshape(-1, 5)
        h, w = image.shape[-2:]
        target = {
            "boxes": tv_tensors.BoundingBoxes(rows[:, :4], format="XYXY", canvas_size=(h, w)),
            "labels": rows[:, 4].long(),
            "image_id": torch.tensor(info["id"]),
            "orig_size": torch.tensor([h, w]),
        }
        return self._apply(image, target)

    def raw_target(self, i: int) -> dict:
        """Image id, size (from the JSON) and labels without reading the image (chance levels)."""
        info = self.images[i]
        rows = torch.tensor(self.targets[i], dtype=torch.float32).reshape(-1, 5)
        return {"image_id": torch.tensor(info["id"]), "labels": rows[:, 4].long(),
                "orig_size": torch.tensor([int(info.get("height", 0)), int(info.get("width", 0))])}


class _PairedDataset(_Base):
    """Images with one same-named PNG each (segmentation labels, depth maps) of the same size."""

    kind = "annotation"

    def __init__(self, img_dir: Path, label_dir: Path, layout: str, transform: Callable | None) -> None:
        super().__init__(transform)
        self.folder = img_dir
        self.images = _images_in(img_dir)
        if not self.images:
            raise ValueError(f"{img_dir} holds no images (expected {layout})")
        self.labels = [label_dir / (p.stem + ".png") for p in self.images]
        missing = [str(p) for p in self.labels if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} {self.kind} PNG(s) missing, e.g. {missing[0]}")

    def __len__(self) -> int:
        return len(self.images)

    def image_paths(self) -> list[Path]:
        return list(self.images)

    def _read_pair(self, i: int) -> tuple[tv_tensors.Image, np.ndarray]:
        image, label = read_image(self.images[i], self.decoder), read_label_png(self.labels[i])
        if label.ndim != 2:
            raise ValueError(f"{self.kind} {self.labels[i]} has shape {label.shape}; expected a single-channel PNG")
        if label.shape != tuple(image.shape[-2:]):
            raise ValueError(f"{self.kind} {self.labels[i]} is {label.shape[1]}x{label.shape[0]} but image "
                             f"{self.images[i]} is {image.shape[-1]}x{image.shape[-2]}; expected the same size")
        return image, label


class ADE20KDataset(_PairedDataset):
    """Semantic segmentation in ADE20K layout.

    ``reduce_zero_label`` (ADE20K's convention) maps label 0 ("other") to 255 (ignored) and
    shifts every other label down by one.
    """

    SPLITS = {"train": "training", "val": "validation"}

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 reduce_zero_label: bool = True) -> None:
        sub = self.SPLITS.get(split, split)
        super().__init__(Path(root) / "images" / sub, Path(root) / "annotations" / sub,
                         f"ADE20K layout images/{sub}/*.jpg", transform)
        self.reduce_zero_label = reduce_zero_label

    def _mask(self, label: np.ndarray) -> torch.Tensor:
        mask = torch.from_numpy(label.astype(np.int64))
        if self.reduce_zero_label:
            mask = torch.where(mask == 0, 255, mask - 1)
            mask[mask == 254] = 255
        return mask

    def __getitem__(self, i: int):
        image, label = self._read_pair(i)
        return self._apply(image, {"mask": tv_tensors.Mask(self._mask(label))})

    def raw_target(self, i: int) -> dict:
        """The label map at full resolution without reading the image (chance levels)."""
        mask = self._mask(read_label_png(self.labels[i]))
        return {"mask": mask, "orig_size": torch.tensor(mask.shape)}


class DepthDataset(_PairedDataset):
    """NYU-style depth: ``<split>/rgb/NAME.*`` with ``<split>/depth/NAME.png`` (uint16 mm)."""

    kind = "depth"

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None,
                 max_depth: float = 10.0) -> None:
        root = Path(root)
        super().__init__(root / split / "rgb", root / split / "depth",
                         f"{root}/{split}/rgb/*.png with {root}/{split}/depth/*.png", transform)
        self.max_depth = max_depth

    @property
    def depths(self) -> list[Path]:
        return self.labels

    def __getitem__(self, i: int):
        image, raw = self._read_pair(i)
        return self._apply(image, {"depth": tv_tensors.Mask(self._metres(raw, i))})

    def _metres(self, raw: np.ndarray, i: int) -> torch.Tensor:
        if raw.dtype != np.uint16:
            raise ValueError(f"depth {self.labels[i]} has dtype {raw.dtype}; expected a 16-bit PNG in millimetres")
        return torch.from_numpy(raw.astype(np.float32) / 1000.0).clamp(max=self.max_depth)

    def raw_target(self, i: int) -> dict:
        """The depth map at full resolution without reading the image (chance levels)."""
        depth = self._metres(read_label_png(self.labels[i]), i)
        return {"depth": depth, "orig_size": torch.tensor(depth.shape)}


def set_decoder(dataset, name: str) -> None:
    """Choose the JPEG decoder (``data.decoder``) of a dataset and of the datasets it reads from."""
    if name not in DECODERS:
        raise ValueError(f"data.decoder={name!r}; expected one of {', '.join(DECODERS)}")
    for d in [dataset, *getattr(dataset, "sources", {}).values()]:
        if hasattr(d, "decoder"):
            d.decoder = name
