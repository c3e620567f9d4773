"""Model checkpoints: one safetensors file whose header carries the model's JSON config,
so ``load_model(path)`` rebuilds the model from the file alone."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..io_utils import atomic_path
from .moe_vit import MoEViT

FORMAT = "moe_vision.model/1"
# Header key of files whose routers' expert masks (``router.allowed.<task>``) are saved: a file
# without it predates the masks (every expert allowed); with it, a missing mask is an error.
MASKS_SAVED = "router_masks"
# Header format tag -> model class rebuilt as ``cls(**config)``; other rooms register theirs
# (the generalist model lives in moe_vision.tasks, which models/ must not import).
MODEL_FORMATS: dict[str, type] = {FORMAT: MoEViT}


def register_format(tag: str, cls: type) -> None:
    MODEL_FORMATS[tag] = cls


def save_model(model, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write weights and ``model.config`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    fmt = getattr(model, "checkpoint_format", FORMAT)
    metadata = {"format": fmt, "config": json.dumps(model.config), MASKS_SAVED: "1", **(extra_metadata or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of a checkpoint, with a clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is not a readable safetensors file ({e})") from None


def _model_of(meta: dict[str, str], name) -> torch.nn.Module:
    if meta.get("format") not in MODEL_FORMATS or "config" not in meta:
        raise ValueError(f"checkpoint {name} has no moe-vision config in its header "
                         f"(format={meta.get('format')!r}, expected one of {sorted(MODEL_FORMATS)})")
    return MODEL_FORMATS[meta["format"]](**json.loads(meta["config"]))


def load_model(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a model (backbone or generalist) from a checkpoint written by :func:`save_model`."""
    model = _model_of(read_metadata(path), path)
    load_weights(model, path, map_location)
    return model


def load_model_bytes(data: bytes, name: str = "checkpoint", map_location: str | torch.device = "cpu"):
    """:func:`load_model` from a checkpoint file's bytes (e.g. read from an archive): safetensors
    only, nothing unpickled."""
    from safetensors.torch import load as load_bytes
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
        state = load_bytes(data)
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{name} is not a readable safetensors file ({e})") from None
    model = _model_of(meta, name)
    check_and_load(model, {k: v.to(map_location) for k, v in state.items()}, name, MASKS_SAVED in meta)
    return model


# Routers' expert masks (``router.allowed.<task>``) did not exist before expert budgets.
MASK_KEY = re.compile(r"\.router\.allowed\.[^.]+$")
_EXPERT_KEY = re.compile(r"\.(experts\.(\d+\.)?(w1|w2|b1|b2)|q_experts\.\w+|o_experts\.\w+|gates\.\w+\.weight)$")


def load_weights(model, path: str | Path, map_location: str | torch.device = "cpu") -> None:
    """Load a checkpoint's weights into ``model``, naming the first mismatch clearly."""
    masks_saved = MASKS_SAVED in read_metadata(path)
    check_and_load(model, load_file(str(path), device=str(map_location)), path, masks_saved)


def check_and_load(model, state: dict[str, torch.Tensor], path, masks_saved: bool = True) -> None:
    """``model.load_state_dict(state)`` after checking keys and shapes, naming the first mismatch.
    ``masks_saved=False``: a file written before the routers' expert masks existed; its routers
    allow every expert."""
    expected = model.state_dict()
    if not masks_saved:
        state = {**{k: torch.ones_like(v) for k, v in expected.items() if MASK_KEY.search(k)}, **state}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]} (check the model name and tasks)")
    for k, v in expected.items():
        if k in state and state[k].shape != v.shape:
            if _EXPERT_KEY.search(k):
                raise ValueError(
                    f"checkpoint {path}: {k} holds {state[k].shape[0]} experts (shape {tuple(state[k].shape)}), "
                    f"but the model config expects {v.shape[0]} (shape {tuple(v.shape)}); "
                    "set moe.num_experts to match the checkpoint")
            raise ValueError(f"checkpoint {path}: {k} has shape {tuple(state[k].shape)}, "
                             f"the model expects {tuple(v.shape)}")
    model.load_state_dict(state)
