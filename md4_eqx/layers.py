"""The networks' layers, written for the local slice of a tensor-parallel mesh; the time (and
class) conditioning both backbones share is here too.

Each layer sees its own slice of a `model`-split weight (see `md4_eqx.parallel`): a COLUMN layer
produces a slice of the features, a ROW layer sums partial products over `model`; on a (1, 1)
mesh the slices are whole. Matmuls take their inputs in the configured compute dtype and
accumulate in float32; the blocks' projections return the compute dtype, so what the backward
pass keeps of them is that size, while the residual stream stays float32.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import MLPKind
from md4_eqx.kernels import Impl, attention
from md4_eqx.parallel import MODEL, Sharded, Split, psum, vocab_offset


def truncated_normal(
    key: PRNGKeyArray, shape: tuple[int, ...], fan_in: int, scale: float = 1.0
) -> Array:
    """Fan-in truncated normal with variance scale / fan_in (Flax's variance_scaling, e.g. LeCun
    normal). Drawn flat and reshaped: the same numbers as a draw of `shape` (JAX's threefry
    counts the elements in row-major order), but a rank-1 draw compiles in a quarter of the time
    of a rank-4 one, which is most of the time it takes to build a model outside `jit`."""
    std = math.sqrt(scale / fan_in) / 0.87962566103423978  # std of N(0,1) truncated to [-2, 2]
    return std * jax.random.truncated_normal(
        key, -2.0, 2.0, (math.prod(shape),), jnp.float32
    ).reshape(shape)


def embedding_table(key: PRNGKeyArray, rows: int, width: int) -> Float[Array, "rows width"]:
    """Flax nn.Embed's init: normal with variance 1 / width."""
    return jax.random.normal(key, (rows, width)) / math.sqrt(width)


class Linear(Sharded):
    """y = x W (+ b), W of shape [in, out], split over `model` as `split` says."""

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"] | None
    split: Split = eqx.field(static=True)

    def __init__(
        self,
        fan_in: int,
        fan_out: int,
        *,
        key: PRNGKeyArray,
        split: Split = Split.REPLICATED,
        scale: float = 1.0,
        zero: bool = False,
        bias: bool = False,
    ):
        if bias and split is not Split.REPLICATED:
            raise ValueError(f"a bias is only supported on replicated layers, not {split=}")
        shape = (fan_in, fan_out)
        self.weight = jnp.zeros(shape) if zero else truncated_normal(key, shape, fan_in, scale)
        self.bias = jnp.zeros((fan_out,)) if bias else None
        self.split = split

    def __call__(
        self, x: Float[Array, "*b fan_in"], dtype: jnp.dtype = jnp.float32
    ) -> Float[Array, "*b fan_out"]:
        """x W (+ b), accumulated in float32 (and summed over `model`), returned in `dtype`."""
        y = jnp.einsum(
            "...i,io->...o", x, self.weight.astype(x.dtype), preferred_element_type=jnp.float32
        )
        if self.split is Split.ROW:
            y = psum(y, MODEL)  # partial sums over the split input features
        y = y if self.bias is None else y + self.bias[(None,) * (y.ndim - 1)]
        return y.astype(dtype)


class Embedding(Sharded):
    """A vocabulary-parallel embedding table [padded_vocab, width]: rows split over `model`."""

    weight: Float[Array, "vocab width"]
    split: Split = eqx.field(static=True, default=Split.VOCAB)

    def __init__(self, num: int, width: int, *, key: PRNGKeyArray):
        self.weight = embedding_table(key, num, width)

    def __call__(self, ids: Int[Array, "*b"]) -> Float[Array, "*b width"]:
        rows = self.weight.shape[0]
        local = ids - vocab_offset(rows)
        inside = (local >= 0) & (local < rows)
        found = jnp.where(inside[..., None], self.weight[jnp.clip(local, 0, rows - 1)], 0.0)
        return psum(found, MODEL)  # each id lives on exactly one device


def layer_norm(x: Float[Array, "*b d"]) -> Float[Array, "*b d"]:
    """LayerNorm without scale or bias (adaLN supplies them), in float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5)  # DeepMind's norm_eps (md4/networks/transformer.py)


def ada_norm(
    x: Float[Array, "b l d"],
    shift: Float[Array, "b 1 d"],
    scale: Float[Array, "b 1 d"],
    dtype: jnp.dtype,
) -> Float[Array, "b l d"]:
    """adaLN: LN(x) (1 + scale) + shift, in `dtype` (MD4_MATH.md, "Network")."""
    return (layer_norm(x) * (1 + scale) + shift).astype(dtype)


def activation(kind: MLPKind):
    """The gate activation of a GLU-family MLP; adaLN uses the same one (MD4_MATH.md)."""
    kinds = {MLPKind.GLU: jax.nn.sigmoid, MLPKind.SWIGLU: jax.nn.swish, MLPKind.GEGLU: jax.nn.gelu}
    return kinds[kind]


def rope(x: Float[Array, "b l h d"], theta: float) -> Float[Array, "b l h d"]:
    """Rotary position embedding over the head dim (pairs (i, i + d/2))."""
    seq, half = x.shape[1], x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (d/2,)
    angles = jnp.arange(seq, dtype=jnp.float32)[:, None] * freqs[None, :]  # (l, d/2)
    angles = angles[None, :, None, :]  # (1, l, 1, d/2)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def dropout(
    x: Float[Array, " b *rest"], rate: float, keys: Key[Array, " b"] | None
) -> Float[Array, " b *rest"]:
    """Inverted dropout with one key per example (keys=None: inference, identity)."""
    if keys is None or rate == 0.0:
        return x
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def layer_keys(keys: Key[Array, " b"] | None, i: Int[Array, ""] | int) -> Key[Array, " b"] | None:
    """Per-example dropout keys of layer `i` (None stays None: inference)."""
    return None if keys is None else jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)


class Attention(eqx.Module):
    """Bidirectional multi-head self-attention with RoPE and no biases; heads split over `model`."""

    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    head_dim: int = eqx.field(static=True)
    rope_theta: float = eqx.field(static=True)

    def __init__(self, width: int, num_heads: int, *, key: PRNGKeyArray, rope_theta: float):
        kq, kk, kv, ko = jax.random.split(key, 4)
        self.wq, self.wk, self.wv = (
            Linear(width, width, key=k, split=Split.COLUMN) for k in (kq, kk, kv)
        )
        self.wo = Linear(width, width, key=ko, split=Split.ROW)
        self.head_dim = width // num_heads
        self.rope_theta = rope_theta

    def __call__(self, x: Float[Array, "b l d"], impl: Impl) -> Float[Array, "b l d"]:
        b, seq, _ = x.shape

        def heads(proj: Linear) -> Float[Array, "b l h hd"]:
            return proj(x, x.dtype).reshape(b, seq, -1, self.head_dim)  # local heads

        q, k, v = (
            rope(heads(self.wq), self.rope_theta),
            rope(heads(self.wk), self.rope_theta),
            heads(self.wv),
        )
        out = attention(q, k, v, impl=impl)  # (b, l, h_local, hd)
        return self.wo(out.reshape(b, seq, -1), x.dtype)  # in x's (compute) dtype


class MLP(eqx.Module):
    """Gated MLP W2(act(W1 x) * W3 x); hidden units split over `model`."""

    w1: Linear
    w3: Linear
    w2: Linear
    kind: MLPKind = eqx.field(static=True)

    def __init__(self, width: int, hidden: int, kind: MLPKind, *, key: PRNGKeyArray, scale: float):
        k1, k2, k3 = jax.random.split(key, 3)
        self.w1 = Linear(width, hidden, key=k1, split=Split.COLUMN, scale=scale)
        self.w3 = Linear(width, hidden, key=k3, split=Split.COLUMN, scale=scale)
        self.w2 = Linear(hidden, width, key=k2, split=Split.ROW, scale=scale)
        self.kind = kind

    def __call__(self, x: Float[Array, "b l d"]) -> Float[Array, "b l d"]:
        """In x's (compute) dtype."""
        return self.w2(activation(self.kind)(self.w1(x, x.dtype)) * self.w3(x, x.dtype), x.dtype)


def time_embedding(t: Float[Array, " b"], dim: int) -> Float[Array, "b dim"]:
    """Sinusoidal embedding of 1000 t: half sin, half cos, frequencies
    exp(-k log(1e4) / (dim/2 - 1))."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = 1000.0 * t[:, None] * freqs[None, :]  # (b, dim/2)
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class Conditioning(eqx.Module):
    """c = Dense(cond)(swish(Dense(4 cond)([time_emb(t), class_emb(y)]))). With `num_classes` > 0
    the class embedding has num_classes + 1 rows: labels 0..num_classes - 1 and the null class
    `num_classes` (no label), which label dropout trains and classifier-free guidance uses."""

    class_embed: Float[Array, "classes_and_null cond"] | None
    dense1: Linear
    dense2: Linear
    dim: int = eqx.field(static=True)

    def __init__(self, dim: int, num_classes: int, *, key: PRNGKeyArray):
        kc, k1, k2 = jax.random.split(key, 3)
        self.class_embed = embedding_table(kc, num_classes + 1, dim) if num_classes else None
        # Its input: [time_emb, class_emb].
        self.dense1 = Linear(dim * (2 if num_classes else 1), 4 * dim, key=k1, bias=True)
        self.dense2 = Linear(4 * dim, dim, key=k2, bias=True)
        self.dim = dim

    def __call__(
        self, t: Float[Array, " b"], labels: Int[Array, " b"] | None
    ) -> Float[Array, "b c"]:
        h = time_embedding(t, self.dim)
        if self.class_embed is not None:
            if labels is None:
                raise ValueError("this model is class-conditional: pass `labels`")
            h = jnp.concatenate([h, self.class_embed[labels]], axis=-1)
        return self.dense2(jax.nn.swish(self.dense1(h)))
