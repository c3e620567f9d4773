"""Run a command-line tool inside the test process, as ``python tools/<name> ARGS`` would run it.

A child Python pays about 5 seconds to import torch, torchvision, timm and the package; most tool
tests only need the tool's own behaviour (its output files, stdout, stderr and exit status), so
they run it here. Tests about the process itself (signals, exit status 75, torchrun, one-line
errors with nothing else on stderr) start a real child with :func:`run_child`."""
from __future__ import annotations

import contextlib
import io
import os
import runpy
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tool_path(tool: str) -> Path:
    path = Path(tool)
    if not path.is_absolute():
        path = ROOT / (tool if tool.startswith("tools/") else f"tools/{tool}")
    return path


def run_tool(tool: str, *args, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``tools/<tool> args`` in this process: its stdout, stderr and exit status (an uncaught
    exception is status 1 with the traceback on stderr). ``env`` entries are set for the run."""
    from hydra.core.global_hydra import GlobalHydra
    path = _tool_path(tool)
    argv = [str(path), *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, code = sys.argv, dict(os.environ), 0
    GlobalHydra.instance().clear()
    sys.argv = argv
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            except Exception:  # what an uncaught exception does to a real process
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def run_child(tool: str, *args, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python tools/<tool> args`` in a child process."""
    return subprocess.run([sys.executable, str(_tool_path(tool)), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
