"""Training checkpoints written with ``torch.distributed.checkpoint`` (DCP), loadable at any world
size and parallel layout.

Layout under ``run_dir/checkpoints``::

    step_0000200/
        .metadata, __*_*.distcp   DCP: model + optimizer tensors, keyed by parameter name
        trainer.pt                 scheduler, task sampler, data iterators, step (same on every rank)
        rng_rank{r}.pt             each rank's RNG state
    latest                         names the newest complete step folder

Sharded tensors (FSDP parameters, expert slices under expert parallelism) are saved as DTensors:
each rank writes its own shard once, and loading into another layout (world size 2 with expert
parallelism -> 1 process, or back) reads exactly the slices each rank needs. Optimizer state is
stored per parameter name (``optim.<name>.<key>``), so it follows its parameter's layout.

Every rank calls :func:`save_checkpoint` and :func:`load_checkpoint` (they are collectives).
The step folder is written under a temporary name and renamed by rank 0 once every rank has
finished, so a run killed mid-write leaves at most a stray ``.tmp`` folder that nothing reads.
For several machines, ``run_dir`` must be on a file system all of them share.
"""
from __future__ import annotations

import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..io_utils import atomic_path, sha256_of
from ..models.checkpoint import MASK_KEY
from .distributed import DistContext

TRAINER_STATE = "trainer.pt"


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- optimizer state by name
def optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str],
                      as_sharded: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"optim.<param name>.<key>": tensor}`` for every tensor in the optimizer's state.

    ``names`` maps ``id(param)`` to its name; ``as_sharded(name, t)`` wraps a per-parameter state
    tensor the way the parameter itself is stored (e.g. an expert slice as a DTensor).
    """
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    name = names[id(p)]
                    out[f"optim.{name}.{key}"] = value if value.dim() == 0 else as_sharded(name, value)
    return out


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _saved_keys(path: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    return FileSystemReader(str(path)).read_metadata().state_dict_metadata


def optimizer_template(path: Path, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Empty tensors shaped like the optimizer state saved in ``path``, each laid out like its
    parameter in ``model_state`` (the current run's layout), for DCP to load into."""
    template = {}
    for key, meta in _saved_keys(path).items():
        if not key.startswith("optim."):
            continue
        name, sub = key[len("optim."):].rsplit(".", 1)
        if name not in model_state:
            raise ValueError(f"checkpoint {path} holds optimizer state for {name!r}, which this model lacks")
        if len(meta.size) == 0:
            template[key] = torch.zeros((), dtype=meta.properties.dtype)
        else:
            template[key] = torch.empty_like(model_state[name])
    return template


def restore_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], loaded: dict[str, torch.Tensor],
                      hyperparameters: list[dict], as_local: Callable[[str, torch.Tensor], torch.Tensor]) -> None:
    """Put state loaded by name back into ``optimizer`` (``as_local`` undoes ``as_sharded``)."""
    if len(hyperparameters) != len(optimizer.param_groups):
        raise ValueError(f"checkpoint has {len(hyperparameters)} optimizer parameter groups, "
                         f"this run {len(optimizer.param_groups)}")
    for group, saved in zip(optimizer.param_groups, hyperparameters):
        group.update(saved)
        for p in group["params"]:
            prefix = f"optim.{names[id(p)]}."
            state = {k[len(prefix):]: v for k, v in loaded.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = {k: (v if v.dim() == 0 else as_local(names[id(p)], v)) for k, v in state.items()}
            else:
                optimizer.state.pop(p, None)


# ---------------------------------------------------------------------------- files
def _quiet_single_process(ctx: DistContext) -> None:
    """DCP warns on every save and load without a process group that it assumes a single process:
    that is what a single-process run means, so the warning tells a user nothing to act on. The
    filter stays for the process: a background save warns from DCP's own thread, later."""
    if not ctx.enabled:
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


MANIFEST = "manifest.json"


def file_manifest(folder: Path) -> dict[str, dict]:
    """``{file name: {"size": bytes, "sha256": hex}}`` of every file in ``folder`` but the manifest,
    read back from disk."""
    return {f.name: {"size": f.stat().st_size, "sha256": sha256_of(f)}
            for f in sorted(Path(folder).iterdir()) if f.is_file() and f.name != MANIFEST}


def damage(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` cannot be used (None: it is complete and intact). A folder
    written before manifests existed is accepted when DCP's metadata and the trainer state are there."""
    folder = Path(folder)
    for f in (".metadata", TRAINER_STATE):
        if not (folder / f).is_file():
            return f"{f} is missing"
    if not (folder / MANIFEST).is_file():
        return None
    try:
        expected = json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in expected.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size:,} bytes, the manifest says {want['size']:,}"
    actual = file_manifest(folder)
    bad = [n for n, want in expected.items() if actual[n]["sha256"] != want["sha256"]]
    return f"{bad[0]} does not match its checksum" if bad else None


def step_folders(run_dir: Path) -> list[Path]:
    """The run's checkpoint step folders, newest first (temporary ``.tmp`` folders excluded)."""
    return sorted((p for p in (Path(run_dir) / "checkpoints").glob("step_*") if p.is_dir()), reverse=True)


class PendingCheckpoint:
    """A checkpoint whose tensors are being written (in the background with ``async_save``);
    :meth:`finish` (every rank calls it) waits for them, then makes the folder final: manifest,
    rename, ``latest``, and the removal of old folders beyond ``keep``."""

    def __init__(self, run_dir: Path, step: int, ctx: DistContext, keep: int, future=None) -> None:
        self.run_dir, self.step, self.ctx, self.keep, self.future = Path(run_dir), step, ctx, keep, future
        self.tmp = self.run_dir / "checkpoints" / f".step_{step:07d}.tmp"
        self.final = self.run_dir / "checkpoints" / f"step_{step:07d}"

    def finish(self) -> Path:
        if self.future is not None:
            self.future.result()
            self.future = None
        ctx = self.ctx
        ctx.barrier()
        if ctx.is_main:
            # The manifest is written last, from what is on disk: a folder with a manifest that
            # matches its files is complete, and only then may older checkpoints go.
            manifest = json.dumps(file_manifest(self.tmp), indent=1)
            with atomic_path(self.tmp / MANIFEST) as t:
                t.write_text(manifest)
            if self.final.exists():
                shutil.rmtree(self.final)
            self.tmp.rename(self.final)
            with atomic_path(self.final.parent / "latest") as t:
                t.write_text(self.final.name)
            for old in step_folders(self.run_dir)[max(1, self.keep):]:
                shutil.rmtree(old, ignore_errors=True)
        ctx.barrier()
        return self.final


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], trainer_state: dict,
                    ctx: DistContext, keep: int = 2, asynchronous: bool = False, process_group=None):
    """Write ``checkpoints/step_XXXXXXX`` (all ranks call this) and point ``latest`` at it; keep
    the newest ``keep`` step folders. With ``asynchronous``, the tensors are staged and written in
    the background (``dcp.async_save``) and a :class:`PendingCheckpoint` is returned, which the
    caller finishes before the next save; otherwise the final folder's path."""
    import torch.distributed.checkpoint as dcp
    pending = PendingCheckpoint(run_dir, step, ctx, keep)
    tmp = pending.tmp
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save({"step": step, "world_size": ctx.world_size, **trainer_state}, tmp / TRAINER_STATE)
    _quiet_single_process(ctx)
    if asynchronous:
        pending.future = dcp.async_save(tensors, checkpoint_id=str(tmp), no_dist=not ctx.enabled,
                                        process_group=process_group)
        return pending
    dcp.save(tensors, checkpoint_id=str(tmp), no_dist=not ctx.enabled)
    return pending.finish()


def latest_checkpoint(run_dir: Path, log=None) -> Path | None:
    """The newest complete, intact checkpoint of the run (None: there is none). A newer folder
    that is damaged (a file missing, truncated or changed since its manifest was written) is
    passed over with one line through ``log``."""
    for folder in step_folders(run_dir):
        why = damage(folder)
        if why is None:
            return folder
        if log is not None:
            log(f"checkpoint {folder} is damaged ({why}); trying the one before it")
    return None


def load_checkpoint(path: Path, tensors: dict[str, torch.Tensor], ctx: DistContext) -> dict:
    """Load ``tensors`` in place from ``path`` (resharding to their layout); restore this rank's RNG
    (rank 0's when the checkpoint came from fewer ranks) and return the trainer state."""
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    saved = _saved_keys(path)
    # Routers' expert masks (``router.allowed.<task>``) are newer than some checkpoints: a model
    # resumed from one keeps its masks as they are (every expert allowed).
    tensors = {k: v for k, v in tensors.items() if k in saved or not MASK_KEY.search(k)}
    missing = sorted(k for k in tensors if k not in saved)
    if missing:
        raise ValueError(f"checkpoint {path} does not match the model: missing {missing[:5]} "
                         "(check the model name and tasks)")
    try:
        _quiet_single_process(ctx)
        dcp.load(tensors, checkpoint_id=str(path), no_dist=not ctx.enabled)
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
        rng = path / f"rng_rank{ctx.rank}.pt"
        set_rng_state(torch.load(rng if rng.is_file() else path / "rng_rank0.pt", weights_only=False))
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"checkpoint {path} could not be read ({str(e).splitlines()[0]})") from None
    return state

