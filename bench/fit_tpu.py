"""The largest MD4-S batch one TPU chip holds, by the real TPU compiler, on a CPU-only host.

    python bench/fit_tpu.py --precision bfloat16                      # search the largest batch
    python bench/fit_tpu.py --precision float32 --attention xla --lo 16 --hi 48
    python bench/fit_tpu.py --precision bfloat16 --remat full --head-chunk 2048 --lo 64 --hi 256
    python bench/fit_tpu.py --precision bfloat16 --batch 16           # one compile
    python bench/fit_tpu.py ... --reference /path/to/google-deepmind/md4   # and DeepMind's, alike

Needs the TPU compiler (`pip install -e ".[tpu]"`: the libtpu that jax pins); the chips are
abstract (`jax.experimental.topologies`), so nothing runs, everything compiles. A batch fits when
its step compiles: the compiler refuses one too large for HBM ("Ran out of memory on HBM",
RESOURCE_EXHAUSTED), checking twice, a first verdict within seconds and a second
(`CompileTimeHbmOom`) after scheduling, minutes later; under pressure it rematerialises by itself,
so `memory_analysis()` at a small batch does not predict the answer: only finished compiles do.
`--batch` prints that analysis for one size (temp bytes: the proxy used to compare levers).
Every compiled step's line also gives the compiler's estimate of its time and tokens/s per chip
(md4_eqx.step_time; the Pallas kernels at their CostEstimate's floor).

The reference's figure is DeepMind's md4 (its openwebtext config, float32, its own train step)
compiled the same way: 40 examples per v5e chip (issue 24). With `--reference` (or
$MD4_REFERENCE) and flax installed the script compiles the reference's step too and prints both
(with `--batch`, at the same batch: like for like).
"""

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
from importlib import metadata

import jax
import jax.numpy as jnp

from md4_eqx import plan, targets
from md4_eqx.config import Impl, Precision, Remat, preset
from md4_eqx.parallel import make_mesh
from md4_eqx.step_time import StepTime, head_chunks_taken, tpu_step_time

REFERENCE_PER_V5E_CHIP = 40  # DeepMind's MD4-S, float32, compiled for one v5e chip (issue 24)
SEQ = 1024  # MD4-S's sequence, ours and the reference's


@dataclasses.dataclass
class Outcome:
    batch: int
    fits: bool
    seconds: float  # tracing, lowering and compiling
    traced: float  # tracing and lowering alone
    cpu: float  # CPU seconds of this process over all threads (less sensitive to a loaded machine)
    temp: int | None = None  # bytes of HLO temporaries, where it compiled
    peak: int | None = None  # arguments + outputs - aliased + temp
    flops: float | None = None
    estimate: StepTime | None = None  # the compiler's estimate of the step (md4_eqx.step_time)
    why: str = ""

    def line(self, chips: int, seq_len: int) -> str:
        if self.fits:
            tokens = self.batch * seq_len / self.estimate.seconds / chips
            return (
                f"batch {self.batch:4d}: compiles in {self.seconds:6.1f} s ({self.traced:.0f} s "
                f"tracing, {self.cpu:.0f} CPU s), temp {self.temp / 2**30:6.2f} GiB, peak "
                f"{self.peak / 2**30:6.2f} GiB"
                + (f", {self.flops / 1e12:.2f} TFLOP" if self.flops else "")
                + f"; estimated step {self.estimate.describe()}, {tokens:,.0f} tokens/s per chip"
            )
        return (
            f"batch {self.batch:4d}: refused in {self.seconds:6.1f} s ({self.traced:.0f} s "
            f"tracing, {self.cpu:.0f} CPU s; {self.why})"
        )


def compile_step(lower, batch: int, chip: targets.Tpu, taken: float = 1.0) -> Outcome:
    """Compile `lower(batch)` and say whether the compiler took it (`plan.HBM_REFUSALS`); its
    estimate with conditionals taken `taken` of the time (`step_time.tpu_step_time`)."""
    start, cpu = time.perf_counter(), time.process_time()
    lowered = lower(batch)
    traced = time.perf_counter() - start  # tracing and lowering, before the compiler runs
    try:
        with plan.compiler_log():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if not any(refusal in text for refusal in plan.HBM_REFUSALS):
            raise
        why = next(
            (ln.strip() for ln in text.splitlines() if "memory" in ln.lower()), text.splitlines()[0]
        )
        elapsed = time.perf_counter() - start
        return Outcome(batch, False, elapsed, traced, time.process_time() - cpu, why=why[:160])
    seconds = time.perf_counter() - start
    m = compiled.memory_analysis()
    peak = (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
    return Outcome(
        batch,
        True,
        seconds,
        traced,
        time.process_time() - cpu,
        int(m.temp_size_in_bytes),
        int(peak),
        (compiled.cost_analysis() or {}).get("flops"),
        tpu_step_time(compiled.as_text(), chip, taken),
    )


def search(fits, lo: int, hi: int, step: int) -> int:
    """The largest multiple of `step` up to `hi` whose step compiles (`fits(batch)`; 0 if none),
    by `plan._largest` from `lo`: galloping up while sizes compile, then bisecting."""
    return plan._largest(lambda n: fits(n * step), max(lo // step, 1), top=hi // step) * step


def ours(args, mesh):
    config = preset("md4-s")
    execution = dataclasses.replace(
        config.execution,
        precision=Precision(args.precision),
        attention=Impl(args.attention),
        remat=Remat(args.remat),
        unroll_layers=not args.rolled,
        head_chunk=args.head_chunk,
    )
    model = dataclasses.replace(config.model, num_layers=args.layers or config.model.num_layers)
    config = dataclasses.replace(config, model=model, execution=execution)
    return (
        lambda batch: plan.lowered_step(config, mesh, batch=batch, microbatches=1),
        lambda batch: head_chunks_taken(config, batch // mesh.size * SEQ),
    )


def reference(path: str, mesh):
    """DeepMind's MD4-S training step (openwebtext config, float32) lowered for `mesh`, or None."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from compare_reference import import_reference

    md4 = import_reference(path)
    if md4 is None:
        return None
    import optax

    model = md4.MD4(
        data_shape=(SEQ,),
        cont_time=True,
        feature_dim=64,
        num_heads=12,
        n_layers=12,
        vocab_size=50257,
        noise_schedule_type="linear",
        mlp_type="glu",
        depth_scaled_init=True,
        cond_type="adaln_zero",
        classes=-1,
    )
    optimizer = optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 3e-4, 2000, 1_000_000), b1=0.9, b2=0.999
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

    def init(tokens):
        params = model.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, tokens)[
            "params"
        ]
        return params, params, optimizer.init(params), jax.random.key(2)

    def step(state, tokens):
        params, ema, opt_state, key = state
        key, sample_key = jax.random.split(key)

        def loss_fn(p):
            return model.apply({"params": p}, tokens, train=True, rngs={"sample": sample_key})[
                "loss"
            ]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: e + 1e-4 * (p - e), ema, params)
        return (params, ema, opt_state, key), loss

    def lower(batch: int):
        tokens = jax.ShapeDtypeStruct((batch, SEQ), jnp.int32, sharding=rows)
        state = jax.eval_shape(init, jax.ShapeDtypeStruct((1, SEQ), jnp.int32))
        state = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
        )
        return jax.jit(step, donate_argnums=0).trace(state, tokens).lower()

    return lower


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", default="v5e:1x1", help="TPU topology, e.g. v5e:1x1, v6e:1x1")
    parser.add_argument("--precision", default="bfloat16", choices=[p.value for p in Precision])
    parser.add_argument("--attention", default="pallas", choices=["pallas", "xla"])
    parser.add_argument("--remat", default="none", choices=[r.value for r in Remat])
    parser.add_argument(
        "--rolled", action="store_true", help="keep the layer loop rolled (unroll_layers=False)"
    )
    parser.add_argument("--head-chunk", type=int, default=0)
    parser.add_argument(
        "--layers", type=int, default=0, help="override MD4-S's 12 layers (a cheaper proxy)"
    )
    parser.add_argument(
        "--batch", type=int, help="compile this global batch only and print its memory analysis"
    )
    parser.add_argument("--lo", type=int, default=8, help="search: the batch tried first")
    parser.add_argument("--hi", type=int, default=64, help="search: the largest batch tried")
    parser.add_argument("--step", type=int, default=1, help="search: batch granularity")
    parser.add_argument(
        "--reference",
        default=os.environ.get("MD4_REFERENCE"),
        help="checkout of google-deepmind/md4, compiled alike (default: $MD4_REFERENCE)",
    )
    args = parser.parse_args(argv)
    if importlib.util.find_spec("libtpu") is None:
        print('skipped: the TPU compiler is not installed (pip install -e ".[tpu]")')
        return
    target = targets.parse(args.target)
    mesh = make_mesh(target.chips, 1, target.devices())

    def log(line: str) -> None:
        print(line, flush=True)

    layers = f" ({args.layers} layers)" if args.layers else ""
    label = (
        f"md4-eqx md4-s{layers} {args.precision} attention={args.attention} remat={args.remat} "
        f"{'rolled' if args.rolled else 'unrolled'} head_chunk={args.head_chunk}"
    )
    log(
        f"{label}, {args.target} ({mesh.size} chip(s)), JAX {jax.__version__}, "
        f"libtpu {metadata.version('libtpu')}"
    )

    def compiler(lower, name: str, taken=lambda batch: 1.0):  # fits(batch), logging each compile
        def fits(batch: int) -> bool:
            outcome = compile_step(lower, batch, target.chip, taken(batch))
            log(f"{name}{outcome.line(mesh.size, SEQ)}")
            return outcome.fits

        return fits

    ref = None
    if not args.reference or not os.path.isdir(os.path.join(args.reference, "md4")):
        log("reference not compiled here: no checkout (pass --reference or set MD4_REFERENCE)")
    elif (ref := reference(args.reference, mesh)) is None:
        log("reference not compiled here: it needs flax and optax")
    lower, taken = ours(args, mesh)
    ours_fit = compiler(lower, "", taken)
    ref_fit = None if ref is None else compiler(ref, "reference ")
    if args.batch:  # like for like: one batch, ours and the reference's
        ours_fit(args.batch)
        if ref_fit is not None:
            ref_fit(args.batch)
        return
    best = search(ours_fit, args.lo, args.hi, args.step)
    per_chip = best // mesh.size
    log(
        f"largest batch that compiles: {best} ({per_chip} per chip); reference (DeepMind md4, "
        f"float32): {REFERENCE_PER_V5E_CHIP} per v5e chip (issue 24)"
    )
    if ref_fit is not None:
        ref_best = search(ref_fit, (REFERENCE_PER_V5E_CHIP - 8) * mesh.size, 10**6, 1)
        log(f"| {args.target} per chip | md4-eqx {per_chip} | reference {ref_best // mesh.size} |")


if __name__ == "__main__":
    main()
