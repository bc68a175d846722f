"""Categorical draws without truncated tails (`md4_eqx.categorical`), against float64 laws."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from md4_eqx.categorical import categorical, exponential, top_p_filter, uniform_below
from md4_eqx.config import Draws

VOCAB, DRAWS = 50257, 2**19


def zipf(exponent: float) -> np.ndarray:
    p = np.arange(1, VOCAB + 1, dtype=np.float64) ** -exponent
    return p / p.sum()


def test_zipf_tail_mass():
    """GPT-2's vocabulary size under Zipf(1.5): tokens of probability < 1e-6 hold 0.71% of the
    mass. The exact draws hit that tail at its rate (binomial chi-square, p > 1e-4 at this seed).

    The float32 path (`jax.random.categorical`) cannot: its Gumbel noise -log(-log u) is capped at
    c = 16.64 by float32's largest uniform below 1, so a token of probability p, which wins when
    log p + g beats a Gumbel(log(1 - p)), wins with probability p exp(-e^-c / p) instead of p
    (integrate over x = e^-g > e^-c). Its tail mass is 27% short: far outside the same bound.
    (Drawing 2^19 float32 Gumbel-max samples would cost 2^19 x 50257 logarithms; the law is
    computed instead.)"""
    probs = zipf(1.5)
    tail = probs < 1e-6
    true_mass = probs[tail].sum()
    logits = jnp.asarray(np.log(probs), jnp.float32)
    keys = jax.random.split(jax.random.key(0), DRAWS)
    tokens = np.asarray(jax.jit(jax.vmap(lambda k: categorical(k, logits, Draws.EXACT)))(keys))
    hits = int(tail[tokens].sum())

    def p_value(count, mass):  # `count` tail hits against a binomial with this tail mass
        return stats.chisquare([count, DRAWS - count], [DRAWS * mass, DRAWS * (1 - mass)]).pvalue

    assert p_value(hits, true_mass) > 1e-4, (hits / DRAWS, true_mass)
    cap = -np.log(-np.log(np.float64(np.nextafter(np.float32(1), np.float32(0)))))
    assert cap == pytest.approx(16.636, abs=1e-3)
    float32_mass = np.sum(probs[tail] * np.exp(-np.exp(-cap) / probs[tail]))
    assert float32_mass < 0.75 * true_mass
    expected_hits = DRAWS * float32_mass  # what the float32 path draws on average
    assert p_value(expected_hits, true_mass) < 1e-30


@pytest.mark.parametrize("draws", list(Draws), ids=lambda d: d.value)
def test_small_vocabulary_laws(draws):
    """Rows of different laws, -inf entries never drawn, and the Bernoulli and exponential draws."""
    probs = np.array([[0.5, 0.3, 0.2, 0.0, 0.0], [0.05, 0.05, 0.1, 0.3, 0.5]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    n = 20000
    keys = jax.random.split(jax.random.key(1), n)
    tokens = np.asarray(jax.vmap(lambda k: categorical(k, logits, draws))(keys))  # (n, 2)
    for row in range(2):
        counts = np.bincount(tokens[:, row], minlength=5)
        support = probs[row] > 0
        assert counts[~support].sum() == 0
        assert stats.chisquare(counts[support], n * probs[row][support]).pvalue > 1e-4
    p = jnp.array([1e-3, 0.5, 1.0 - 1e-3])
    hits = np.asarray(jax.vmap(lambda k: uniform_below(k, p, draws))(keys)).sum(0)
    for h, q in zip(hits, np.asarray(p, np.float64), strict=True):
        assert stats.binomtest(int(h), n, q).pvalue > 1e-4
    e = np.asarray(exponential(jax.random.key(2), (n,), draws), np.float64)
    assert stats.kstest(e, "expon").pvalue > 1e-4


def sort_top_p(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The sorting reference in float64: keep tokens while the mass strictly above them is
    below top_p."""
    order = np.argsort(-probs, axis=-1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, -1)
    keep_sorted = np.cumsum(sorted_probs, -1) - sorted_probs < top_p
    threshold = np.where(keep_sorted, sorted_probs, np.inf).min(-1, keepdims=True)
    return probs >= threshold


def test_top_p_bisection_matches_the_sort():
    """64 rows over 50,257 tokens at several temperatures. The kept sets agree with the float64
    sort except where the boundary token's cumulative mass lies within 3e-7 of top_p, where
    float32 sums may round either way."""
    logits = jax.random.normal(jax.random.key(3), (64, VOCAB)) * jnp.linspace(2.0, 6.0, 64)[:, None]
    for top_p in (0.5, 0.9, 0.98):
        kept = np.isfinite(np.asarray(top_p_filter(logits, top_p)))
        probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
        reference = sort_top_p(probs, top_p)
        smallest = np.where(reference, probs, np.inf).min(-1)
        mass = np.where(reference, probs, 0.0).sum(-1)
        ambiguous = (np.abs(mass - top_p) < 3e-7) | (np.abs(mass - smallest - top_p) < 3e-7)
        assert ambiguous.mean() < 0.1
        np.testing.assert_array_equal(kept[~ambiguous], reference[~ambiguous])
