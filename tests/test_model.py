"""The transformer backbone: shapes, zero head, precision, recomputation, unrolling, dropout,
runtime type checks."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from jaxtyping import TypeCheckError

from md4_eqx.config import (
    ExecutionConfig,
    MLPKind,
    ModelConfig,
    Precision,
    Remat,
    config_from_json,
    config_to_json,
    preset,
)
from md4_eqx.errors import ConfigError
from md4_eqx.model import MD4, selected_tokens
from md4_eqx.parallel import MODEL, make_mesh, param_specs, shard_map_modules

MESH = make_mesh(1, 1, jax.devices()[:1])


def small(**overrides) -> ModelConfig:
    fields = dict(vocab_size=50, seq_len=24, width=32, num_layers=2, num_heads=4, cond_dim=16)
    return ModelConfig(**(fields | overrides))


def run(**overrides) -> ExecutionConfig:
    """How the small model is computed: float32 unless overridden."""
    return ExecutionConfig(**(dict(precision=Precision.FLOAT32) | overrides))


def logits_fn(model: MD4, z, t, labels=None, keys=None):
    """model.logits on the (1, 1) mesh, jitted, as training and sampling call it."""

    def specs(model, z, t, labels, keys):
        batch = lambda a: None if a is None else P()  # noqa: E731
        return (param_specs(model), P(), P(), batch(labels), batch(keys))

    def fn(model, z, t, labels, keys):
        return model.logits(z, t, labels, keys=keys)

    logits_spec = P(None, None, MODEL)  # the vocabulary is split over `model`
    return eqx.filter_jit(shard_map_modules(fn, MESH, specs, logits_spec))(
        model, z, t, labels, keys
    )


def with_random_head(model: MD4, key) -> MD4:
    """Fill the zero-initialised weights (adaLN and head) so that t, labels and dropout matter."""
    where = lambda m: (m.net.head.weight, m.net.final_ada.weight, m.net.blocks.ada.weight)  # noqa: E731
    keys = jax.random.split(key, 3)
    return eqx.tree_at(
        where,
        model,
        [0.3 * jax.random.normal(k, w.shape) for k, w in zip(keys, where(model), strict=True)],
    )


def test_paper_sizes():
    cfg = preset("md4-s").model
    assert cfg.hidden == 2048  # 2/3 of 4 * 768 rounded to a multiple of 32
    assert cfg.padded_vocab == 50304 and cfg.padded_vocab % 128 == 0 and cfg.padded_vocab > 50257
    assert cfg.head_dim == 64


@pytest.mark.parametrize("mlp", list(MLPKind), ids=lambda k: k.value)
def test_fresh_model_is_uniform(getkey, mlp):
    cfg = small(mlp=mlp)
    model = MD4(cfg, execution=run(), key=getkey())
    z = jax.random.randint(getkey(), (3, cfg.seq_len), 0, cfg.vocab_size + 1)
    logits = logits_fn(model, z, jnp.array([0.1, 0.5, 0.9]))
    assert logits.shape == (3, cfg.seq_len, cfg.padded_vocab) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(logits, 0.0)  # zero head: uniform over V


def test_bfloat16_compute_matches_float32(getkey):
    key, head_key = getkey(), getkey()
    z = jax.random.randint(getkey(), (2, 24), 0, 51)
    t = jnp.array([0.3, 0.8])
    out = {}
    for precision in Precision:
        model = with_random_head(
            MD4(small(), execution=run(precision=precision), key=key), head_key
        )
        out[precision] = logits_fn(model, z, t)
        assert all(
            leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array))
        )
    f32, bf16 = out[Precision.FLOAT32], out[Precision.BFLOAT16]
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); a few roundings through 2
    # blocks and a 32-wide head of unit-variance weights: a few percent of the logits' scale.
    scale = float(jnp.std(f32))
    np.testing.assert_allclose(bf16, f32, atol=0.05 * scale)
    assert not np.allclose(bf16, f32, atol=1e-6)  # it really computed in bfloat16


def test_remat_policies_give_the_same_loss_and_gradients_from_fewer_temporaries(getkey):
    """Each recomputation policy and a rolled layer loop change how the step is computed, not
    what it computes: the same loss and gradients, dropout included (a recomputed block draws
    the same masks). Recomputing frees temporaries: FULL against NONE as configured by default;
    MINIMAL against NONE with the loop rolled, since with the layers unrolled XLA's CPU backend
    schedules the MLP halves' recomputation ahead of the backward pass, where it saves nothing.
    A policy that were ignored would compile to NONE's temporaries."""
    cfg = small(width=64, seq_len=64, dropout=0.1)
    key, head_key = getkey(), getkey()
    z = jax.random.randint(getkey(), (4, cfg.seq_len), 0, cfg.vocab_size + 1)
    t = jnp.array([0.2, 0.4, 0.6, 0.8])
    keys = jax.random.split(getkey(), 4)
    ways = {
        "none": run(),
        "full": run(remat=Remat.FULL),
        "none-rolled": run(unroll_layers=False),
        "minimal-rolled": run(remat=Remat.MINIMAL, unroll_layers=False),
    }
    losses, grads, temp = {}, {}, {}
    for name, execution in ways.items():
        model = with_random_head(MD4(cfg, execution=execution, key=key), head_key)
        params, static = eqx.partition(model, eqx.is_array)

        def loss(p, static=static):
            return jnp.sum(jnp.sin(logits_fn(eqx.combine(p, static), z, t, keys=keys)))

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        losses[name], grad = compiled(params)
        grads[name] = jax.tree.leaves(grad)
        temp[name] = compiled.memory_analysis().temp_size_in_bytes
    for name in ways:
        # Recomputation may fuse differently: float32 rounding, relative to each leaf's scale.
        np.testing.assert_allclose(losses[name], losses["none"], rtol=1e-5)
        for a, b in zip(grads[name], grads["none"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
    assert temp["full"] < 0.8 * temp["none"], temp  # 0.66 here
    assert temp["minimal-rolled"] < 0.85 * temp["none-rolled"], temp  # 0.76 here


def test_dropout_needs_keys_and_is_per_example(getkey):
    model = with_random_head(MD4(small(dropout=0.5), execution=run(), key=getkey()), getkey())
    z = jnp.tile(jax.random.randint(getkey(), (1, 24), 0, 51), (2, 1))
    t = jnp.array([0.5, 0.5])
    eval_out = logits_fn(model, z, t)
    np.testing.assert_array_equal(eval_out, logits_fn(model, z, t))  # no keys: deterministic
    keys = jax.random.split(getkey(), 2)
    train_out = logits_fn(model, z, t, keys=keys)
    assert not np.allclose(train_out, eval_out)
    assert not np.allclose(train_out[0], train_out[1])  # each example draws its own mask
    same_keys = jnp.stack([keys[0], keys[0]])
    out = logits_fn(model, z, t, keys=same_keys)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)


def test_class_embedding_changes_the_output(getkey):
    model = with_random_head(MD4(small(num_classes=10), execution=run(), key=getkey()), getkey())
    z = jnp.full((2, 24), 50)
    out = logits_fn(model, z, jnp.array([0.5, 0.5]), jnp.array([1, 7]))
    assert not np.allclose(out[0], out[1])


def test_runtime_type_checks_are_on(getkey):
    """jaxtyping + beartype check public signatures under pytest: float tokens are refused."""
    from md4_eqx.layers import layer_norm, rope

    with pytest.raises(TypeCheckError):
        layer_norm(jnp.zeros((3,), jnp.int32))
    with pytest.raises(TypeCheckError):
        rope(jnp.zeros((2, 3, 4)), 10_000.0)  # missing the head axis


@pytest.mark.parametrize(
    "make, fields, message",
    [
        (small, dict(width=30, num_heads=4), "multiple of"),
        (small, dict(dropout=1.0), "dropout"),
        (small, dict(num_layers=0), "num_layers"),
        (run, dict(head_chunk=-1), "head_chunk=-1"),
    ],
)
def test_config_errors_name_the_value(make, fields, message):
    with pytest.raises(ConfigError, match=message):
        make(**fields)


def test_a_saved_enum_value_this_code_does_not_know_is_a_config_error():
    """A checkpoint from before `Remat` stored `remat: false`: one line naming the choices."""
    saved = config_to_json(preset("tiny"))
    assert config_from_json(saved) == preset("tiny")
    saved["execution"]["remat"] = False
    with pytest.raises(
        ConfigError, match="^execution.remat=False is not one of: none, minimal, full$"
    ):
        config_from_json(saved)


@pytest.mark.parametrize("size", [5, 7, 96], ids=["size5", "size7", "one-chunk"])
def test_selected_tokens_equal_fn_where_selected(getkey, size):
    """fn on the selected tokens only, zeros elsewhere, and the same gradient as the dense
    fn masked afterwards. Two examples select nothing, so whole chunks are skipped; 7 divides
    no part of the 4 x 12 tokens, so the last chunk is padded."""
    b, seq, d, v = 4, 12, 8, 6
    h = jax.random.normal(getkey(), (b, seq, d))
    w = jax.random.normal(getkey(), (d, v))
    x = jax.random.randint(getkey(), (b, seq), 0, v)
    where = jax.random.bernoulli(getkey(), 0.4, (b, seq)).at[1:3].set(False)

    def fn(h, x, w):  # a pytree of per-token values, as the loss heads give
        logits = h @ w  # (n, v)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), x[..., None], -1)[..., 0]
        return logp, jnp.tanh(logits)

    def sparse(h, w):
        return selected_tokens(lambda h, x: fn(h, x, w), h, where, (x,), size)

    def dense(h, w):  # every token, then masked
        def masked(o):
            o = o.reshape(b, seq, *o.shape[1:])
            return jnp.where(where.reshape(b, seq, *[1] * (o.ndim - 2)), o, 0.0)

        return jax.tree.map(masked, fn(h.reshape(b * seq, d), x.reshape(b * seq), w))

    def total(outs):
        logp, probs = outs
        return jnp.sum(logp.reshape(-1)) + jnp.sum(jnp.sin(probs.reshape(-1)))

    got, want = jax.jit(sparse)(h, w), dense(h, w)
    assert got[0].shape == (b, seq) and got[1].shape == (b, seq, v)
    for a, e in zip(got, want, strict=True):
        # float32 values of size ~1, computed in other matmul shapes: a few ulp.
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(got[1])[~np.asarray(where)])
    grads = jax.jit(jax.grad(lambda h, w: total(sparse(h, w)), argnums=(0, 1)))(h, w)
    wants = jax.grad(lambda h, w: total(dense(h, w)), argnums=(0, 1))(h, w)
    for a, e in zip(grads, wants, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(grads[0])[~np.asarray(where)])
