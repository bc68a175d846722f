"""The VDM-style U-Net mu_theta(z_t, t) that MD4 trains on CIFAR-10 (MD4_MATH.md, "The paper's
configurations", CIFAR-10; DeepMind's md4/networks/unet.py, after google-research/vdm).

Each sub-pixel id (V + 1 ids, the mask is V) is embedded to `width` features and the C = 3
channels of a pixel are concatenated: [b, H, W, 3 width]. At full resolution (no down- or
upsampling): a 3x3 conv to `width` channels; `num_layers` residual blocks whose outputs are kept
as skips; a middle of residual block, one self-attention over the H W pixels, residual block;
`num_layers + 1` residual blocks each taking the concatenation with the matching skip; GroupNorm,
swish and a zero-initialised 3x3 conv to C x V logits per pixel, so a fresh U-Net predicts the
uniform distribution over V: log2(V) = 8 bits per dimension.

The reference uses one `feature_dim` (128) for the sub-pixel embedding, the channels and the
conditioning; here they are `width` (channels and embedding) and `cond_dim`.

Layout: Equinox convolutions are channels-first per example, so activations are [b, c, h, w] and
each layer is vmapped over the batch; the residual stream is float32. Every parameter is
replicated: each `model` device runs the whole U-Net on its batch slice and keeps its slice of the
padded vocabulary, the transformer's logits contract.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import UNET_CHANNELS as CHANNELS
from md4_eqx.config import UNET_GROUPS as GROUPS
from md4_eqx.config import ExecutionConfig, ModelConfig, Remat
from md4_eqx.kernels import attention
from md4_eqx.layers import (
    Conditioning,
    Linear,
    dropout,
    embedding_table,
    layer_keys,
    truncated_normal,
)
from md4_eqx.parallel import MODEL, vocab_offset


def conv2d(
    in_channels: int, out_channels: int, kernel: int, *, key: PRNGKeyArray, zero: bool = False
) -> eqx.nn.Conv2d:
    """A 'same'-padded conv initialised as Flax's nn.Conv (LeCun normal kernel, zero bias), or all
    zeros (`zero`), the reference's init for the last conv of a block and of the network."""
    # Only the layer's structure: its own (uniform) init would be drawn and thrown away.
    conv = eqx.filter_eval_shape(
        eqx.nn.Conv2d, in_channels, out_channels, kernel, padding="SAME", key=key
    )
    shape = conv.weight.shape  # (out, in, k, k)
    weight = (
        jnp.zeros(shape)
        if zero
        else truncated_normal(key, shape, fan_in=in_channels * kernel * kernel)
    )
    return eqx.tree_at(lambda c: (c.weight, c.bias), conv, (weight, jnp.zeros(conv.bias.shape)))


def apply(layer: eqx.Module, x: Float[Array, "b ..."], dtype: jnp.dtype) -> Float[Array, "b ..."]:
    """A per-example layer over the batch in `dtype` (float32 parameters cast for the call), to
    float32."""
    layer = jax.tree.map(lambda p: p.astype(dtype), layer)
    return jax.vmap(layer)(x.astype(dtype)).astype(jnp.float32)


def group_norm(channels: int) -> eqx.nn.GroupNorm:
    return eqx.nn.GroupNorm(GROUPS, channels, eps=1e-6)  # Flax GroupNorm's epsilon


class ResBlock(eqx.Module):
    """h = Conv(swish(GN(x))) + Dense(c);  out = skip(x) + ZeroConv(Dropout(swish(GN(h)))),
    with skip a 1x1 conv (a dense layer over channels) when the input has more channels, else
    identity."""

    norm1: eqx.nn.GroupNorm
    conv1: eqx.nn.Conv2d
    cond: Linear  # zero-initialised, no bias
    norm2: eqx.nn.GroupNorm
    conv2: eqx.nn.Conv2d  # zero-initialised: a fresh block is the identity (or its skip)
    skip: eqx.nn.Conv2d | None
    cfg: ModelConfig = eqx.field(static=True)
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(
        self, cfg: ModelConfig, execution: ExecutionConfig, in_channels: int, *, key: PRNGKeyArray
    ):
        k1, kc, k2, ks = jax.random.split(key, 4)
        width = cfg.width
        self.norm1 = group_norm(in_channels)
        self.conv1 = conv2d(in_channels, width, 3, key=k1)
        self.cond = Linear(cfg.cond_dim, width, key=kc, zero=True)
        self.norm2 = group_norm(width)
        self.conv2 = conv2d(width, width, 3, key=k2, zero=True)
        self.skip = conv2d(in_channels, width, 1, key=ks) if in_channels != width else None
        self.cfg, self.execution = cfg, execution

    def __call__(
        self, x: Float[Array, "b ci h w"], c: Float[Array, "b cond"], keys: Key[Array, " b"] | None
    ) -> Float[Array, "b co h w"]:
        dtype = self.execution.precision.dtype
        h = apply(self.conv1, jax.nn.swish(jax.vmap(self.norm1)(x)), dtype)  # (b, width, h, w)
        h = h + self.cond(c)[:, :, None, None]
        h = dropout(jax.nn.swish(jax.vmap(self.norm2)(h)), self.cfg.dropout, keys)
        h = apply(self.conv2, h, dtype)
        return h + (x if self.skip is None else apply(self.skip, x, dtype))


class SelfAttention(eqx.Module):
    """x + Attn(GN(x)) over the h w pixels, with biased q, k, v and output projections."""

    norm: eqx.nn.GroupNorm
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    cfg: ModelConfig = eqx.field(static=True)
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, key: PRNGKeyArray):
        self.norm = group_norm(cfg.width)
        keys = jax.random.split(key, 4)
        self.wq, self.wk, self.wv, self.wo = (
            Linear(cfg.width, cfg.width, key=k, bias=True) for k in keys
        )
        self.cfg, self.execution = cfg, execution

    def __call__(self, x: Float[Array, "b d h w"]) -> Float[Array, "b d h w"]:
        b, d, height, width = x.shape
        dtype = self.execution.precision.dtype
        n = jax.vmap(self.norm)(x).reshape(b, d, -1).transpose(0, 2, 1).astype(dtype)  # (b, hw, d)

        def heads(proj: Linear) -> Float[Array, "b hw heads hd"]:
            return proj(n, dtype).reshape(b, height * width, self.cfg.num_heads, -1)

        q, k, v = heads(self.wq), heads(self.wk), heads(self.wv)
        out = attention(q, k, v, impl=self.execution.attention)  # (b, hw, heads, hd)
        out = self.wo(out.reshape(b, height * width, d))  # (b, hw, d), float32
        return x + out.transpose(0, 2, 1).reshape(b, d, height, width)


class UNet(eqx.Module):
    """mu_theta: (z_t, t, label) -> float32 logits over this device's slice of the padded
    vocabulary; `keys` (one per example) enable dropout."""

    embed: Float[Array, "ids width"]  # V + 1 rows: the sub-pixel values and the mask
    cond: Conditioning
    conv_in: eqx.nn.Conv2d
    down: ResBlock  # every array has a leading [num_layers] axis
    mid1: ResBlock
    attn: SelfAttention
    mid2: ResBlock
    up: ResBlock  # every array has a leading [num_layers + 1] axis
    norm_out: eqx.nn.GroupNorm
    conv_out: eqx.nn.Conv2d  # zero-initialised: a fresh U-Net predicts uniform logits
    cfg: ModelConfig = eqx.field(static=True)
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, key: PRNGKeyArray):
        ke, kc, ki, kd, k1, ka, k2, ku, ko = jax.random.split(key, 9)
        width = cfg.width
        self.embed = embedding_table(ke, cfg.vocab_size + 1, width)
        self.cond = Conditioning(cfg.cond_dim, cfg.num_classes, key=kc)
        self.conv_in = conv2d(CHANNELS * width, width, 3, key=ki)

        # `count` blocks on a leading [count] axis.
        def stack(in_channels: int, key: PRNGKeyArray, count: int) -> ResBlock:
            return eqx.filter_vmap(lambda k: ResBlock(cfg, execution, in_channels, key=k))(
                jax.random.split(key, count)
            )

        self.down = stack(width, kd, cfg.num_layers)
        self.mid1 = ResBlock(cfg, execution, width, key=k1)
        self.attn = SelfAttention(cfg, execution, key=ka)
        self.mid2 = ResBlock(cfg, execution, width, key=k2)
        self.up = stack(2 * width, ku, cfg.num_layers + 1)
        self.norm_out = group_norm(width)
        self.conv_out = conv2d(width, CHANNELS * cfg.vocab_size, 3, key=ko, zero=True)
        self.cfg, self.execution = cfg, execution

    def _blocks(
        self,
        blocks: ResBlock,
        h: Float[Array, "b d hh ww"],
        skips: Float[Array, "n b d hh ww"] | None,
        c: Float[Array, "b cond"],
        keys: Key[Array, " b"] | None,
        first: int,
    ) -> Float[Array, "n b d hh ww"]:
        """Run the n stacked blocks in turn (block i gets dropout keys `first + i`); with `skips`,
        block i takes [h, skips[i]] concatenated over channels. Returns every block's output.

        Any recomputation (`Remat.MINIMAL` or `Remat.FULL`: a ResBlock has no MLP half to
        recompute alone) recomputes whole blocks in the backward pass, and then the loop is rolled,
        as the transformer's: unrolled, XLA schedules the recomputation ahead of the backward pass
        and it saves nothing. Otherwise it is unrolled: XLA's CPU backend runs a convolution inside
        a loop body many times slower."""
        params, static = eqx.partition(blocks, eqx.is_array)

        def layer(h, inputs):
            block_params, skip, i = inputs
            x = h if skip is None else jnp.concatenate([h, skip], axis=1)  # (b, d or 2 d, hh, ww)
            h = eqx.combine(block_params, static)(x, c, layer_keys(keys, first + i))
            return h, h

        recompute = self.execution.remat is not Remat.NONE
        if recompute:
            layer = jax.checkpoint(layer)
        count = jax.tree.leaves(params)[0].shape[0]
        return lax.scan(layer, h, (params, skips, jnp.arange(count)), unroll=not recompute)[1]

    def __call__(
        self,
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None = None,
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> Float[Array, "b l v_local"]:
        cfg, dtype = self.cfg, self.execution.precision.dtype
        side = math.isqrt(cfg.seq_len // CHANNELS)  # ModelConfig checks seq_len = 3 side^2
        b, num = z.shape[0], cfg.num_layers
        c = self.cond(t, labels)  # (b, cond)
        # (b, h, w, 3 d), the sub-pixels in (h, w, c) order
        x = self.embed[z].reshape(b, side, side, CHANNELS * cfg.width)
        h0 = apply(self.conv_in, x.transpose(0, 3, 1, 2), dtype)  # (b, d, h, w)
        down = self._blocks(self.down, h0, None, c, keys, first=0)  # (num, b, d, h, w)
        skips = jnp.concatenate([h0[None], down])
        # The middle: block, attention, block.
        h = self.attn(self.mid1(skips[-1], c, layer_keys(keys, num)))
        h = self.mid2(h, c, layer_keys(keys, num + 1))
        # The up path takes the skips last-in first-out, ending with the input conv's output.
        h = self._blocks(self.up, h, skips[::-1], c, keys, first=num + 2)[-1]
        h = apply(self.conv_out, jax.nn.swish(jax.vmap(self.norm_out)(h)), dtype)  # (b, 3 V, h, w)
        logits = h.transpose(0, 2, 3, 1).reshape(b, side * side * CHANNELS, cfg.vocab_size)
        # Zero logits on the padded ids (the loss's normaliser excludes them), then this device's
        # slice.
        full = jnp.pad(logits, ((0, 0), (0, 0), (0, cfg.padded_vocab - cfg.vocab_size)))
        v_local = cfg.padded_vocab // lax.axis_size(MODEL)
        return lax.dynamic_slice_in_dim(full, vocab_offset(v_local), v_local, axis=-1)
