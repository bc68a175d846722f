"""The loss's masked-only head against the full head: loss forward + backward, one device.

    python bench/head.py                                   # MD4-S, seq 128, batch 4, float32
    python bench/head.py --head-chunk 64 128 256 --rounds 7

The loss reads log mu_theta(z_t, t)[x] only where z_t is masked, and `MD4.readout` runs the head
and its log-normaliser only there (`selected_tokens`). The full head is the same code with every
token selected: `MD4.readout` given `where` all true, as the exactness test compares. Each round
times --steps calls of one, then of the other, with the same keys (so the same times and masks),
and the medians over all rounds are compared, so machine load hits both alike.
"""

import argparse
import dataclasses
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from md4_eqx.config import Impl, Precision, preset
from md4_eqx.loss import losses
from md4_eqx.model import HEAD_CHUNK, MD4
from md4_eqx.parallel import DATA, batch_specs, example_ids, make_mesh, shard_map_modules
from md4_eqx.targets import keep_jax_off_absent_tpus


def full_readout(readout):
    """`MD4.readout` with every token selected: the head on all b l tokens."""

    def every_token(self, fn, z, t, labels, x, where, *, keys=None):
        return readout(self, fn, z, t, labels, x, jnp.ones_like(where), keys=keys)

    return every_token


def loss_step(model: MD4, mesh, batch: int):
    """jit(value_and_grad) of the mean training objective over `batch` examples on `mesh`."""

    def objective(model, key, tokens, labels):
        ids = example_ids(tokens.shape[0])
        return losses(model, tokens, labels, ids, key, global_batch=batch, train=True).objective

    per_example = shard_map_modules(objective, mesh, batch_specs, P(DATA))
    mean = lambda model, key, tokens: jnp.mean(per_example(model, key, tokens, None))  # noqa: E731
    return eqx.filter_jit(eqx.filter_value_and_grad(mean))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="md4-s")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--head-chunk", type=int, nargs="+", default=[HEAD_CHUNK])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = preset(args.preset)
    mesh = make_mesh(1, 1, jax.devices()[:1])
    tokens = jax.random.randint(
        jax.random.key(1), (args.batch, args.seq_len), 0, base.model.vocab_size
    )
    print(
        f"{args.preset}, seq {args.seq_len}, batch {args.batch}, float32, loss forward + backward, "
        f"{jax.devices()[0].platform}, {args.rounds} rounds of {args.steps} calls"
    )
    sparse_readout = MD4.readout
    for chunk in args.head_chunk:
        cfg = dataclasses.replace(
            base,
            model=dataclasses.replace(base.model, seq_len=args.seq_len),
            execution=dataclasses.replace(
                base.execution, precision=Precision.FLOAT32, attention=Impl.XLA, head_chunk=chunk
            ),
        )
        model = MD4(cfg.model, cfg.diffusion, cfg.execution, key=jax.random.key(0))
        steps = {}
        for name, readout in [("masked", sparse_readout), ("full", full_readout(sparse_readout))]:
            MD4.readout = readout  # traced now: each step keeps the head it was compiled with
            steps[name] = loss_step(model, mesh, args.batch)
            jax.block_until_ready(steps[name](model, jax.random.key(0), tokens))
        MD4.readout = sparse_readout
        times = {name: [] for name in steps}
        for r in range(args.rounds):
            for name, step in steps.items():
                for i in range(args.steps):
                    key = jax.random.key(1000 * r + i)
                    start = time.perf_counter()
                    jax.block_until_ready(step(model, key, tokens))
                    times[name].append(time.perf_counter() - start)
        masked, full = (statistics.median(times[n]) * 1e3 for n in ("masked", "full"))
        print(
            f"head_chunk {chunk}: masked-only {masked:.1f} ms, full {full:.1f} ms, "
            f"{full / masked:.3f}x"
        )


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    main()
