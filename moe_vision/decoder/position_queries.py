"""Questions asked at image positions: GLID's "what is here?" queries to the shared decoder.

A position query's content is the decoder's shared mask query (learned query 1) and its position
the sine embedding of a point, the code the memory tokens' positions use. Masked image modelling
asks one per masked patch ("which pixels are here?"); the dense tasks in ``mode=queries`` ask one
per cell of a regular grid ("which class / which depth is here?"), so what pre-training trains is
exactly what those tasks read, and only the topmost linear layer differs.

Legend: B batch, N positions asked, D decoder dim, gh x gw grid, s grid stride (pixels),
K values per cell.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.padding import cell_mask, valid_cells
from .pixel_decoder import DecoderInputs, grid_centres, sine_embed_points
from .query_decoder import Queries, gaussian_attention_bias

CLS_QUERY, MASK_QUERY = 0, 1


def ask_positions(decoder, feats: DecoderInputs, centres_BN2: torch.Tensor, cell_wh: tuple[float, float],
                  with_cls: bool = False, return_all: bool = False, asked_BN: torch.Tensor | None = None):
    """The decoder's answers ``[B, N, D]`` to one mask query at each point (``[B, 1 + N, D]`` with
    the [CLS] query, learned query 0, asked first); with ``return_all`` every layer's answers.
    ``cell_wh``: the normalised size of the cell each point stands for; with the decoder's
    ``position_prior`` > 0 each mask query's cross-attention is biased towards memory tokens near
    its point (a Gaussian of that width), the [CLS] query's is not. ``asked_BN`` (padded
    batches): False for points outside the image, which the other queries do not attend to."""
    B, N = centres_BN2.shape[:2]
    content = decoder.query_embed[MASK_QUERY].expand(B, N, -1)
    pos = sine_embed_points(centres_BN2, decoder.dim).to(content.dtype)
    bias = None
    if decoder.position_prior > 0:
        cells_BN4 = torch.cat([centres_BN2, centres_BN2.new_tensor(cell_wh).expand(B, N, 2)], -1)
        bias = gaussian_attention_bias(cells_BN4, feats.centres_M2, decoder.position_prior)
    if with_cls:
        content = torch.cat([decoder.query_embed[CLS_QUERY].expand(B, 1, -1), content], 1)
        pos = torch.cat([decoder.query_pos[CLS_QUERY].expand(B, 1, -1), pos], 1)
        if bias is not None:
            bias = torch.cat([bias.new_zeros(B, 1, 1, bias.shape[-1]), bias], 2)
    self_mask = None
    if asked_BN is not None:
        keys_BQ = torch.cat([asked_BN.new_ones(B, 1), asked_BN], 1) if with_cls else asked_BN
        self_mask = keys_BQ[:, None, None, :]
    return decoder(feats.memory_BMD, feats.memory_pos_BMD, return_all=return_all,
                   queries=Queries(content, pos, cross_bias_BhQM=bias, self_mask_QQ=self_mask),
                   centres_M2=feats.centres_M2, memory_valid_BM=feats.memory_valid_BM)


def check_mask_query(task_type: str, num_queries: int) -> None:
    """Refuse a decoder without the mask query (learned query 1) that position queries ask."""
    if num_queries < 2:
        raise ValueError(f"{task_type} mode=queries asks the decoder's mask query (learned query 1): "
                         f"decoder.num_queries={num_queries} must be >= 2")


def query_grid(image_size: tuple[int, int], stride: int, where: str) -> tuple[int, int]:
    """The ``(gh, gw)`` grid of cells of ``stride`` pixels covering the image; ``where`` names the
    option in the error when the image is not a whole number of cells."""
    H, W = image_size
    if stride < 1 or H % stride or W % stride:
        raise ValueError(f"{where}={stride}: the image size {H}x{W} must be a multiple of it")
    return H // stride, W // stride


class CellHead(nn.Module):
    """The topmost linear layer of a dense task posed as queries: each grid cell's answer ->
    ``K`` values for each of its ``s x s`` pixels, assembled into a map ``[B, K, gh s, gw s]``."""

    def __init__(self, dim: int, stride: int, channels: int) -> None:
        super().__init__()
        self.stride, self.channels = int(stride), int(channels)
        self.linear = nn.Linear(dim, self.stride ** 2 * self.channels)

    def forward(self, answers_BND: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (gh, gw), s, K = grid, self.stride, self.channels
        cells = self.linear(answers_BND).reshape(-1, gh, gw, s, s, K)
        return cells.permute(0, 5, 1, 3, 2, 4).reshape(-1, K, gh * s, gw * s)


def ask_grid(decoder, feats: DecoderInputs, grid: tuple[int, int], return_all: bool = False,
             stride: int | None = None):
    """The answers to one mask query per cell of ``grid`` over the canvas (as :func:`ask_positions`).
    With the cells' ``stride`` (pixels), cells are placed and sized in the frame's coordinates, and
    in a padded batch the cells beyond an image are not attended to by its other cells."""
    B, device = feats.memory_BMD.shape[0], feats.memory_BMD.device
    extent, asked = grid, None
    if stride is not None and feats.frame is not None:
        extent = (feats.frame[0] / stride, feats.frame[1] / stride)
        if feats.valid_px_B2 is not None:
            asked = cell_mask(valid_cells(feats.valid_px_B2, stride), grid).flatten(1)
    return ask_positions(decoder, feats, grid_centres(grid, device, extent).expand(B, -1, -1),
                         (1 / extent[1], 1 / extent[0]), return_all=return_all, asked_BN=asked)
