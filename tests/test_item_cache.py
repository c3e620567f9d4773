"""Evaluation items reused between evaluations of one split: read once, the same batches, read
again when a file changes, never kept for a transform that draws at random, old splits dropped."""
import os
import shutil

import pytest
import torch

from moe_vision.data import readers
from moe_vision.data.item_cache import EVAL_ITEMS, ItemCache, item_bytes
from moe_vision.data.readers import ImageFolderDataset
from moe_vision.data.transforms import build_transforms
from moe_vision.engine.evaluate import iterate_batches


@pytest.fixture
def counted_reads(monkeypatch):
    """Image paths read through readers.read_image, in order."""
    seen = []
    real = readers.read_image

    def read(path, *a, **k):
        seen.append(path)
        return real(path, *a, **k)
    monkeypatch.setattr(readers, "read_image", read)
    EVAL_ITEMS.clear()
    yield seen
    EVAL_ITEMS.clear()


@pytest.fixture
def small_split(synthetic_root, tmp_path):
    root = tmp_path / "cls"
    for c in sorted(p.name for p in (synthetic_root / "cls" / "val").iterdir())[:8]:
        shutil.copytree(synthetic_root / "cls" / "val" / c, root / "val" / c)
    return root


def split(root, train=False):
    return ImageFolderDataset(root, "val", build_transforms("cls", train, 32, hflip=0.5, scale=(0.5, 1.0)))


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and [t["label"] for t in x[1]] == [t["label"] for t in y[1]]
                                    for x, y in zip(a, b))


def test_a_split_is_read_once_and_gives_the_same_batches(small_split, counted_reads):
    first = list(iterate_batches(split(small_split), 3))
    n = len(counted_reads)
    assert n == len(split(small_split)) > 3
    again = list(iterate_batches(split(small_split), 3))  # a new reader of the same folder, as a new run builds
    assert len(counted_reads) == n and same(first, again)
    again[0][1][0]["extra"] = 1  # a caller adding a key changes nothing kept
    assert "extra" not in list(iterate_batches(split(small_split), 3))[0][1][0]


def test_a_changed_file_a_random_transform_and_workers_read_again(small_split, counted_reads):
    list(iterate_batches(split(small_split), 3))
    n = len(counted_reads)
    some = split(small_split).samples[0][0]
    st = some.stat()
    os.utime(some, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # rewritten: another modification time
    list(iterate_batches(split(small_split), 3))
    assert len(counted_reads) == 2 * n
    assert split(small_split, train=True).reuse_key() is None
    list(iterate_batches(split(small_split, train=True), 3))
    list(iterate_batches(split(small_split, train=True), 3))
    assert len(counted_reads) == 4 * n


def test_the_least_recently_used_split_is_dropped_beyond_the_limit(small_split, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(small_split, other)
    size = sum(item_bytes(split(small_split)[i]) for i in range(len(split(small_split))))
    cache = ItemCache(max_bytes=int(1.5 * size))
    for root in (small_split, other):
        data = split(root)
        get = cache.loader(data, data.__getitem__)
        for i in range(len(data)):
            get(i)
    assert len(cache.splits) == 1 and cache.nbytes() == size
    assert next(iter(cache.splits))[1] == str((other / "val").resolve())
    tiny = ItemCache(max_bytes=10)  # one split larger than the limit keeps nothing
    data = split(small_split)
    get = tiny.loader(data, data.__getitem__)
    assert same([(get(0)[0][None], [get(0)[1]])], [(data[0][0][None], [data[0][1]])]) and tiny.nbytes() == 0
    assert not tiny.splits and len(tiny.too_large) == 1
