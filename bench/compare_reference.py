"""md4-eqx's training step against DeepMind's Flax MD4, step for step, in one process.

    MD4_REFERENCE=/path/to/google-deepmind/md4 python bench/compare_reference.py
    python bench/compare_reference.py --reference /path/to/md4 --rounds 7 --steps 5

The reference is not a dependency: it is imported from a local checkout of
github.com/google-deepmind/md4 (flag or MD4_REFERENCE) and needs flax; without either the script
says so in one line and exits 0. Only its training loss is used (`MD4.__call__`: antithetic
times, forward masking, the transformer, the continuous-time loss), so the modules it imports for
sampling, plotting and logging (tensorflow_probability, distrax, clu, ...) are stubbed when they
are not installed.

Both models take the same config: vocab 256, seq 128, 4 layers, 4 heads x 64, GLU, adaLN-zero,
linear schedule, continuous time, float32, batch 32, one device. The reference step is its
train.py's on one device: value_and_grad of the loss, AdamW, EMA 0.9999 (its OpenWebText config
clips nothing); ours is `md4_eqx.train_step`'s (global-norm clipping at 1 included). Both donate
their state. Timing alternates: each round times --steps steps of one, then of the other, and
the per-step medians over all rounds are compared, so machine load hits both alike.
"""

import argparse
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    Impl,
    ModelConfig,
    OptimConfig,
    Precision,
    TrainConfig,
)
from md4_eqx.parallel import make_mesh
from md4_eqx.targets import keep_jax_off_absent_tpus
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

VOCAB, SEQ, LAYERS, HEADS, HEAD_DIM, BATCH = 256, 128, 4, 4, 64, 32
STUBBED = (
    "tensorflow_probability",
    "tensorflow_probability.substrates",
    "tensorflow_probability.substrates.jax",
    "distrax",
    "chex",
    "clu",
    "clu.platform",
    "matplotlib",
    "matplotlib.pyplot",
    "seaborn",
    "einops",
)


def ours() -> tuple[object, object]:
    """(state, step) of md4-eqx at the comparison config."""
    config = Config(
        model=ModelConfig(
            vocab_size=VOCAB,
            seq_len=SEQ,
            width=HEADS * HEAD_DIM,
            num_layers=LAYERS,
            num_heads=HEADS,
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32, attention=Impl.XLA),
        diffusion=DiffusionConfig(),
        optim=OptimConfig(),
        train=TrainConfig(batch_size=BATCH, steps=1_000_000),
    )
    mesh = make_mesh(1, 1, devices=jax.devices()[:1])
    optimizer = make_optimizer(config.optim, config.train.steps)
    state = init_state(config, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=config.optim.clip, ema=config.optim.ema)
    return state, lambda state, tokens: step(state, tokens)


class _Stub(types.ModuleType):
    """A missing module: its submodules are the stubs registered under their names, any other
    attribute a placeholder class (enough for md4's module-level
    `class X(distrax.Distribution)`)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return sys.modules.get(f"{self.__name__}.{name}") or type(name, (), {})


def import_reference(path: str):
    """DeepMind's `md4.models.diffusion.md4` module from a checkout, or None if it cannot load."""
    try:
        import flax  # noqa: F401
        import optax  # noqa: F401
    except ImportError:
        return None
    for name in STUBBED:  # imported at module level by md4, used only off the training loss
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = _Stub(name)
    sys.path.insert(0, path)
    from md4.models.diffusion import md4

    return md4


def reference(md4) -> tuple[object, object]:
    """(state, step) of DeepMind's MD4 at the comparison config, as its train.py runs it."""
    import optax

    model = md4.MD4(
        data_shape=(SEQ,),
        cont_time=True,
        feature_dim=HEAD_DIM,
        num_heads=HEADS,
        n_layers=LAYERS,
        vocab_size=VOCAB,
        noise_schedule_type="linear",
        mlp_type="glu",
        depth_scaled_init=True,
        cond_type="adaln_zero",
        classes=-1,
    )
    init_key, sample_key, state_key = jax.random.split(jax.random.key(0), 3)
    params = model.init(
        {"params": init_key, "sample": sample_key}, jnp.ones((BATCH, SEQ), jnp.int32)
    )["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 2000, 1_000_000)
    optimizer = optax.adamw(schedule, b1=0.9, b2=0.999, weight_decay=0.0)
    ema_rate = 0.9999

    def step(state, tokens):
        params, ema, opt_state, key = state
        key, sample_key = jax.random.split(key)

        def loss_fn(params):
            return model.apply({"params": params}, tokens, train=True, rngs={"sample": sample_key})[
                "loss"
            ]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: e + (1.0 - ema_rate) * (p - e), ema, params)
        return (params, ema, opt_state, key), loss

    state = (params, jax.tree.map(jnp.copy, params), optimizer.init(params), state_key)
    return state, jax.jit(step, donate_argnums=0)


def count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree) if hasattr(x, "size"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--reference",
        default=os.environ.get("MD4_REFERENCE"),
        help="checkout of google-deepmind/md4 (default: $MD4_REFERENCE)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="alternations of the two")
    parser.add_argument("--steps", type=int, default=5, help="steps of each per round")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.exit(2, f"{parser.prog}: error: need --rounds >= 1 and --steps >= 1\n")
    if not args.reference or not os.path.isdir(os.path.join(args.reference, "md4")):
        print(
            "skipped: no reference checkout "
            "(pass --reference or set MD4_REFERENCE to a clone of google-deepmind/md4)"
        )
        return
    md4 = import_reference(args.reference)
    if md4 is None:
        print("skipped: the reference needs flax and optax, which this Python does not have")
        return

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
    runs = {"md4-eqx": ours(), "reference": reference(md4)}
    ours_n, reference_n = count(runs["md4-eqx"][0].model), count(runs["reference"][0][0])
    print(f"parameters: md4-eqx {ours_n:,}, reference {reference_n:,}")
    times: dict[str, list[float]] = {name: [] for name in runs}
    states = {name: state for name, (state, _) in runs.items()}
    for name, (_, step) in runs.items():  # compile and warm up
        for _ in range(2):
            states[name], out = step(states[name], tokens)
        jax.block_until_ready(out)
    for _ in range(args.rounds):
        for name, (_, step) in runs.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                states[name], out = step(states[name], tokens)
                jax.block_until_ready((states[name], out))
                times[name].append(time.perf_counter() - start)
    device = jax.devices()[0]
    print(
        f"{device.device_kind} ({device.platform}, {os.cpu_count()} cores), "
        f"JAX {jax.__version__}; {args.rounds} rounds x {args.steps} steps each, alternating; "
        f"batch {BATCH} x seq {SEQ}, float32"
    )
    print("| model | ms/step (median) | tokens/s | vs reference |")
    print("|---|---|---|---|")
    ref = statistics.median(times["reference"])
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med * 1e3:.1f} | {BATCH * SEQ / med:,.0f} | {ref / med:.2f}x |")


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    main()
