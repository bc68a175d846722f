"""Several processes, one run: start JAX's distributed runtime, load each process's rows of the
global batch, and gather results split over `data` back to every process.

One process per host (GPU node or TPU VM), each driving its local devices. The mesh spans every
process's devices (`jax.devices()` lists them all, grouped by process), so the training step
is the same `shard_map` as on one device. Checkpoints need nothing more: orbax writes and reads
each process's shards (`md4_eqx.checkpoint`).
"""

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Shaped

from md4_eqx.parallel import DATA


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """`jax.distributed.initialize`; call it before any other use of JAX.

    Give all three arguments to launch by hand (`host:port` of process 0, the number of
    processes, this one's index), or none on a TPU pod slice or under SLURM / Open MPI, where JAX
    reads them from the environment. On CPU, collectives across processes go over gloo."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)


def data_rows(devices: np.ndarray, process: int) -> list[int]:
    """The rows of a mesh's [data, model] array of `devices` that hold devices of `process`."""
    return sorted(
        {i for (i, _), device in np.ndenumerate(devices) if device.process_index == process}
    )


def batch_part(mesh: Mesh) -> tuple[int, int]:
    """(index, count): this process's devices hold the index-th of `count` equal, contiguous
    parts of every global batch split over `data` (pass them to the data loader as its
    process_index and process_count). Processes that differ only along `model` share a part;
    `md4_eqx.validate.check_processes` has checked that the mesh splits this way."""
    rows = data_rows(mesh.devices, jax.process_index())
    return rows[0] // len(rows), mesh.shape[DATA] // len(rows)


def global_batch(
    local: Shaped[np.ndarray, "b_local *rest"],  # noqa: F821
    mesh: Mesh,
) -> Shaped[Array, "b *rest"]:  # noqa: F821
    """The global batch [B, ...] split over `data`, from this process's part [B / count, ...]
    (see `batch_part`); with one process it is simply `local` placed on the mesh."""
    _, count = batch_part(mesh)
    shape = (local.shape[0] * count, *local.shape[1:])
    return jax.make_array_from_process_local_data(NamedSharding(mesh, P(DATA)), local, shape)


def gather(x: Shaped[Array, "..."]) -> np.ndarray:
    """The whole value of a global array on every process (e.g. samples split over `data`, of
    which each process holds only its rows)."""
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated_on_mesh(x: Shaped[np.ndarray, "b *rest"], mesh: Mesh) -> Shaped[Array, "b *rest"]:  # noqa: F821
    """A host array every process holds in full -> a global array split over `data`."""
    return jax.make_array_from_callback(
        x.shape, NamedSharding(mesh, P(DATA)), lambda index: x[index]
    )
