"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

import equinox as eqx
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

