"""Grouped linear layers over expert-sorted rows, as one custom operator.

Legend: A rows (token-expert assignments, sorted by expert), I input width, O output width,
E groups (experts).

``grouped_linear(x_AI, counts_E, w_EIO, b_EO)`` computes, for every group e, its
``counts_E[e]`` consecutive rows times ``w_EIO[e]`` plus ``b_EO[e]``. It is registered with
``torch.library`` (``moe_vision::grouped_linear``, with its backward as a second operator and a
fake implementation for shapes), so ``torch.compile`` traces it as one opaque node of static
shape ``[A, O]``: no graph break, whatever the per-expert counts are.

Kernels (``model.moe.kernel``):

- ``grouped_mm``: ``torch._grouped_mm`` with the group offsets as a device tensor, no host
  synchronisation in the forward or the backward. It runs on CUDA and, in the torch we install,
  on the CPU too (fp32 and bf16), so the CPU tests run the exact formulas the GPU uses. It needs
  rows whose width in bytes is a multiple of 16 (fp32: widths divisible by 4; bf16: by 8); other
  shapes fall back to the loop with a one-time notice.
- ``loop``: one ``addmm`` per group writing into a preallocated buffer; it reads the counts on the
  host (on the CPU no device copy, on CUDA one per call).
- ``auto`` (the default): ``grouped_mm`` on CUDA in bf16/fp16, ``loop`` elsewhere (on the CPU the
  loop is as fast and needs no alignment).
"""
from __future__ import annotations

import warnings

import torch

KERNELS = ("auto", "grouped_mm", "loop")
_NOTICED: set[str] = set()


def _aligned(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.shape[-1] * x.element_size()) % 16 == 0 and (w.shape[-1] * w.element_size()) % 16 == 0


def _notice_once(reason: str) -> None:
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        warnings.warn(f"model.moe.kernel=grouped_mm: {reason}; using the per-expert loop for such calls",
                      stacklevel=3)


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"model.moe.kernel={kernel!r}; expected one of {list(KERNELS)}")
    return kernel


def use_grouped_mm(kernel: str, x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether this call runs on ``torch._grouped_mm`` (else the loop), per ``kernel``."""
    if kernel == "loop":
        return False
    available = hasattr(torch, "_grouped_mm")
    if kernel == "auto":
        return (available and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
                and _aligned(x, w))
    if not available:
        _notice_once(f"this torch {torch.__version__} has no torch._grouped_mm")
    elif w.dtype != x.dtype:
        _notice_once(f"inputs {x.dtype} and weights {w.dtype} differ")
    elif not _aligned(x, w):
        _notice_once(f"widths {x.shape[-1]} -> {w.shape[-1]} in {x.dtype} are not multiples of 16 bytes")
    else:
        return True
    return False


def group_ids(counts_E: torch.Tensor, rows: int) -> torch.Tensor:
    """The group of every row ``[A]`` (static ``rows``: no synchronisation)."""
    return torch.repeat_interleave(torch.arange(len(counts_E), device=counts_E.device), counts_E, output_size=rows)


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


@torch.library.custom_op("moe_vision::grouped_linear", mutates_args=())
def grouped_linear(x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None, impl: str = "auto") -> torch.Tensor:
    """Rows of group e times ``weight[e]`` (+ ``bias[e]``): ``[A, I] -> [A, O]``; ``impl`` is the
    kernel setting (``auto``, ``grouped_mm``, ``loop``; not named ``kernel``, which the compiler's
    fallback-kernel lowering uses itself)."""
    A, O = x.shape[0], weight.shape[-1]
    if use_grouped_mm(impl, x, weight):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        y = torch._grouped_mm(x, weight, offs=offs)
        return y if bias is None else y + bias.to(y.dtype)[group_ids(counts, A)]
    y = x.new_empty(A, O)
    for e, s in _segments(counts.tolist()):
        if bias is None:
            torch.mm(x[s], weight[e], out=y[s])
        else:
            torch.addmm(bias[e], x[s], weight[e], out=y[s])
    return y


@grouped_linear.register_fake
def _(x, counts, weight, bias, impl="auto"):
    return x.new_empty(x.shape[0], weight.shape[-1])


@torch.library.custom_op("moe_vision::grouped_linear_backward", mutates_args=())
def grouped_linear_backward(grad: torch.Tensor, x: torch.Tensor, counts: torch.Tensor, weight: torch.Tensor,
                            with_bias: bool, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`grouped_linear` for ``x``, ``weight`` and ``bias`` (zeros without one)."""
    grad = grad.contiguous()
    E, O = weight.shape[0], weight.shape[-1]
    A = x.shape[0]
    if with_bias:  # (half-precision gradients are summed in fp32)
        acc = torch.float32 if grad.dtype in (torch.bfloat16, torch.float16) else grad.dtype
        g_b = grad.new_zeros(E, O, dtype=acc).index_add_(0, group_ids(counts, A), grad.to(acc)).to(weight.dtype)
    else:
        g_b = weight.new_zeros(E, O)
    if use_grouped_mm(impl, grad, weight):
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        g_x = torch._grouped_mm(grad, weight.transpose(-2, -1), offs=offs)
        g_w = torch._grouped_mm(x.t(), grad, offs=offs)  # [E, I, O]: each group's x^T @ grad
        return g_x, g_w, g_b
    counts_list = counts.tolist()
    g_x = torch.empty_like(x)
    # Every group with rows has its weight gradient written in full below; only idle ones need zeros.
    g_w = torch.empty_like(weight)
    for e, n in enumerate(counts_list):
        if n == 0:
            g_w[e] = 0
    for e, s in _segments(counts_list):
        torch.mm(grad[s], weight[e].t(), out=g_x[s])
        torch.mm(x[s].t(), grad[s], out=g_w[e])
    return g_x, g_w, g_b


@grouped_linear_backward.register_fake
def _(grad, x, counts, weight, with_bias, impl="auto"):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty(weight.shape[0], weight.shape[-1])


def _setup(ctx, inputs, output):
    x, counts, weight, bias, impl = inputs
    ctx.save_for_backward(x, counts, weight)
    ctx.with_bias, ctx.impl = bias is not None, impl


def _backward(ctx, grad):
    x, counts, weight = ctx.saved_tensors
    g_x, g_w, g_b = grouped_linear_backward(grad, x, counts, weight, ctx.with_bias, ctx.impl)
    return (g_x if ctx.needs_input_grad[0] else None, None, g_w if ctx.needs_input_grad[2] else None,
            g_b if ctx.with_bias and ctx.needs_input_grad[3] else None, None)


grouped_linear.register_autograd(_backward, setup_context=_setup)


def _register_flops() -> None:
    """FLOP formulas for ``torch.utils.flop_counter`` (it cannot look inside a custom operator):
    ``2 A I O`` forward, twice that backward (input and weight gradients)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.moe_vision.grouped_linear)
    def _forward_flops(x_shape, counts_shape, w_shape, *args, **kwargs) -> int:
        return 2 * x_shape[0] * x_shape[1] * w_shape[-1]

    @register_flop_formula(torch.ops.moe_vision.grouped_linear_backward)
    def _backward_flops(grad_shape, x_shape, counts_shape, w_shape, *args, **kwargs) -> int:
        return 4 * x_shape[0] * x_shape[1] * w_shape[-1]


_register_flops()


def autocast_inputs(x: torch.Tensor, *weights: torch.Tensor | None):
    """``x`` and the weights in the autocast dtype of ``x``'s device when autocast is on (custom
    operators are not cast by autocast themselves), else ``x``'s dtype."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return (x.to(dtype), *[None if w is None else w.to(dtype) for w in weights])
