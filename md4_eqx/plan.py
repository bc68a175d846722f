"""A memory plan: the largest batch the devices hold, found by compiling the step, not by crashing.

XLA reports, for a compiled program, the bytes of its arguments, its outputs (less those aliased
to donated arguments) and its temporaries (`compiled.memory_analysis()`, on CPU, GPU and TPU).
The training step is compiled abstractly (`jax.ShapeDtypeStruct` inputs, no parameters
allocated); its per-device peak is

    peak(m) = arguments + outputs - aliased + temp(m),    temp(m) ~ fixed + per_example * m

for a per-device microbatch of m examples. Two compilations (m = 1, 2) fit the line; the answer
is then confirmed by compiling the chosen size and the next larger one, so what the planner picks
is what XLA says fits. A batch fits when its peak is at most the budget: the device's memory
less a `MARGIN` for what the analysis does not see (allocator fragmentation, runtime workspaces,
collectives' buffers).

For a target (md4_eqx.targets: a TPU slice or GPUs this host does not have) the mesh is over its
abstract devices and the compiler is that hardware's own. On TPU a batch fits when the compiler
accepts it (`HBM_REFUSALS`): under memory pressure it rematerialises by itself, so the largest
batch that compiles lies far above where the line through small batches crosses the memory. On
GPU the memory analysis decides, as here (with XLA's attention: `_plannable`).
"""

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable
from typing import NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx.config import AUTO, Config, Impl, Remat
from md4_eqx.errors import PlanError
from md4_eqx.kernels.attention import platform_of
from md4_eqx.kernels.attention import resolve as resolve_attention
from md4_eqx.parallel import DATA, shardings
from md4_eqx.train_step import TrainState, init_state, make_optimizer, make_train_step, state_specs

MARGIN = 0.10  # a tenth of the device's memory is kept free of the planned peak

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Bytes of a size such as `80GiB`, `40GB`, `16 GiB` or `1e9` (GB = 10^9, GiB = 2^30)."""
    match = re.fullmatch(
        r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmgt]i?b|b)?\s*", text, re.IGNORECASE
    )
    if match is None or float(match[1]) <= 0:
        raise PlanError(
            f"--memory-limit {text!r}: expected a positive size such as 80GiB, 40GB or 512MiB"
        )
    return int(float(match[1]) * _UNITS[(match[2] or "").lower()])


def show_size(n: int) -> str:
    """Bytes as GiB, or MiB below one GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def device_memory() -> int:
    """The bytes the first local device lets XLA allocate."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise PlanError(
            f"{device.platform} device reports no memory size: give --memory-limit, e.g. 80GiB"
        )
    return int(stats["bytes_limit"])


def abstract_state(config: Config, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """The training state as `eqx.partition` splits it: its arrays, as `jax.ShapeDtypeStruct`s
    carrying their shardings on `mesh`, and its static rest."""
    optimizer = make_optimizer(config.optim, config.train.steps)
    abstract = eqx.filter_eval_shape(init_state, config, optimizer, mesh)
    arrays, static = eqx.partition(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    specs = shardings(mesh, state_specs(abstract, optimizer))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arrays, specs
    ), static


def state_bytes(arrays: TrainState) -> dict[str, int]:
    """Bytes per device of the parameters, their EMA and the optimizer state (`abstract_state`'s arrays)."""

    def size(tree) -> int:
        return sum(
            math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
            for a in jax.tree.leaves(tree)
        )

    return {
        "parameters": size(arrays.model),
        "EMA": size(arrays.ema),
        "optimizer state": size(arrays.opt_state),
    }


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled training step (XLA's memory analysis), its flops and its compile time."""

    arguments: int  # state and batch
    outputs: int  # new state and metrics
    aliased: int  # outputs written into donated arguments (the state)
    temp: int  # activations, gradients, optimizer temporaries
    flops: float | None  # per device, XLA's count (None where the compiler gives none: GPU targets)
    seconds: float  # compile time
    refused: str | None = (
        None  # the TPU compiler's first line when the step does not fit in HBM (bytes then 0)
    )

    @property
    def peak(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temp


def lowered_step(
    config: Config, mesh: Mesh, *, batch: int, microbatches: int, platform: str | None = None
) -> jax.stages.Lowered:
    """The training step for a global `batch` split into `microbatches`, traced on abstract
    inputs (no parameter is ever made) and lowered for the devices of `mesh`, real or abstract
    (md4_eqx.targets), or for `platform` ("cuda"): its kernels then go through their
    compilers' lowering only, which is all a host without that compiler can check."""
    arrays, static = abstract_state(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.steps)
    step = make_train_step(
        arrays,
        optimizer,
        mesh,
        microbatches=microbatches,
        clip=config.optim.clip,
        ema=config.optim.ema,
    )
    rows = NamedSharding(mesh, P(DATA))
    tokens = jax.ShapeDtypeStruct((batch, config.model.seq_len), jnp.int32, sharding=rows)
    labels = (
        jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
        if config.model.num_classes
        else None
    )

    def run(arrays, tokens, labels):
        return step(eqx.combine(arrays, static), tokens, labels)

    platforms = None if platform is None else (platform,)
    return (
        jax.jit(run, donate_argnums=0)
        .trace(arrays, tokens, labels)
        .lower(lowering_platforms=platforms)
    )


# How the TPU compiler refuses a program too big for HBM: its first check (within seconds), and
# the second one after scheduling, so only a finished compile says "fits". Anything else (a
# kernel over VMEM, a bug) is not a batch size's answer.
HBM_REFUSALS = (
    "Ran out of memory in memory space hbm",
    "Ran out of memory on HBM",
    "CompileTimeHbmOom",
)


@functools.cache  # a Planner and its callers (tests, benchmarks) ask for the same compilations
def step_memory(config: Config, mesh: Mesh, *, batch: int, microbatches: int) -> StepMemory:
    """`lowered_step` compiled (not run), and its memory analysis. On CPU XLA's figures are its
    CPU compilation's, a proxy for an accelerator's (which fuses and schedules differently); for
    a target's abstract devices, its compiler's own."""
    lowered = lowered_step(config, mesh, batch=batch, microbatches=microbatches)
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if not any(refusal in str(e) for refusal in HBM_REFUSALS):
            raise
        return StepMemory(
            0, 0, 0, 0, None, time.perf_counter() - started, refused=str(e).strip().splitlines()[0]
        )
    seconds = time.perf_counter() - started
    m = compiled.memory_analysis()
    flops = (compiled.cost_analysis() or {}).get("flops")
    return StepMemory(
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
        flops,
        seconds,
    )


class Planner:
    """Compiles the step for one config, mesh and memory budget (`step_memory` remembers every
    compilation). `by_compiler`: a batch fits when the compiler accepts it (default: on TPU), else
    when its peak is within `memory` less the margin (also for a memory limit given for a TPU)."""

    def __init__(self, config: Config, mesh: Mesh, memory: int, *, by_compiler: bool | None = None):
        self.platform = platform_of(mesh)
        self.config, self.note = _plannable(config, self.platform)
        self.mesh, self.memory, self.data = mesh, memory, mesh.shape[DATA]
        self.by_compiler = self.platform.name == "tpu" if by_compiler is None else by_compiler
        self.budget = int(memory * (1.0 - MARGIN))
        self.remat = (
            self.config.execution.remat
        )  # what `microbatches`, `batch_size` and `report` plan for

    def step(self, remat: Remat, microbatch: int, microbatches: int = 1) -> StepMemory:
        """The step compiled with `microbatches` chunks of `microbatch` examples per device."""
        config = dataclasses.replace(
            self.config, execution=dataclasses.replace(self.config.execution, remat=remat)
        )
        return step_memory(
            config,
            self.mesh,
            batch=microbatch * microbatches * self.data,
            microbatches=microbatches,
        )

    def fits(self, remat: Remat, microbatch: int, microbatches: int = 1) -> bool:
        """The compiler accepts the step and, unless it alone judges, its peak is within the budget."""
        step = self.step(remat, microbatch, microbatches)
        return step.refused is None and (self.by_compiler or step.peak <= self.budget)

    def line(self, remat: Remat, at: tuple[int, int] = (1, 2)) -> tuple[int, int]:
        """(fixed, per_example): the peak's line through microbatches of `at` examples per device."""
        small, large = at
        low = self.step(remat, small).peak
        per_example = max((self.step(remat, large).peak - low) // (large - small), 1)
        return low - small * per_example, per_example

    def guess(self, remat: Remat) -> int:
        """The largest per-device microbatch that fits by the line through 1 and 2 examples (the
        cheapest compiles; at scale its slope runs 15-20% low), at least 1. A slope under a KiB
        per example says nothing (tiny models, where XLA's buffer reuse varies by more than one
        example's activations; on a TPU the tiny preset's peak moves by 512 bytes from 1 to 2
        examples): then 2, and the search gallops up from there."""
        fixed, per_example = self.line(remat)
        if per_example < 2**10:
            return 2
        return max(1, (self.budget - fixed) // per_example)

    def largest(self, remat: Remat) -> int:
        """The largest per-device microbatch that fits, confirmed by compiling (0: none)."""
        return _largest(lambda m: self.fits(remat, m), self.guess(remat))

    def fit(self, remat: Remat) -> tuple[int, int, int]:
        """(fixed, per_example, largest): the largest per-device microbatch that fits (0: none)
        and the peak's line through it and half of it, where the slope matters (`head_chunk`'s
        chunk hides it at 1 and 2 examples). Where the compiler judges, the line through 1 and 2:
        it rematerialises under pressure, so no line holds up to its answer."""
        largest = self.largest(remat)
        at = (1, 2) if self.by_compiler else (max(largest // 2, 1), max(largest, 2))
        return *self.line(remat, at), largest

    def microbatches(self, batch: int) -> int:
        """The fewest gradient-accumulation chunks of the global `batch` whose step fits (`batch`
        splits evenly over `data`: md4_eqx.validate checks it before any plan)."""
        per_device = batch // self.data
        counts = [
            k for k in range(per_device, 0, -1) if per_device % k == 0
        ]  # chunk size ascending
        guess = sum(1 for k in counts if per_device // k <= self.guess(self.remat))
        best = _largest(
            lambda i: self.fits(self.remat, per_device // counts[i - 1], counts[i - 1]),
            max(guess, 1),
            top=len(counts),
        )
        if not best:
            self._no_fit(f"batch {batch} (data={self.data})", per_device)
        return counts[best - 1]

    def batch_size(self) -> int:
        """The largest global batch whose step fits without gradient accumulation."""
        largest = self.largest(self.remat)
        if largest == 0:
            self._no_fit("one example per device")
        return largest * self.data

    def _no_fit(self, what: str, microbatches: int = 1) -> NoReturn:
        """The PlanError for `what`, with the step of one example per device in `microbatches`."""
        step = self.step(self.remat, 1, microbatches)
        if step.refused:
            raise PlanError(f"{what} does not fit: the TPU compiler says {step.refused}")
        extra = (
            ""
            if self.remat is Remat.FULL
            else f" ({show_size(self.step(Remat.FULL, 1).peak)} with --remat full)"
        )
        raise PlanError(
            f"{what} does not fit: one example per device needs {show_size(step.peak)}{extra}, "
            f"the budget is {show_size(self.budget)} ({show_size(self.memory)} less {MARGIN:.0%})"
        )

    def report(self) -> str:
        """What `train.py --plan` prints: state bytes, then the largest microbatch per device for
        the config's remat setting, with its step's peak, flops and compile time."""
        state = state_bytes(abstract_state(self.config, self.mesh)[0])
        m, run = self.config.model, self.config.execution
        chunk = f", the head {run.head_chunk} tokens at a time" if run.head_chunk else ""
        judge = (
            "a batch fits when the TPU compiler accepts it"
            if self.by_compiler
            else "XLA's compiled memory analysis"
        )
        lines = [
            f"memory plan per device, mesh {dict(self.mesh.shape)} of {self.platform.device_kind}, seq {m.seq_len}, "
            f"{run.precision.value} compute{chunk}, attention {run.attention.value} ({judge}):"
        ]
        if self.note:
            lines.append(f"  note: {self.note}")
        lines += [f"  {name:<16} {show_size(n)}" for name, n in state.items()]
        budget = (
            ""
            if self.by_compiler
            else f"; budget {show_size(self.budget)} after a {MARGIN:.0%} margin"
        )
        lines.append(f"  device memory    {show_size(self.memory)}{budget}")
        fixed, per_example, largest = self.fit(self.remat)
        if largest == 0:
            self._no_fit("one example per device")
        step = self.step(self.remat, largest)
        flops = (
            "flops not counted by the compiler"
            if step.flops is None
            else f"{step.flops / 1e12:.3g} TFLOP"
        )
        lines.append(
            f"  remat {self.remat.value}: largest microbatch {largest} per device "
            f"(global {largest * self.data} without accumulation): peak {show_size(step.peak)}, "
            f"{flops} per step, compiled in {step.seconds:.1f} s; line {show_size(fixed)} + "
            f"{per_example / 2**20:.1f} MiB per example{' at 1-2 examples' if self.by_compiler else ''} "
            "(--remat none, minimal or full: what each block recomputes)"
        )
        return "\n".join(lines)


def _plannable(config: Config, platform) -> tuple[Config, str]:
    """`config` as the plan compiles it for `platform`, and a note where that differs: on a GPU
    cuDNN builds its graph on the device and Mosaic GPU compiles inside its custom call at run
    time, so XLA's attention runs in their place (its [T, T] scores make the plan conservative)."""
    run = config.execution
    kernel = resolve_attention(run.attention, run.precision.dtype, config.model.head_dim, platform)
    if platform.name != "gpu" or kernel.impl is Impl.XLA:
        return config, ""
    note = (
        f"attention {run.attention.value} would run {kernel.impl.value} here, which is compiled only on the "
        f"GPU itself: this plan uses XLA's attention instead (more memory: the [T, T] scores)"
    )
    return dataclasses.replace(config, execution=dataclasses.replace(run, attention=Impl.XLA)), note


def _largest(fits: Callable[[int], bool], guess: int, top: int | float = math.inf) -> int:
    """The largest n in [1, top] with fits(n), for a `fits` that holds up to some n and not
    beyond: from `guess`, galloping up (guess + 1, + 3, + 7, ...) until a size does not fit,
    then bisecting; a good guess costs two compiles. 0 if none fits."""
    lo, n, stride = 0, min(guess, top), 1  # fits(lo), or lo = 0
    while n <= top and fits(n):
        lo, n, stride = n, n + stride, 2 * stride
    hi = min(n, top + 1)  # not fits(hi), or beyond top
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def resolve(
    config: Config,
    mesh: Mesh,
    memory: int | None,
    saved: Config | None = None,
    *,
    by_compiler: bool | None = None,
) -> Config:
    """`config` with an `AUTO` batch size or microbatch count replaced: by the checkpoint's
    (`saved`, so a resumed run keeps its choice), else by the planner's (for `memory`, default
    what the device reports; `by_compiler` as `Planner` takes it)."""
    train = config.train
    if AUTO not in (train.batch_size, train.microbatches):
        return config
    if saved is not None:
        train = dataclasses.replace(
            train,
            batch_size=train.batch_size or saved.train.batch_size,
            microbatches=train.microbatches or saved.train.microbatches,
        )
    else:
        planner = Planner(config, mesh, memory or device_memory(), by_compiler=by_compiler)
        if train.batch_size == AUTO:
            if train.microbatches not in (AUTO, 1):
                raise PlanError(
                    f"--batch-size auto picks a batch without accumulation: drop --microbatches {train.microbatches}"
                )
            train = dataclasses.replace(train, batch_size=planner.batch_size(), microbatches=1)
        else:
            train = dataclasses.replace(train, microbatches=planner.microbatches(train.batch_size))
    return dataclasses.replace(config, train=train)
