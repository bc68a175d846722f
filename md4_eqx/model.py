"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray, PyTree

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
        everywhere = jnp.ones(x.shape, bool)
        return selected_tokens(
            lambda h, x: fn(self.net.head(h), x), h, everywhere, (x,), self.execution.head_chunk
        )


def selected_tokens(
    fn: Callable[..., PyTree[Array]],
    h: Float[Array, "b l d"],
    where: Bool[Array, "b l"],
    aux: tuple[Array, ...],
    size: int,
) -> PyTree[Array]:
    """fn(h, *aux) evaluated only on the tokens where `where` holds: fn's value there, zeros
    elsewhere. fn maps a chunk, h [n, d] and each aux leaf [n, ...], to a pytree of [n, ...]
    arrays; aux leaves are [b, l, ...]. The b l tokens are compacted (a stable argsort puts the
    selected ones first), split into chunks of `size`, and each chunk runs under a `lax.cond`
    that skips it when it holds no selected token. The loop's body is recomputed in the backward
    pass (`jax.checkpoint`), so only one chunk's intermediates (the head's [size, V] logits) are
    ever live. Differentiable; with `where` all true it is the whole of fn, chunk by chunk."""
    b, seq = where.shape
    tokens = b * seq
    count = -(-tokens // size)
    pad = count * size - tokens
    # Padding tokens are not selected, so they sort last with the unselected ones.
    selected = jnp.pad(where.reshape(tokens), (0, pad))  # (count * size,)
    order = jnp.argsort(~selected, stable=True)  # selected tokens first, in their order

    def compact(a: Array) -> Array:  # (b, l, ...) -> (count, size, ...), in `order`
        flat = a.reshape(tokens, *a.shape[2:])
        flat = jnp.pad(flat, ((0, pad),) + ((0, 0),) * (a.ndim - 2))
        return flat[order].reshape(count, size, *a.shape[2:])

    hs, chosen, aux = compact(h), selected[order].reshape(count, size), tuple(map(compact, aux))
    first = jax.tree.map(lambda a: a[0], (hs, aux))
    shapes = jax.eval_shape(lambda h, aux: fn(h, *aux), *first)

    @jax.checkpoint
    def chunk_out(chunk):
        h, picked, aux = chunk

        def skip():
            return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

        return jax.lax.cond(jnp.any(picked), lambda: fn(h, *aux), skip)

    out = jax.lax.map(chunk_out, (hs, chosen, aux))  # leaves (count, size, ...)
    back = jnp.argsort(order)  # each token's place in the compacted order

    def scatter(o: Array) -> Array:  # (count, size, ...) -> (b, l, ...), zeros where not selected
        o = o.reshape(count * size, *o.shape[2:])[back][:tokens]
        return jnp.where(where.reshape(tokens, *[1] * (o.ndim - 1)), o, 0).reshape(
            b, seq, *o.shape[1:]
        )

    return jax.tree.map(scatter, out)
