"""Multi-scale bottleneck adapters, inserted after every backbone block and on every level the
pixel decoder reads, trained while the pre-trained weights stay frozen (pretrain-adapt-finetune).

Legend: B batch, N tokens (P prefix + gh*gw patches), D dim, R bottleneck width, h x w map size.

One adapter: down-projection D -> R, a multi-scale mixing of the token grid (depthwise 3x3
convolutions at several dilations, plus a global branch: the grid's mean through a linear layer),
GELU, a zero-initialised up-projection R -> D and a scale. The up-projection starts at zero, so
inserting adapters changes no output until they are trained.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn
import torch.nn.functional as F

DEFAULT_ADAPTERS = {"enabled": False, "bottleneck": 16, "dilations": [1, 2, 3], "scale": 1.0,
                    "share": "per_task", "blocks": True, "levels": True}
SHARED = "shared"


class MultiScaleAdapter(nn.Module):
    """``x + adapter(x)`` residual branch for token sequences or feature maps."""

    def __init__(self, dim: int, bottleneck: int, dilations: Sequence[int] = (1, 2, 3), scale: float = 1.0) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"adapters.bottleneck={bottleneck} must be >= 1")
        if not dilations or any(int(d) < 1 for d in dilations):
            raise ValueError(f"adapters.dilations={list(dilations)}: expected positive integers")
        self.down = nn.Linear(dim, bottleneck)
        self.mix = nn.ModuleList(nn.Conv2d(bottleneck, bottleneck, 3, padding=int(d), dilation=int(d),
                                           groups=bottleneck) for d in dilations)
        self.glob = nn.Linear(bottleneck, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = float(scale)

    def _mix_grid(self, h_BRhw: torch.Tensor) -> torch.Tensor:
        out = h_BRhw + sum(conv(h_BRhw) for conv in self.mix)
        return out + self.glob(h_BRhw.mean((2, 3)))[..., None, None]

    def tokens(self, x_BND: torch.Tensor, grid: tuple[int, int] | None, num_prefix: int = 1) -> torch.Tensor:
        """The branch for tokens (prefix first, then the patch grid in row-major order). Without a
        grid (visible-only encoding keeps no full grid) the mixing is skipped: pointwise only."""
        h = self.down(x_BND)
        if grid is not None:
            gh, gw = grid
            prefix, patches = h[:, :num_prefix], h[:, num_prefix:]
            B, _, R = patches.shape
            m = self._mix_grid(patches.transpose(1, 2).reshape(B, R, gh, gw)).flatten(2).transpose(1, 2)
            glob = self.glob(patches.mean(1, keepdim=True))
            h = torch.cat([prefix + glob, m], 1)
        return self.scale * self.up(F.gelu(h))

    def maps(self, x_BDhw: torch.Tensor) -> torch.Tensor:
        """The branch for a feature map ``[B, D, h, w]``."""
        h = self.down(x_BDhw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        h = F.gelu(self._mix_grid(h))
        return (self.scale * self.up(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)


class ModelAdapters(nn.Module):
    """All adapters of a generalist: ``blocks[i][key]`` after backbone block i and ``levels[l][key]``
    on the l-th map the pixel decoder reads, with ``key`` the task name (``share: per_task``) or
    ``"shared"``."""

    def __init__(self, cfg: Mapping[str, Any], tasks: Sequence[str], dim: int, depth: int, num_levels: int) -> None:
        super().__init__()
        cfg = {**DEFAULT_ADAPTERS, **cfg}
        unknown = sorted(set(cfg) - set(DEFAULT_ADAPTERS))
        if unknown:
            raise ValueError(f"adapters: unknown option(s) {unknown}; expected {sorted(DEFAULT_ADAPTERS)}")
        if cfg["share"] not in ("per_task", SHARED):
            raise ValueError(f"adapters.share={cfg['share']!r}; expected 'per_task' or 'shared'")
        self.share = cfg["share"]
        keys = list(tasks) if self.share == "per_task" else [SHARED]
        make = lambda: nn.ModuleDict({k: MultiScaleAdapter(dim, int(cfg["bottleneck"]), cfg["dilations"],
                                                           float(cfg["scale"])) for k in keys})
        self.blocks = nn.ModuleList(make() for _ in range(depth if cfg["blocks"] else 0))
        self.levels = nn.ModuleList(make() for _ in range(num_levels if cfg["levels"] else 0))

    def key(self, task: str) -> str:
        return task if self.share == "per_task" else SHARED

    def after_block(self, task: str):
        """A hook for :meth:`MoEViT.forward_multiscale`: ``(i, x, grid) -> x`` after block i."""
        if not len(self.blocks):
            return None
        key = self.key(task)
        return lambda i, x, grid: x + self.blocks[i][key].tokens(x, grid)

    def on_levels(self, maps: Sequence[torch.Tensor], task: str) -> list[torch.Tensor]:
        if not len(self.levels):
            return list(maps)
        key = self.key(task)
        # Added in place to a copy, so each map keeps its memory layout (and the model its exact
        # outputs while the up-projections are zero).
        return [m.clone().add_(self.levels[i][key].maps(m)) for i, m in enumerate(maps)]
