"""The bidirectional transformer mu_theta(z_t, t) of MD4 (MD4_MATH.md, "Network").

Tokens (V + 1 ids, the mask is V) -> embedding -> N adaLN-zero blocks conditioned on t (and a
class label) -> final adaLN LayerNorm -> a zero-initialised head to the padded vocabulary, so a
fresh model predicts the uniform distribution over V (log2(V) bits/token). Images use the same
network over their flattened sub-pixel sequence.

Blocks are stacked along a leading layer axis and run with `lax.scan`, unrolled by default
(`unroll_layers`): XLA then sees straight-line code, without the loop's stacked residual buffers,
their zero-fill and the dynamic slices into them, so steps are faster; rolled, compile time stays
flat in depth. `Remat.FULL` always rolls the loop: unrolled, XLA schedules every block's
recomputation ahead of the backward pass and the recomputation saves no memory.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import ExecutionConfig, ModelConfig, Remat
from md4_eqx.layers import (
    MLP,
    Attention,
    Conditioning,
    Embedding,
    Linear,
    activation,
    ada_norm,
    dropout,
    layer_keys,
)
from md4_eqx.parallel import Split


class Block(eqx.Module):
    """One adaLN-zero block (MD4_MATH.md, "Network"):
    h = x + gate_a * Attn(LN(x) (1 + scale_a) + shift_a);
    out = h + gate_m * MLP(LN(h) (1 + scale_m) + shift_m).

    `Remat.MINIMAL` recomputes the block's norms and its MLP half in the backward pass, which then
    keeps only x (float32), the attention's input, q, k, v, output and Attn(...) (compute dtype),
    and MLP(...) (compute dtype): h, both norms and the MLP's [b, l, hidden] intermediates come
    back from them, for two more MLP matmuls (on XLA's CPU backend only with the layers rolled:
    unrolled, it schedules the recomputation ahead of the backward pass). `Remat.NONE` keeps
    everything and recomputes nothing; `Remat.FULL` is applied to the whole block by
    `Transformer.features`.
    """

    ada: Linear  # zero-initialised: a fresh block is the identity
    attn: Attention
    mlp: MLP
    cfg: ModelConfig = eqx.field(static=True)
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, key: PRNGKeyArray):
        ka, km, kd = jax.random.split(key, 3)
        self.ada = Linear(cfg.cond_dim, 6 * cfg.width, key=kd, zero=True, bias=True)
        self.attn = Attention(cfg.width, cfg.num_heads, key=ka, rope_theta=cfg.rope_theta)
        # Depth-scaled init.
        self.mlp = MLP(cfg.width, cfg.hidden, cfg.mlp, key=km, scale=2.0 / cfg.num_layers)
        self.cfg, self.execution = cfg, execution

    def __call__(
        self, x: Float[Array, "b l d"], c: Float[Array, "b c"], keys: Key[Array, " b"] | None
    ) -> Float[Array, "b l d"]:
        dtype = self.execution.precision.dtype
        minimal = self.execution.remat is Remat.MINIMAL
        recompute = jax.checkpoint if minimal else lambda f: f
        norm = recompute(functools.partial(ada_norm, dtype=dtype))
        mods = self.ada(activation(self.cfg.mlp)(c))[:, None, :]  # (b, 1, 6 d)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)
        ka, km = (None, None) if keys is None else jax.vmap(jax.random.split, out_axes=1)(keys)
        a = self.attn(norm(x, shift_a, scale_a), self.execution.attention)  # (b, l, d), dtype

        @recompute
        def mlp_half(x, gate_a, a, shift_m, scale_m, mlp):
            h = x + gate_a * a.astype(jnp.float32)
            # (b, l, d) float32, (b, l, d) dtype
            return h, mlp(ada_norm(h, shift_m, scale_m, dtype))

        h, m = mlp_half(x, gate_a, dropout(a, self.cfg.dropout, ka), shift_m, scale_m, self.mlp)
        return h + gate_m * dropout(m, self.cfg.dropout, km).astype(jnp.float32)


class Transformer(eqx.Module):
    """mu_theta: (z_t, t, label) -> float32 logits over this device's slice of the padded
    vocabulary; `keys` (one per example) enable dropout."""

    embed: Embedding
    cond: Conditioning
    blocks: Block  # every array has a leading [num_layers] axis
    final_ada: Linear
    head: Linear
    cfg: ModelConfig = eqx.field(static=True)
    execution: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, execution: ExecutionConfig, *, key: PRNGKeyArray):
        ke, kc, kb, kf, kh = jax.random.split(key, 5)
        self.embed = Embedding(cfg.padded_vocab, cfg.width, key=ke)
        self.cond = Conditioning(cfg.cond_dim, cfg.num_classes, key=kc)
        self.blocks = eqx.filter_vmap(lambda k: Block(cfg, execution, key=k))(
            jax.random.split(kb, cfg.num_layers)
        )
        self.final_ada = Linear(cfg.cond_dim, 2 * cfg.width, key=kf, zero=True, bias=True)
        self.head = Linear(cfg.width, cfg.padded_vocab, key=kh, split=Split.COLUMN, zero=True)
        self.cfg, self.execution = cfg, execution

    def __call__(
        self,
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None = None,
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> Float[Array, "b l v_local"]:
        return self.head(self.features(z, t, labels, keys=keys))  # (b, l, padded_vocab / M)

    def features(
        self,
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None = None,
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> Float[Array, "b l d"]:
        """What the head reads: the last block's output after the final adaLN, in compute dtype."""
        c = self.cond(t, labels)  # (b, cond)
        x = self.embed(z)  # (b, l, d), float32 residual stream
        params, static = eqx.partition(self.blocks, eqx.is_array)

        def layer(x, inputs):
            block_params, i = inputs
            return eqx.combine(block_params, static)(x, c, layer_keys(keys, i)), None

        full = self.execution.remat is Remat.FULL
        if full:
            layer = jax.checkpoint(layer)
        unroll = self.execution.unroll_layers and not full  # see the module docstring
        x, _ = lax.scan(layer, x, (params, jnp.arange(self.cfg.num_layers)), unroll=unroll)
        mods = self.final_ada(activation(self.cfg.mlp)(c))[:, None, :]  # (b, 1, 2 d)
        shift, scale = jnp.split(mods, 2, axis=-1)
        return ada_norm(x, shift, scale, self.execution.precision.dtype)
