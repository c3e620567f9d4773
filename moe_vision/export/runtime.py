"""Writing an exported graph (ONNX or torch.export) and running it back for the parity check.

Optional dependencies: ``onnx``, ``onnxruntime``, ``onnxscript`` (the ``export`` extra). Without
them ONNX export stops with one message naming the extra; torch.export needs nothing extra.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import MissingExtra
from .graph import RAW_OUTPUTS, TaskGraph, dense_experts

FORMATS = ("onnx", "torch_export")
MAX_BATCH = 4096


def require_onnx() -> None:
    """A clear error when the ``export`` extra is missing."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtra(f"ONNX export needs {', '.join(missing)}: pip install -e '.[export]' "
                          "(or --format torch_export, which needs nothing extra)")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def _batch_dim():
    return {"images_B3HW": {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}}


def export_graph(graph: TaskGraph, example_B3HW: torch.Tensor, out: str | Path, fmt: str) -> Path:
    """Export ``graph`` (static-shaped MoE path, dynamic batch dimension) to ``out``; written to a
    temporary file next to it and renamed only once complete."""
    check_format(fmt)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    with dense_experts(graph.model), torch.no_grad():
        if fmt == "onnx":
            require_onnx()
            # The exporter and onnxscript's optimiser print progress lines; keep the tool's output readable.
            logging.getLogger("onnxscript").setLevel(logging.ERROR)
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(graph, (example_B3HW,), input_names=["images"],
                                            output_names=graph.output_names(), dynamic_shapes=_batch_dim(),
                                            dynamo=True, verbose=False)
                program.save(str(tmp))
        else:
            program = torch.export.export(graph, (example_B3HW,), dynamic_shapes=_batch_dim())
            torch.export.save(program, str(tmp))
    os.replace(tmp, out)
    return out


def load_runner(path: str | Path, fmt: str) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    """``run(images_B3HW) -> outputs`` for an exported file: ONNX Runtime (CPU provider) or the
    torch.export program."""
    check_format(fmt)
    if fmt == "onnx":
        require_onnx()
        import onnxruntime as ort
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: [torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: x.numpy()})]
    program = torch.export.load(str(path)).module()
    return lambda x: [o.detach() for o in program(x)]


@torch.no_grad()
def compare_outputs(graph: TaskGraph, run: Callable, batches: Sequence[torch.Tensor]) -> dict[str, dict]:
    """Per output: ``max_abs_diff`` between PyTorch eager (the sparse MoE path) and the exported
    runner over ``batches``, and for integer outputs ``mismatches`` (elements that differ)."""
    graph.eval()
    report = {name: {"max_abs_diff": 0.0, "mismatches": 0} for name in graph.output_names()}
    for x in batches:
        want, got = graph(x), run(x)
        for name, a, b in zip(graph.output_names(), want, got):
            if tuple(a.shape) != tuple(b.shape):
                raise ValueError(f"exported output {name} has shape {tuple(b.shape)}, PyTorch {tuple(a.shape)}")
            if a.is_floating_point():
                report[name]["max_abs_diff"] = max(report[name]["max_abs_diff"],
                                                   float((a.double() - b.double()).abs().max()))
            else:
                report[name]["mismatches"] += int((a != b.to(a.dtype)).sum())
    return report


def outputs_dict(graph: TaskGraph, raw: Sequence[torch.Tensor]) -> dict:
    """The task head's output dict rebuilt from a graph's raw outputs (what ``postprocess`` reads)."""
    return dict(zip(RAW_OUTPUTS[graph.kind].values(), raw))


@torch.no_grad()
def task_metrics(graph: TaskGraph, run: Callable, dataset, batch_size: int = 32,
                 max_batches: int | None = None) -> dict[str, float]:
    """The task's metrics on ``dataset`` from ``run``'s raw outputs, through the task's own
    postprocess and evaluator (the same route for the eager graph and the exported file)."""
    from ..engine.evaluate import iterate_batches
    spec, n_raw = graph.spec, len(RAW_OUTPUTS[graph.kind])
    ev = spec.evaluator(dataset)
    for images, targets in iterate_batches(dataset, batch_size, max_batches):
        ev.update(spec.postprocess(outputs_dict(graph, list(run(images))[:n_raw]), targets), targets)
    return ev.compute()

