"""What the server serves: a run directory (``model.safetensors`` + ``config.json``) or an expert
bundle (``model.safetensors`` + ``bundle.json``), loaded once, with what the page shows beside the
model: the run's average expert usage and a few validation images to try."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks import GeneralistModel

EXAMPLES_PER_TASK = 4


@dataclass
class ServedModel:
    model: GeneralistModel
    kind: str  # "run" | "bundle"
    path: Path
    kept_experts: dict[str, list[int]] | None = None  # bundle: layer -> original expert ids, in local order
    usage: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # layer -> task -> frequency per expert
    examples: list[tuple[str, Path]] = field(default_factory=list)  # (task, validation image)

    @property
    def tasks(self) -> list[str]:
        return self.model.tasks

    def info(self) -> dict:
        """What ``GET /info`` returns."""
        layers = self.model.backbone.moe_layers()
        allowed = self.model.backbone.allowed_experts()
        if self.kept_experts:  # a bundle's routers index its kept experts: back to the parent's ids
            allowed = {l: {t: [self.kept_experts[l][i] for i in e] for t, e in per.items()} for l, per in allowed.items()}
        return {
            "kind": self.kind, "name": self.path.name,
            "tasks": {t: {"type": s.type_name, "classes": self.class_names(t)} for t, s in self.model.specs.items()},
            "layers": {name: {"experts": self.kept_experts[name] if self.kept_experts else list(range(n))}
                       for name, n in layers.items()},
            "kept_experts": self.kept_experts,
            "allowed": allowed,  # layer -> task -> experts its router may choose (train.expert_budget)
            "usage": self.usage,
            "patch_size": self.model.backbone.patch_size,
            "examples": [{"id": i, "task": t, "name": p.name} for i, (t, p) in enumerate(self.examples)],
        }

    def class_names(self, task: str) -> list[str]:
        spec = self.model.spec(task)
        names = spec.options.get("class_names")
        return list(names) if names else [str(i) for i in range(spec.num_classes)]


def load_source(path: str | Path, device: str = "cpu") -> ServedModel:
    """Load a run directory or a bundle folder; one clear error if it is neither or is incomplete."""
    from ..engine.builders import load_generalist
    from ..surgery.bundle import bundle_tasks, load_bundle
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist or is not a folder (expected a run directory or a bundle)")
    if (path / "bundle.json").exists():
        model = load_bundle(path, device)
        info = model.bundle_info
        kept = {layer: list(experts) for layer, experts in info["kept_experts"].items()}
        served = ServedModel(model.eval(), "bundle", path, kept_experts=kept)
        usage = info.get("usage_frequency") or {}
        tasks = bundle_tasks(info)
        if usage and not isinstance(next(iter(usage.values())), dict):  # a one-task bundle of format 1
            usage = {tasks[0]: usage}
        served.usage = {layer: {t: list(usage[t][layer]) for t in tasks if layer in usage.get(t, {})}
                        for layer in info["kept_experts"]}
        parent = Path(info["parent_checkpoint"])
        served.examples = _examples(parent if parent.is_dir() else parent.parent, tasks)
        return served
    if not (path / "model.safetensors").is_file():
        raise ValueError(f"{path} is neither a run directory (model.safetensors) nor a bundle (bundle.json)")
    model, _, _ = load_generalist(path)
    served = ServedModel(model.to(device).eval(), "run", path)
    usage_file = path / "expert_usage.json"
    if usage_file.is_file():
        u = json.loads(usage_file.read_text())
        served.usage = {layer: {task: u["frequency"][li][si][:u["num_experts"][layer]]
                                for si, task in enumerate(u["tasks"])} for li, layer in enumerate(u["layers"])}
    served.examples = _examples(path, model.tasks)
    return served


def _examples(run_dir: Path, tasks: list[str]) -> list[tuple[str, Path]]:
    """The first validation images of each task, from the run's recorded data config (none when
    the run has no config or its data is not on this machine)."""
    from ..engine.builders import build_dataset
    cfg_file = run_dir / "config.json"
    if not cfg_file.is_file():
        return []
    cfg = json.loads(cfg_file.read_text())
    out = []
    for task in tasks:
        try:
            paths = build_dataset(task, cfg["tasks"][task], cfg["data"], "val", False).image_paths()
        except (KeyError, ValueError, FileNotFoundError, NotADirectoryError):
            continue
        step = max(1, len(paths) // EXAMPLES_PER_TASK)
        out += [(task, Path(p)) for p in paths[::step][:EXAMPLES_PER_TASK]]
    return out
