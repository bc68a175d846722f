"""MD4 and GenMD4 as one Equinox module: the network mu_theta plus the masking schedule."""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray, PyTree

from md4_eqx.config import Backbone, DiffusionConfig, ExecutionConfig, ModelConfig
from md4_eqx.parallel import vary_like
from md4_eqx.schedule import LearnableSchedule, MaskingSchedule
from md4_eqx.transformer import Transformer
from md4_eqx.unet import UNet

# Tokens per chunk of the loss's head (`MD4.readout`) when `ExecutionConfig.head_chunk` is 0: a
# chunk's float32 logits are 2048 x 50304 floats (412 MB) on OpenWebText's padded vocabulary.
# Each chunk also adds the head weight's gradient into its sum, a [d, V] pass whatever the
# chunk's size: on an accelerator, small chunks spend more time on that than on their matmuls
# (bench/RESULTS.md, "Step time by the TPU compiler's estimate"). A chunk is at most all the
# tokens of a device.
HEAD_CHUNK = 2048


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
        """mu_theta(z_t, t) as logits over this device's vocabulary slice (`md4_eqx.parallel`)."""
        return self.net(z, t, labels, keys=keys)

    def readout(
        self,
        fn: Callable[[Float[Array, "*n v_local"], Int[Array, "*n"]], PyTree[Float[Array, "*n"]]],
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None,
        x: Int[Array, "b l"],
        where: Bool[Array, "b l"],
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> PyTree[Float[Array, "b l"]]:
        """fn(logits, x) at the tokens where `where` holds, zeros elsewhere: what a loss needs of
        mu_theta(z_t, t), per token. The losses read log mu_theta(z_t, t)[x] only where z_t is
        masked (MD4_MATH.md, "Continuous-time NELBO"), so the transformer runs its head and `fn`
        (the vocabulary-parallel log-normaliser) only there: `selected_tokens`, `head_chunk`
        tokens at a time (0: HEAD_CHUNK), the masked tokens first and chunks holding none
        skipped. The [b, l, V] logits and their gradient never exist whole. `fn` maps any
        leading token axes, [b, l] or a chunk's [n]. The U-Net's head is its last convolution,
        over the whole image: it runs on every token, and `where` only zeroes the result."""
        if self.config.backbone is Backbone.UNET:
            out = fn(self.logits(z, t, labels, keys=keys), x)
            return jax.tree.map(lambda o: jnp.where(where, o, 0.0), out)
        h = self.net.features(z, t, labels, keys=keys)  # (b, l, d)
        head = vary_like(self.net.head, h)  # its gradient summed over `data` here, once
        size = self.execution.head_chunk or HEAD_CHUNK
        return selected_tokens(lambda h, x: fn(head(h), x), h, where, (x,), size)


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
    ever live. Differentiable; with `where` all true it is the whole of fn, chunk by chunk.

    Inside a shard_map, what fn closes over and differentiates (the head's weights) must already
    vary over the mesh axes that h varies over (`md4_eqx.parallel.vary_like`): otherwise fn
    casts it inside the `lax.cond`, and the gradient's sum over those axes, the cast's
    transpose, would wait there for devices whose chunk took the other branch."""
    b, seq = where.shape
    tokens = b * seq
    size = min(size, tokens)  # one chunk at most of all the tokens
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

    def zeros(s: jax.ShapeDtypeStruct) -> Array:  # typed as varying where fn's output is
        axes = s.manual_axis_type.varying if s.manual_axis_type else ()
        z = jnp.zeros(s.shape, s.dtype)
        return jax.lax.pcast(z, tuple(axes), to="varying") if axes else z

    @jax.checkpoint
    def chunk_out(chunk):
        h, picked, aux = chunk
        skip = lambda: jax.tree.map(zeros, shapes)  # noqa: E731
        return jax.lax.cond(jnp.any(picked), lambda: fn(h, *aux), skip)

    out = jax.lax.map(chunk_out, (hs, chosen, aux))  # leaves (count, size, ...)
    back = jnp.argsort(order)  # each token's place in the compacted order

    def scatter(o: Array) -> Array:  # (count, size, ...) -> (b, l, ...), zeros where not selected
        o = o.reshape(count * size, *o.shape[2:])[back][:tokens]
        return jnp.where(where.reshape(tokens, *[1] * (o.ndim - 1)), o, 0).reshape(
            b, seq, *o.shape[1:]
        )

    return jax.tree.map(scatter, out)
