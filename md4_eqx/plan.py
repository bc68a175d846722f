"""A memory plan: the largest batch the devices hold, and the fastest way to run a given one,
found by compiling the step, not by crashing.

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
batch that compiles lies far above where the line through small batches crosses the memory. It
refuses a step too big in seconds and takes minutes to accept one, so there the search starts
high and walks down along the figures its refusals name (`Planner.search`), not up from the
line. On GPU the memory analysis decides, as here (with XLA's attention: `_plannable`).

Where the TPU compiler estimates a step's time (md4_eqx.step_time: its cost model; a GPU gets a
roofline, printed but not weighed), the plan for a given global batch is the fastest step that
fits, not the largest:
`Planner.fastest` weighs what each block recomputes (`Remat`), the head chunk and the number of
microbatches. More recomputation and smaller chunks cost time, so a step is compiled only where
it needs fewer microbatches than one that recomputes no more with a chunk no smaller; every
compilation is made once (`step_memory`).
"""

import bisect
import contextlib
import dataclasses
import functools
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx import targets
from md4_eqx.config import AUTO, Backbone, Config, ExecutionConfig, Impl, Remat
from md4_eqx.errors import PlanError
from md4_eqx.kernels.attention import platform_of
from md4_eqx.kernels.attention import resolve as resolve_attention
from md4_eqx.model import HEAD_CHUNK
from md4_eqx.parallel import DATA, shardings
from md4_eqx.step_time import (
    StepTime,
    flops_per_token,
    head_chunks_taken,
    mfu,
    roofline,
    tpu_step_time,
)
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
    """Bytes per device of the parameters, their EMA and the optimizer state (`abstract_state`'s
    arrays)."""

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
    """One compiled training step: its per-device bytes (XLA's memory analysis), flops and
    estimated time, and its compile time."""

    arguments: int  # state and batch
    outputs: int  # new state and metrics
    aliased: int  # outputs written into donated arguments (the state)
    temp: int  # activations, gradients, optimizer temporaries
    flops: float | None  # per device, XLA's count, loop bodies once (None: GPU targets give none)
    seconds: float  # compile time
    # The TPU compiler's first line when the step does not fit in HBM (bytes then 0).
    refused: str | None = None
    # md4_eqx.step_time's estimate of one step (None: devices without a chip record, e.g. CPUs).
    estimate: StepTime | None = None
    rematerialised: bool = False  # the compiler recomputed values to fit the memory
    # A refused step's need over the chip's memory, from the refusal's text (`_over`).
    over: float | None = None

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
# The sizes a refusal names: "the total memory required for HLO temporaries (50.34G) exceeds
# available HBM (15.75G)" (the first check: temporaries alone), "Used 16.26G of 15.75G hbm" (the
# second: everything).
_SIZE = r"([0-9.]+)([KMGT]?)"
_TEMPORARIES = re.compile(rf"temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)")
_USED = re.compile(rf"Used {_SIZE} of {_SIZE} hbm")


def _over(refusal: str) -> float | None:
    """How many times the chip's memory a refused step needs, as the refusal says it (its first
    check counts temporaries alone: the compiler may still fit a step there, rematerialising);
    None where the text names no sizes."""

    def size(number: str, unit: str) -> float:
        return float(number) * 1024 ** " KMGT".index(unit or " ")

    match = _USED.search(refusal) or _TEMPORARIES.search(refusal)
    return None if match is None else size(*match.groups()[:2]) / size(*match.groups()[2:])


# An instruction XLA's rematerialisation pass cloned to recompute it (`fusion.3.remat`).
_REMATERIALISED = re.compile(r"^\s+(?:ROOT )?%?[\w.-]+\.remat\d* = ", re.MULTILINE)


@functools.cache  # a Planner and its callers (tests, benchmarks) ask for the same compilations
def step_memory(config: Config, mesh: Mesh, *, batch: int, microbatches: int) -> StepMemory:
    """`lowered_step` compiled (not run), its memory analysis and its estimated time. On CPU
    XLA's figures are its CPU compilation's, a proxy for an accelerator's (which fuses and
    schedules differently); for a target's abstract devices, its compiler's own. The compiler's
    own log stays off stderr (`compiler_log`): where it says it rematerialised, the step says so."""
    lowered = lowered_step(config, mesh, batch=batch, microbatches=microbatches)
    started = time.perf_counter()
    with compiler_log() as log:
        try:
            compiled = lowered.compile()
        except jax.errors.JaxRuntimeError as e:
            if not any(refusal in str(e) for refusal in HBM_REFUSALS):
                raise
            seconds, first = time.perf_counter() - started, str(e).strip().splitlines()[0]
            return StepMemory(0, 0, 0, 0, None, seconds, refused=first, over=_over(str(e)))
    seconds = time.perf_counter() - started
    m = compiled.memory_analysis()
    flops = (compiled.cost_analysis() or {}).get("flops")
    text = compiled.as_text()
    return StepMemory(
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
        int(m.temp_size_in_bytes),
        flops,
        seconds,
        estimate=_estimate(lowered, text, mesh, config, batch // microbatches // mesh.shape[DATA]),
        rematerialised=bool(_REMATERIALISED.search(text))
        or any("rematerializ" in line.lower() for line in log),
    )


def _estimate(
    lowered: jax.stages.Lowered, text: str, mesh: Mesh, config: Config, microbatch: int
) -> StepTime | None:
    """The step's time on `mesh`'s chips: the TPU compiler's cost model (the masked-only head's
    chunks as many as a `microbatch` of examples per device computes on average), a GPU's
    roofline of the program's flops and bytes per device (None for devices without a chip
    record)."""
    chip = targets.chip_of(platform_of(mesh).device_kind)
    if isinstance(chip, targets.Tpu):
        taken = head_chunks_taken(config, microbatch * config.model.seq_len)
        return tpu_step_time(text, chip, taken)
    if chip is None:
        return None
    cost = lowered.cost_analysis() or {}
    return roofline(
        cost.get("flops", 0.0) / mesh.size, cost.get("bytes accessed", 0.0) / mesh.size, chip
    )


@contextlib.contextmanager
def compiler_log() -> Iterator[list[str]]:
    """Keeps the compiler's C++ log (XLA's warnings, such as hlo_rematerialization.cc's when a
    program will not fit) off stderr while the block runs and hands its lines back: the plan's
    report is what a user reads. The C++ logger writes to file descriptor 2 itself, so that is
    what is redirected, to a temporary file, and restored after."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            lines += log.read().decode(errors="replace").splitlines()


@dataclasses.dataclass(frozen=True)
class Plan:
    """A step for a global batch: how it runs (`run`: what it recomputes, its head chunk), in how
    many microbatches, and the compiled step."""

    run: ExecutionConfig
    microbatches: int
    step: StepMemory

    def describe(self) -> str:
        run = self.run
        chunk = run.head_chunk or HEAD_CHUNK
        return f"remat {run.remat.value}, head chunk {chunk}, {self.microbatches} microbatch(es)"


# The head chunks the speed plan weighs besides the config's own (`ExecutionConfig.head_chunk`):
# the default (md4_eqx.model.HEAD_CHUNK) and a quarter of it, less memory for more time.
HEAD_CHUNKS = (0, 512)
# Where the TPU compiler's search for the largest microbatch per device starts (`search`), in
# tokens per device: a refusal far above the answer costs seconds, like one near it.
TOP_TOKENS = 2**20


class Planner:
    """Compiles the step for one config, mesh and memory budget (`step_memory` remembers every
    compilation). `by_compiler`: a batch fits when the compiler accepts it (default: on TPU), else
    when its peak is within `memory` less the margin (also for a memory limit given for a TPU).
    Each method takes the `run` (ExecutionConfig) to compile; `self.run` is the config's."""

    def __init__(
        self,
        config: Config,
        mesh: Mesh,
        memory: int,
        *,
        by_compiler: bool | None = None,
        echo: Callable[[str], None] | None = None,
    ):
        self.platform = platform_of(mesh)
        self.config, self.note = _plannable(config, self.platform)
        self.mesh, self.memory, self.data = mesh, memory, mesh.shape[DATA]
        self.by_compiler = self.platform.name == "tpu" if by_compiler is None else by_compiler
        self.budget = int(memory * (1.0 - MARGIN))
        self.run = self.config.execution
        self.chip = targets.chip_of(self.platform.device_kind)  # None: no time estimate
        self.echo = echo  # where each new compilation is told, as it ends
        self.top = max(TOP_TOKENS // self.config.model.seq_len, 1)  # `largest`'s first try

    def step(self, run: ExecutionConfig, microbatch: int, microbatches: int = 1) -> StepMemory:
        """The step compiled with `microbatches` chunks of `microbatch` examples per device."""
        compiled = step_memory.cache_info().misses
        step = step_memory(
            dataclasses.replace(self.config, execution=run),
            self.mesh,
            batch=microbatch * microbatches * self.data,
            microbatches=microbatches,
        )
        if self.echo and step_memory.cache_info().misses > compiled:
            over = "" if step.over is None else f", {step.over:.2f}x the HBM"
            verdict = f"refused{over}" if step.refused else f"peak {show_size(step.peak)}"
            self.echo(
                f"  compiled {Plan(run, microbatches, step).describe()} of {microbatch} per "
                f"device: {verdict}, {step.seconds:.0f} s"
            )
        return step

    def fits(self, run: ExecutionConfig, microbatch: int, microbatches: int = 1) -> bool:
        """The compiler accepts the step and, unless it alone judges, its peak is in the budget."""
        step = self.step(run, microbatch, microbatches)
        return step.refused is None and (self.by_compiler or step.peak <= self.budget)

    def line(self, run: ExecutionConfig, at: tuple[int, int] = (1, 2)) -> tuple[int, int]:
        """(fixed, per_example): the peak's line through `at` examples per device."""
        small, large = at
        low = self.step(run, small).peak
        per_example = max((self.step(run, large).peak - low) // (large - small), 1)
        return low - small * per_example, per_example

    def guess(self, run: ExecutionConfig) -> int:
        """The largest per-device microbatch that fits by the line through 1 and 2 examples (the
        cheapest compiles; at scale its slope runs 15-20% low), at least 1. A slope under a KiB
        per example says nothing (tiny models, where XLA's buffer reuse varies by more than one
        example's activations): then 2, and the search gallops up from there."""
        fixed, per_example = self.line(run)
        if per_example < 2**10:
            return 2
        return max(1, (self.budget - fixed) // per_example)

    def search(self, step_at: Callable[[int], StepMemory], sizes: Sequence[int]) -> int:
        """The largest of `sizes` (per-device microbatches, ascending) whose step the TPU compiler
        accepts (0: none). It refuses a step too big in seconds where it takes minutes to accept
        one (MD4-S), so the search starts at the largest size, and as memory is near-linear in
        the microbatch, each try goes where a line meets the chip's memory: the line through the
        closest tries that fit and that do not, or before any fits, through the last two
        refusals (zero examples, zero memory after the first). A refusal says how far over the
        memory its step is (`StepMemory.over`), the memory analysis how far under. The first
        refusals count temporaries alone, so the line through them meets the memory at the
        largest size the compiler's first check passes: the answer or just above it. A try that
        leaves more than half of the interval above a size that fits is followed by its
        midpoint."""
        below, refused = (-1, 0, 0.0), []  # (index, size, memory / HBM): the closest that fits
        i, width = len(sizes) - 1, math.inf
        while i >= 0:
            step = step_at(sizes[i])
            if step.refused:
                refused.append((i, sizes[i], step.over))
            else:
                below = (i, sizes[i], min(step.peak / self.memory, 1.0))
            if not refused or refused[-1][0] - below[0] <= 1:
                return below[1]
            above = refused[-1]
            # Halving only above a size that fits: below the refusals' line lie accepted steps.
            halve = below[0] >= 0 and above[0] - below[0] > width / 2
            width = above[0] - below[0]
            (_, m0, l0), (_, m1, l1) = (
                refused[-2:] if below[0] < 0 < len(refused) - 1 else (below, above)
            )
            if halve or None in (l0, l1) or (l1 - l0) * (m1 - m0) <= 0:  # no rising line
                i = (below[0] + above[0]) // 2
            else:
                i = bisect.bisect_right(sizes, m0 + (1.0 - l0) * (m1 - m0) / (l1 - l0)) - 1
                i = min(max(i, below[0] + 1), above[0] - 1)
        return 0  # no sizes

    def largest(self, run: ExecutionConfig) -> int:
        """The largest per-device microbatch that fits, confirmed by compiling (0: none): where
        the compiler judges, searched up to `TOP_TOKENS` tokens per device (`search`), else by
        galloping from the line's guess."""
        if self.by_compiler:
            return self.search(lambda m: self.step(run, m), range(1, self.top + 1))
        return _largest(lambda m: self.fits(run, m), self.guess(run))

    def fit(self, run: ExecutionConfig) -> tuple[tuple[int, int] | None, int]:
        """(line, largest): the largest per-device microbatch that fits (0: none) and the peak's
        line (fixed, per_example) through it and half of it, where the slope matters
        (`head_chunk`'s chunk hides it at 1 and 2 examples). None where the compiler judges: it
        rematerialises under pressure, so no line holds up to its answer."""
        largest = self.largest(run)
        if self.by_compiler:
            return None, largest
        return self.line(run, (max(largest // 2, 1), max(largest, 2))), largest

    def fewest_microbatches(
        self,
        run: ExecutionConfig,
        batch: int,
        fewer_than: int | None = None,
        near: int | None = None,
    ) -> int | None:
        """The fewest gradient-accumulation chunks of the global `batch` whose step fits (`batch`
        splits evenly over `data`: md4_eqx.validate checks it before any plan), looking only
        below `fewer_than` chunks, which are taken to fit; None where none fits there. Where the
        compiler judges, the search starts at one chunk (`search`); else at `near`
        chunks where given (a similar step's answer), or where the line through 1 and 2
        examples per device says (`guess`)."""
        per_device = batch // self.data
        counts = [k for k in range(per_device, 0, -1) if per_device % k == 0]  # chunks descending
        known = 0 if fewer_than is None else counts.index(fewer_than) + 1
        sizes = [per_device // k for k in counts]  # per-device microbatches, ascending
        if self.by_compiler:
            size = self.search(lambda m: self.step(run, m, per_device // m), sizes[known:])
            return per_device // size if size else None
        if known:
            guess = known + 1
        elif near is not None:
            guess = counts.index(near) + 1
        else:
            guess = sum(1 for m in sizes if m <= self.guess(run))
        best = _largest(
            lambda i: i <= known or self.fits(run, sizes[i - 1], counts[i - 1]),
            max(guess, 1),
            top=len(counts),
        )
        return counts[best - 1] if best > known else None

    def microbatches(self, batch: int) -> int:
        """The fewest gradient-accumulation chunks of the global `batch` whose step fits."""
        count = self.fewest_microbatches(self.run, batch)
        if count is None:
            self._no_fit(f"batch {batch} (data={self.data})", batch // self.data)
        return count

    def fastest(self, batch: int) -> list[Plan]:
        """The steps weighed for the global `batch`, fastest first by the TPU compiler's estimate
        (none on other devices): each recomputation policy (`Remat`) with each head chunk at the
        fewest microbatches that fit. A step that recomputes as much or more with a chunk as
        small or smaller than one already found (more recomputation, and more chunks each adding
        the head's [d, V] weight gradient, cost time) is compiled only where it needs fewer
        microbatches than that one."""
        if not isinstance(self.chip, targets.Tpu):  # a GPU's roofline cannot tell them apart
            return []
        sizes = {c or HEAD_CHUNK: c for c in (*HEAD_CHUNKS, self.run.head_chunk)}  # config's wins
        chunks = [sizes[size] for size in sorted(sizes, reverse=True)]  # the largest first
        if self.config.model.backbone is Backbone.UNET:  # its head is a convolution
            chunks = [self.run.head_chunk]
        order = list(Remat)
        plans, fewest, near = [], {}, None  # near: the first answer, where the next start
        for remat, chunk in ((r, c) for r in order for c in chunks):
            faster = [
                count
                for (r, c), count in fewest.items()
                if order.index(r) <= order.index(remat)
                and (c or HEAD_CHUNK) >= (chunk or HEAD_CHUNK)
            ]
            run = dataclasses.replace(self.run, remat=remat, head_chunk=chunk)
            count = self.fewest_microbatches(
                run, batch, fewer_than=min(faster, default=None), near=near
            )
            near = near or count
            if count is not None:
                fewest[remat, chunk] = count
                plans.append(Plan(run, count, self.step(run, batch // self.data // count, count)))
        return sorted(plans, key=lambda plan: plan.step.estimate.seconds)

    def batch_size(self) -> int:
        """The largest global batch whose step fits without gradient accumulation."""
        largest = self.largest(self.run)
        if largest == 0:
            self._no_fit("one example per device")
        return largest * self.data

    def _no_fit(self, what: str, microbatches: int = 1) -> NoReturn:
        """The PlanError for `what`, with the step of one example per device in `microbatches`."""
        step = self.step(self.run, 1, microbatches)
        if step.refused:
            raise PlanError(f"{what} does not fit: the TPU compiler says {step.refused}")
        full = dataclasses.replace(self.run, remat=Remat.FULL)
        extra = (
            ""
            if self.run.remat is Remat.FULL
            else f" ({show_size(self.step(full, 1).peak)} with --remat full)"
        )
        raise PlanError(
            f"{what} does not fit: one example per device needs {show_size(step.peak)}{extra}, "
            f"the budget is {show_size(self.budget)} ({show_size(self.memory)} less {MARGIN:.0%})"
        )

    def report(self) -> str:
        """What `train.py --plan` prints: state bytes, the largest microbatch per device for the
        config's execution (one line), then, where the compiler estimates a step's time, the
        fastest way to run the config's global batch (the largest's, for an `auto` batch)."""
        state = state_bytes(abstract_state(self.config, self.mesh)[0])
        m, run = self.config.model, self.run
        chunk = f", the head {run.head_chunk or HEAD_CHUNK} masked tokens at a time"
        judge = (
            "a batch fits when the TPU compiler accepts it"
            if self.by_compiler
            else "XLA's compiled memory analysis"
        )
        lines = [
            f"memory plan per device, mesh {dict(self.mesh.shape)} of "
            f"{self.platform.device_kind}, seq {m.seq_len}, {run.precision.value} compute{chunk}, "
            f"attention {run.attention.value} ({judge}):"
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
        line, largest = self.fit(run)
        if largest == 0:
            self._no_fit("one example per device")
        step = self.step(run, largest)
        flops = (
            "flops not counted by the compiler"
            if step.flops is None
            else f"{step.flops / 1e12:.3g} TFLOP"
        )
        if line is None and largest == self.top:
            line_text = f"the most the search tries ({TOP_TOKENS:,} tokens)"
        elif line is None:  # the compiler judged: what it said to the next size
            over = self.step(run, largest + 1).over
            line_text = f"{largest + 1} refused" + (
                "" if over is None else f", {over:.2f}x the HBM"
            )
        else:
            line_text = f"line {show_size(line[0])} + {line[1] / 2**20:.1f} MiB per example"
        speed = (
            ""
            if step.estimate is None
            else f", {largest * m.seq_len / step.estimate.seconds:,.0f} tokens/s per chip by "
            f"{step.estimate.basis.value} (an estimate)"
        )
        lines.append(
            f"  remat {run.remat.value}: largest microbatch {largest} per device "
            f"(global {largest * self.data} without accumulation): peak {show_size(step.peak)}, "
            f"{flops} per step{speed}, compiled in {step.seconds:.1f} s; {line_text}"
            + ("; the compiler rematerialised to fit it" if step.rematerialised else "")
        )
        batch = self.config.train.batch_size or largest * self.data
        if self.chip is None:
            lines.append(f"  no step-time estimate for {self.platform.device_kind} devices")
        elif plans := self.fastest(batch):
            lines += self._speed_lines(batch, plans)
        else:  # a GPU: the largest batch's roofline
            lines += self._speed_lines(largest * self.data, [Plan(run, 1, step)])
        return "\n".join(lines)

    def _speed_lines(self, batch: int, plans: list[Plan]) -> list[str]:
        """The fastest plan for the global `batch` with its estimated time, tokens/s per chip and
        MFU, then the others weighed, one line each."""
        best = plans[0]
        seconds = best.step.estimate.seconds
        tokens = batch * self.config.model.seq_len
        model_flops = flops_per_token(self.config) * tokens / self.mesh.size
        remat = "; the compiler rematerialised to fit it" if best.step.rematerialised else ""
        lines = [
            f"  {'fastest' if len(plans) > 1 else 'plan'} for the global batch {batch}: "
            f"{best.describe()} "
            f"(--remat {best.run.remat.value} --head-chunk {best.run.head_chunk} "
            f"--microbatches {best.microbatches}): estimated step {best.step.estimate.describe()}, "
            f"{tokens / seconds / self.mesh.size:,.0f} tokens/s per chip, MFU "
            f"{mfu(model_flops, best.step.estimate, self.chip):.0%} (the compiler's estimate, "
            f"not a measurement; collectives not counted){remat}"
        ]
        lines += [
            f"    also weighed: {plan.describe()}: {plan.step.estimate.seconds * 1e3:.1f} ms"
            for plan in plans[1:]
        ]
        return lines


def _plannable(config: Config, platform) -> tuple[Config, str]:
    """`config` as the plan compiles it for `platform`, and a note where that differs: on a GPU
    cuDNN builds its graph on the device and Mosaic GPU compiles inside its custom call at run
    time, so XLA's attention runs in their place (its [T, T] scores make the plan conservative)."""
    run = config.execution
    kernel = resolve_attention(run.attention, run.precision.dtype, config.model.head_dim, platform)
    if platform.name != "gpu" or kernel.impl is Impl.XLA:
        return config, ""
    note = (
        f"attention {run.attention.value} would run {kernel.impl.value} here, which is compiled "
        f"only on the GPU itself: this plan uses XLA's attention instead (more memory: the "
        f"[T, T] scores)"
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
    what the device reports; `by_compiler` as `Planner` takes it). An `auto` batch size is the
    largest without accumulation; `auto` microbatches for a given batch come with the
    recomputation policy and head chunk of the fastest plan (`Planner.fastest`) where the
    compiler estimates step times, else the fewest that fit the config's own."""
    train, execution = config.train, config.execution
    if AUTO not in (train.batch_size, train.microbatches):
        return config
    if saved is not None:
        train = dataclasses.replace(
            train,
            batch_size=train.batch_size or saved.train.batch_size,
            microbatches=train.microbatches or saved.train.microbatches,
        )
        if config.train.microbatches == AUTO:  # planned with the microbatches
            run = saved.execution
            execution = dataclasses.replace(execution, remat=run.remat, head_chunk=run.head_chunk)
    else:
        planner = Planner(config, mesh, memory or device_memory(), by_compiler=by_compiler)
        if train.batch_size == AUTO:  # md4_eqx.validate: with microbatches auto or 1
            train = dataclasses.replace(train, batch_size=planner.batch_size(), microbatches=1)
        elif plans := planner.fastest(train.batch_size):
            best = plans[0]
            train = dataclasses.replace(train, microbatches=best.microbatches)
            execution = dataclasses.replace(
                execution, remat=best.run.remat, head_chunk=best.run.head_chunk
            )
        else:
            train = dataclasses.replace(train, microbatches=planner.microbatches(train.batch_size))
    return dataclasses.replace(config, train=train, execution=execution)
