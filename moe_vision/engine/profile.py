"""Time the named phases of training steps (``record_function`` scopes in the trainer and the
tasks' matching code) with torch.profiler."""
from __future__ import annotations

import time
from collections import defaultdict

from torch.profiler import ProfilerActivity, profile


def profile_steps(trainer, steps: int = 5, warmup: int = 2) -> tuple[dict[str, float], float]:
    """Milliseconds per step of each named phase, and the wall-clock milliseconds per step."""
    if steps < 1:
        raise ValueError(f"profile.steps={steps} must be >= 1")
    for _ in range(warmup):
        trainer.train_step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
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
