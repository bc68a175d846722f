"""Training-step speed: tokens/s, ms/step, MFU and peak device memory of the jitted step.

    # CPU: every case of the tiny model
    python bench/train_step.py --preset tiny
    # GPU: MD4-S, bf16 and f32, each attention
    python bench/train_step.py --preset md4-s --batch 16 32 64
    # cuDNN's attention (bfloat16 only), the rows also written as JSON
    python bench/train_step.py --preset md4-s --batch 64 --attention cudnn --json out.json
    # the loss's head in chunks
    python bench/train_step.py --preset md4-s --batch 64 --precision bfloat16 --head-chunk 2048
    # the U-Net
    python bench/train_step.py --preset cifar10 --batch 2 --precision float32 --steps 1 --warmup 0

Every case (batch size x attention implementation x compute dtype) builds a fresh state on one
device, compiles the step, runs --warmup steps, then times --steps steps one by one and reports
the median. The state is donated exactly as in training (the step returns the next state, which
the next call consumes). The batch is random tokens: the step costs the same whatever they are.

MFU uses analytic FLOPs per token, forward + backward:
    6 x (parameters every token touches: per layer 4 d^2 attention + 3 d h MLP, plus the d x V_pad
         head; the embedding is a lookup and the adaLN / conditioning layers act once per example)
  + 12 x layers x seq x width (the attention scores and their mixing, forward + backward),
(md4_eqx.step_time.flops_per_token; the U-Net's: its convolutions' multiply-adds per pixel),
over the device's peak dense matmul rate for the compute dtype (--peak-tflops to override; on a
CPU there is none to assume, so MFU is n/a unless given). Peak memory is the device's high-water
mark so far in this process (`memory_stats`, GPU/TPU); cases run from the smallest batch up, so
each row's figure is that case's own peak unless an earlier, larger one set it. CPU: n/a.
"""

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from md4_eqx import plan
from md4_eqx.config import PRESETS, Config, Precision, preset
from md4_eqx.kernels import Impl
from md4_eqx.kernels.attention import available_impls
from md4_eqx.parallel import make_mesh
from md4_eqx.step_time import flops_per_token
from md4_eqx.targets import keep_jax_off_absent_tpus
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

# Dense matmul peaks in TFLOP/s (no sparsity): bfloat16, and float32 as XLA runs it (TF32).
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.0},
    "H200": {"bfloat16": 989.0, "float32": 494.0},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


# --- The only calls into md4_eqx's training API: update these when that API changes. ---------
def case_config(
    name: str, batch: int, attention: str, precision: Precision, head_chunk: int = 0
) -> Config:
    """The preset with this case's batch size, attention implementation, compute dtype and head
    chunk."""
    config = preset(name)
    execution = dataclasses.replace(
        config.execution, attention=Impl(attention), precision=precision, head_chunk=head_chunk
    )
    train = dataclasses.replace(config.train, batch_size=batch, microbatches=1)
    return dataclasses.replace(config, execution=execution, train=train)


def build(config: Config) -> tuple[object, Callable]:
    """A fresh training state on one device and the jitted step
    `(state, tokens, labels) -> (state, metrics)`."""
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = init_state(config, optimizer, mesh)
    return state, make_train_step(
        state, optimizer, mesh, clip=config.optim.clip, ema=config.optim.ema
    )


# ----------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def peak_tflops(precision: Precision) -> float | None:
    kind = jax.devices()[0].device_kind
    for name, peaks in PEAK_TFLOPS.items():
        if name in kind:
            return peaks[precision.value]
    return None


def peak_memory_gib() -> float | None:
    stats = jax.devices()[0].memory_stats()
    return (
        None
        if not stats or "peak_bytes_in_use" not in stats
        else stats["peak_bytes_in_use"] / 2**30
    )


def machine() -> str:
    device = jax.devices()[0]
    cores = f", {os.cpu_count()} cores" if device.platform == "cpu" else ""
    return f"{device.device_kind} ({device.platform}{cores}), JAX {jax.__version__}"


def planned_peak_gib(config: Config) -> float:
    """The memory plan's peak per device for this case (md4_eqx.plan: XLA's compiled figures)."""
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    return (
        plan.step_memory(config, mesh, batch=config.train.batch_size, microbatches=1).peak / 2**30
    )


def time_case(config: Config, warmup: int, steps: int) -> dict:
    """Compile, warm up and time one case; the figures of one table row."""
    planned = planned_peak_gib(config)
    state, step = build(config)
    m, b = config.model, config.train.batch_size
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, m.vocab_size, (b, m.seq_len)), jnp.int32)
    labels = jnp.asarray(rng.integers(0, m.num_classes, (b,)), jnp.int32) if m.num_classes else None
    start = time.perf_counter()
    state, metrics = step(state, tokens, labels)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    for _ in range(warmup):
        state, metrics = step(state, tokens, labels)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = step(state, tokens, labels)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens_per_s = b * m.seq_len / seconds
    peak = peak_tflops(config.execution.precision)
    return {
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "compile_s": compile_s,
        "mfu": None if peak is None else tokens_per_s * flops_per_token(config) / (peak * 1e12),
        "peak_memory_gib": peak_memory_gib(),
        "planned_memory_gib": planned,
        "bits_per_token": float(metrics.bpt),
    }


def is_out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> None:
    parser = _Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: the preset's)")
    parser.add_argument(
        "--attention", nargs="+", help="implementations (default: every one this machine has)"
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        choices=[p.value for p in Precision],
        default=[p.value for p in Precision],
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="timed steps per case (median reported)"
    )
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's peak for MFU (default: by device kind)"
    )
    parser.add_argument(
        "--head-chunk",
        type=int,
        default=0,
        help="every case computes the loss's head this many tokens at a time (default 0: whole)",
    )
    parser.add_argument("--json", help="also write every case's figures to this file")
    args = parser.parse_args(argv)
    impls = tuple(i.value for i in available_impls())
    attention = args.attention or list(impls)
    if unknown := [a for a in attention if a not in impls + ("auto",)]:
        parser.error(
            f"--attention {unknown[0]} does not run here; this machine has {impls} (and auto)"
        )
    batches = sorted(args.batch or [preset(args.preset).train.batch_size])
    if args.steps < 1 or args.warmup < 0 or min(batches) < 1 or args.head_chunk < 0:
        parser.error(
            f"need --steps >= 1, --warmup >= 0, batches >= 1 and --head-chunk >= 0 "
            f"(got {args.steps}, {args.warmup}, {batches}, {args.head_chunk})"
        )
    if args.peak_tflops is not None:
        PEAK_TFLOPS[jax.devices()[0].device_kind] = dict.fromkeys(args.precision, args.peak_tflops)

    chunk = f" --head-chunk {args.head_chunk}" if args.head_chunk else ""
    header = f"`python bench/train_step.py --preset {args.preset}{chunk}`: {machine()}"
    print(header + f", median of {args.steps} steps after compile + {args.warmup}\n")
    columns = "batch | attention | compute | ms/step | tokens/s | MFU | peak GiB | planned GiB"
    print(f"| {columns} | compile s |")
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rows = []
    for batch in batches:
        for impl in attention:
            for name in args.precision:
                if impl == "cudnn" and name == "float32":
                    continue  # cuDNN's fused attention takes only 16-bit inputs
                config = case_config(args.preset, batch, impl, Precision(name), args.head_chunk)
                row = {
                    "preset": args.preset,
                    "batch": batch,
                    "attention": impl,
                    "precision": name,
                    "head_chunk": args.head_chunk,
                    "seq_len": config.model.seq_len,
                    "flops_per_token": flops_per_token(config),
                }
                try:
                    row |= time_case(config, args.warmup, args.steps)
                except Exception as error:  # an OOM is a result; anything else is re-raised
                    if not is_out_of_memory(error):
                        raise
                    row["error"] = "out of memory"
                    print(f"| {batch} | {impl} | {name} | out of memory | | | | | |", flush=True)
                else:
                    print(
                        f"| {batch} | {impl} | {name} | {row['ms_per_step']:.1f} "
                        f"| {row['tokens_per_s']:,.0f} | {fmt(row['mfu'], '.1%')} "
                        f"| {fmt(row['peak_memory_gib'], '.1f')} | {row['planned_memory_gib']:.2f} "
                        f"| {row['compile_s']:.1f} |",
                        flush=True,
                    )
                rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "jax": jax.__version__, "cases": rows}, f, indent=1)
    sys.stdout.flush()


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    main()
