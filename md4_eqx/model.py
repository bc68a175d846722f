"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

import equinox as eqx
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import Backbone, DiffusionConfig, ModelConfig
from md4_eqx.schedule import LearnableSchedule, MaskingSchedule, make_schedule
from md4_eqx.transformer import Transformer
from md4_eqx.unet import UNet


class MD4(eqx.Module):
    """The trainable model: the network and the schedule (GenMD4's learns, MD4's is fixed). The
    network is the config's backbone; both map (z_t, t, labels) to the same logits, so the
    losses, samplers, evaluation and checkpoints never ask which it is."""

    net: Transformer | UNet
    schedule: MaskingSchedule | LearnableSchedule
    config: ModelConfig = eqx.field(static=True)
    diffusion: DiffusionConfig = eqx.field(static=True)

    def __init__(
        self, config: ModelConfig, diffusion: DiffusionConfig = DiffusionConfig(), *, key: PRNGKeyArray
    ):
        self.net = (UNet if config.backbone is Backbone.UNET else Transformer)(config, key=key)
        self.schedule = make_schedule(diffusion, config.vocab_size)
        self.config, self.diffusion = config, diffusion

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def mask_id(self) -> int:
        """The mask token m = V."""
        return self.config.vocab_size

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
        """P(a masked position becomes token v between t and s < t | it would be v)."""
        return self.schedule.unmask_probs(t, s, self.vocab_size)
