"""timm registry entrypoints: ``timm.create_model("moe_vit_tiny_patch8", tasks=[...])``.

Each entrypoint has a default config (``model.pretrained_cfg``: input size, normalisation, first
conv, classifier; no weights to download) and goes through timm's builder, so timm's factory
options work: ``num_classes``, ``global_pool``, ``features_only`` / ``out_indices`` (the last blocks'
maps through :meth:`MoEViT.forward_intermediates`), ``device``, ``dtype``.
"""
from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .moe_vit import MoEViT

# Architecture of each size; anything here can be overridden by keyword arguments.
MODEL_ARGS: dict[str, dict] = {
    # A few seconds per training step on a laptop CPU; for tests and demos.
    "moe_vit_nano_patch8": dict(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3),
    "moe_vit_tiny_patch8": dict(img_size=64, patch_size=8, embed_dim=192, depth=12, num_heads=3),
    "moe_vit_tiny_patch16": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "moe_vit_small_patch16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "moe_vit_base_patch16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
}


def _cfg(args: dict) -> dict:
    size, grid = args["img_size"], args["img_size"] // args["patch_size"]
    return dict(url="", num_classes=0, input_size=(3, size, size), pool_size=(grid, grid), crop_pct=1.0,
                interpolation="bilinear", fixed_input_size=False, mean=(0.485, 0.456, 0.406),
                std=(0.229, 0.224, 0.225), first_conv="patch_embed.proj", classifier="head", license="apache-2.0")


default_cfgs = generate_default_cfgs({name: _cfg(args) for name, args in MODEL_ARGS.items()})


def _create(name: str, pretrained: bool = False, **kwargs) -> MoEViT:
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are downloaded; build it and use "
                         "moe_vision.models.upcycle_from_dense(...) or load_model(path) on a local file")
    kwargs.pop("cache_dir", None)
    return build_model_with_cfg(MoEViT, name, pretrained=False, feature_cfg=dict(feature_cls="getter", out_indices=4),
                                **{**MODEL_ARGS[name], **kwargs})


@register_model
def moe_vit_nano_patch8(pretrained: bool = False, **kwargs) -> MoEViT:
    return _create("moe_vit_nano_patch8", pretrained, **kwargs)


@register_model
def moe_vit_tiny_patch8(pretrained: bool = False, **kwargs) -> MoEViT:
    return _create("moe_vit_tiny_patch8", pretrained, **kwargs)


@register_model
def moe_vit_tiny_patch16(pretrained: bool = False, **kwargs) -> MoEViT:
    return _create("moe_vit_tiny_patch16", pretrained, **kwargs)


@register_model
def moe_vit_small_patch16(pretrained: bool = False, **kwargs) -> MoEViT:
    return _create("moe_vit_small_patch16", pretrained, **kwargs)


@register_model
def moe_vit_base_patch16(pretrained: bool = False, **kwargs) -> MoEViT:
    return _create("moe_vit_base_patch16", pretrained, **kwargs)
