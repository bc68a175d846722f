"""Masking schedules: endpoints, monotonicity, alpha' against jax.grad, GenMD4's initial state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_eqx.config import Schedule
from md4_eqx.schedule import LearnableSchedule, MaskingSchedule

SCHEDULES = [
    MaskingSchedule(Schedule.LINEAR),
    MaskingSchedule(Schedule.COSINE),
    MaskingSchedule(Schedule.POLY, exponent=0.5),
    MaskingSchedule(Schedule.POLY, exponent=2.0),
    MaskingSchedule(Schedule.POLY, exponent=3.0),
]
IDS = ["linear", "cosine", "poly0.5", "poly2", "poly3"]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_endpoints(schedule):
    alpha = jax.jit(schedule.alpha)
    np.testing.assert_allclose(alpha(jnp.float32(0.0)), 1.0 - schedule.eps, rtol=1e-7)
    np.testing.assert_allclose(alpha(jnp.float32(1.0)), schedule.eps, rtol=1e-5)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_monotone_decreasing(schedule):
    t = jnp.linspace(0.0, 1.0, 1001)
    alpha = jax.jit(schedule.alpha)(t)
    # Non-increasing in float32 (t^3 near 0 changes alpha by less than an ulp), strictly so in
    # the stably computed 1 - alpha(t).
    assert jnp.all(jnp.diff(alpha) <= 0)
    assert jnp.all(jnp.diff(jax.jit(schedule.mask_prob)(t)) > 0)
    np.testing.assert_allclose(schedule.mask_prob(t), 1 - alpha, atol=1e-6)
    assert jnp.all(jax.jit(schedule.weight)(t[1:-1]) < 0)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_derivative_is_grad_of_alpha(schedule):
    t = jnp.linspace(0.01, 0.99, 99)
    autodiff = jax.jit(jax.vmap(jax.grad(schedule.alpha)))(t)
    # float32 with values of order 1-3: a few ulps of relative error.
    np.testing.assert_allclose(jax.jit(schedule.dalpha)(t), autodiff, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_weight_matches_float64_formula(schedule):
    t = np.linspace(0.02, 0.98, 49)
    a, da = {
        Schedule.LINEAR: (1 - t, -np.ones_like(t)),
        Schedule.COSINE: (
            1 - np.cos(np.pi / 2 * (1 - t)),
            -np.pi / 2 * np.sin(np.pi / 2 * (1 - t)),
        ),
        Schedule.POLY: (
            1 - t**schedule.exponent,
            -schedule.exponent * t ** (schedule.exponent - 1),
        ),
    }[schedule.kind]
    eps = schedule.eps
    expected = (1 - 2 * eps) * da / (1 - ((1 - 2 * eps) * a + eps))
    np.testing.assert_allclose(schedule.weight(jnp.asarray(t, jnp.float32)), expected, rtol=1e-5)


def test_learnable_schedule_starts_linear():
    sched = LearnableSchedule(vocab_size=11, eps=1e-4)
    np.testing.assert_allclose(sched.w, np.ones(11), rtol=1e-6)
    t = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(sched.alpha(t, jnp.ones_like(t)), 1 - (1 - 1e-4) * t, rtol=1e-6)
    assert sched.alpha(jnp.float32(1.0), jnp.float32(3.0)) == pytest.approx(1e-4, rel=1e-3)
