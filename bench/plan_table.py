"""The README's "Will it fit?" table: MD4-S's (seq 1024) largest batch per chip, compiled by each
target's own compiler on abstract devices (md4_eqx.targets), with no such hardware here.

    python bench/plan_table.py --target v5e:1x1 --precision bfloat16 --remat none full
    python bench/plan_table.py --target v5e:1x1 --precision float32 --remat none
    JAX_PLATFORMS=cpu python bench/plan_table.py --target h100 a100-40gb   # needs the [cuda] extra
    python bench/plan_table.py --target v5e:1x1 --preset tiny --remat none  # a quick look

For every target x precision x remat (x --head-chunk) it runs the planner's search
(`md4_eqx.plan.Planner.largest`): on a TPU the largest batch the compiler accepts (it
rematerialises under pressure, and only a finished compile says "fits"), on a GPU the largest
whose compiled peak is within 90% of the memory. A chip's batch holds for any number of chips in
data parallelism (the state is replicated, the batch split), so "per 8 chips" is 8 x per chip.
On a GPU target cuDNN's attention compiles only on the device: the plan runs XLA's attention,
whose [T, T] scores make it conservative. Every row prints its compile time at the answer and
the whole search's, and the compiler's FLOPs per token next to bench/train_step.py's formula
(the ratio is the MFU cross-check: the formula counts matmuls only).
"""

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import jax

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_step import flops_per_token  # noqa: E402  (bench/train_step.py)

from md4_eqx import plan, targets  # noqa: E402
from md4_eqx.config import Precision, Remat, preset  # noqa: E402
from md4_eqx.parallel import make_mesh  # noqa: E402


def row(name: str, config, remat: Remat) -> str:
    """One table row: the target's largest batch per chip for `config` with `remat`."""
    target = targets.parse(name)
    mesh = make_mesh(1, 1, target.devices()[:1])
    started = time.perf_counter()
    planner = plan.Planner(config, mesh, target.chip.memory)
    largest = planner.largest(remat)
    searched = time.perf_counter() - started
    step = planner.step(remat, max(largest, 1))
    run = config.execution
    tokens = max(largest, 1) * config.model.seq_len
    flops = "-" if step.flops is None else f"{step.flops / tokens / flops_per_token(config):.2f}"
    peak = "-" if step.refused else plan.show_size(step.peak)
    return (
        f"| {name} | {run.precision.value} | {remat.value} | {run.head_chunk or '-'} | {largest} | "
        f"{8 * largest} | {peak} | {step.seconds:.0f} s | {searched:.0f} s | {flops} |"
        + (f" {planner.note}" if planner.note else "")
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
    args = parser.parse_args()
    base = preset(args.preset)
    print(
        f"{args.preset}, seq {base.model.seq_len}; jax {jax.__version__}; compiled on this host's CPU for "
        f"each target; a row per target x precision x remat\n",
        flush=True,
    )
    print(
        "| target | precision | remat | head chunk | largest per chip | per 8 chips | peak at it "
        "| compile at it | search | compiler / formula FLOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in args.target:
        for precision in args.precision:
            execution = dataclasses.replace(
                base.execution, precision=Precision(precision), head_chunk=args.head_chunk
            )
            for remat in args.remat:
                print(
                    row(name, dataclasses.replace(base, execution=execution), Remat(remat)),
                    flush=True,
                )


if __name__ == "__main__":
    main()
