"""Training checkpoints: model (safetensors) + optimiser, scheduler, sampler and RNG state.

Layout under ``run_dir/checkpoints``: one folder per saved step, written as a temporary folder
and renamed, and a ``latest`` file (replaced atomically) naming the newest complete one. A run
killed mid-write leaves at most a stray ``.tmp`` folder that nothing reads.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..io_utils import atomic_path
from ..models import load_weights, save_model


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, state: dict, keep: int = 2) -> Path:
    """Write ``checkpoints/step_XXXXXXX`` and point ``checkpoints/latest`` at it; keep the newest ``keep``."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step:07d}"
    tmp = ckpt_root / f".step_{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.safetensors")
    torch.save({"step": step, **state, "rng": rng_state()}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    with atomic_path(ckpt_root / "latest") as t:
        t.write_text(final.name)
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    for f in ("model.safetensors", "state.pt"):
        if not (path / f).is_file():
            raise FileNotFoundError(f"checkpoint {path} named by {pointer} is missing {f}")
    return path


def load_checkpoint(path: Path, model) -> dict:
    """Load weights into ``model``; return the training state (RNG already restored)."""
    load_weights(model, Path(path) / "model.safetensors")
    try:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for a damaged pickle
        raise ValueError(f"training state {Path(path) / 'state.pt'} could not be read ({e})") from None
    set_rng_state(state["rng"])
    return state
