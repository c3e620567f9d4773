"""Pixel decoder: fuse the backbone's multi-scale maps into per-pixel features and a flat
multi-scale memory for the query decoder.

Legend: B batch, C backbone dim, D decoder dim, L levels, M memory tokens (sum of h*w over levels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ..models.padding import MaskedGroupNorm, cell_mask, upsample2x, valid_cells, zero_beyond


def grid_centres(grid: tuple[int, int], device=None, extent: tuple[float, float] | None = None) -> torch.Tensor:
    """Normalised ``(x, y)`` centre of every cell of a ``gh x gw`` grid ``[N, 2]``, row-major (the
    token order of a feature map, and of the backbone's patches when the grid is its patch grid).
    ``extent``: how many cells span the unit square (default: the grid itself; a padded canvas
    measured in a larger frame has an extent larger than its grid)."""
    gh, gw = grid
    eh, ew = extent or grid
    ys = (torch.arange(gh, device=device, dtype=torch.float32) + 0.5) / eh
    xs = (torch.arange(gw, device=device, dtype=torch.float32) + 0.5) / ew
    return torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(gh * gw, 2)


def sine_embed_points(points_N2: torch.Tensor, dim: int) -> torch.Tensor:
    """Sine/cosine embedding ``[..., dim]`` of normalised ``(x, y)`` points in [0, 1] (half the
    channels per axis): the memory tokens' positions and the queries' use the same code, so a
    query placed at a token's centre gets that token's position embedding."""
    if dim % 4:
        raise ValueError(f"sine position embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=points_N2.device, dtype=torch.float32) / quarter))
    x = points_N2[..., 0:1].float() * 2 * math.pi * freq
    y = points_N2[..., 1:2].float() * 2 * math.pi * freq
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


MEMORY_SOURCES = ("separate", "fpn")


@dataclass
class DecoderInputs:
    """What the pixel decoder hands to the query decoder and the task heads."""

    pixel_BDhw: torch.Tensor  # per-pixel features at the finest stride
    memory_BMD: torch.Tensor  # every level flattened, fine to coarse
    memory_pos_BMD: torch.Tensor  # sine position + nothing learned (level embedding is in memory)
    centres_M2: torch.Tensor  # (x, y) centre of each memory token, normalised by the frame
    strides_M: torch.Tensor  # stride (input pixels) of each memory token's level
    shapes: list[tuple[int, int]]  # (h, w) of each level
    frame: tuple[int, int] | None = None  # the size (pixels) positions are normalised by; None: the canvas
    memory_valid_BM: torch.Tensor | None = None  # padded batches: True for memory tokens inside an image
    valid_px_B2: torch.Tensor | None = None  # padded batches: each image's valid region (pixels)


class PixelDecoder(nn.Module):
    """FPN-style top-down fusion of maps ordered fine to coarse.

    ``forward(maps, stem_maps)`` returns :class:`DecoderInputs`. ``memory`` says where the query
    decoder's memory comes from: ``separate`` (a 1x1 projection of each backbone map, apart from
    the fused per-pixel path) or ``fpn`` (the fused levels themselves, as Mask2Former's transformer
    decoder reads its pixel decoder: whatever trains the query decoder, masked image modelling
    included, then also trains the laterals the per-pixel features are built from).

    With ``stem_channels`` (the conv stem's stage widths), the stem's map at the finest level's
    stride is added to it through a 1x1 convolution: backbone maps at strides below the patch
    size are only resampled tokens, the stem's map carries real high-resolution detail. (With
    ``memory="fpn"`` the memory's finest level carries it too; ``separate`` memory is backbone-only.)
    """

    def __init__(self, in_dim: int, dim: int = 128, num_levels: int = 4, stem_channels: Sequence[int] = (),
                 finest_stride: int = 4, memory: str = "separate") -> None:
        super().__init__()
        if memory not in MEMORY_SOURCES:
            raise ValueError(f"decoder.memory={memory!r}; expected one of {', '.join(MEMORY_SOURCES)}")
        self.dim = dim
        self.lateral = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in range(num_levels))
        self.memory_proj = nn.ModuleList(nn.Conv2d(in_dim, dim, 1) for _ in range(num_levels)) \
            if memory == "separate" else None
        # Stem stage i has stride 2^(i+1); use the one at the finest level's stride, if any.
        stage = int(math.log2(finest_stride)) - 1
        self.stem_stage = stage if 0 <= stage < len(stem_channels) else None
        self.stem_lateral = nn.Conv2d(stem_channels[stage], dim, 1) if self.stem_stage is not None else None
        self.finest_stride = finest_stride
        self.output = nn.Sequential(nn.Conv2d(dim, dim, 3, padding=1), MaskedGroupNorm(8, dim), nn.GELU(),
                                    nn.Conv2d(dim, dim, 1))
        self.level_embed = nn.Parameter(torch.zeros(num_levels, dim))
        nn.init.normal_(self.level_embed, std=0.02)

    def forward(self, maps: Sequence[torch.Tensor], stem_maps: Sequence[torch.Tensor] = (),
                image_size: tuple[int, int] | None = None, frame: tuple[int, int] | None = None,
                valid_px_B2: torch.Tensor | None = None) -> DecoderInputs:
        """``maps`` fine to coarse (strides ``finest_stride * 2^l``). ``frame`` (default: the
        canvas, ``image_size``) is the size token positions are normalised by; ``valid_px_B2``
        (padded batches) each image's valid region, outside which nothing is read (see
        :mod:`moe_vision.models.padding`) and the memory is masked."""
        if len(maps) != len(self.lateral):
            raise ValueError(f"pixel decoder built for {len(self.lateral)} levels, got {len(maps)} maps")
        strides = [self.finest_stride * 2 ** i for i in range(len(maps))]
        valid = [None if valid_px_B2 is None else valid_cells(valid_px_B2, s) for s in strides]
        lat = [proj(m) for proj, m in zip(self.lateral, maps)]
        if self.stem_lateral is not None and len(stem_maps) > self.stem_stage:
            lat[0] = lat[0] + self.stem_lateral(stem_maps[self.stem_stage])
        fused = [lat[-1]]  # coarse to fine
        for i in reversed(range(len(lat) - 1)):
            fused.append(lat[i] + upsample2x(fused[-1], lat[i].shape[-2:], valid[i + 1]))
        fused.reverse()
        conv3, norm, act, conv1 = self.output
        pixel_BDhw = conv1(act(norm(conv3(fused[0] if valid[0] is None else zero_beyond(fused[0], valid[0])),
                                    valid[0])))
        levels = fused if self.memory_proj is None else [proj(m) for proj, m in zip(self.memory_proj, maps)]
        if frame is None:
            frame = tuple(image_size) if image_size else tuple(n * strides[0] for n in maps[0].shape[-2:])
        memory, pos, centres, strides_M, shapes, masks = [], [], [], [], [], []
        for i, (level, m) in enumerate(zip(levels, maps)):
            h, w = m.shape[-2:]
            memory.append(level.flatten(2).transpose(1, 2) + self.level_embed[i])
            c = grid_centres((h, w), m.device, (frame[0] / strides[i], frame[1] / strides[i]))
            pos.append(sine_embed_points(c, self.dim).to(m.dtype).expand(m.shape[0], -1, -1))
            centres.append(c)
            strides_M.append(torch.full((h * w,), float(strides[i]), device=m.device))
            shapes.append((h, w))
            if valid[i] is not None:
                masks.append(cell_mask(valid[i], (h, w)).flatten(1))
        return DecoderInputs(pixel_BDhw, torch.cat(memory, 1), torch.cat(pos, 1), torch.cat(centres),
                             torch.cat(strides_M), shapes, tuple(frame), torch.cat(masks, 1) if masks else None,
                             valid_px_B2)
