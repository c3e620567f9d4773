"""Masked image modelling inputs: which patches are hidden, the masked image the encoder sees and
the per-patch pixel targets.

Legend: B batch, C channels, p patch size, gh x gw patch grid, N = gh*gw patches, P = p*p*C
values per patch, Nm masked patches per image.

The encoder sees the whole grid with the masked patches' pixels set to zero (the mean, after
normalisation), not the visible tokens only: the conv stem and the pixel decoder need a full
grid, and a zeroed patch carries no information about its pixels (tested: changing them changes
nothing the model computes).
"""
from __future__ import annotations

import torch


def num_masked(num_patches: int, ratio: float) -> int:
    """``round(ratio * N)``, at least 1 and at most N - 1 (something to predict, something seen)."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask_ratio={ratio}; expected a value in (0, 1)")
    return min(num_patches - 1, max(1, round(ratio * num_patches)))


def held_out_generator(index: int | None) -> torch.Generator | None:
    """The mask generator of item ``index`` of a held-out split: seeded by the index, so every
    evaluation scores the same masks (and two runs are compared on the same questions). ``None``
    (training) draws from the global stream."""
    return None if index is None else torch.Generator().manual_seed(int(index))


def random_patch_mask(num_patches: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean ``[N]`` mask with exactly :func:`num_masked` patches set (True = hidden)."""
    order = torch.randperm(num_patches, generator=generator)
    mask_N = torch.zeros(num_patches, dtype=torch.bool)
    mask_N[order[:num_masked(num_patches, ratio)]] = True
    return mask_N


def patchify(image_CHW: torch.Tensor, p: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[N, P]``, patches in row-major grid order, values (row, column, channel)."""
    C, H, W = image_CHW.shape
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not divisible by the patch size {p}")
    x = image_CHW.reshape(C, H // p, p, W // p, p)
    return x.permute(1, 3, 2, 4, 0).reshape((H // p) * (W // p), p * p * C)


def unpatchify(patches_NP: torch.Tensor, p: int, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[N, P]`` -> ``[C, gh p, gw p]``."""
    gh, gw = grid
    x = patches_NP.reshape(gh, gw, p, p, channels)
    return x.permute(4, 0, 2, 1, 3).reshape(channels, gh * p, gw * p)


def normalised_patches(patches_NP: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch minus its mean, over its standard deviation (MAE's normalised-pixel target)."""
    mean = patches_NP.mean(dim=-1, keepdim=True)
    var = patches_NP.var(dim=-1, keepdim=True, unbiased=False)
    return (patches_NP - mean) / (var + eps).sqrt()


def mask_image(image_CHW: torch.Tensor, mask_N: torch.Tensor, p: int) -> torch.Tensor:
    """The image with every masked patch's pixels set to zero."""
    C, H, W = image_CHW.shape
    keep = (~mask_N).reshape(H // p, W // p).to(image_CHW.dtype)
    return image_CHW * keep.repeat_interleave(p, 0).repeat_interleave(p, 1)

