"""How long a multi-process run's per-step preemption check keeps the host waiting.

    python bench/preemption_wait.py

Starts two CPU processes of one device each (gloo) and times, after dispatching a ~0.5 s step,
`Preemption.requested()` against the check it replaced (an immediate `process_allgather` of
the flags, which runs behind the step on the devices and so waits for it). The host's wait is
time the devices sit idle before the next step is dispatched.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np

REPEATS = 5


def worker(process_id: int, port: int) -> None:
    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from md4_eqx.distributed import initialize
    from md4_eqx.preemption import Preemption

    initialize(f"127.0.0.1:{port}", 2, process_id)
    mesh = Mesh(np.array(jax.devices()), ("d",))
    x = jax.device_put(jnp.ones((2048, 1024)), NamedSharding(mesh, P("d")))

    @jax.jit
    def step(x):  # a stand-in for a training step: ~0.5 s of matmuls on one CPU core
        for _ in range(20):
            x = jnp.tanh(x @ x[:1024].T / 1024)
        return x

    x = step(x).block_until_ready()
    began = time.perf_counter()
    x = step(x).block_until_ready()
    step_s = time.perf_counter() - began

    def allgather() -> bool:
        return bool(np.any(multihost_utils.process_allgather(np.asarray(False))))

    if process_id == 0:
        print(
            f"machine: {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
            f"JAX {jax.__version__}, 2 processes of {jax.local_device_count()} device each",
            flush=True,
        )
    for name, check in (
        ("immediate process_allgather (before)", allgather),
        ("Preemption.requested (lagged)", Preemption().requested),
    ):
        check(), check()  # compiled
        waits = []
        for _ in range(REPEATS):
            x = step(x)
            began = time.perf_counter()
            check()
            waits.append(time.perf_counter() - began)
            x.block_until_ready()
        if process_id == 0:
            print(
                f"{name:38s} host waits {np.median(waits) * 1e3:7.1f} ms "
                f"after a {step_s * 1e3:.0f} ms step (median of {REPEATS})",
                flush=True,
            )


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.path.dirname(os.path.dirname(__file__)),
    }
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE if i else None,
            stderr=subprocess.DEVNULL,
        )
        for i in range(2)
    ]
    for p in procs:
        p.communicate(timeout=300)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]))
    else:
        main()
