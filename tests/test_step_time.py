"""The step time the TPU compiler's cost model gives (md4_eqx.step_time): a hand-checked HLO text,
and programs compiled for an abstract v5e chip whose loops must be counted trip-count times."""

import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx import targets
from md4_eqx.config import Schedule, preset
from md4_eqx.step_time import Basis, head_chunks_taken, mfu, roofline, tpu_step_time

V5E = targets.CHIPS["v5e"]

# An entry with 1,000 cycles of its own and a loop of 5 trips (LT 5) whose body has 100 cycles,
# a Pallas call (2e9 flops, 1e6 bytes) and an inner loop of 4 trips (LE 3) of 10 cycles. The
# fusion's own computation carries cycles that its caller already counts (not to be added).
HLO = """HloModule jit_f, entry_computation_layout={()->f32[]}

%fused (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p), backend_config={"estimated_cycles":"999999"}
}

%inner_body (a: (s32[], f32[8])) -> (s32[], f32[8]) {
  %a = (s32[]{:T(128)}, f32[8]{0:T(256)}) parameter(0)
  %f = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused, backend_config={"estimated_cycles":"10"}
  ROOT %t = (s32[], f32[8]) tuple(%a, %f)
}

%inner_cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]) parameter(0)
  %k = s32[]{:T(128)} constant(3)
  %i = s32[] get-tuple-element(%c), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %k), direction=LE
}

%body (a: (s32[], f32[8])) -> (s32[], f32[8]) {
  %a = (s32[], f32[8]) parameter(0)
  %c = f32[8]{0} copy(%a), backend_config={"window_config":{"estimated_cycles":"100"}}
  %k = f32[8]{0} custom-call(%c), custom_call_target="tpu_custom_call", backend_config=KERNEL
  ROOT %w = (s32[], f32[8]) while(%a), condition=%inner_cond, body=%inner_body
}

%cond (c: (s32[], f32[8])) -> pred[] {
  %c = (s32[], f32[8]) parameter(0)
  %i = s32[] get-tuple-element(%c), index=0
  %k = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[]{:T(512)} compare(%i, %k), direction=LT
}

ENTRY %main () -> f32[] {
  %x = f32[8]{0} broadcast(), backend_config={"estimated_cycles":"1000"}
  %w = (s32[]{:T(128)}, f32[8]{0:T(256)}) while(%x), condition=%cond, body=%body
  ROOT %r = f32[] reduce(%w), backend_config={"estimated_cycles":"0"}
}
""".replace(
    "KERNEL",
    '{"cost_estimate":{"flops":"2000000000","transcendentals":"0","bytes_accessed":"1000000"}}',
)


def test_hand_checked_hlo():
    time = tpu_step_time(HLO, V5E)
    cycles = 1000 + 5 * (100 + 4 * 10)
    assert time.basis is Basis.COST_MODEL
    assert time.compiled == pytest.approx(cycles / 1.5e9)
    assert time.kernels == pytest.approx(5 * 2e9 / 197e12)  # flops bound: 1e6 bytes take 1.2 us
    assert time.seconds == pytest.approx(time.compiled + time.kernels)
    assert "CostEstimate's floor" in time.describe()


def test_known_trip_count_wins():
    known = HLO.replace(
        "condition=%cond, body=%body",
        'condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"7"}}',
    )
    assert tpu_step_time(known, V5E).compiled == pytest.approx((1000 + 7 * 140) / 1.5e9)


def test_a_conditional_is_its_branches_weighted_by_how_often_the_costlier_runs():
    """A conditional after the entry's own cycles, its branches 300 and 20 cycles: at its costlier
    branch by default (an upper bound), weighted by `taken` where given; `bound` is the first."""
    hlo = HLO.replace(
        '  ROOT %r = f32[] reduce(%w), backend_config={"estimated_cycles":"0"}',
        "  %p = pred[] constant(true)\n"
        "  ROOT %r = f32[8] conditional(%p, %x, %x), true_computation=%dear, "
        "false_computation=%cheap",
    ).replace(
        "ENTRY",
        "%dear (a: f32[8]) -> f32[8] {\n"
        '  ROOT %e = f32[8]{0} exponential(%a), backend_config={"estimated_cycles":"300"}\n'
        "}\n\n"
        "%cheap (a: f32[8]) -> f32[8] {\n"
        '  ROOT %b = f32[8]{0} broadcast(), backend_config={"estimated_cycles":"20"}\n'
        "}\n\n"
        "ENTRY",
    )
    loops = 1000 + 5 * (100 + 4 * 10)
    upper = tpu_step_time(hlo, V5E)
    assert upper.compiled == pytest.approx((loops + 300) / 1.5e9)
    assert upper.bound == pytest.approx(upper.seconds)
    quarter = tpu_step_time(hlo, V5E, taken=0.25)
    assert quarter.compiled == pytest.approx((loops + 0.25 * 300 + 0.75 * 20) / 1.5e9)
    assert quarter.bound == pytest.approx(upper.seconds)
    assert "25% of them" in quarter.describe() and "if all did" in quarter.describe()


def test_head_chunks_taken_at_the_schedules_mean_masking_rate():
    """ceil-ish(mean masked / chunk) of the chunks: the linear schedule masks half the tokens on
    average (2 / pi for the cosine one, 1 / (k + 1) for t^k), and one example in a chunk bigger
    than it always runs its one chunk."""
    md4s = preset("md4-s")

    def taken(tokens: int, chunk: int, **diffusion) -> float:
        config = dataclasses.replace(
            md4s,
            execution=dataclasses.replace(md4s.execution, head_chunk=chunk),
            diffusion=dataclasses.replace(md4s.diffusion, **diffusion),
        )
        return head_chunks_taken(config, tokens)

    assert taken(16 * 1024, 2048) == 5 / 8  # 8,192 masked: 4 chunks, rounded up to 5
    assert taken(16 * 1024, 256) == 33 / 64
    assert taken(1024, 2048) == 1.0
    assert taken(1024, 256, schedule=Schedule.COSINE) == 3 / 4  # 652 masked
    assert taken(1024, 64, schedule=Schedule.POLY, exponent=3.0) == 5 / 16  # 256 masked
    assert taken(16 * 1024, 2048, learnable=True) == 5 / 8


def test_roofline_and_mfu():
    h100 = targets.CHIPS["h100"]
    time = roofline(989e12, 1e9, h100)  # a second of flops, 0.3 ms of bytes
    assert time.basis is Basis.ROOFLINE and time.seconds == pytest.approx(1.0)
    assert mfu(989e12 / 2, time, h100) == pytest.approx(0.5)
    assert roofline(1.0, 3.35232e12, h100).seconds == pytest.approx(1.0)


@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='the TPU compiler is not installed: pip install -e ".[tpu]"',
)
def test_a_rolled_loop_costs_its_trips():
    """x <- tanh(x @ w) eight times, [2048, 2048] bf16, compiled for one v5e chip: unrolled, the
    estimate is eight times one layer's; rolled (a while loop) it is at least that (the loop's
    own copies cost more by the cost model), where counting the body once would give a fifth."""
    mesh = Mesh(np.asarray(targets.parse("v5e:1x1").devices()).reshape(1, 1), ("data", "model"))
    shape = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P()))

    def estimate(layers: int, unroll: bool) -> float:
        def layers_of(w, x):
            return jax.lax.fori_loop(0, layers, lambda i, x: jnp.tanh(x @ w), x, unroll=unroll)

        compiled = jax.jit(layers_of).trace(shape, shape).lower().compile()
        return tpu_step_time(compiled.as_text(), V5E).seconds

    one, unrolled, rolled = estimate(1, True), estimate(8, True), estimate(8, False)
    assert one > 2 * 2048**3 / V5E.peak_flops  # no faster than the chip's peak
    assert unrolled == pytest.approx(8 * one, rel=0.1)
    assert 0.9 * unrolled < rolled < 2.5 * unrolled
