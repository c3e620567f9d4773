"""MoE-ViT backbone, timm registry entrypoints, checkpoints and sparse upcycling."""
from . import registry  # noqa: F401  (registers the timm entrypoints)
from .checkpoint import load_model, load_weights, save_model
from .factory import build_model, count_parameters
from .moe_vit import MoEBlock, MoEViT
from .registry import MODEL_ARGS
from .upcycle import load_dense_state_dict, upcycle_from_dense

__all__ = ["MODEL_ARGS", "MoEBlock", "MoEViT", "build_model", "count_parameters", "load_dense_state_dict", "load_model", "load_weights",
           "save_model", "upcycle_from_dense"]
