"""Expert bundles on disk: ``model.safetensors`` + ``bundle.json`` in one folder (format in
experts/README.md). Written to a temporary folder and renamed, so a bundle folder that exists
is complete; ``load_bundle`` checks both files before building anything."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ..engine.builders import resolve_checkpoint
from ..models import load_model, save_model
from ..tasks import GeneralistModel

REQUIRED_KEYS = ("task", "parent_checkpoint", "parent_sha256", "kept_experts", "rule", "params", "model_sha256")


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def read_bundle_info(path: str | Path) -> dict:
    """``bundle.json`` of a bundle folder, after checking the folder is complete and intact."""
    path = Path(path)
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
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(f"bundle {path}: bundle.json lacks {missing}")
    if sha256_of(path / "model.safetensors") != info["model_sha256"]:
        raise ValueError(f"bundle {path}: model.safetensors does not match the sha256 in bundle.json "
                         "(the file is corrupted or was replaced)")
    return info


def load_bundle(path: str | Path, map_location: str = "cpu", parent_checkpoint: str | Path | None = None
                ) -> GeneralistModel:
    """The bundle's model (same ``forward`` / ``predict`` API as the full model), with
    ``model.bundle_info`` holding ``bundle.json``. With ``parent_checkpoint``, also check that the
    bundle was cut from that file (sha256)."""
    info = read_bundle_info(path)
    if parent_checkpoint is not None:
        parent, _ = resolve_checkpoint(parent_checkpoint)
        if sha256_of(parent) != info["parent_sha256"]:
            raise ValueError(f"bundle {path} was not extracted from {parent}: parent sha256 "
                             f"{info['parent_sha256'][:12]}... != {sha256_of(parent)[:12]}...")
    model = load_model(Path(path) / "model.safetensors", map_location)
    model.bundle_info = info
    return model
