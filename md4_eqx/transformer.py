"""The bidirectional transformer mu_theta(z_t, t) of MD4 (MD4_MATH.md, "Network").

Tokens (V + 1 ids, the mask is V) -> embedding -> N adaLN-zero blocks conditioned on t (and a
class label) -> final adaLN LayerNorm -> a zero-initialised head to the padded vocabulary, so a
fresh model predicts the uniform distribution over V (log2(V) bits/token). Images use the same
network over their flattened sub-pixel sequence.

Blocks are stacked along a leading layer axis and run with `lax.scan`, unrolled by default
(`unroll_layers`): XLA then sees straight-line code, without the loop's stacked residual buffers,
their zero-fill and the dynamic slices into them (CPU: 8-10% faster steps, bench/RESULTS.md); rolled,
compile time stays flat in depth (MD4-S on CPU: 19 s rolled against 34 s unrolled). With `remat` the
loop is always rolled: unrolled, XLA schedules every block's recomputation ahead of the backward pass
and remat saves nothing (MD4-S on CPU: 3058 MiB per example unrolled against 394 rolled).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int, Key, PRNGKeyArray

from md4_eqx.config import ExecutionConfig, ModelConfig
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
    """One adaLN-zero block:
    h = x + gate_a * Attn(LN(x) (1 + scale_a) + shift_a);  out = h + gate_m * MLP(LN(h) (1 + scale_m) + shift_m).

    What the backward pass keeps of a block, without `remat`: x (float32), the attention's input,
    q, k, v, output and Attn(...) (compute dtype), and MLP(...) (compute dtype). h, both norms and
    the MLP's [b, l, hidden] intermediates are recomputed from them (two more MLP matmuls). MD4-S
    on one v5e chip, with `head_chunk` 2048, then fits 47 examples in bfloat16 and 32 in float32
    (XLA's attention), where it fit 22 and 23 without (bench/fit_tpu.py).
    """

    ada: Linear  # zero-initialised: a fresh block is the identity
    attn: Attention
    mlp: MLP
    cfg: ModelConfig = eqx.field(static=True)
    run: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, run: ExecutionConfig, *, key: PRNGKeyArray):
        ka, km, kd = jax.random.split(key, 3)
        self.ada = Linear(cfg.cond_dim, 6 * cfg.width, key=kd, zero=True, bias=True)
        self.attn = Attention(cfg.width, cfg.num_heads, key=ka, rope_theta=cfg.rope_theta)
        self.mlp = MLP(
            cfg.width, cfg.hidden, cfg.mlp, key=km, scale=2.0 / cfg.num_layers
        )  # depth-scaled init
        self.cfg, self.run = cfg, run

    def __call__(
        self, x: Float[Array, "b l d"], c: Float[Array, "b c"], keys: Key[Array, " b"] | None
    ) -> Float[Array, "b l d"]:
        dtype = self.run.precision.dtype
        mods = self.ada(activation(self.cfg.mlp)(c))[:, None, :]  # (b, 1, 6 d)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mods, 6, axis=-1)
        ka, km = (None, None) if keys is None else jax.vmap(jax.random.split, out_axes=1)(keys)
        a = self.attn(ada_norm(x, shift_a, scale_a, dtype), self.run.attention)  # (b, l, d), dtype

        @jax.checkpoint
        def mlp_half(
            x, gate_a, a, shift_m, scale_m, mlp
        ):  # h, its norm and the MLP's hidden units are recomputed
            h = x + gate_a * a.astype(jnp.float32)
            return h, mlp(
                ada_norm(h, shift_m, scale_m, dtype)
            )  # (b, l, d) float32, (b, l, d) dtype

        h, m = mlp_half(x, gate_a, dropout(a, self.cfg.dropout, ka), shift_m, scale_m, self.mlp)
        return h + gate_m * dropout(m, self.cfg.dropout, km).astype(jnp.float32)


class Transformer(eqx.Module):
    """mu_theta: (z_t, t, label) -> float32 logits over this device's slice of the padded vocabulary;
    `keys` (one per example) enable dropout."""

    embed: Embedding
    cond: Conditioning
    blocks: Block  # every array has a leading [num_layers] axis
    final_ada: Linear
    head: Linear
    cfg: ModelConfig = eqx.field(static=True)
    run: ExecutionConfig = eqx.field(static=True)

    def __init__(self, cfg: ModelConfig, run: ExecutionConfig, *, key: PRNGKeyArray):
        ke, kc, kb, kf, kh = jax.random.split(key, 5)
        self.embed = Embedding(cfg.padded_vocab, cfg.width, key=ke)
        self.cond = Conditioning(cfg.cond_dim, cfg.num_classes, key=kc)
        self.blocks = eqx.filter_vmap(lambda k: Block(cfg, run, key=k))(
            jax.random.split(kb, cfg.num_layers)
        )
        self.final_ada = Linear(cfg.cond_dim, 2 * cfg.width, key=kf, zero=True, bias=True)
        self.head = Linear(cfg.width, cfg.padded_vocab, key=kh, split=Split.COLUMN, zero=True)
        self.cfg, self.run = cfg, run

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

        if self.run.remat:
            layer = jax.checkpoint(layer)
        unroll = self.run.unroll_layers and not self.run.remat  # see the module docstring
        x, _ = lax.scan(layer, x, (params, jnp.arange(self.cfg.num_layers)), unroll=unroll)
        shift, scale = jnp.split(
            self.final_ada(activation(self.cfg.mlp)(c))[:, None, :], 2, axis=-1
        )
        return ada_norm(x, shift, scale, self.run.precision.dtype)
