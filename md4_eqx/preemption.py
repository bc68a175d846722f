"""Preemption: SIGTERM and SIGINT ask the run to stop after its current step.

Cloud schedulers and SLURM send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT.
Once `Preemption` is created, either signal only sets a flag: the loop finishes its step, asks
`requested()`, writes a checkpoint at that step and exits 0, so rerunning the same command (a
SLURM requeue) resumes exactly. A second signal, e.g. during that save, sets the flag again and
nothing else, so the save is never cut short (orbax also writes it to a temporary directory and
renames it when complete). SIGKILL still kills at once; the previous checkpoint then resumes.
"""

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils


class Preemption:
    """Installs the handlers (for the rest of the process's life; create it once)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.received: signal.Signals | None = None
        for signum in signals:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = self.received or signal.Signals(signum)

    def requested(self) -> bool:
        """Whether a signal reached this process or, in a multi-process run, any process: every
        process gets the same answer, so all stop at the same step. That is a collective there:
        every process calls it at the same points."""
        flag = np.asarray(self.received is not None)
        if jax.process_count() > 1:
            return bool(np.any(multihost_utils.process_allgather(flag)))
        return bool(flag)
