"""How long one compiled step takes on its target, as the target's compiler estimates it.

XLA:TPU writes its cost model's estimate into each instruction it schedules: the
`backend_config` of fusions, copies and reductions in `compiled.as_text()` carries
`"estimated_cycles":"N"`. Only the instructions of sequential computations (the entry, loop
bodies) carry them; a fusion's own computation does not, so each cycle is counted once, at the
instruction that runs it. A while loop's body runs trip-count times: the constant its condition
compares the counter with (or XLA's `known_trip_count` where it says). The sum, at the chip's
clock, is the compiler's estimate of a step. Pallas TPU calls (`tpu_custom_call`) carry no
cycles; their `cost_estimate` (`pl.CostEstimate`: flops, bytes) at the chip's peak flops and
bandwidth is a floor for them. Collectives carry no cycles either: a multi-chip step's estimate
leaves out its communication. A `conditional` runs one branch: each is priced at its costlier
branch a `taken` fraction of its runs and at its cheaper one otherwise (`taken` = 1: an upper
bound). In a training step the only conditionals are the masked-only head's chunks
(`md4_eqx.model.selected_tokens`), and `head_chunks_taken` is the fraction of them that compute
on average.

GPU targets compile without a cost model's estimate: there the step time is a roofline, the
HLO's flops and bytes (`Lowered.cost_analysis()`, which counts a loop's body once) at the card's
peak: a floor.
"""

import dataclasses
import enum
import math
import re

from md4_eqx.config import Backbone, Config, ModelConfig, Schedule
from md4_eqx.model import HEAD_CHUNK
from md4_eqx.targets import Gpu, Tpu


class Basis(enum.Enum):
    """Where a step time comes from."""

    COST_MODEL = "the TPU compiler's cost model"
    ROOFLINE = "a roofline of the HLO's flops and bytes at the card's peak, loops once: a floor"


@dataclasses.dataclass(frozen=True)
class StepTime:
    """One step's estimated seconds: `compiled` (the cost model's cycles, or the roofline) plus
    `kernels` (the Pallas calls at their cost estimate's floor), with the conditionals' costlier
    branches taken a `taken` fraction of the time; `bound`: the seconds with every conditional at
    its costlier branch (the same where `taken` is 1 or there is none)."""

    compiled: float
    kernels: float
    basis: Basis
    taken: float = 1.0
    bound: float = 0.0

    @property
    def seconds(self) -> float:
        return self.compiled + self.kernels

    def describe(self) -> str:
        """The figure with what it rests on, as the plan prints it."""
        if self.basis is Basis.ROOFLINE:
            return f"{self.seconds * 1e3:.1f} ms ({self.basis.value})"
        kernels = (
            f" + {self.kernels * 1e3:.1f} ms for the Pallas kernels at their CostEstimate's floor"
            if self.kernels
            else ""
        )
        compiled = f"{self.compiled * 1e3:.1f} ms"
        chunks = (
            f"; the masked-only head's chunks priced at the {self.taken:.0%} of them that compute "
            f"on average, {self.bound * 1e3:.1f} ms if all did"
            if self.bound > self.seconds
            else ""
        )
        return f"{self.seconds * 1e3:.1f} ms ({self.basis.value}: {compiled}{kernels}{chunks})"


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.-]+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.-]+) = .*?\b([a-z][a-z0-9-]*)\(")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_COST = re.compile(
    r'"cost_estimate":\{"flops":"(\d+)","transcendentals":"\d+","bytes_accessed":"(\d+)"'
)


def tpu_step_time(hlo: str, chip: Tpu, taken: float = 1.0) -> StepTime:
    """The XLA:TPU cost model's estimate of the program `hlo` (`compiled.as_text()`) on `chip`:
    the estimated cycles of the entry computation, each loop body times its trip count (nested
    loops multiply), each conditional at its costlier branch a `taken` fraction of the time and at
    its cheaper one otherwise, at the chip's clock, plus every Pallas call's flops and bytes at the
    chip's peak (the larger of the two: a floor)."""
    computations: dict[str, list[str]] = {}
    entry = None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line):
            lines = computations.setdefault(match[1], [])
            entry = match[1] if line.startswith("ENTRY") else entry
        elif line.startswith(" ") and computations:
            lines.append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")

    def cost(name: str, taken: float) -> tuple[float, float]:  # (cycles, Pallas seconds) of a run
        cycles, kernels = 0.0, 0.0
        for line in computations[name]:
            if match := _CYCLES.search(line):
                cycles += int(match[1])
            if 'custom_call_target="tpu_custom_call"' in line and (match := _COST.search(line)):
                flops, bytes_ = int(match[1]), int(match[2])
                kernels += max(flops / chip.peak_flops, bytes_ / chip.memory_bandwidth)
            op = (_INSTRUCTION.match(line) or [None, None, ""])[2]
            called: list[tuple[str, int]] = []
            if op == "while":
                body = re.search(r"\bbody=%?([\w.-]+)", line)[1]
                called = [(body, _trip_count(line, computations))]
            elif op == "call" or op.endswith("-start"):
                called = [(c, 1) for c in re.findall(r"\b(?:to_apply|calls)=%?([\w.-]+)", line)]
            elif op == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches = re.findall(r"%?([\w.-]+)", listed[1]) if listed else []
                branches += re.findall(r"\b(?:true|false)_computation=%?([\w.-]+)", line)
                costs = sorted(cost(b, taken) for b in branches)
                (cheap, cheap_k), (dear, dear_k) = costs[0], costs[-1]
                cycles += taken * dear + (1.0 - taken) * cheap
                kernels += taken * dear_k + (1.0 - taken) * cheap_k
            for callee, times in called:
                c, k = cost(callee, taken)
                cycles, kernels = cycles + times * c, kernels + times * k
        return cycles, kernels

    clock = chip.clock_ghz * 1e9
    cycles, kernels = cost(entry, taken)
    all_cycles, all_kernels = cost(entry, 1.0)
    return StepTime(
        cycles / clock, kernels, Basis.COST_MODEL, taken, all_cycles / clock + all_kernels
    )


def head_chunks_taken(config: Config, tokens: int) -> float:
    """The fraction of the masked-only head's chunks (`md4_eqx.model.selected_tokens`) that compute
    in a step of `tokens` tokens per device: the masked tokens come first, so a device runs
    ceil(masked / chunk) of its chunks. Taken at the schedule's mean masking rate, the mean of
    1 - alpha(t) over t ~ U[0, 1) (the antithetic strata give every device times across [0, 1)),
    and rounded up to the next whole chunk (a little over the mean: a conservative estimate).
    GenMD4's learned schedules are taken at their initial (linear) one."""
    m, d = config.model, config.diffusion
    chunk = config.execution.head_chunk or HEAD_CHUNK
    if m.backbone is Backbone.UNET:  # its head runs on every token, without conditionals
        return 1.0
    match Schedule.LINEAR if d.learnable else d.schedule:
        case Schedule.LINEAR:  # the mean of t
            mean = 0.5
        case Schedule.COSINE:  # the mean of cos(pi / 2 (1 - t))
            mean = 2 / math.pi
        case Schedule.POLY:  # the mean of t^k
            mean = 1 / (d.exponent + 1)
    mean = (1 - 2 * d.eps) * mean + d.eps
    count = -(-tokens // chunk)
    return min(count, math.floor(mean * tokens / chunk) + 1) / count


def _trip_count(line: str, computations: dict[str, list[str]]) -> int:
    """How many times the while loop `line` runs its body: XLA's `known_trip_count` where given,
    else the constant its condition's root compares the counter with (counters start at 0)."""
    if match := re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line):
        return int(match[1])
    condition = computations[re.search(r"\bcondition=%?([\w.-]+)", line)[1]]
    constants = {
        m[1]: int(m[2])
        for m in (re.match(r"^\s+%?([\w.-]+) = \S+ constant\((-?\d+)\)", ln) for ln in condition)
        if m
    }
    root = next(ln for ln in condition if ln.lstrip().startswith("ROOT"))
    compare = re.search(r"compare\(%?([\w.-]+), %?([\w.-]+)\), direction=(\w+)", root)
    if compare is None or compare[2] not in constants or compare[3] not in ("LT", "LE"):
        raise ValueError(f"a while loop whose trip count is not a constant bound: {root.strip()}")
    return constants[compare[2]] + (compare[3] == "LE")


def roofline(flops: float, bytes_accessed: float, chip: Gpu | Tpu) -> StepTime:
    """A step's floor where the compiler gives no estimate: its flops at the chip's peak or its
    bytes at the memory's bandwidth, whichever takes longer."""
    seconds = max(flops / chip.peak_flops, bytes_accessed / chip.memory_bandwidth)
    return StepTime(seconds, 0.0, Basis.ROOFLINE)


def mfu(flops: float, time: StepTime, chip: Gpu | Tpu) -> float:
    """The fraction of the chip's peak that `flops` (a step's, per device) in `time` would use."""
    return flops / (time.seconds * chip.peak_flops) if time.seconds > 0 else math.nan


def flops_per_token(config: Config) -> float:
    """Analytic forward + backward FLOPs per token: 6 x the parameters every token touches (per
    layer 4 d^2 attention + 3 d h MLP, plus the d x V_pad head; the embedding is a lookup and the
    adaLN / conditioning layers act once per example) + 12 x layers x seq x width (the attention
    scores and their mixing). The matmuls only: the numerator of a model-flops MFU."""
    m = config.model
    if m.backbone is Backbone.UNET:
        return unet_flops_per_token(m)
    touched = m.num_layers * (4 * m.width**2 + 3 * m.width * m.hidden) + m.width * m.padded_vocab
    return 6.0 * touched + 12.0 * m.num_layers * m.seq_len * m.width


def unet_flops_per_token(m: ModelConfig) -> float:
    """The U-Net's: 6 x the multiply-adds per pixel of every layer that acts on each pixel (a 3x3
    conv c_in -> c_out: 9 c_in c_out; a block's 1x1 skip; the attention's 4 projections, and its
    scores and mixing 2 x pixels x width), over the 3 sub-pixels (tokens) of a pixel."""
    w, pixels = m.width, m.seq_len // 3

    def block(c_in: int) -> int:
        return 9 * c_in * w + 9 * w * w + (c_in * w if c_in != w else 0)

    macs = (
        9 * 3 * w * w
        + m.num_layers * block(w)
        + 2 * block(w)
        + 4 * w * w
        + 2 * pixels * w
        + (m.num_layers + 1) * block(2 * w)
        + 9 * w * 3 * m.vocab_size
    )
    return 6.0 * macs / 3
