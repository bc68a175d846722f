"""The exact-skip sampler samples the ancestral sampler's law with fewer network calls.

The law is checked on a network with known outputs whose predictions depend strongly on both the
time t and the tokens already unmasked, so a sampler that calls it at the wrong time or on the
wrong state draws visibly different tokens. Chi-square tests at fixed seeds compare per-position
token frequencies, a pair of positions, the unmask-step histogram (against its exact law) and the
number of network calls per sequence. Each test is at level 1e-3 per statistic; the power check
shows that the same statistics reject a network evaluated about one step late.
"""

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import Array, Float, Int
from scipy import stats

from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    Loop,
    ModelConfig,
    Precision,
    SamplerConfig,
    TimeGrid,
)
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh, vocab_offset
from md4_eqx.sampling import expected_skip_calls, generate, unmask_step_probs
from md4_eqx.schedule import MaskingSchedule

V, L, T, N = 4, 6, 10, 6000
LEVEL = 1e-3


class KnownNet(eqx.Module):
    """logits[b, l, v] = base[l, v] + time[v] * t_b + herd * #{positions of example b holding v},
    zero past V; returns this device's vocabulary slice like the transformer. `delay` evaluates
    it at t + delay instead: with delay = 1/T, a sampler that reads the time about one step off."""

    base: Float[Array, "l v"]
    time: Float[Array, " v"]
    delay: Float[Array, ""]  # an array, so a late network reuses the compiled sampler
    herd: float = eqx.field(static=True)
    padded_vocab: int = eqx.field(static=True)

    def __call__(self, z: Int[Array, "b l"], t: Float[Array, " b"], labels=None, *, keys=None):
        counts = jnp.sum(jax.nn.one_hot(z, V, dtype=jnp.float32), axis=1)  # (b, V); masks count 0
        t = jnp.minimum(t + self.delay, 1.0)
        logits = (
            self.base[None]
            + self.time[None, None] * t[:, None, None]
            + self.herd * counts[:, None, :]
        )
        full = jnp.pad(logits, ((0, 0), (0, 0), (0, self.padded_vocab - V)))  # (b, l, padded)
        v_local = self.padded_vocab // jax.lax.axis_size("model")
        return jax.lax.dynamic_slice_in_dim(full, vocab_offset(v_local), v_local, axis=-1)


@functools.cache
def known_model(delay: float = 0.0) -> MD4:
    # eps = 0.05 makes the final argmax fill happen often enough to be tested (P = eps / (1 - eps)).
    config = Config(
        model=ModelConfig(vocab_size=V, seq_len=L, width=8, num_layers=1, num_heads=2, cond_dim=8),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
        diffusion=DiffusionConfig(eps=0.05),
    )
    model = MD4(config.model, config.diffusion, config.execution, key=jax.random.key(0))
    ramp = (
        jnp.arange(L, dtype=jnp.float32)[:, None] * jnp.eye(V)[1][None]
    )  # token 1 likelier along l
    base = jnp.log(jnp.array([0.1, 0.2, 0.3, 0.4]))[None] + 0.3 * ramp  # (L, V)
    net = KnownNet(
        base, jnp.array([3.0, 0.0, -3.0, 0.0]), jnp.array(delay), 0.7, config.model.padded_vocab
    )
    return eqx.tree_at(lambda m: m.net, model, net)


class Run(NamedTuple):
    tokens: np.ndarray  # (N, L)
    step: np.ndarray  # (N, L) the step that unmasked each position; T: the final fill
    distinct: np.ndarray  # (N,) distinct unmask steps of each sequence
    calls: np.ndarray  # (data,) network calls of each data shard


def run(model: MD4, loop: Loop, seed: int, mesh_shape: tuple[int, int] = (4, 2)) -> Run:
    """N all-mask sequences, their unmask steps read off the trajectory."""
    template = jnp.full((N, L), model.mask_id, jnp.int32)
    cfg = SamplerConfig(loop=loop, steps=T)
    out = generate(
        model, jax.random.key(seed), template, make_mesh(*mesh_shape), cfg, trajectory=True
    )
    unmasked = np.asarray(out.trajectory) != model.mask_id  # (T, N, L)
    step = np.where(
        unmasked[-1], T - unmasked.sum(0), T
    )  # the first step after which it is unmasked
    distinct = np.array([np.unique(row).size for row in step])
    return Run(np.asarray(out.tokens), step, distinct, np.asarray(out.calls))


def same_law(x: np.ndarray, y: np.ndarray) -> float:
    """p-value of a two-sample chi-square test on the counts of non-negative integers."""
    size = max(x.max(), y.max()) + 1
    table = np.stack([np.bincount(x, minlength=size), np.bincount(y, minlength=size)])
    return stats.chi2_contingency(table[:, table.sum(0) > 0]).pvalue


def token_p_values(a: np.ndarray, b: np.ndarray) -> list[float]:
    """Per-position marginals and the joint law of positions (0, L - 1)."""
    per_position = [same_law(a[:, i], b[:, i]) for i in range(L)]
    return per_position + [same_law(a[:, 0] * V + a[:, -1], b[:, 0] * V + b[:, -1])]


@pytest.fixture(scope="module")
def ancestral():
    return run(known_model(), Loop.EVERY_STEP, seed=1)


@pytest.fixture(scope="module")
def skip():
    return run(known_model(), Loop.EXACT_SKIP, seed=2)


def test_skip_samples_the_ancestral_law(ancestral, skip):
    assert min(token_p_values(ancestral.tokens, skip.tokens)) > LEVEL
    assert same_law(ancestral.distinct, skip.distinct) > LEVEL  # network calls per sequence
    probs = np.asarray(unmask_step_probs(known_model().schedule, T, TimeGrid.COSINE), np.float64)
    for step in (ancestral.step, skip.step):  # positions unmask independently: a multinomial
        counts = np.bincount(step.ravel(), minlength=T + 1)
        assert stats.chisquare(counts, probs / probs.sum() * step.size).pvalue > LEVEL


def test_the_statistics_reject_a_late_network(ancestral):
    late = run(known_model(delay=1.0 / T), Loop.EXACT_SKIP, seed=3)
    assert max(token_p_values(ancestral.tokens, late.tokens)) < 1e-6


def test_network_calls(ancestral, skip):
    """A device calls the network once per distinct unmask step of its busiest sequence, and a
    sequence's distinct unmask steps average `expected_skip_calls`; every step calls it T + 1
    times."""
    np.testing.assert_array_equal(ancestral.calls, [T + 1] * 4)
    busiest = skip.distinct.reshape(4, N // 4).max(axis=1)  # 4 data shards of N / 4 sequences
    np.testing.assert_array_equal(skip.calls, busiest)
    cfg = SamplerConfig(loop=Loop.EXACT_SKIP, steps=T)
    expected = expected_skip_calls(known_model().schedule, cfg, L)
    assert abs(skip.distinct.mean() - expected) < 4 * skip.distinct.std() / math.sqrt(N)


def test_skip_is_mesh_invariant(skip):
    np.testing.assert_array_equal(
        run(known_model(), Loop.EXACT_SKIP, 2, (8, 1)).tokens, skip.tokens
    )


def test_unmask_step_law_telescopes():
    """The law against a float64 computation from the per-step unmask probabilities; float32
    differences of survival probabilities near 1 are exact to a few 1e-8."""
    schedule, steps = MaskingSchedule(), 1000
    probs = np.asarray(unmask_step_probs(schedule, steps, TimeGrid.COSINE), np.float64)
    u = (steps - np.arange(steps + 1)) / steps
    alpha = (1 - 2e-4) * (1 - np.cos(np.pi / 2 * (1 - u))) + 1e-4  # at t_0 = 1, ..., t_T = 0
    unmask = (alpha[1:] - alpha[:-1]) / (1 - alpha[:-1])  # p_i of step i: t_i -> s_i = t_{i+1}
    survival = np.cumprod(1 - unmask)
    exact = -np.diff(np.concatenate([[1.0], survival, [0.0]]))
    np.testing.assert_allclose(probs, exact, atol=3e-7)
    # The paper's OpenWebText sampling (L = 1024, T = 1000): 591.5 expected calls instead of 1001.
    calls = expected_skip_calls(schedule, SamplerConfig(steps=steps), 1024)
    assert calls == pytest.approx(np.sum(-np.expm1(1024 * np.log1p(-exact))), rel=1e-4)
    assert calls == pytest.approx(591.5, abs=0.1)


def test_transformer_on_a_mesh_keeps_the_prompt():
    config = Config(
        model=ModelConfig(
            vocab_size=50, seq_len=16, width=32, num_layers=1, num_heads=2, cond_dim=16
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
    )
    model = MD4(config.model, config.diffusion, config.execution, key=jax.random.key(0))
    rng = np.random.default_rng(0)  # a random head and adaLN: a fresh model's are zero
    model = jax.tree.map(lambda x: x + rng.normal(0.0, 0.2, x.shape).astype(np.float32), model)
    template = jnp.full((8, 16), model.mask_id, jnp.int32).at[:, :4].set(7)
    cfg = SamplerConfig(loop=Loop.EXACT_SKIP, steps=64)
    out = generate(model, jax.random.key(1), template, make_mesh(4, 2), cfg)
    tokens = np.asarray(out.tokens)
    assert np.all(tokens[:, :4] == 7) and np.all(tokens < 50)
    assert np.all(np.asarray(out.calls) <= 12 + 1)  # <= one call per masked position, and the fill
