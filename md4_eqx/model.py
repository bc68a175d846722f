"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray, PyTree

from md4_eqx.config import Backbone, DiffusionConfig, ExecutionConfig, ModelConfig
from md4_eqx.schedule import LearnableSchedule, MaskingSchedule
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
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(
        self,
        config: ModelConfig,
        diffusion: DiffusionConfig = DiffusionConfig(),
        execution: ExecutionConfig = ExecutionConfig(),
        *,
        key: PRNGKeyArray,
    ):
        self.net = (UNet if config.backbone is Backbone.UNET else Transformer)(
            config, execution, key=key
        )
        self.schedule = (
            LearnableSchedule(config.vocab_size, diffusion.eps)
            if diffusion.learnable
            else MaskingSchedule(diffusion.schedule, diffusion.exponent, diffusion.eps)
        )
        self.config, self.diffusion, self.execution = config, diffusion, execution

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

    def readout(
        self,
        fn: Callable[[Float[Array, "*n v_local"], Int[Array, "*n"]], PyTree[Float[Array, "*n"]]],
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None,
        x: Int[Array, "b l"],
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> PyTree[Float[Array, "b l"]]:
        """fn(logits, x) at every token: what a loss needs of mu_theta(z_t, t), per token. `fn` maps
        any leading token axes, [b, l] or a chunk's [n]. With `head_chunk` (the transformer's), the
        head and `fn` run in `token_chunks`, so the [b, l, V] logits and their gradient never exist
        whole, for one more head matmul. MD4-S in bfloat16 at 2048 tokens a chunk: 1243 -> 862 MiB
        per example without remat, 429 -> 143 MiB with it (bench/RESULTS.md)."""
        if not self.execution.head_chunk:
            return fn(self.logits(z, t, labels, keys=keys), x)
        h = self.net.features(z, t, labels, keys=keys)  # (b, l, d)
        return token_chunks(lambda h, x: fn(self.net.head(h), x), h, x, self.execution.head_chunk)


def token_chunks(
    fn: Callable[[Float[Array, "n d"], Int[Array, " n"]], PyTree[Float[Array, " n"]]],
    h: Float[Array, "b l d"],
    x: Int[Array, "b l"],
    size: int,
) -> PyTree[Float[Array, "b l"]]:
    """fn over the b l tokens, `size` at a time in a loop whose body is recomputed in the backward
    pass (`jax.checkpoint`), so only one chunk's intermediates are ever live. The last chunk is
    padded with zeros, whose outputs are dropped."""
    b, l = x.shape
    n = -(-b * l // size)
    pad = n * size - b * l
    hs = jnp.pad(h.reshape(b * l, -1), ((0, pad), (0, 0))).reshape(n, size, -1)  # (n, size, d)
    xs = jnp.pad(x.reshape(b * l), (0, pad)).reshape(n, size)
    out = jax.lax.map(jax.checkpoint(lambda chunk: fn(*chunk)), (hs, xs))  # leaves (n, size)
    return jax.tree.map(lambda o: o.reshape(n * size)[: b * l].reshape(b, l), out)
