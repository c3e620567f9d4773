"""Unlabelled images for pre-training, each returned masked, with its masked-image-modelling target.

Sources: any folder of images (searched recursively; labels, if any, are ignored) or the training
images of every task in a data config (their labels ignored). A file that cannot be decoded is
skipped: it is replaced by the next readable image and named in one warning; the count of
skipped files is kept in ``skipped``. A held-out split (``held_out=True``) masks each image with
the same patches at every evaluation.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset

from ..data.readers import read_image
from .masking import held_out_generator, mask_image, normalised_patches, patchify, random_patch_mask


class UnlabelledImages(Dataset):
    """``dataset[i]`` -> ``(masked_image [3, S, S], target)`` with target keys ``mask`` (bool
    ``[N]``), ``patches`` (normalised pixel targets ``[N, P]``) and ``image`` (the unmasked input,
    for pictures). With ``transform=None``: the decoded image and an empty target."""

    def __init__(self, paths: Sequence[Path], transform: Callable, patch_size: int, mask_ratio: float,
                 norm_pix: bool = True, held_out: bool = False) -> None:
        if not paths:
            raise ValueError("no images to pre-train on")
        self.paths, self.transform = list(paths), transform
        self.patch_size, self.mask_ratio, self.norm_pix = int(patch_size), float(mask_ratio), bool(norm_pix)
        self.held_out = bool(held_out)
        self.bad: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self.bad)

    def __len__(self) -> int:
        return len(self.paths)

    def _read(self, i: int):
        for k in range(len(self.paths)):
            j = (i + k) % len(self.paths)
            if j in self.bad:
                continue
            try:
                return read_image(self.paths[j])
            except (ValueError, FileNotFoundError) as e:
                self.bad.add(j)
                warnings.warn(f"skipping unreadable image: {e}", stacklevel=2)
        raise ValueError(f"none of the {len(self.paths)} pre-training images could be read")

    def __getitem__(self, i: int):
        if self.transform is None:  # a plain source (the hybrid objective augments and masks itself)
            return self._read(i), {}
        image, _ = self.transform(self._read(i), {})
        image = torch.as_tensor(image)
        p = self.patch_size
        patches = patchify(image, p)
        mask = random_patch_mask(patches.shape[0], self.mask_ratio, held_out_generator(i if self.held_out else None))
        target = {"mask": mask, "patches": normalised_patches(patches) if self.norm_pix else patches,
                  "image": image}
        return mask_image(image, mask, p), target
