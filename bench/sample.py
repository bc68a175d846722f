"""Sampling speed: tokens/s and network evaluations of each sampler, against the first row.

    python bench/sample.py                                   # tiny preset: 128 and 1000 steps
    python bench/sample.py --preset md4-s --batch 1 --steps 16 64
    python bench/sample.py --preset md4-s --batch 16 --steps 1000  # the paper's setting, on a GPU
    python bench/sample.py --preset md4-s --float32 --seq-len 128 --batch 1 --steps 128 \
        --loops exact_skip                                   # the sparse head against the full one

Each loop runs twice: with the full head (`sampling.FullHead`: the head and the draw at every
position) and with the sparse head (only where a position unmasks; the same tokens). Each
configuration is compiled once, then timed over --repeats runs (the median is reported), the
configurations taking turns within each repeat in the same process, so every speed-up is against
the first row measured on the same machine under the same load.
A fresh model is used: sampling costs the same whatever the weights, and the exact-skip sampler's
number of calls does not depend on the network at all. "calls" is the mean number of network
evaluations per run (T + 1 for the ancestral sampler; for exact-skip, the distinct unmask steps
of the busiest sequence in the batch), "expected" the exact expectation for one sequence.
"""

import argparse
import dataclasses
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from md4_eqx.config import PRESETS, Loop, Precision, SamplerConfig, preset
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import FullHead, expected_skip_calls, generate
from md4_eqx.targets import keep_jax_off_absent_tpus


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    host = f"host {cpu}, {os.cpu_count()} cores"
    return f"{device.platform}: {device.device_kind}; {host}; JAX {jax.__version__}"


def bench(
    runs: list[tuple[MD4, SamplerConfig]], batch: int, repeats: int
) -> list[tuple[float, float]]:
    """(median seconds per run, mean network calls per run) of `batch` unconditional samples, for
    each (model, sampler) of `runs`. Each is compiled first; then every repeat times each of them
    in turn with the same key, so a change in the machine's load falls on all of them alike."""
    mesh = make_mesh(1, 1, jax.devices()[:1])
    template = jnp.full((batch, runs[0][0].config.seq_len), runs[0][0].mask_id, jnp.int32)
    for model, cfg in runs:  # compile
        jax.block_until_ready(generate(model, jax.random.key(0), template, mesh, cfg))
    times, calls = [[] for _ in runs], [[] for _ in runs]
    for r in range(repeats):
        for i, (model, cfg) in enumerate(runs):
            start = time.perf_counter()
            out = jax.block_until_ready(generate(model, jax.random.key(r + 1), template, mesh, cfg))
            times[i].append(time.perf_counter() - start)
            calls[i].append(float(np.mean(out.calls)))
    return [(statistics.median(t), float(np.mean(c))) for t, c in zip(times, calls, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 1000])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="override the preset's sequence length")
    parser.add_argument("--layers", type=int, help="override the preset's number of layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--loops",
        type=Loop,
        nargs="+",
        default=[Loop.EVERY_STEP, Loop.EXACT_SKIP],
        help="which loops to time (each with the full head, then the sparse one)",
    )
    parser.add_argument(
        "--float32", action="store_true", help="float32 matmuls (default: the preset's)"
    )
    args = parser.parse_args()

    cfg = preset(args.preset)
    changes = {"seq_len": args.seq_len, "num_layers": args.layers}
    cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{k: v for k, v in changes.items() if v})
    )
    if args.float32:
        cfg = dataclasses.replace(
            cfg, execution=dataclasses.replace(cfg.execution, precision=Precision.FLOAT32)
        )
    sparse = MD4(cfg.model, cfg.diffusion, cfg.execution, key=jax.random.key(0))
    heads = {"full head": eqx.tree_at(lambda m: m.net, sparse, FullHead(sparse.net))}
    heads["sparse head"] = sparse
    m = cfg.model
    print(f"machine: {machine()}")
    print(
        f"model: {args.preset}, {m.num_layers} layers, width {m.width}, vocab {m.vocab_size}, "
        f"seq {m.seq_len}, {cfg.execution.precision.value}; batch {args.batch}; cosine grid; "
        f"median of {args.repeats}"
    )
    print("| steps | sampler | calls | expected | s/run | tokens/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.steps:
        rows = [
            (head, model, dataclasses.replace(cfg.sampler, loop=loop, steps=steps))
            for loop in args.loops
            for head, model in heads.items()
        ]
        timed = bench([(model, c) for _, model, c in rows], args.batch, args.repeats)
        base = timed[0][0]
        for (head, model, sampler_cfg), (seconds, calls) in zip(rows, timed, strict=True):
            expected = (
                steps + 1
                if sampler_cfg.loop is Loop.EVERY_STEP
                else expected_skip_calls(model.schedule, sampler_cfg, m.seq_len)
            )
            print(
                f"| {steps} | {sampler_cfg.rule.value}, {sampler_cfg.loop.value}, {head} | "
                f"{calls:.1f} | {expected:.1f} | {seconds:.3f} | "
                f"{args.batch * m.seq_len / seconds:.4g} | {base / seconds:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    main()
