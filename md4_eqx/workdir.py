"""A run's claim on its workdir: writable, big enough for a checkpoint, and used by no other run.

`claim` holds an exclusive `fcntl.flock` on WORKDIR/.lock while its `with` block runs (a killed
process's lock goes with it, even on SIGKILL), so a second run started on the same workdir
refuses instead of writing over the first one's checkpoints; `check_space` refuses a disk that
cannot hold one more. Both raise `WorkdirError` (one line); in a multi-process run process 0
checks and every process raises. A disk that fills up later is
`md4_eqx.checkpoint.Checkpoints.save`'s to report.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils

from md4_eqx.errors import WorkdirError

if TYPE_CHECKING:  # for annotations only: the workdir sits below the train step
    from md4_eqx.train_step import TrainState


def _agree(error: str | None) -> None:
    """Raises on every process if process 0 found `error` (a collective in a multi-process run)."""
    if jax.process_count() > 1:
        failed = bool(np.any(multihost_utils.process_allgather(np.asarray(error is not None))))
        error = error or (
            "process 0 cannot use the workdir (its error says why)" if failed else None
        )
    if error:
        raise WorkdirError(error)


@contextlib.contextmanager
def claim(workdir: Path) -> Iterator[None]:
    """Creates `workdir` and locks it for the run inside the `with` (process 0 holds the lock)."""
    with contextlib.ExitStack() as lock:  # closing the file releases the lock
        error = None
        if jax.process_index() == 0:
            path = workdir / ".lock"
            try:
                workdir.mkdir(parents=True, exist_ok=True)
                fcntl.flock(lock.enter_context(open(path, "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                error = f"workdir {workdir} is in use by another run (it holds {path})"
            except OSError as e:
                error = f"workdir {workdir} is not writable ({e.strerror})"
        _agree(error)
        yield


def checkpoint_bytes(state: TrainState) -> int:
    """The size of one checkpoint: every array of the state (model, EMA, optimizer state)."""
    return sum(x.nbytes for x in jax.tree.leaves(eqx.filter(state, eqx.is_array)))


def check_space(workdir: Path, state: TrainState) -> None:
    """Refuses a disk with less free space than one checkpoint of `state`."""
    error = None
    if jax.process_index() == 0:
        need, free = checkpoint_bytes(state), shutil.disk_usage(workdir).free
        if free < need:
            error = (
                f"workdir {workdir} has {free / 2**20:.1f} MiB free, "
                f"a checkpoint needs {need / 2**20:.1f} MiB"
            )
    _agree(error)
