"""``train.compile``: ``torch.compile`` for the training model, or eager with one warning where the
compiler does not work (no C++ toolchain for the CPU backend, an unsupported GPU, ...)."""
from __future__ import annotations

import logging
import warnings

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def quiet_cpu_compiler() -> None:
    """On a machine without a CUDA runtime, inductor's CPU kernels still go through torch's C++
    extension helper, which warns once per process that it found no CUDA runtime; nothing for the
    user to act on, so that logger is lowered to errors there."""
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def compiler_problem(device: torch.device, mode: str = "default", backend: str = "inductor") -> str | None:
    """None when ``torch.compile`` with this backend and mode compiles and runs a small function
    on ``device``, else the reason in one line."""
    def probe(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x @ x.t()).sum(-1)

    quiet_cpu_compiler()
    try:
        torch.compile(probe, backend=backend, mode=None if backend != "inductor" else mode,
                      fullgraph=True)(torch.randn(8, 8, device=device))
        return None
    except Exception as e:  # whatever the toolchain raises
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:300]}"


def compile_model(model: torch.nn.Module, device: torch.device, mode: str = "default",
                  backend: str = "inductor") -> bool:
    """Compile ``model`` in place (parameter names unchanged) and return True, or warn once and
    leave it eager (False) when the compiler does not work here. For the generalist, its
    ``forward_core`` is compiled (backbone, decoders, heads: one graph per task) while the per-image
    bookkeeping and the losses (matching) stay eager; ``mode="reduce-overhead"`` adds CUDA graphs
    where shapes are static."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode={mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    problem = compiler_problem(device, mode, backend)
    if problem is not None:
        warnings.warn(f"train.compile=true: torch.compile ({backend}) does not work on {device} here ({problem}); "
                      "training eagerly", stacklevel=2)
        return False
    # A frame that fails to compile later runs eagerly (with a logged warning) instead of stopping the run.
    torch._dynamo.config.suppress_errors = True
    mode = None if backend != "inductor" else mode
    if hasattr(model, "compile_core"):  # the generalist: its tensor work, not its per-image bookkeeping
        model.compile_core(backend, mode)
    else:
        model.compile(backend=backend, mode=mode)
    return True
