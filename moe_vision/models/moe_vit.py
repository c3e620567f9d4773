"""MoE-ViT: a ViT whose MLPs (and optionally attentions) are task-routed mixtures of experts.

Legend: B batch, C channels, N patch tokens, P prefix (class) tokens, D dim, gh x gw patch grid.

Parameter names follow timm's VisionTransformer (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.i.norm1/attn/ls1/norm2/mlp/ls2``, ``norm``) so dense timm checkpoints map
onto it directly (see :mod:`moe_vision.models.upcycle`).
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
from torch import nn
import torch.nn.functional as F
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, LayerScale, Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from timm.models import register_notrace_module
from timm.models.vision_transformer import Attention

from ..moe import AuxLosses, AuxLossWeights, MoEAttention, MoEConfig, MoEMLP, RoutingOutput, check_task
from ..moe import compute_aux_losses, resolve_blocks
from .padding import avg_pool, cell_mask, replicate_beyond, valid_cells, zero_beyond
from .task_norm import TaskBatchNorm2d, check_task_norm

_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@register_notrace_module  # a leaf for torch.fx: routing has data-dependent shapes
class MoEBlock(nn.Module):
    """Pre-norm transformer block whose attention and/or MLP may be task-routed experts."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, tasks: Sequence[str],
                 moe: MoEConfig, moe_mlp: bool, moe_attn: bool, drop_path: float, init_values: float | None,
                 name: str) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        if moe_attn:
            self.attn = MoEAttention(dim, num_heads, tasks, moe.layer_num_experts.get(f"{name}.attn", moe.attn_num_experts),
                                     moe.attn_top_k, qkv_bias,
                                     moe.router_mode, moe.renormalize, moe.noisy_gating, layer_name=f"{name}.attn",
                                     kernel=moe.kernel)
        else:
            self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        if moe_mlp:
            if hidden % moe.granularity:
                raise ValueError(f"moe.granularity={moe.granularity} must divide the MLP hidden width {hidden}")
            self.mlp = MoEMLP(dim, hidden // moe.granularity, tasks,
                              moe.layer_num_experts.get(f"{name}.mlp", moe.num_experts), moe.top_k, moe.router_mode,
                              moe.renormalize, moe.noisy_gating, moe.capacity_factor, moe.activation,
                              moe.expert_scale, layer_name=f"{name}.mlp", added_experts=moe.added_experts,
                              task_added_groups=moe.task_added_groups, kernel=moe.kernel)
        else:
            self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, task: str, attn_mask: torch.Tensor | None = None,
                valid_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, list[RoutingOutput]]:
        """``attn_mask`` ``[B, 1, 1, N]`` (True: a key that may be attended) and ``valid_idx`` (the
        flat indices of the tokens that are not padding, which alone go through MoE MLP experts
        and count in their routing statistics) come with padded batches."""
        routing = []
        h = self.norm1(x)
        if isinstance(self.attn, MoEAttention):
            h, r = self.attn(h, task, attn_mask=attn_mask)
            routing.append(r)
        else:
            h = self.attn(h, attn_mask=attn_mask) if attn_mask is not None else self.attn(h)
        x = x + self.drop_path1(self.ls1(h))
        h = self.norm2(x)
        if isinstance(self.mlp, MoEMLP):
            if valid_idx is not None:
                flat = h.reshape(-1, h.shape[-1])
                y, r = self.mlp(flat.index_select(0, valid_idx), task)
                h = flat.new_zeros(flat.shape).index_copy(0, valid_idx, y).reshape(h.shape)
            else:
                h, r = self.mlp(h, task)
            if r is not None:  # None: the static-shaped export path keeps no routing statistics
                routing.append(r)
        else:
            h = self.mlp(h)
        return x + self.drop_path2(self.ls2(h)), routing


class ConvStem(nn.Module):
    """Convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better"):
    log2(patch_size) stages, each a 3x3 stride-2 convolution followed by ``depth - 1`` 3x3
    stride-1 convolutions (BatchNorm + ReLU), then a 1x1 projection, in place of the single
    patchifying convolution; ViTs trained from scratch on little data optimise much faster with it.
    Stage i has ``width >> (stages - 1 - i)`` channels (``width`` defaults to ``embed_dim``).
    Output ``[B, gh, gw, D]`` like timm's ``PatchEmbed(output_fmt="NHWC")``; with
    ``return_stages`` also each stage's map ``[B, C_i, H / 2^(i+1), W / 2^(i+1)]`` (fine to coarse),
    which dense heads use as high-resolution detail."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depth: int = 1,
                 width: int | None = None, tasks: Sequence[str] = (), task_norm: str = "shared") -> None:
        super().__init__()
        check_task_norm(task_norm)

        def norm(c: int) -> nn.Module:
            return nn.BatchNorm2d(c) if task_norm == "shared" else TaskBatchNorm2d(c, tasks, task_norm == "affine")
        n = int(math.log2(patch_size))
        if 2 ** n != patch_size:
            raise ValueError(f"stem='conv' needs a power-of-two patch_size, got {patch_size}")
        if depth < 1:
            raise ValueError(f"stem_depth must be >= 1, got {depth}")
        width = width or embed_dim
        layers, c_in, self.stage_ends, self.stage_channels = [], in_chans, [], []
        for i in range(n):
            c_out = max(16, width >> (n - 1 - i))
            for j in range(depth):
                layers += [nn.Conv2d(c_in if j == 0 else c_out, c_out, 3, 2 if j == 0 else 1, 1, bias=False),
                           norm(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
            self.stage_ends.append(len(layers) - 1)
            self.stage_channels.append(c_out)
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.stem = nn.Sequential(*layers)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor, return_stages: bool = False, valid_px_B2: torch.Tensor | None = None,
                task: str | None = None):
        """``valid_px_B2`` (padded batches): after every activation, zeros beyond each image's
        valid region, so that padding acts like the border of the image alone. ``task`` picks the
        normalisation statistics under ``task_norm`` other than ``shared``."""
        stages, stride = [], 1
        for i, layer in enumerate(self.stem):
            if isinstance(layer, nn.Conv2d):
                stride *= layer.stride[0]
            x = layer(x, task) if isinstance(layer, TaskBatchNorm2d) else layer(x)
            if valid_px_B2 is not None and isinstance(layer, nn.ReLU):
                x = zero_beyond(x, valid_cells(valid_px_B2, stride))
            if return_stages and i in self.stage_ends:
                stages.append(x)
        x = x.permute(0, 2, 3, 1)
        return (x, stages) if return_stages else x


class MoEViT(nn.Module):
    """Task-conditioned sparse MoE vision transformer backbone.

    With timm's plain calls (``model(x)``, ``forward_features(x)``, ``forward_head``,
    ``reset_classifier``, ``features_only=True``) it is a timm model of its first task
    (:attr:`default_task`): ``forward_features`` gives the patch features ``[B, gh, gw, D]``
    (``output_fmt`` NHWC), ``forward_head`` averages them and applies the classifier
    (``num_classes``, default 0: none, the pooled features). Every method also takes ``task``.

    Args:
        tasks: task names, e.g. ``["cls", "det", "seg"]``. Each gets a learned token embedding
            (zero-initialised) and, in every MoE layer, its own router.
        img_size: default input size; other sizes divisible by ``patch_size`` also work (the
            position embedding is resampled).
        moe: a :class:`MoEConfig` or a dict of its fields.
        stem: ``"patch"`` (timm's patch embedding; needed for upcycling timm checkpoints) or
            ``"conv"`` (:class:`ConvStem`).
        stem_depth, stem_width: convolutions per stage and width of the conv stem.
        task_norm: the conv stem's BatchNorm: ``shared`` (one set of statistics), ``stats`` (running
            statistics per task) or ``affine`` (statistics, scale and shift per task); see
            :mod:`moe_vision.models.task_norm`.
        multiscale: how :meth:`forward_multiscale` builds its maps: ``"spread"`` (one map per scale
            from evenly spaced blocks, shallow to deep) or ``"last"`` (every scale from the last
            block, as ViTDet's simple feature pyramid).
        num_classes, global_pool: timm's classifier on the pooled features (0: none) and the
            pooling (``"avg"`` over the patch grid, ``""``: none); the toolkit's task heads live in
            :mod:`moe_vision.tasks` and do not use it.
        device, dtype: where and in which dtype the parameters are created (timm's factory
            arguments).
    """

    def __init__(
        self,
        tasks: Iterable[str] = ("cls",),
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        moe: MoEConfig | dict | None = None,
        stem: str = "patch",
        stem_depth: int = 1,
        stem_width: int | None = None,
        multiscale: str = "spread",
        task_norm: str = "shared",
        num_classes: int = 0,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        tasks = list(tasks)
        bad = [t for t in tasks if not isinstance(t, str) or not _TASK_NAME.match(t)]
        if not tasks or bad or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct identifiers like 'cls', 'det'; got {tasks}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        moe_cfg = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe)
        self.config = dict(tasks=tasks, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           qkv_bias=qkv_bias, drop_path_rate=drop_path_rate, init_values=init_values,
                           moe=moe_cfg.to_dict(), stem=stem, stem_depth=stem_depth, stem_width=stem_width,
                           multiscale=multiscale, task_norm=task_norm,
                           **({"num_classes": num_classes} if num_classes else {}),
                           **({"global_pool": global_pool} if global_pool != "avg" else {}))
        if multiscale not in ("spread", "last"):
            raise ValueError(f"multiscale={multiscale!r}; expected 'spread' or 'last'")
        self.multiscale = multiscale
        self.moe_config = moe_cfg
        self.aux_weights = AuxLossWeights(**moe_cfg.aux_weights)
        self.patch_size, self.embed_dim, self.num_features = patch_size, embed_dim, embed_dim
        self.num_prefix_tokens = 1
        if stem == "patch":
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, flatten=False,
                                          output_fmt="NHWC", strict_img_size=False)
        elif stem == "conv":
            self.patch_embed = ConvStem(img_size, patch_size, in_chans, embed_dim, stem_depth, stem_width, tasks,
                                        task_norm)
        else:
            raise ValueError(f"stem={stem!r}; expected 'patch' (timm's patchifying conv) or 'conv'")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.task_embed = nn.ParameterDict({t: nn.Parameter(torch.zeros(1, 1, embed_dim)) for t in tasks})
        mlp_idx = set(resolve_blocks(moe_cfg.mlp_blocks, depth, "moe.mlp_blocks"))
        attn_idx = set(resolve_blocks(moe_cfg.attn_blocks, depth, "moe.attn_blocks"))
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList([
            MoEBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, tasks, moe_cfg, i in mlp_idx, i in attn_idx,
                     dpr[i], init_values, name=f"blocks.{i}")
            for i in range(depth)
        ])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.grad_checkpointing = False  # recompute block activations in backward to save memory
        # timm's classifier interface (the toolkit's own heads live in moe_vision.tasks)
        self.in_chans, self.head_hidden_size, self.output_fmt = in_chans, embed_dim, "NHWC"
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}") for i in range(depth)]
        self.num_classes, self.global_pool = 0, global_pool
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes, global_pool)
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # ----------------------------------------------------------------- introspection
    @property
    def tasks(self) -> list[str]:
        return list(self.task_embed.keys())

    @property
    def default_task(self) -> str:
        """The task of calls that name none (timm's ``model(x)``, ``features_only``): the first."""
        return self.tasks[0]

    # ----------------------------------------------------------------- timm's model interface
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier of ``num_classes`` outputs (0: none) on the same device and dtype."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool={global_pool!r}; expected 'avg' or '' (none)")
            self.global_pool = global_pool
        self.num_classes = int(num_classes)
        like = self.pos_embed
        self.head = (nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning rates (timm's optimizer factory)."""
        return dict(stem=r"^cls_token|^pos_embed|^patch_embed|^task_embed",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "task_embed.*"}

    def prune_intermediate_layers(self, indices: int | Sequence[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and the final norm / the classifier) for a
        features-only model; returns the indices (timm's feature extraction calls this)."""
        take = self._take_indices(indices)
        self.blocks = self.blocks[:max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take

    def moe_modules(self) -> dict[str, nn.Module]:
        """MoE layer name -> the layer (``MoEAttention`` or ``MoEMLP``), in forward order: the one
        list of a model's MoE layers that the budget, extraction and statistics read."""
        return {m.layer_name: m for blk in self.blocks for m in (blk.attn, blk.mlp)
                if isinstance(m, (MoEAttention, MoEMLP))}

    def moe_layers(self) -> dict[str, int]:
        """MoE layer name -> expert count, in forward order."""
        return {name: m.num_experts for name, m in self.moe_modules().items()}

    def allowed_experts(self) -> dict[str, dict[str, list[int]]]:
        """MoE layer name -> task -> the experts the task's router may choose (all of them unless
        ``train.expert_budget`` narrowed it)."""
        return {name: {t: m.router.allowed_mask(t).nonzero().flatten().tolist() for t in m.router.tasks}
                for name, m in self.moe_modules().items()}

    def aux_losses(self, routing: Sequence[RoutingOutput]) -> AuxLosses:
        """Weighted auxiliary losses (weights from ``moe.aux_weights``) over a step's routing outputs."""
        return compute_aux_losses(routing, self.aux_weights)

    # ----------------------------------------------------------------- forward
    @property
    def stem_channels(self) -> list[int]:
        """Channels of the conv stem's stage maps (stride 2, 4, ...); empty for the patch stem."""
        return list(getattr(self.patch_embed, "stage_channels", []))

    def _embed(self, x: torch.Tensor, stem_maps: list | None = None, frame: tuple[int, int] | None = None,
               valid_px_B2: torch.Tensor | None = None, task: str | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        if is_fx_symbolic_tracing():  # torch.fx: shapes are symbols, so the graph is traced for the default size
            x = self.patch_embed(x) if not isinstance(self.patch_embed, ConvStem) else self.patch_embed(x, task=task)
            return (torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1) + self.pos_embed,
                    tuple(self.patch_embed.grid_size))
        if x.ndim != 4:
            raise ValueError(f"expected images [B, C, H, W], got shape {tuple(x.shape)}")
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not divisible by patch size {p}; "
                             f"expected height and width that are multiples of {p}")
        if isinstance(self.patch_embed, ConvStem):
            x, stages = self.patch_embed(x, return_stages=True, valid_px_B2=valid_px_B2, task=task)  # [B, gh, gw, D]
            if stem_maps is not None:
                stem_maps.extend(stages)
        else:
            x = self.patch_embed(x)
        grid = tuple(x.shape[1:3])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x.flatten(1, 2)], dim=1) + self.position_embedding(
            grid, frame)
        return x, grid

    def position_embedding(self, grid: tuple[int, int], frame: tuple[int, int] | None = None) -> torch.Tensor:
        """``[1, P + gh*gw, D]``: the learned embedding resampled to the frame's patch grid (the
        canvas by default) and cropped to ``grid``. A frame that does not depend on the batch
        (a task's largest input) gives every patch the same embedding however much padding
        follows it."""
        frame_grid = grid if frame is None else (frame[0] // self.patch_size, frame[1] // self.patch_size)
        if frame_grid[0] < grid[0] or frame_grid[1] < grid[1]:
            raise ValueError(f"frame {frame} is smaller than the {grid[0]}x{grid[1]} patch grid of the input")
        pos = self.pos_embed
        if frame_grid != tuple(self.patch_embed.grid_size):
            pos = resample_abs_pos_embed(pos, new_size=frame_grid, old_size=self.patch_embed.grid_size,
                                         num_prefix_tokens=self.num_prefix_tokens)
        if frame_grid != grid:
            P, D = self.num_prefix_tokens, pos.shape[-1]
            patches = pos[:, P:].reshape(1, *frame_grid, D)[:, :grid[0], :grid[1]].reshape(1, -1, D)
            pos = torch.cat([pos[:, :P], patches], 1)
        return pos

    def _run(self, x: torch.Tensor, task: str, keep: set[int] = frozenset(), stem_maps: list | None = None,
             visible_BNv: torch.Tensor | None = None, after_block=None, frame: tuple[int, int] | None = None,
             valid_px_B2: torch.Tensor | None = None):
        check_task(task, self.tasks)
        if valid_px_B2 is not None and visible_BNv is not None:
            raise ValueError("padded batches (valid_px_B2) and visible-only encoding (visible_BNv) do not mix")
        x, grid = self._embed(x, stem_maps, frame, valid_px_B2, task)
        x = x + self.task_embed[task]
        attn_mask = valid_idx = None
        if valid_px_B2 is not None:  # padded batch: mask padded keys; experts see real tokens only
            valid_BN = cell_mask(valid_cells(valid_px_B2, self.patch_size), grid).flatten(1)
            valid_BN = torch.cat([valid_BN.new_ones(x.shape[0], self.num_prefix_tokens), valid_BN], 1)
            attn_mask = valid_BN[:, None, None, :]
            valid_idx = valid_BN.reshape(-1).nonzero().squeeze(1)
        if visible_BNv is not None:  # MAE-style: the blocks see the prefix and the visible patches only
            patches = torch.gather(x[:, 1:], 1, visible_BNv[..., None].expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], patches], 1)
        routing: list[RoutingOutput] = []
        kept = []
        for i, blk in enumerate(self.blocks):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, r = checkpoint(blk, x, task, attn_mask, valid_idx, use_reentrant=False)
            else:
                x, r = blk(x, task, attn_mask, valid_idx)
            if after_block is not None:  # e.g. adapters: (block index, tokens, patch grid or None) -> tokens
                x = after_block(i, x, None if visible_BNv is not None else grid)
            if not is_fx_symbolic_tracing():  # (a leaf block's routing is one symbol when traced)
                routing.extend(r)
            if i in keep:
                kept.append(x)
        return self.norm(x), kept, grid, routing

    def forward_tokens(self, x: torch.Tensor, task: str | None = None, return_routing: bool = False):
        """Tokens ``[B, P+N, D]`` (class token first) after the final norm; with ``return_routing``
        also the list of :class:`RoutingOutput` (one per MoE layer)."""
        tokens, _, _, routing = self._run(x, task or self.default_task)
        return (tokens, routing) if return_routing else tokens

    def forward_features(self, x: torch.Tensor, task: str | None = None, return_routing: bool = False):
        """Patch features ``[B, gh, gw, D]`` after the final norm (timm's unpooled features, NHWC);
        with ``return_routing`` also the routing of every MoE layer."""
        tokens, _, (gh, gw), routing = self._run(x, task or self.default_task)
        maps = tokens[:, self.num_prefix_tokens:].reshape(tokens.shape[0], gh, gw, tokens.shape[-1])
        return (maps, routing) if return_routing else maps

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """``global_pool`` over the patch grid of :meth:`forward_features`' maps, then the
        classifier (unless ``pre_logits``)."""
        if self.global_pool == "avg":
            features = features.mean(dim=(1, 2))
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor, task: str | None = None) -> torch.Tensor:
        if is_fx_symbolic_tracing():  # torch.fx makes every argument a symbol: it traces the default task
            task = None
        return self.forward_head(self.forward_features(x, task))

    def default_indices(self, n: int = 4) -> list[int]:
        """``n`` evenly spaced block indices ending at the last block."""
        step = max(1, len(self.blocks) // n)
        return sorted({len(self.blocks) - 1 - step * i for i in range(n) if len(self.blocks) - 1 - step * i >= 0})

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        depth = len(self.blocks)
        if indices is None:
            return self.default_indices()
        if isinstance(indices, int):
            return list(range(depth - indices, depth))
        return sorted(int(i) % depth for i in indices)

    def forward_intermediates(self, x: torch.Tensor, task: str | None = None,
                              indices: int | Sequence[int] | None = None, norm: bool = False,
                              return_routing: bool = False, stem_maps: list | None = None,
                              visible_BNv: torch.Tensor | None = None, after_block=None,
                              frame: tuple[int, int] | None = None, valid_px_B2: torch.Tensor | None = None,
                              output_fmt: str = "NCHW", intermediates_only: bool = False, stop_early: bool = False):
        """Final tokens and feature maps ``[B, D, gh, gw]`` after the given blocks (timm-style).

        ``indices`` is a list of block indices or an int n (the last n blocks); default: 4
        evenly spaced blocks. Returns ``(tokens, maps)`` or ``(tokens, maps, routing)``; with
        ``intermediates_only`` the maps alone (``output_fmt`` NCHW or NHWC), as timm's feature
        extraction asks (``stop_early`` is accepted: every block runs either way). A list
        passed as ``stem_maps`` receives the conv stem's stage maps. With ``visible_BNv`` (indices
        of the patches to keep, the same number per image) the blocks see only those patches
        (masked image modelling, MAE-style); the maps hold zeros at every other position and the
        tokens are the prefix and the kept patches. ``after_block(i, tokens, grid)`` (e.g. adapters)
        replaces the tokens after block i; ``grid`` is None when only visible patches are encoded.
        Padded batches: ``valid_px_B2`` (each image's valid region in pixels, whole patches) and
        ``frame`` (the size position embeddings are laid out for; see :meth:`position_embedding`).
        """
        output_fmt = getattr(output_fmt, "value", output_fmt)  # (timm passes its Format enum)
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r}; expected NCHW or NHWC")
        idx = self._take_indices(indices)
        tokens, kept, (gh, gw), routing = self._run(x, task or self.default_task, set(idx), stem_maps, visible_BNv,
                                                    after_block, frame, valid_px_B2)
        maps = []
        for h in kept:
            h = (self.norm(h) if norm else h)[:, self.num_prefix_tokens:]
            if visible_BNv is not None:
                h = h.new_zeros(h.shape[0], gh * gw, h.shape[-1]).scatter(
                    1, visible_BNv[..., None].expand(-1, -1, h.shape[-1]), h)
            maps.append(h.reshape(h.shape[0], gh, gw, -1).permute(0, 3, 1, 2))
        if output_fmt == "NHWC":
            maps = [m.permute(0, 2, 3, 1) for m in maps]
        if intermediates_only:
            return maps
        return (tokens, maps, routing) if return_routing else (tokens, maps)

    def forward_multiscale(self, x: torch.Tensor, task: str, scales: Sequence[float] = (2.0, 1.0, 0.5, 0.25),
                           return_routing: bool = False, stem_maps: list | None = None,
                           visible_BNv: torch.Tensor | None = None, after_block=None,
                           frame: tuple[int, int] | None = None, valid_px_B2: torch.Tensor | None = None):
        """Multi-scale feature maps for dense heads, ViTDet-style but parameter-free: one map per
        scale, resized by that scale (strides ``patch_size / scale``; a pooled map is rounded up
        to cover the whole grid), taken from evenly spaced blocks (``multiscale="spread"``) or all
        from the last block (``"last"``). A list passed as ``stem_maps`` receives the conv stem's
        stage maps (strides 2, 4, ...); ``visible_BNv``, ``after_block``, ``frame`` and
        ``valid_px_B2``: see :meth:`forward_intermediates`."""
        depth = len(self.blocks)
        if self.multiscale == "last":
            per_scale = [depth - 1] * len(scales)
        else:  # evenly spaced, deepest for the coarsest scale; shallow models repeat blocks
            step = max(1, depth // len(scales))
            per_scale = [max(0, depth - 1 - step * i) for i in reversed(range(len(scales)))]
        unique = sorted(set(per_scale))
        tokens, maps, routing = self.forward_intermediates(x, task, unique, norm=True, return_routing=True,
                                                           stem_maps=stem_maps, visible_BNv=visible_BNv,
                                                           after_block=after_block, frame=frame,
                                                           valid_px_B2=valid_px_B2)
        maps = [maps[unique.index(i)] for i in per_scale]
        grid_valid = None if valid_px_B2 is None else valid_cells(valid_px_B2, self.patch_size)
        out = []
        for m, s in zip(maps, scales):
            if s > 1:
                if grid_valid is not None:
                    m = replicate_beyond(m, grid_valid)
                m = F.interpolate(m, scale_factor=s, mode="bilinear", align_corners=False)
            elif s < 1:
                m = avg_pool(m, round(1 / s), grid_valid)
            out.append(m)
        return (out, routing) if return_routing else out
