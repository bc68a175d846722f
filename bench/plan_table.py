"""The README's planned maximum per-device batch of MD4-S (seq 1024) for common accelerators.

    python bench/plan_table.py

Compiles the training step on this machine's first device (a (1, 1) mesh: per-device figures)
at microbatches of 1 and 2 examples, for float32 and bfloat16 compute, with and without remat,
and extends the line peak = fixed + per_example * m (md4_eqx.plan) to each memory size, less
the planner's margin. On CPU, XLA's memory analysis is a proxy for the accelerator's.
"""

import dataclasses

import jax

from md4_eqx.config import Precision, preset
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import MARGIN, Planner, parse_size, show_size

MEMORY = {"H100 80 GB": "80GiB", "A100 40 GB": "40GiB", "A100 80 GB": "80GiB", "TPU v5e 16 GB": "16GiB"}


def main() -> None:
    mesh = make_mesh(1, 1, jax.devices()[:1])
    base = preset("md4-s")
    rows = []
    for precision in Precision:
        config = dataclasses.replace(base, model=dataclasses.replace(base.model, precision=precision))
        for remat in (False, True):
            fixed, per_example = Planner(config, mesh, 1).line(remat)
            print(f"{precision.value} remat={remat}: peak {show_size(fixed)} + {per_example / 2**20:.1f} MiB per example",
                  flush=True)
            rows.append((precision.value, remat, fixed, per_example))
    print(f"\n| device | " + " | ".join(f"{p} {'remat' if r else 'no remat'}" for p, r, _, _ in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for name, size in MEMORY.items():
        budget = parse_size(size) * (1.0 - MARGIN)
        cells = [str(max(0, int((budget - fixed) // per_example))) for _, _, fixed, per_example in rows]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
