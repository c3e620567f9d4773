"""Pixel decoder: fuse the backbone's multi-scale maps into per-pixel features and a flat
multi-scale memory for the query decoder.

Legend: B batch, C backbone dim, D decoder dim, L levels, M memory tokens (sum of h*w over levels).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F


def sine_position_embedding(h: int, w: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine/cosine position embedding ``[h*w, dim]`` (half the channels per axis)."""
    if dim % 4:
        raise ValueError(f"sine position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h * 2 * math.pi
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w * 2 * math.pi
    y = ys[:, None] * freq[None]  # [h, q]
    x = xs[:, None] * freq[None]  # [w, q]
    pos = torch.cat([y.sin()[:, None].expand(h, w, quarter), y.cos()[:, None].expand(h, w, quarter),
                     x.sin()[None].expand(h, w, quarter), x.cos()[None].expand(h, w, quarter)], dim=-1)
    return pos.reshape(h * w, dim).to(dtype or torch.float32)


class PixelDecoder(nn.Module):
    """FPN-style top-down fusion of maps ordered fine to coarse.

    ``forward(maps)`` returns ``pixel_BDhw`` (finest stride), ``memory_BMD`` and ``memory_pos_BMD``
    (every level flattened, with a learned level embedding and a sine position embedding).
    """

    def __init__(self, in_dim: int, dim: int = 128, num_levels: int = 4) -> None:
        super().__init__()
        self.dim = dim
        self.lateral = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in range(num_levels))
        self.memory_proj = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in range(num_levels))
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(8, dim), nn.GELU(),
                                    nn.Conv2d(dim, dim, 1))
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        nn.init.normal_(self.level_embed, std=0.02)

    def forward(self, maps: Sequence[torch.Tensor]):
        if len(maps) != len(self.lateral):
            raise ValueError(f"pixel decoder built for {len(self.lateral)} levels, got {len(maps)} maps")
        lat = [proj(m) for proj, m in zip(self.lateral, maps)]
        x = lat[-1]
        for m in reversed(lat[:-1]):
            x = m + F.interpolate(x, size=m.shape[-2:], mode="bilinear", align_corners=False)
        pixel_BDhw = self.output(x)
        memory, pos = [], []
        for i, (proj, m) in enumerate(zip(self.memory_proj, maps)):
            h, w = m.shape[-2:]
            memory.append(proj(m).flatten(2).transpose(1, 2) + self.level_embed[i])
            pos.append(sine_position_embedding(h, w, self.dim, m.device, m.dtype).expand(m.shape[0], -1, -1))
        return pixel_BDhw, torch.cat(memory, 1), torch.cat(pos, 1)
