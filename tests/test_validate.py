"""validate's check of a mesh against the processes that hold its devices, on device arrays of
several processes (stand-ins with a process_index: this test runs in one process)."""

from types import SimpleNamespace

import numpy as np
import pytest

from md4_eqx.distributed import data_rows
from md4_eqx.errors import MeshError
from md4_eqx.validate import check_processes


def mesh_devices(processes: int, per_process: int, model: int) -> np.ndarray:
    """[data, model] stand-ins for the devices of `processes` processes, in process order, as
    make_mesh lays out jax.devices()."""
    flat = [SimpleNamespace(process_index=i // per_process) for i in range(processes * per_process)]
    return np.asarray(flat, dtype=object).reshape(-1, model)


@pytest.mark.parametrize(
    "processes, per_process, model, parts",
    [
        (2, 4, 1, [[0, 1, 2, 3], [4, 5, 6, 7]]),  # data only
        (2, 4, 2, [[0, 1], [2, 3]]),  # model divides each process's 4 devices
        (2, 2, 4, [[0], [0]]),  # model spans both processes: one part, shared
        (4, 2, 4, [[0], [0], [1], [1]]),
    ],
)
def test_meshes_that_split_over_the_processes(processes, per_process, model, parts):
    devices = mesh_devices(processes, per_process, model)
    check_processes(devices)
    assert [data_rows(devices, p) for p in range(processes)] == parts


@pytest.mark.parametrize(
    "processes, per_process, model, rows",
    [
        # model=3 neither divides 2 nor is a multiple
        (3, 2, 3, "process 1 holds data rows [0, 1]"),
        (2, 6, 4, "process 0 holds data rows [0, 1]"),  # 6 devices: rows 0-1 and 1-2 of 3
    ],
)
def test_meshes_that_do_not(processes, per_process, model, rows):
    with pytest.raises(MeshError, match=f"model={model} does not split") as e:
        check_processes(mesh_devices(processes, per_process, model))
    assert rows in str(e.value)
