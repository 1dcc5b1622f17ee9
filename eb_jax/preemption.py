"""Stopping cleanly on SIGTERM or SIGINT: the run finishes its step, checkpoints, exits.

Cloud TPU spot VMs and GPU schedulers send SIGTERM some seconds before they stop a job.
Inside `handling()` the signal only asks the run to stop; the trainer asks `stop_at(step)`
after every step and, once it says yes, saves that step and raises `Preempted`. The
command line exits with `exit_code(signal)`: 128 + the signal's number, as a shell
reports a process the signal ended (143 for SIGTERM, 130 for SIGINT).

One process: a flag. Several processes: JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`) tells every process the same step, one
after the newest any of them had reached when the notice came; JAX's own handler takes
SIGTERM there (a SIGINT is passed on to it as a SIGTERM to this process). A second signal
of the same kind ends one process at once, without a checkpoint (as a SIGKILL: the run
resumes from its previous one).
"""

from __future__ import annotations

import contextlib
import os
import signal

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the signals asked to stop this process, in order


class Preempted(Exception):
    """The run stopped on a signal after checkpointing `step`."""

    def __init__(self, step: int, signum: int):
        self.step, self.signum = step, signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} after step {step}, checkpointed; the same command resumes")


def exit_code(signum: int) -> int:
    """The exit status of a run stopped by `signum`: 128 + its number."""
    return 128 + signum


def _ask_to_stop(signum, frame) -> None:
    if signum in _received:  # the second: stop now, as the default action would
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received.append(signum)
    if _synced():  # JAX's handler holds SIGTERM and tells every process
        os.kill(os.getpid(), signal.SIGTERM)


def _synced() -> bool:
    return jax.distributed.is_initialized()


@contextlib.contextmanager
def handling():
    """Within it, SIGTERM and SIGINT ask the run to stop at the next step boundary."""
    taken = [s for s in SIGNALS if not (_synced() and s == signal.SIGTERM)]
    before = {s: signal.signal(s, _ask_to_stop) for s in taken}
    _received.clear()
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
        _received.clear()


def request(signum: int = signal.SIGTERM) -> None:
    """Asks the run to stop as `signum` would (what the signal handler does)."""
    _ask_to_stop(signum, None)


def stop_at(step: int) -> bool:
    """Whether the run stops after global step `step`; the same answer on every process.
    Every process must ask at every training step."""
    if _synced():
        return multihost_utils.reached_preemption_sync_point(step)
    return bool(_received)


def stop_now() -> bool:
    """Whether a one-process run was asked to stop (between stages, evaluations, epochs)."""
    return not _synced() and bool(_received)


def signal_number() -> int:
    """The signal that stopped the run (SIGTERM when JAX's handler took it)."""
    return _received[0] if _received else signal.SIGTERM
