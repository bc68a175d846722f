"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import Config
from md4_eqx.schedule import LearnableSchedule, MaskingSchedule
from md4_eqx.transformer import Transformer


class MD4(eqx.Module):
    """The trainable model. `learned` is GenMD4's per-token schedule, None for MD4."""

    net: Transformer
    learned: LearnableSchedule | None
    config: Config = eqx.field(static=True)

    def __init__(self, config: Config, *, key: PRNGKeyArray):
        self.net = Transformer(config.model, key=key)
        d = config.diffusion
        self.learned = LearnableSchedule(config.model.vocab_size, d.eps) if d.learnable else None
        self.config = config

    @property
    def schedule(self) -> MaskingSchedule:
        return MaskingSchedule.from_config(self.config.diffusion)

    @property
    def vocab_size(self) -> int:
        return self.config.model.vocab_size

    @property
    def mask_id(self) -> int:
        """The mask token m = V."""
        return self.config.model.vocab_size

    def logits(
        self,
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None = None,
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> Float[Array, "b l v_local"]:
        """mu_theta(z_t, t) as logits over this device's vocabulary slice (see `md4_eqx.parallel`)."""
        return self.net(z, t, labels, keys=keys)

    def unmask_probs(self, t: Float[Array, ""], s: Float[Array, ""]) -> Float[Array, " vocab"]:
        """P(a masked position becomes token v between t and s < t | it would be v):
        (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v)), the same for every v under MD4's schedule.
        GenMD4: 1 - alpha_t(v) = (1 - eps) t^(w_v), so the ratio is 1 - (s / t)^(w_v)."""
        if self.learned is not None:
            ratio = jnp.maximum(s, 0.0) / t  # the cosine grid's last s is -4e-8 in float32
            return -jnp.expm1(self.learned.w * jnp.log(ratio))
        schedule = self.schedule
        mask_t = schedule.mask_prob(t)
        return jnp.full((self.vocab_size,), (mask_t - schedule.mask_prob(s)) / mask_t)
