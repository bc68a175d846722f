"""Attention speed: forward and forward+backward of every implementation this machine compiles.

    python bench/attention.py                    # (16, 1024, 12, 64) and (4, 4096, 12, 64)
    python bench/attention.py --small --dtype float32   # CPU-sized shapes

Prints one markdown table (ready for bench/RESULTS.md) naming the machine and JAX version,
with ratios to cuDNN and XLA measured in the same run ("speed-up": their time / this time).
FLOPs: the forward counts its two matmuls, 4*B*T*T*H*D; forward+backward counts 3.5x that
(the backward's five matmuls, one recomputing QK^T, as in FlashAttention-2), for every
implementation alike. The Pallas interpreter is not timed: on CPU it measures Python, not
the kernel, so "pallas" appears only on TPU.
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from md4_eqx.kernels import Impl, attention
from md4_eqx.kernels.attention import available_impls
from md4_eqx.targets import keep_jax_off_absent_tpus

SHAPES = [(16, 1024, 12, 64), (4, 4096, 12, 64)]  # (batch, seq, heads, head_dim)
SMALL_SHAPES = [(2, 256, 4, 64), (1, 1024, 4, 64)]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def seconds_per_call(fn, *args, repeats: int) -> float:
    """Median wall time of a compiled call, after one call that compiles and warms up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(
    impl: str, shape: tuple[int, int, int, int], dtype, repeats: int
) -> tuple[float, float]:
    """(forward seconds, forward+backward seconds) of `impl` at `shape`."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v, do = (jax.random.normal(key, shape, dtype) for key in keys)

    def forward(q, k, v):
        return attention(q, k, v, impl=Impl(impl))

    def forward_backward(q, k, v, do):
        _, vjp = jax.vjp(forward, q, k, v)
        return vjp(do)

    return (
        seconds_per_call(jax.jit(forward), q, k, v, repeats=repeats),
        seconds_per_call(jax.jit(forward_backward), q, k, v, do, repeats=repeats),
    )


def ratio(times: dict[str, tuple[float, float]], baseline: str, impl: str) -> str:
    """Speed-up of `impl` over `baseline`, forward / forward+backward, or '-' if unmeasured."""
    if baseline not in times:
        return "-"
    (f0, b0), (f1, b1) = times[baseline], times[impl]
    return f"{f0 / f1:.2f} / {b0 / b1:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="CPU-sized shapes")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    dtype = jnp.dtype(args.dtype)
    impls = [i.value for i in available_impls()]

    device = jax.devices()[0]
    cores = f", {os.cpu_count()} cores" if device.platform == "cpu" else ""
    machine = f"{device.device_kind} ({device.platform}{cores})"
    print(f"machine: {machine}, JAX {jax.__version__}, {args.dtype}")
    print("fwd / fwd+bwd; speed-up = baseline time / this time\n")
    print(
        "| B, T, H, D | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| vs cuDNN | vs XLA |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in SMALL_SHAPES if args.small else SHAPES:
        b, t, h, d = shape
        flops = 4 * b * t * t * h * d
        times = {impl: measure(impl, shape, dtype, args.repeats) for impl in impls}
        for impl, (fwd, fwd_bwd) in times.items():
            print(
                f"| {b}, {t}, {h}, {d} | {impl} | {fwd * 1e3:.2f} | {flops / fwd / 1e12:.3g} "
                f"| {fwd_bwd * 1e3:.2f} | {3.5 * flops / fwd_bwd / 1e12:.3g} "
                f"| {ratio(times, 'cudnn', impl)} | {ratio(times, 'xla', impl)} |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    main()
