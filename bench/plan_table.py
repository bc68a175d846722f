"""The README's "Will it fit?" table: MD4-S's (seq 1024) largest batch per chip, compiled by each
target's own compiler on abstract devices (md4_eqx.targets), with no such hardware here.

    python bench/plan_table.py --target v5e:1x1 --precision bfloat16 --remat none full
    python bench/plan_table.py --target v5e:1x1 --precision float32 --remat none
    MD4_REFERENCE=/path/to/google-deepmind/md4 python bench/plan_table.py --target v5e:1x1 ...
    JAX_PLATFORMS=cpu python bench/plan_table.py --target h100 a100-40gb   # needs the [cuda] extra
    python bench/plan_table.py --target v5e:1x1 --preset tiny --remat none  # a quick look

For every target x precision x remat (x --head-chunk) it runs the planner's search
(`md4_eqx.plan.Planner.largest`): on a TPU the largest batch the compiler accepts (it
rematerialises under pressure, and only a finished compile says "fits"), on a GPU the largest
whose compiled peak is within 90% of the memory. A chip's batch holds for any number of chips in
data parallelism (the state is replicated, the batch split), so "per 8 chips" is 8 x per chip.
On a GPU target cuDNN's attention compiles only on the device: the plan runs XLA's attention,
whose [T, T] scores make it conservative. Every row prints its compile time at the answer and
the whole search's, the compiler's FLOPs per token next to md4_eqx.step_time's formula (the
ratio is the MFU cross-check: the formula counts matmuls only), and the estimated tokens/s per
chip at the largest batch: on a TPU the compiler's cost model (md4_eqx.step_time), on a GPU a
roofline. With --reference (or $MD4_REFERENCE) and flax, DeepMind's md4 gets a row per TPU
target, computed the same way (bench/fit_tpu.py compiles its step).
"""

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fit_tpu  # noqa: E402  (bench/fit_tpu.py)

from md4_eqx import plan, targets  # noqa: E402
from md4_eqx.config import Precision, Remat, preset  # noqa: E402
from md4_eqx.model import HEAD_CHUNK  # noqa: E402
from md4_eqx.parallel import make_mesh  # noqa: E402
from md4_eqx.step_time import flops_per_token  # noqa: E402


def row(name: str, config) -> str:
    """One table row: the target's largest batch per chip for `config`, and the compiler's
    estimate of its tokens/s per chip there."""
    target = targets.parse(name)
    mesh = make_mesh(1, 1, target.devices()[:1])
    started = time.perf_counter()
    planner = plan.Planner(config, mesh, target.chip.memory)
    largest = planner.largest(planner.run)
    searched = time.perf_counter() - started
    step = planner.step(planner.run, max(largest, 1))
    run = config.execution
    tokens = max(largest, 1) * config.model.seq_len
    flops = "-" if step.flops is None else f"{step.flops / tokens / flops_per_token(config):.2f}"
    peak = "-" if step.refused else plan.show_size(step.peak)
    speed = "-" if step.estimate is None else f"{tokens / step.estimate.seconds:,.0f}"
    return (
        f"| {name} | md4-eqx | {run.precision.value} | {run.remat.value} | "
        f"{run.head_chunk or HEAD_CHUNK} | {largest} | {8 * largest} | {speed} | {peak} | "
        f"{step.seconds:.0f} s | {searched:.0f} s | {flops} |"
        + (f" {planner.note}" if planner.note else "")
    )


def reference_row(name: str, path: str) -> str:
    """DeepMind's md4 (its own step, float32) on one chip of a TPU target, the same way: its
    largest batch by `plan._largest`, from the 40 a v5e chip holds, and the estimate there."""
    target = targets.parse(name)
    mesh = make_mesh(1, 1, target.devices()[:1])
    lower = fit_tpu.reference(path, mesh)
    if lower is None:
        return f"| {name} | DeepMind's md4: needs flax and optax |"
    started = time.perf_counter()
    outcomes = {}

    def fits(batch: int) -> bool:
        outcomes[batch] = fit_tpu.compile_step(lower, batch, target.chip)
        return outcomes[batch].fits

    largest = plan._largest(fits, fit_tpu.REFERENCE_PER_V5E_CHIP)
    searched = time.perf_counter() - started
    at = outcomes[largest]
    speed = f"{largest * fit_tpu.SEQ / at.estimate.seconds:,.0f}"
    return (
        f"| {name} | DeepMind's md4, its own step | float32 | none | - | {largest} | "
        f"{8 * largest} | {speed} | {plan.show_size(at.peak)} | {at.seconds:.0f} s | "
        f"{searched:.0f} s | - |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target", nargs="+", required=True, help="compile targets (md4_eqx.targets)"
    )
    parser.add_argument("--preset", default="md4-s")
    parser.add_argument(
        "--precision",
        nargs="+",
        default=[p.value for p in Precision],
        choices=[p.value for p in Precision],
    )
    remats = [r.value for r in Remat]
    parser.add_argument("--remat", nargs="+", default=remats, choices=remats)
    parser.add_argument(
        "--head-chunk", type=int, default=0, help="the loss's head on this many tokens at a time"
    )
    parser.add_argument(
        "--reference",
        default=os.environ.get("MD4_REFERENCE"),
        help="checkout of google-deepmind/md4: its row for each TPU target (default: "
        "$MD4_REFERENCE)",
    )
    args = parser.parse_args()
    base = preset(args.preset)
    print(
        f"{args.preset}, seq {base.model.seq_len}; jax {jax.__version__}; compiled on this host's "
        f"CPU for each target; a row per target x precision x remat; tokens/s per chip at the "
        f"largest batch by the compiler's estimate (md4_eqx.step_time)\n",
        flush=True,
    )
    print(
        "| target | code | precision | remat | head chunk | largest per chip | per 8 chips "
        "| estimated tokens/s per chip | peak at it | compile at it | search "
        "| compiler / formula FLOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.target:
        if args.reference and targets.parse(name).platform == "tpu":
            print(reference_row(name, args.reference), flush=True)
        for precision in args.precision:
            for remat in args.remat:
                execution = dataclasses.replace(
                    base.execution,
                    precision=Precision(precision),
                    remat=Remat(remat),
                    head_chunk=args.head_chunk,
                )
                print(row(name, dataclasses.replace(base, execution=execution)), flush=True)


if __name__ == "__main__":
    main()
