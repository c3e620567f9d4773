"""MKL's strict reproducible mode (moe_vision/exactness.py): set by importing moe_vision, a user's
own choice kept, a late import warned about; the bit-for-bit checks hold with operands in other
memory layouts; and without the mode Intel's MKL kernels break them (the checks have teeth)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moe_vision.exactness import MKL_ENV, MKL_MODE, mkl_is_reproducible, mkl_mode

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "exactness_probe.py"
needs_mkl = pytest.mark.skipif(mkl_mode() is None, reason="this torch build does not use MKL")
# exactness.py loaded on its own: a child process that does not import the whole package.
LOAD = ("import importlib.util as u; s = u.spec_from_file_location('exactness', {path!r}); "
        "e = u.module_from_spec(s); s.loader.exec_module(e)").format(path=str(ROOT / "moe_vision" / "exactness.py"))


def _children(scripts: dict[str, tuple[str, dict]]) -> dict[str, subprocess.CompletedProcess]:
    """Run ``python -c script`` children at once (each with its environment changes; None removes)."""
    procs = {}
    for name, (script, env_changes) in scripts.items():
        env = {k: v for k, v in os.environ.items() if k not in env_changes}
        env.update({k: v for k, v in env_changes.items() if v is not None})
        procs[name] = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
        assert p.returncode == 0, stderr[-2000:]
    return out


@needs_mkl
def test_moe_vision_sets_the_strict_mode_keeps_a_users_choice_and_warns_when_too_late():
    assert mkl_is_reproducible(), f"this test process runs MKL in mode {mkl_mode()}"
    runs = _children({
        "package": ("import torch, moe_vision, os; from moe_vision.exactness import mkl_mode; "
                    "print(mkl_mode(), os.environ['MKL_CBWR'])", {MKL_ENV: None}),
        "user": (LOAD + "; import torch; e.use_reproducible_mkl(); print(e.mkl_mode())", {MKL_ENV: "COMPATIBLE"}),
        "late": (LOAD + "; import torch; torch.ones(4, 4) @ torch.ones(4, 4); e.use_reproducible_mkl(); "
                 "print(e.mkl_mode())", {MKL_ENV: None}),
    })
    assert runs["package"].stdout.split() == [MKL_MODE, MKL_MODE]  # set, and inherited by child processes
    assert runs["user"].stdout.strip() == "COMPATIBLE" and not runs["user"].stderr
    assert runs["late"].stdout.strip() == "OFF" and f"{MKL_ENV}={MKL_MODE}" in runs["late"].stderr


@needs_mkl
def test_a_mode_that_cannot_be_read_is_not_taken_for_strict(monkeypatch):
    import moe_vision.exactness as exactness
    monkeypatch.setattr(exactness, "_mkl_service", lambda: None)  # e.g. a build without MKL's service calls
    assert exactness.mkl_mode() == "unknown" and not exactness.mkl_is_reproducible()


def test_bit_for_bit_checks_hold_with_operands_in_other_memory_layouts():
    """Every parameter, buffer and the input of the bundle and the grown model at misaligned
    addresses, the input a strided view; the full model ran with trainable, aligned tensors."""
    from tests.exactness_probe import checks
    report = checks()
    assert report["bundle_identical"] and report["add_task_identical"], report
    assert all(report["linear"].values()), report["linear"]


def _intel_kernels(build: Path) -> dict[str, str] | None:
    """Environment changes that give this process MKL's Intel code paths: none on an Intel CPU; on
    another x86 CPU a preloaded two-line library that answers MKL's "is this an Intel CPU?" with
    yes (MKL picks its kernels by that answer); None where neither is possible."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "GenuineIntel" in info:
        return {}
    compiler = shutil.which("cc") or shutil.which("gcc")
    if "AuthenticAMD" not in info or compiler is None:
        return None
    source, lib = build / "answer.c", build / "libanswer.so"
    source.write_text("int mkl_serv_intel_cpu_true(void) { return 1; }\nint mkl_serv_intel_cpu(void) { return 1; }\n")
    if subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib), str(source)], capture_output=True).returncode:
        return None
    return {"LD_PRELOAD": str(lib)}


@needs_mkl
def test_without_the_strict_mode_intel_kernels_break_the_checks_and_with_it_they_hold(tmp_path):
    env = _intel_kernels(tmp_path)
    if env is None:
        pytest.skip("MKL's Intel kernels cannot be had here (not x86 Intel/AMD, or no C compiler)")
    script = f"import sys; sys.path.insert(0, {str(ROOT)!r}); import json; from tests.exactness_probe import checks; print(json.dumps(checks()))"
    runs = _children({"default": (script, {**env, MKL_ENV: ""}), "strict": (script, {**env, MKL_ENV: None})})
    default, strict = (json.loads(runs[k].stdout.splitlines()[-1]) for k in ("default", "strict"))
    if default["mkl_branch"] < 12:
        pytest.skip(f"MKL's Intel branch here is {default['mkl_branch']}, not AVX-512 (12 and up)")
    assert default["mkl_cbwr"] == "OFF" and strict["mkl_cbwr"] == MKL_MODE
    # MKL's default mode: the same linear differs by how torch hands it over, and add_task's check fails.
    assert not all(default["linear"].values()) and not default["add_task_identical"], default
    assert strict["bundle_identical"] and strict["add_task_identical"] and all(strict["linear"].values()), strict
