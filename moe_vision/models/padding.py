"""Padded batches: images of different sizes share one canvas; what lies beyond each image must
not change what the model computes inside it.

An image's *valid region* is its size rounded up to whole patches (``valid_px_B2``, pixels); on
a feature map of stride ``s`` it covers ``ceil(valid_px / s)`` cells. Every operation that mixes
neighbouring positions is made blind to the rest: attention masks padded keys, pooling averages
valid cells only, a 3x3 convolution sees zeros beyond the region (as at an image border),
bilinear upsampling sees the region's edge values repeated (as ``F.interpolate`` clamps at a
border), and normalisation statistics are taken over the region. With these, an image padded
into a larger batch gives the same outputs inside its region as the image alone.

Legend: B batch, C channels, h x w map size.
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def valid_cells(valid_px_B2: torch.Tensor, stride: float) -> torch.Tensor:
    """``[B, 2]`` (rows, columns) of a stride-``stride`` map that the valid regions cover."""
    return torch.ceil(valid_px_B2.float() / stride).long()


def cell_mask(valid_B2: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` True inside each image's valid cells."""
    h, w = shape
    rows = torch.arange(h, device=valid_B2.device)[None, :, None] < valid_B2[:, 0, None, None]
    cols = torch.arange(w, device=valid_B2.device)[None, None, :] < valid_B2[:, 1, None, None]
    return rows & cols


def zero_beyond(m_BChw: torch.Tensor, valid_B2: torch.Tensor) -> torch.Tensor:
    """Zeros outside the valid cells (what a convolution's zero padding shows at a border)."""
    return m_BChw * cell_mask(valid_B2, m_BChw.shape[-2:])[:, None].to(m_BChw.dtype)


def replicate_beyond(m_BChw: torch.Tensor, valid_B2: torch.Tensor) -> torch.Tensor:
    """Each cell outside the valid region takes the value of the nearest valid cell (what
    bilinear interpolation reads past a border)."""
    B, _, h, w = m_BChw.shape
    rows_Bh = torch.minimum(torch.arange(h, device=m_BChw.device)[None], valid_B2[:, :1] - 1)
    cols_Bw = torch.minimum(torch.arange(w, device=m_BChw.device)[None], valid_B2[:, 1:] - 1)
    batch = torch.arange(B, device=m_BChw.device)[:, None, None]
    return m_BChw.permute(0, 2, 3, 1)[batch, rows_Bh[:, :, None], cols_Bw[:, None, :]].permute(0, 3, 1, 2)


def upsample2x(m_BChw: torch.Tensor, out_hw: tuple[int, int], valid_B2: torch.Tensor | None = None) -> torch.Tensor:
    """Bilinear 2x upsampling cropped to ``out_hw`` (a finer level of ceil-sized maps)."""
    if valid_B2 is not None:
        m_BChw = replicate_beyond(m_BChw, valid_B2)
    up = F.interpolate(m_BChw, scale_factor=2, mode="bilinear", align_corners=False)
    return up[..., :out_hw[0], :out_hw[1]]


def avg_pool(m_BChw: torch.Tensor, k: int, valid_B2: torch.Tensor | None = None) -> torch.Tensor:
    """``k x k`` average pooling (a window past the edge averages what it covers); with
    ``valid_B2``, over valid cells only."""
    if valid_B2 is None:
        return F.avg_pool2d(m_BChw, k, ceil_mode=True)
    mask = cell_mask(valid_B2, m_BChw.shape[-2:])[:, None].to(m_BChw.dtype)
    total = F.avg_pool2d(m_BChw * mask, k, ceil_mode=True)
    return total / F.avg_pool2d(mask, k, ceil_mode=True).clamp(min=1e-6)


class MaskedGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters) whose statistics, with ``valid_B2``, come from each
    image's valid cells only."""

    def forward(self, x: torch.Tensor, valid_B2: torch.Tensor | None = None) -> torch.Tensor:
        if valid_B2 is None:
            return super().forward(x)
        B, C, h, w = x.shape
        G = self.num_groups
        mask = cell_mask(valid_B2, (h, w))[:, None, None].to(x.dtype)  # [B, 1, 1, h, w]
        xg = x.reshape(B, G, C // G, h, w)
        count = mask.sum((-1, -2), keepdim=True).clamp(min=1) * (C // G)
        mean = (xg * mask).sum((2, 3, 4), keepdim=True) / count
        var = (((xg - mean) * mask) ** 2).sum((2, 3, 4), keepdim=True) / count
        out = ((xg - mean) / torch.sqrt(var + self.eps)).reshape(B, C, h, w)
        if self.affine:
            out = out * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return out
