"""Stopping a run cleanly when its scheduler asks: SIGTERM (SLURM, Kubernetes, torchrun), SIGUSR1
(SLURM's ``--signal=USR1@<seconds>`` warning ahead of the time limit) and SIGINT (Ctrl-C) make
training finish the step it is in, write a checkpoint and exit with :data:`EXIT_PREEMPTED`.

A signal only sets a flag: nothing is interrupted mid-step or mid-save, so a second signal while
the checkpoint is written changes nothing (the folder is written under a temporary name anyway).
Under torchrun the ranks may receive the signal at different moments; after every step they agree
with one small collective (a MAX of their flags over a gloo group, on the host: no device
synchronisation) so that all of them stop after the same step and write the same checkpoint.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistContext

# The exit status of a run that stopped on a signal after writing its checkpoint: EX_TEMPFAIL of
# sysexits.h ("try again later"), distinct from 0 (finished), 1 (a bug) and 2 (bad input).
EXIT_PREEMPTED = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class TrainingStopped(Exception):
    """Raised by the trainer after the checkpoint of the step it stopped at is complete."""

    def __init__(self, step: int, checkpoint, signal_name: str) -> None:
        super().__init__(f"stopped on {signal_name} after step {step}; checkpoint {checkpoint} is complete: "
                         "run the same command with resume=true to continue")
        self.step, self.checkpoint, self.signal_name = step, checkpoint, signal_name


class StopSignals:
    """Context manager: while inside, the stop signals set :attr:`received` (the first signal's
    name) instead of ending the process; the previous handlers come back on exit. Only the main
    thread can install handlers; elsewhere (a notebook worker thread) it does nothing."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log, self.received, self._previous = log, None, {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            self.log(f"{name} received: finishing this step, then writing a checkpoint")
        else:
            self.log(f"{name} received again: already stopping (the checkpoint is being written)")

    def __enter__(self) -> "StopSignals":
        import threading
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    sig = getattr(signal, name)
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, ctx: DistContext, group=None) -> str | None:
        """The signal to stop on, the same on every rank (a collective under torchrun: every rank
        calls it after every step), or None to go on."""
        if not ctx.enabled:
            return self.received
        names = (None, *STOP_SIGNALS)
        flag = torch.tensor([names.index(self.received)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return names[int(flag)]


def host_group(ctx: DistContext):
    """A gloo process group for small host-side agreements (None: the default group is gloo already
    or there is a single process)."""
    if not ctx.enabled or ctx.backend == "gloo":
        return None
    return dist.new_group(backend="gloo")


def exit_stopped(e: TrainingStopped) -> None:
    """What a tool does with :class:`TrainingStopped`: one line and :data:`EXIT_PREEMPTED`."""
    print(f"moe-vision: {e}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def fit_to_the_end(trainer) -> dict | None:
    """``trainer.fit()``, then leave the process group; a stop signal ends the process with
    :data:`EXIT_PREEMPTED` after the group is left. Returns fit's result on the main process and
    None on the others (the tools print only there)."""
    try:
        out = trainer.fit()
    except TrainingStopped as e:
        trainer.dist.shutdown()
        exit_stopped(e)
    trainer.dist.shutdown()
    return out if trainer.dist.is_main else None
