"""Masking schedules alpha(t) (paper section 2; MD4_MATH.md, "Forward process and schedules").

alpha(t) is the probability that a token is still unmasked at time t, kept away from 0 and 1 as
in the paper's code: alpha(0) = 1 - eps, alpha(1) = eps. MD4's `MaskingSchedule` is the same for
every token, GenMD4's `LearnableSchedule` per token. Both answer the question a sampler asks
(`unmask_probs`), and `per_token` says whether the masking law depends on the token, which is all
the loss (`md4_eqx.loss.losses`) and the exact-skip sampler need to know.
"""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from md4_eqx.config import Schedule


class MaskingSchedule(eqx.Module):
    """alpha(t), alpha'(t) and the loss weight alpha'(t) / (1 - alpha(t)) of one schedule."""

    kind: Schedule = eqx.field(static=True, default=Schedule.LINEAR)
    exponent: float = eqx.field(static=True, default=1.0)
    eps: float = eqx.field(static=True, default=1e-4)
    per_token: ClassVar[bool] = False

    def _one_minus_a(self, t: Float[Array, "*b"]) -> Float[Array, "*b"]:
        """1 - a(t), written out so that 1 - alpha(t) keeps its precision near t = 0."""
        match self.kind:
            case Schedule.LINEAR:
                return t
            case Schedule.COSINE:
                return jnp.cos(jnp.pi / 2 * (1.0 - t))
            case Schedule.POLY:
                return t**self.exponent

    def alpha(self, t: Float[Array, "*b"]) -> Float[Array, "*b"]:
        """alpha(t) = (1 - 2 eps) a(t) + eps."""
        return (1.0 - 2 * self.eps) * (1.0 - self._one_minus_a(t)) + self.eps

    def dalpha(self, t: Float[Array, "*b"]) -> Float[Array, "*b"]:
        """alpha'(t) = (1 - 2 eps) a'(t)."""
        match self.kind:
            case Schedule.LINEAR:
                da = -jnp.ones_like(t)
            case Schedule.COSINE:
                da = -jnp.pi / 2 * jnp.sin(jnp.pi / 2 * (1.0 - t))
            case Schedule.POLY:
                da = -self.exponent * t ** (self.exponent - 1.0)
        return (1.0 - 2 * self.eps) * da

    def mask_prob(self, t: Float[Array, "*b"]) -> Float[Array, "*b"]:
        """1 - alpha(t) = (1 - 2 eps)(1 - a(t)) + eps, the probability a token is masked at t."""
        return (1.0 - 2 * self.eps) * self._one_minus_a(t) + self.eps

    def weight(self, t: Float[Array, "*b"]) -> Float[Array, "*b"]:
        """alpha'(t) / (1 - alpha(t)) <= 0: the continuous-time NELBO's weight."""
        return self.dalpha(t) / self.mask_prob(t)

    def unmask_probs(
        self, t: Float[Array, ""], s: Float[Array, ""], vocab_size: int
    ) -> Float[Array, " vocab"]:
        """P(a masked position becomes token v between t and s < t | it would be v):
        (alpha_s - alpha_t) / (1 - alpha_t), the same number for every v."""
        mask_t = self.mask_prob(t)
        return jnp.full((vocab_size,), (mask_t - self.mask_prob(s)) / mask_t)


class LearnableSchedule(eqx.Module):
    """GenMD4's per-token polynomial schedule alpha_t(v) = 1 - (1 - eps) t^(w_v),
    w = softplus(theta), initialised at w = 1 for every token (MD4_MATH.md, "GenMD4")."""

    theta: Float[Array, " vocab"]
    eps: float = eqx.field(static=True)
    per_token: ClassVar[bool] = True

    def __init__(self, vocab_size: int, eps: float = 1e-4):
        # softplus(theta) = 1  <=>  theta = log(e - 1)
        self.theta = jnp.full((vocab_size,), jnp.log(jnp.expm1(1.0)), jnp.float32)
        self.eps = eps

    @property
    def w(self) -> Float[Array, " vocab"]:
        return jax.nn.softplus(self.theta)

    def alpha(self, t: Float[Array, "*#b"], w: Float[Array, "*#b"]) -> Float[Array, "*#b"]:
        """alpha_t for tokens whose exponent is w (broadcast against t)."""
        return 1.0 - (1.0 - self.eps) * jnp.exp(w * jnp.log(t))

    def unmask_probs(
        self, t: Float[Array, ""], s: Float[Array, ""], vocab_size: int
    ) -> Float[Array, " vocab"]:
        """1 - alpha_t(v) = (1 - eps) t^(w_v), so (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v))
        = 1 - (s / t)^(w_v)."""
        ratio = jnp.maximum(s, 0.0) / t  # the cosine grid's last s is -4e-8 in float32
        return -jnp.expm1(self.w * jnp.log(ratio))
