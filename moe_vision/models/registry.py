"""timm registry entrypoints: ``timm.create_model("moe_vit_tiny_patch8", tasks=[...])``."""
from __future__ import annotations

from timm.models import register_model

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

# Factory arguments timm passes to every entrypoint; our models have no hub weights.
_TIMM_FACTORY_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _create(name: str, pretrained: bool = False, **kwargs) -> MoEViT:
    for k in _TIMM_FACTORY_KWARGS:
        kwargs.pop(k, None)
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are downloaded; build it and use "
                         "moe_vision.models.upcycle_from_dense(...) or load_model(path) on a local file")
    return MoEViT(**{**MODEL_ARGS[name], **kwargs})


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
