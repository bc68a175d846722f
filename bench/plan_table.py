"""The README's planned maximum per-device batch of MD4-S (seq 1024) for common accelerators.

    python bench/plan_table.py
    python bench/plan_table.py --head-chunk 2048 --at 64 128   # the loss's head 2048 tokens at a time

Compiles the training step on this machine's first device (a (1, 1) mesh: per-device figures)
at microbatches of 8 and 16 examples (--at), for float32 and bfloat16 compute, with and without remat,
and extends the line peak = fixed + per_example * m to each memory size, less the planner's
margin (md4_eqx.plan.MARGIN). The planner's default line, through 1 and 2 examples, is only its
first guess: its slope is 15-20% lower than at the sizes that matter here. With --head-chunk and
remat, a step's peak moves from the head's chunk to a block's recomputation only past 16 or so
examples, so that table needs a line through larger sizes. On CPU, XLA's memory analysis is a
proxy for the accelerator's.

Attention is planned as the accelerators run it, a flash kernel (cuDNN's or ours), not as XLA's
[T, T] probabilities on this CPU: `flash_memory` stands in for the kernel, one call opaque to XLA
that keeps what a flash kernel keeps for the backward pass (q, k, v, the output and the
log-sum-exp). It is compiled, never run. `--xla` plans with XLA's attention instead.
"""

import argparse
import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np

from md4_eqx.config import Precision, preset
from md4_eqx.kernels.attention import Impl, Kernel
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import MARGIN, Planner, parse_size, show_size

MEMORY = {"H100 80 GB": "80GiB", "A100 40 GB": "40GiB", "A100 80 GB": "80GiB", "TPU v5e 16 GB": "16GiB"}


def opaque(*like: jax.Array):
    """A call XLA cannot see into, returning arrays shaped as `like` (zeros, were it ever run)."""
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in like)
    return lambda *args: jax.pure_callback(lambda *_: tuple(np.zeros(s.shape, s.dtype) for s in shapes),
                                           shapes, *args)


@jax.custom_vjp
def flash_memory(q, k, v):
    return flash_forward(q, k, v)[0]


def flash_forward(q, k, v):
    b, t, h, _ = q.shape
    o, lse = opaque(q, jnp.zeros((b, h, t), jnp.float32))(q, k, v)
    return o, (q, k, v, o, lse)


def flash_backward(residuals, do):
    q, k, v = residuals[:3]
    return opaque(q, k, v)(*residuals, do)


flash_memory.defvjp(flash_forward, flash_backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--xla", action="store_true", help="plan with XLA's attention, not a flash kernel's memory")
    parser.add_argument("--head-chunk", type=int, default=0, help="the loss's head on this many tokens at a time")
    parser.add_argument("--precision", choices=[p.value for p in Precision], action="append",
                        help="only these compute precisions (default: both)")
    parser.add_argument("--at", type=int, nargs=2, default=(8, 16), metavar=("SMALL", "LARGE"),
                        help="the two microbatch sizes the line runs through (default 8 16)")
    parser.add_argument("--compile", type=int, nargs="+", default=[], metavar="M",
                        help="also compile these per-device sizes and print their peaks (to check the line)")
    args = parser.parse_args()
    if not args.xla:  # every attention call resolves to the stand-in
        row = Kernel(Impl.PALLAS, flash_memory, lambda *_: None)
        importlib.import_module("md4_eqx.kernels.attention").resolve = lambda *_, **__: row
    mesh = make_mesh(1, 1, jax.devices()[:1])
    base = preset("md4-s")
    print(f"MD4-S, attention {'XLA' if args.xla else 'as a flash kernel'}, head_chunk {args.head_chunk}, "
          f"line through {args.at[0]} and {args.at[1]} examples, compiled on {jax.devices()[0].device_kind}")
    rows = []
    for precision in [Precision(p) for p in args.precision or [p.value for p in Precision]]:
        model = dataclasses.replace(base.model, precision=precision, head_chunk=args.head_chunk)
        config = dataclasses.replace(base, model=model)
        for remat in (False, True):
            planner = Planner(config, mesh, 1)
            fixed, per_example = planner.line(remat, at=tuple(args.at))
            print(f"{precision.value} remat={remat}: peak {show_size(fixed)} + {per_example / 2**20:.1f} MiB per example",
                  flush=True)
            for m in args.compile:
                print(f"  {m} per device: compiled {show_size(planner.peak(remat, m))}, "
                      f"line {show_size(fixed + m * per_example)}", flush=True)
            rows.append((precision.value, remat, fixed, per_example))
    print(f"\n| device | " + " | ".join(f"{p} {'remat' if r else 'no remat'}" for p, r, _, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, size in MEMORY.items():
        budget = parse_size(size) * (1.0 - MARGIN)
        cells = [str(max(0, int((budget - fixed) // per_example))) for _, _, fixed, per_example in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
