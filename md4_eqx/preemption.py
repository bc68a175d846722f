"""Preemption: SIGTERM and SIGINT ask the run to stop after its current step.

Cloud schedulers and SLURM send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT.
Once `Preemption` is created, either signal only sets a flag: the loop finishes its step, asks
`requested()`, writes a checkpoint at that step and exits 0, so rerunning the same command (a
SLURM requeue) resumes exactly. A second signal, e.g. during that save, sets the flag again and
nothing else, so the save is never cut short. SIGKILL still kills at once; the previous checkpoint
then resumes.
"""

import functools
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class Preemption:
    """Installs the handlers (for the rest of the process's life; create it once)."""

    def __init__(self):
        self.received = False
        self._gathering: jax.Array | None = None  # several processes: the previous call's answer
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.received = True

    def requested(self) -> bool:
        """Whether a signal reached this process or, in a multi-process run, any process.

        Several processes must all stop at the same step, so there every call is a collective
        (every process calls it at the same points) that ORs the processes' flags on the
        devices, behind the step in flight. Waiting for it would wait for that step, and leave
        the devices idle while the host loads the next batch; so a call starts that OR and
        answers with the previous call's, which the devices have computed by then or soon
        after. Every process gets the same answer, one step after the signal."""
        if jax.process_count() == 1:
            return self.received
        previous, self._gathering = self._gathering, _any_process(self.received)
        return previous is not None and bool(previous.addressable_data(0))


def _any_process(flag: bool) -> jax.Array:
    """Whether `flag` is set in any process, replicated on every device; dispatched, not awaited."""
    sharding, reduce = _all_devices()
    flags = [jax.device_put(np.array([flag]), device) for device in jax.local_devices()]
    return reduce(jax.make_array_from_single_device_arrays((jax.device_count(),), sharding, flags))


@functools.cache
def _all_devices() -> tuple[NamedSharding, jax.stages.Wrapped]:
    """One flag per device, and `any` of them replicated everywhere."""
    mesh = Mesh(np.array(jax.devices()), ("devices",))
    return NamedSharding(mesh, P("devices")), jax.jit(
        jnp.any, out_shardings=NamedSharding(mesh, P())
    )
