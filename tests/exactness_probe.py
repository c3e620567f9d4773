"""The bit-for-bit checks with operands in other memory layouts than the full model used.

``python tests/exactness_probe.py`` prints one JSON line: whether a bundle that cuts half of each
layer's experts (det narrowed to 2 of 4, as a budget leaves it) and a model
grown by ``add_task`` still give the full model's outputs bit for bit when every parameter, buffer
and input sits at a misaligned address (an offset view into a larger buffer) and the input is a
strided view, plus the single ``linear`` calls that differ without MKL's strict mode. The test
runs it in-process (strict mode) and in child processes with MKL's default mode."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASKS = {"cls": {"type": "cls", "num_classes": 5}, "det": {"type": "det", "num_classes": 4},
         "seg": {"type": "seg", "num_classes": 3, "class_names": ["background", "p", "q"]}}


def misaligned(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A copy of ``t`` that starts ``offset`` elements into a fresh buffer (not 64-byte aligned
    unless ``offset`` is a multiple of 16 fp32 elements)."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype)
    return buf[offset:].view_as(t).copy_(t)


@torch.no_grad()
def relocate(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter and buffer moved to its own misaligned storage (offsets 1..15 in turn)."""
    tensors = [*model.parameters(), *model.buffers()]
    for i, t in enumerate(tensors):
        if t.is_floating_point() and t.numel():
            t.data = misaligned(t.data, 1 + i % 15)
    return model


def strided_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view with other strides and a misaligned start (the same values)."""
    wide = misaligned(torch.cat([x, x[..., :1]], dim=-1), 3)
    return wide[..., :-1]


def linear_formulations() -> dict[str, bool]:
    """One ``linear`` computed four ways that torch hands MKL differently; True = bit-identical."""
    torch.manual_seed(0)
    tokens = torch.randn(2, 17, 96)
    grid = tokens[:, 1:].reshape(2, 4, 4, 96)  # the patch tokens of a 4x4 grid: a strided view
    w, b = torch.randn(4, 96), torch.randn(4)
    ref = F.linear(grid, w, b)
    return {"contiguous_input": torch.equal(F.linear(grid.contiguous(), w, b), ref),
            "weight_requires_grad": torch.equal(F.linear(grid, w.clone().requires_grad_(), b).detach(), ref),
            "per_image": torch.equal(torch.stack([F.linear(g, w, b) for g in grid]), ref),
            "misaligned_weight": torch.equal(F.linear(grid, misaligned(w, 1), b), ref)}


def mkl_branch() -> int:
    """The code branch MKL picks for this CPU (12 and up: AVX-512), or -1 without MKL."""
    import ctypes
    try:
        return ctypes.CDLL(str(next((Path(torch.__file__).parent / "lib").glob("libtorch_cpu*")))).mkl_serv_cbwr_get_auto_branch()
    except (StopIteration, OSError, AttributeError):
        return -1


def checks() -> dict:
    """Bundle and add_task outputs against the full model's, with relocated operands."""
    from moe_vision.engine.builders import build_generalist
    from moe_vision.exactness import mkl_mode
    from moe_vision.surgery.continual import add_task, bit_identical, outputs_on_probe
    from moe_vision.surgery.extract import extract_task

    torch.manual_seed(0)
    cfg = {"model": {"name": "moe_vit_nano_patch8", "img_size": 32, "moe": {"num_experts": 4}},
           "tasks": TASKS, "decoder": {"dim": 32, "num_queries": 14, "num_layers": 1, "num_heads": 2},
           "adapters": {"enabled": True, "bottleneck": 4}}
    model = build_generalist(cfg).eval()
    with torch.no_grad():  # trained-looking adapters (they start as zeros)
        for name, p in model.named_parameters():
            if name.startswith("adapters."):
                p.normal_(std=0.1)
    # det narrowed to 2 of the 4 experts per layer (as a budget leaves it): the bundle cuts the other 2.
    for module in model.backbone.moe_modules().values():
        module.router.set_allowed("det", torch.tensor([False, True, False, True]))
    x = torch.randn(2, 3, 32, 32)
    before = outputs_on_probe(model, list(TASKS), x)  # parameters trainable, aligned, contiguous input
    kept = model.backbone.allowed_experts()
    kept = {layer: per_task["det"] for layer, per_task in kept.items()}
    assert all(len(k) == 2 for k in kept.values())
    bundle = relocate(extract_task(model, "det", kept).eval())
    grown = relocate(add_task(model, "depth", {"type": "depth"}, new_experts=1).eval())
    moved = strided_input(x)
    return {"mkl_cbwr": mkl_mode(), "mkl_branch": mkl_branch(),
            "bundle_identical": bit_identical({"det": before["det"]}, outputs_on_probe(bundle, ["det"], moved)),
            "add_task_identical": bit_identical(before, outputs_on_probe(grown, list(TASKS), moved)),
            "linear": linear_formulations()}


if __name__ == "__main__":
    print(json.dumps(checks()))
