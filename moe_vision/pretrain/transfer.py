"""Start a model from a pre-trained one: every tensor whose name and shape match is copied (the
encoder, the pixel and query decoders, the queries); the task heads and the new tasks' routers
are new; pre-training-only tensors (the MIM linear layer, the pre-training router) are ignored.
Optionally each new task's routers and task embedding start as copies of a pre-training task's.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

# Per-task tensors of the backbone: each MoE layer's router gate, the task embedding, per-task normalisation.
TASK_TENSOR = re.compile(r"^(?P<pre>.*(?:\.router\.gates|\.task_embed|backbone\.task_embed|\.per_task))\.(?P<task>[^.]+)"
                          r"(?P<post>(?:\..*)?)$")


def pretrained_state(source: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The tensors of a run directory's ``model.safetensors`` (or of that file itself)."""
    from safetensors.torch import load_file
    from ..models.checkpoint import read_metadata
    path = Path(source)
    path = path / "model.safetensors" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from={source}: no model.safetensors there "
                                "(expected a finished run directory or a .safetensors file)")
    read_metadata(path)  # clear error for a file that is not a moe-vision checkpoint
    return load_file(str(path)), path


KEEP = {"all": ("",), "encoder": ("backbone.",)}  # which pre-trained tensors a fine-tuning keeps


def init_from_pretrained(model: nn.Module, source: str | Path, init_routers_from: str | None = None,
                         keep: str = "all") -> dict:
    """Copy the pre-trained tensors of ``source`` into ``model`` and return a report
    ``{"source", "loaded", "new", "ignored", "routers_from", "heads_reshaped"}`` (lists of tensor names).

    A task head tensor present in both with different shapes (another label space) stays new and is
    listed in ``heads_reshaped``; any other tensor present in both with different shapes is
    refused, naming it and both shapes.
    ``init_routers_from`` names a task of the source (e.g. ``pretrain``) whose router gates and
    task embedding initialise every task of ``model`` that the source lacks. ``keep="encoder"``
    copies the backbone only (MAE-style transfer: the decoders and queries start fresh).
    """
    if keep not in KEEP:
        raise ValueError(f"model.init_keep={keep!r}; expected one of {sorted(KEEP)}")
    src, path = pretrained_state(source)
    src = {k: v for k, v in src.items() if k.startswith(KEEP[keep])}
    own = model.state_dict()
    # A task head sized for another label space (a task of the same name with other classes) is
    # left new: heads are the task-specific top layers that fine-tuning replaces.
    reshaped = sorted(n for n, t in own.items()
                      if n.startswith("heads.") and n in src and tuple(src[n].shape) != tuple(t.shape))
    src = {k: v for k, v in src.items() if k not in reshaped}
    for name, t in own.items():
        if name in src and tuple(src[name].shape) != tuple(t.shape):
            raise ValueError(f"model.init_from={source}: tensor {name} has shape {tuple(src[name].shape)} there but "
                             f"{tuple(t.shape)} in this model (a model of another size or layout?)")
    copied: dict[str, str] = {name: name for name in own if name in src}
    routers_from: list[str] = []
    if init_routers_from:
        sources = {m.group("pre") + "." + init_routers_from + m.group("post")
                   for k in src if (m := TASK_TENSOR.match(k)) and m.group("task") == init_routers_from}
        needed = [n for n in own if n not in copied and TASK_TENSOR.match(n)]
        if not sources and needed:  # (a source that already has every task's routers needs none)
            raise ValueError(f"model.init_routers_from={init_routers_from!r}: {path} has no router or task embedding "
                             f"for that task")
        for name in own:
            m = TASK_TENSOR.match(name)
            if name in copied or not m:
                continue
            from_name = m.group("pre") + "." + init_routers_from + m.group("post")
            if from_name in src and tuple(src[from_name].shape) == tuple(own[name].shape):
                copied[name] = from_name
                routers_from.append(name)
    with torch.no_grad():
        for name, from_name in copied.items():
            own[name].copy_(src[from_name])
    return {"source": str(path), "loaded": sorted(n for n in copied if n not in routers_from),
            "routers_from": sorted(routers_from),
            # (a task's expert mask, ``router.allowed.<task>``, is routing state: copied when the source
            # has the same task, else it starts open; not a tensor to report as new)
            "new": sorted(n for n in own if n not in copied and ".router.allowed." not in n),
            "ignored": sorted(k for k in src if k not in own), "heads_reshaped": reshaped}

