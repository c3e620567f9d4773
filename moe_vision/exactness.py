"""Numerical reproducibility: the one place that sets what the toolkit's bit-for-bit checks need.

The toolkit promises bit-identical outputs in three places: an exact bundle (rule ``allowed``, the
default for a budget-trained model, or ``selected`` on its calibration images) against its full
model, old tasks before and after ``add_task``, and a resumed run against an uninterrupted one.
Each compares two computations of the same numbers that differ in memory layout: weights sliced
into a new tensor, frozen instead of trainable parameters, a token grid viewed with other strides.

On x86 torch computes fp32 matrix products with Intel's MKL. On Intel CPUs MKL's fastest kernels
(AVX-512, AVX2) round differently depending on how ``torch.matmul`` hands them the operands: the
same ``linear`` on a strided view, on its contiguous copy, or with weights that require gradients
(which changes whether torch folds the batch into one product) can differ in the last bit. MKL's
conditional numerical reproducibility in its strict form (``MKL_CBWR=AUTO,STRICT``: the best code
path of the CPU, with results independent of those choices and of the thread count) removes that;
its plain ``AUTO`` form does not. On AMD CPUs MKL takes a generic path that already behaves so.
oneDNN's convolutions do not depend on operand alignment (oneDNN picks its kernels by instruction
set, not CPU vendor, so this machine shows what Intel CPUs do).

MKL reads ``MKL_CBWR`` at its first call, not when torch loads, so importing ``moe_vision`` before
any matrix product is enough; a value the user set (even an empty one, which means MKL's default)
is left alone. No torch import here: ``moe_vision/__init__.py`` calls :func:`use_reproducible_mkl`
before anything loads torch. The guarantees and their preconditions: docs/exactness.md.
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings
from pathlib import Path

MKL_ENV = "MKL_CBWR"
MKL_MODE = "AUTO,STRICT"

# MKL's names for its code branches (mkl_service.h: MKL_CBWR_*) and its strict flag.
_BRANCHES = {1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2", 9: "AVX",
             10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_STRICT = 0x10000
_CODES = {name: code for code, name in _BRANCHES.items()}
UNKNOWN = "unknown"


def _mkl_service():
    """torch's MKL service functions (MKL is linked into libtorch_cpu), or None without MKL."""
    if "torch" not in sys.modules:
        return None
    import torch
    if not torch.backends.mkl.is_available():
        return None
    for lib in (Path(torch.__file__).parent / "lib").glob("libtorch_cpu*"):
        try:
            service = ctypes.CDLL(str(lib))
            get, set_ = service.mkl_serv_cbwr_get, service.mkl_serv_cbwr_set
        except (OSError, AttributeError):
            continue
        get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
        set_.argtypes, set_.restype = [ctypes.c_int], ctypes.c_int
        return service
    return None


def mkl_mode() -> str | None:
    """MKL's reproducibility mode as ``MKL_CBWR`` spells it (``"AUTO,STRICT"``, ``"OFF"``, ...);
    None where torch's build has no MKL (non-x86 builds); ``"unknown"`` where torch uses MKL but its
    mode cannot be read (torch not loaded yet, or MKL's service functions not found, e.g. a build
    that does not export them)."""
    if "torch" not in sys.modules:
        return UNKNOWN
    import torch
    if not torch.backends.mkl.is_available():
        return None
    service = _mkl_service()
    if service is None:
        return UNKNOWN
    value = service.mkl_serv_cbwr_get(-1)  # MKL_CBWR_ALL: the branch and the strict flag
    name = _BRANCHES.get(value & 0xFFFF, str(value & 0xFFFF))
    return name + (",STRICT" if value & _STRICT else "")


def mkl_is_reproducible() -> bool:
    """Whether the bit-for-bit guarantees' MKL precondition is known to hold: strict mode, or no
    MKL at all. A mode that cannot be read is not taken for strict."""
    mode = mkl_mode()
    return mode is None or mode.endswith(",STRICT")


def use_reproducible_mkl() -> None:
    """Ask MKL for its strict reproducible mode unless the user chose a mode of their own.

    Before MKL's first call setting ``MKL_CBWR`` is all it takes (child processes inherit it).
    If torch already ran a matrix product in this process, MKL has fixed its mode; then a warning
    says the guarantees need ``moe_vision`` imported first or the variable set before Python starts.
    """
    if MKL_ENV in os.environ:
        return
    os.environ[MKL_ENV] = MKL_MODE
    service = _mkl_service()
    if service is None or mkl_is_reproducible():
        return
    branch, _, strict = MKL_MODE.partition(",")
    if service.mkl_serv_cbwr_set(_CODES[branch] | (_STRICT if strict else 0)) != 0:
        warnings.warn(f"MKL ran before moe_vision was imported, in mode {mkl_mode()}; bit-for-bit checks "
                      f"(bundles, add_task, resume) may fail on Intel CPUs: import moe_vision before the "
                      f"first matrix product, or start Python with {MKL_ENV}={MKL_MODE}", stacklevel=3)


def describe() -> dict:
    """What a bit-for-bit check ran under, for the reports that record one (``bundle.json``...)."""
    import torch
    return {"mkl_cbwr": mkl_mode(), "torch": torch.__version__}
