"""Time the named phases of training steps (``record_function`` scopes in the trainer and the
tasks' matching code) with torch.profiler."""
from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import defaultdict
from typing import Iterator

from torch.profiler import ProfilerActivity, profile


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


@contextlib.contextmanager
def quiet_profile(activities=(ProfilerActivity.CPU,)) -> Iterator[profile]:
    """``torch.profiler.profile`` without the lines its native tracer prints to stderr when it
    starts and stops (``USDT ... profiler_start``, and on a machine without a GPU ``ERROR ...
    gpuGetDeviceCount failed``): they say nothing about the measurement. Only the start and the
    stop are silenced; what the profiled code prints is kept."""
    prof = profile(activities=list(activities))
    with _native_stderr_silenced():
        prof.__enter__()
    try:
        yield prof
    finally:
        with _native_stderr_silenced():
            prof.__exit__(None, None, None)


def profile_steps(trainer, steps: int = 5, warmup: int = 2) -> tuple[dict[str, float], float]:
    """Milliseconds per step of each named phase, and the wall-clock milliseconds per step."""
    if steps < 1:
        raise ValueError(f"profile.steps={steps} must be >= 1")
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    with quiet_profile() as prof:
        for _ in range(steps):
            trainer.train_step()
    wall = (time.perf_counter() - t0) * 1e3 / steps
    phases: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if "/" in event.key or event.key in ("backward", "optimizer"):
            phases[event.key] += event.cpu_time_total / 1e3 / steps
    return dict(phases), wall


def phase_table(phases: dict[str, float], wall_ms: float) -> str:
    """Phases sorted by name, with their share of the step (matching is part of its task's loss)."""
    lines = [f"{'phase':<24} {'ms/step':>9} {'share':>7}", "-" * 42]
    for name in sorted(phases):
        lines.append(f"{name:<24} {phases[name]:9.1f} {phases[name] / wall_ms:7.1%}")
    lines.append(f"{'step (wall clock)':<24} {wall_ms:9.1f}")
    return "\n".join(lines)
