"""Expert bundles on disk: ``model.safetensors`` + ``bundle.json`` + ``README.md`` (the model card)
in one folder (format in experts/README.md), optionally packed into one ``.tar.gz``. A folder is
written under a temporary name and renamed, so a bundle folder that exists is complete;
``load_bundle`` checks the files (and the model file's checksum) before building anything."""
from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from pathlib import Path

from ..engine.builders import resolve_checkpoint
from ..io_utils import atomic_path, sha256_of
from ..models import load_model, save_model
from ..models.checkpoint import load_model_bytes
from ..tasks import GeneralistModel
from .model_card import model_card

BUNDLE_FORMAT = "moe_vision.bundle/2"  # /1: one task ("task"), metrics not keyed by task
REQUIRED_KEYS = ("parent_checkpoint", "parent_sha256", "kept_experts", "rule", "params", "model_sha256")
FILES = ("bundle.json", "model.safetensors", "README.md")


def bundle_tasks(info: dict) -> list[str]:
    """The tasks a bundle answers (``tasks``; a bundle written before multi-task bundles has ``task``)."""
    return list(info.get("tasks") or [info["task"]])


def bundle_task(info: dict, task: str | None = None) -> str:
    """``task`` checked against the bundle's tasks, or its only task; several need a choice."""
    tasks = bundle_tasks(info)
    if task is None:
        if len(tasks) > 1:
            raise ValueError(f"this bundle answers tasks {tasks}; choose one with --task")
        return tasks[0]
    if task not in tasks:
        raise ValueError(f"unknown task {task!r}; this bundle answers tasks {tasks}")
    return task


def write_bundle(out: str | Path, model: GeneralistModel, info: dict, force: bool = False) -> Path:
    """Write ``model`` and ``info`` (plus the model file's sha256) as a bundle folder."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, tmp / "model.safetensors")
    info = {**info, "model_sha256": sha256_of(tmp / "model.safetensors")}
    (tmp / "bundle.json").write_text(json.dumps(info, indent=2))
    (tmp / "README.md").write_text(model_card(info, out.name))
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_archive(folder: str | Path) -> Path:
    """``<folder>.tar.gz`` holding the bundle's files (written to a temporary file, then renamed)."""
    folder = Path(folder)
    out = folder.with_name(folder.name + ".tar.gz")
    with atomic_path(out) as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for name in FILES:
                if (folder / name).is_file():
                    tar.add(folder / name, arcname=name)
    return out


def _read_archive(path: Path) -> dict[str, bytes]:
    """The bundle files of an archive, read in memory: regular files with the expected names only
    (nothing is extracted to disk, nothing unpickled)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            files = {}
            for member in tar.getmembers():
                if member.name not in FILES or not member.isfile():
                    raise ValueError(f"bundle archive {path} holds {member.name!r}; expected only {', '.join(FILES)}")
                files[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"bundle archive {path} is not a readable .tar.gz ({e})") from None
    return files


def _check_info(info: dict, path) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if "task" not in info and "tasks" not in info:
        missing.insert(0, "tasks")
    if missing:
        raise ValueError(f"bundle {path}: bundle.json lacks {missing}")
    return info


def read_bundle_info(path: str | Path) -> dict:
    """``bundle.json`` of a bundle folder or archive, after checking it is complete and intact."""
    path = Path(path)
    if path.is_file() and path.name.endswith(".tar.gz"):
        files = _read_archive(path)
        for name in ("bundle.json", "model.safetensors"):
            if name not in files:
                raise ValueError(f"bundle archive {path} is incomplete: {name} is missing")
        info = _check_info(json.loads(files["bundle.json"]), path)
        if hashlib.sha256(files["model.safetensors"]).hexdigest() != info["model_sha256"]:
            raise ValueError(f"bundle archive {path}: model.safetensors does not match the sha256 in bundle.json "
                             "(the file is corrupted or was replaced)")
        return info
    if not path.is_dir():
        raise FileNotFoundError(f"bundle {path} does not exist (expected a folder with model.safetensors and "
                                "bundle.json)")
    for name in ("model.safetensors", "bundle.json"):
        if not (path / name).is_file():
            raise ValueError(f"bundle {path} is incomplete: {name} is missing")
    try:
        info = json.loads((path / "bundle.json").read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"bundle {path}: bundle.json is not valid JSON ({e})") from None
    _check_info(info, path)
    if sha256_of(path / "model.safetensors") != info["model_sha256"]:
        raise ValueError(f"bundle {path}: model.safetensors does not match the sha256 in bundle.json "
                         "(the file is corrupted or was replaced)")
    return info


def load_bundle(path: str | Path, map_location: str = "cpu", parent_checkpoint: str | Path | None = None
                ) -> GeneralistModel:
    """The bundle's model (same ``forward`` / ``predict`` API as the full model) from a bundle
    folder or its ``.tar.gz``, with ``model.bundle_info`` holding ``bundle.json``. With
    ``parent_checkpoint``, also check that the bundle was cut from that file (sha256)."""
    info = read_bundle_info(path)
    if parent_checkpoint is not None:
        parent, _ = resolve_checkpoint(parent_checkpoint)
        if sha256_of(parent) != info["parent_sha256"]:
            raise ValueError(f"bundle {path} was not extracted from {parent}: parent sha256 "
                             f"{info['parent_sha256'][:12]}... != {sha256_of(parent)[:12]}...")
    path = Path(path)
    if path.is_file():  # an archive: read in memory, checked against bundle.json's checksum
        model = load_model_bytes(_read_archive(path)["model.safetensors"], f"{path}:model.safetensors", map_location)
    else:
        model = load_model(path / "model.safetensors", map_location)
    model.bundle_info = info
    return model
