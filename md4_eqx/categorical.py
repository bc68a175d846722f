"""Categorical and Bernoulli draws with untruncated tails, and top-p without a sort (samplers).

`jax.random.categorical` adds float32 Gumbel noise -log(-log u), and float32's largest uniform
below 1 caps that noise near 16.6: a token more than ~16.6 nats below the leading one is never
drawn, and rarer tokens are drawn too seldom. Over a 50k vocabulary and many steps this lowers
the samplers' effective temperature, deflating both sample entropy and generative perplexity
(Zheng et al. 2024, arXiv 2409.02908).

`Draws.EXACT` needs neither Gumbel noise nor float64 (off by default in JAX, emulated on TPU): an
inverse-CDF draw down a binary tree whose nodes hold the summed weights exp(logit - max) of their
leaves, going left with probability left / (left + right) against a uniform resolved to 2^-64 at
both ends of (0, 1). A token's probability is thus its weight over the root's up to 2 log2(V)
float32 roundings (relative error ~2e-6, the logits' own rounding); none above float32's exp
underflow (~1e-38) is cut off. Cost: 2 log2(V) random words per draw instead of V, a pairwise sum
instead of V logarithms, and log2(V) gathers (cheaper than the Gumbel draw on CPU).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from md4_eqx.config import Draws


def _uniform_halves(
    key: PRNGKeyArray, shape: tuple[int, ...]
) -> tuple[Bool[Array, "..."], Float[Array, "..."]]:
    """U ~ Uniform(0, 1) as (upper, v): U = 1 - v if upper else v, with v in (0, 1/2] carrying
    float32 relative precision down to 2^-64 (float32's own uniform has absolute steps of 2^-24,
    so it resolves neither U near 0 nor 1 - U near 0). One bit picks the half, 63 bits give v."""
    hi, lo = jax.random.bits(key, (2, *shape), jnp.uint32)
    v = (hi >> 1).astype(jnp.float32) * 2.0**-32 + (lo.astype(jnp.float32) + 0.5) * 2.0**-64
    return (hi & 1) == 1, v


def uniform_below(key: PRNGKeyArray, p: Float[Array, "*b"], draws: Draws) -> Bool[Array, "*b"]:
    """Bernoulli(p), i.e. U < p; EXACT resolves p and 1 - p down to 2^-64."""
    if draws is Draws.FLOAT32:
        return jax.random.uniform(key, p.shape) < p
    upper, v = _uniform_halves(key, p.shape)
    return jnp.where(upper, v > 1.0 - p, v < p)  # U = 1 - v < p  <=>  v > 1 - p


def exponential(key: PRNGKeyArray, shape: tuple[int, ...], draws: Draws) -> Float[Array, "..."]:
    """E ~ Exp(1) = -log U; EXACT keeps both tails (E near 0 and E up to 44)."""
    if draws is Draws.FLOAT32:
        return jax.random.exponential(key, shape)
    upper, v = _uniform_halves(key, shape)
    return jnp.where(upper, -jnp.log1p(-v), -jnp.log(v))


def categorical(key: PRNGKeyArray, logits: Float[Array, "*b v"], draws: Draws) -> Int[Array, "*b"]:
    """One draw per row with P(v) = softmax(logits)[v] (-inf: never)."""
    if draws is Draws.FLOAT32:
        return jax.random.categorical(key, logits)
    *batch, vocab = logits.shape
    depth = max(1, (vocab - 1).bit_length())
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # (*b, V), max 1
    levels = [jnp.pad(weights, [(0, 0)] * len(batch) + [(0, 2**depth - vocab)])]
    for _ in range(depth - 1):  # levels[d]: 2^(depth - d) node sums
        levels.append(levels[-1].reshape(*batch, -1, 2).sum(-1))
    upper, v = _uniform_halves(key, (depth, *batch))
    node = jnp.zeros(batch, jnp.int32)  # index of the current node within its level
    for d in range(depth):  # from the root's children down to the leaves
        level = levels[depth - 1 - d]
        left = jnp.take_along_axis(level, (2 * node)[..., None], axis=-1)[..., 0]
        right = jnp.take_along_axis(level, (2 * node + 1)[..., None], axis=-1)[..., 0]
        total = left + right
        # Go left with probability left / total: U < left / total, resolved at both ends.
        go_left = jnp.where(upper[d], v[d] > right / total, v[d] < left / total)
        node = 2 * node + jnp.where(go_left, 0, 1)
    return node


def top_p_filter(logits: Float[Array, "*b v"], top_p: float) -> Float[Array, "*b v"]:
    """Keep the smallest set of tokens whose probability reaches top_p; the rest get -inf.

    That set is {v : p_v >= tau} for tau the largest value with mass(tau) = sum_{p_v >= tau} p_v
    >= top_p (mass only changes at the p_v, so tau is one of them). mass falls as tau grows, and
    positive float32 values order as their int32 bit patterns, so bisection on the bits finds tau
    exactly: 30 halvings of [0, bits(max p) + 1), each one masked sum over V, and no sort of the
    vocabulary (which is slow on accelerators). The samplers call it on the gathered vocabulary:
    summing slices split over `model` would round differently on each mesh, and samples must not
    depend on the mesh."""
    probs = jax.nn.softmax(logits, axis=-1)

    def mass(bits: Int[Array, "*b"]) -> Float[Array, "*b"]:
        tau = jax.lax.bitcast_convert_type(bits, jnp.float32)[..., None]
        return jnp.sum(jnp.where(probs >= tau, probs, 0.0), axis=-1)

    def halve(_, bounds):  # invariant: mass(lo) >= top_p > mass(hi), or lo = 0
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        reaches = mass(mid) >= top_p
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid)

    # <= bits(1.0) + 1 < 2^30
    top = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1), jnp.int32) + 1
    lo, _ = jax.lax.fori_loop(0, 30, halve, (jnp.zeros_like(top), top))
    threshold = jax.lax.bitcast_convert_type(lo, jnp.float32)[..., None]
    return jnp.where(probs >= threshold, logits, -jnp.inf)
