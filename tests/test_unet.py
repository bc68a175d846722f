"""The CIFAR-10 U-Net: the reference's parameter count, uniform at init, the transformer's logits
contract on any mesh, dropout keys, the null class, bfloat16 compute."""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised
from jax.sharding import PartitionSpec as P

from md4_eqx.config import (
    Backbone,
    ConfigError,
    ExecutionConfig,
    ModelConfig,
    Precision,
    Remat,
)
from md4_eqx.parallel import (
    DATA,
    MODEL,
    MeshError,
    check_model_split,
    make_mesh,
    param_specs,
    shard_map_modules,
)
from md4_eqx.unet import UNet

# DeepMind's MD4 CIFAR-10 network (md4/configs/md4/cifar10.py): feature_dim 128, n_layers 32,
# one attention head, the time conditioning 128 -> 512 -> 128, unconditional (classes = -1).
FULL = ModelConfig(
    backbone=Backbone.UNET,
    vocab_size=256,
    seq_len=32 * 32 * 3,
    width=128,
    num_layers=32,
    num_heads=1,
    cond_dim=128,
    dropout=0.1,
)
# Computed from the reference's code (google-deepmind/md4, flax 0.12.8, jax 0.10.2): the
# parameters of `md4.models.diffusion.md4.MD4` built as md4/models/utils.py `get_model` builds
# it from the cifar10 config, `jax.eval_shape(model.init)` on a [2, 32, 32, 3] batch, summed
# over every leaf (the sub-pixel embedding, CondEmbedding and the UNet; the linear schedule has
# none). The same model with `classes=11` (10 classes + the null class, its class embedding
# concatenated to the time embedding) has 28,494,464.
REFERENCE_PARAMS = 28_427_520
REFERENCE_PARAMS_CLASSES = 28_494_464


def small(**overrides) -> ModelConfig:
    """4 x 4 RGB images, one block each way, width 64: two channels per GroupNorm group (with
    one, the norm after the conditioning's per-channel shift would remove it)."""
    fields = dict(
        backbone=Backbone.UNET,
        vocab_size=256,
        seq_len=4 * 4 * 3,
        width=64,
        num_layers=1,
        num_heads=1,
        cond_dim=32,
    )
    return ModelConfig(**(fields | overrides))


RUN = ExecutionConfig(precision=Precision.FLOAT32)  # how the small U-Nets are computed


@functools.cache
def on_mesh(mesh):
    """net(z, t, labels, keys=keys) jitted inside the one shard_map: batch over `data`,
    parameters replicated, vocabulary split over `model` (cached: one trace per mesh and input
    structure)."""

    def specs(net, z, t, labels, keys):
        batch = lambda a: None if a is None else P(DATA)  # noqa: E731
        return (param_specs(net), P(DATA), P(DATA), batch(labels), batch(keys))

    def fn(net, z, t, labels, keys):
        return net(z, t, labels, keys=keys)

    return eqx.filter_jit(shard_map_modules(fn, mesh, specs, P(DATA, None, MODEL)))


def logits_on(mesh, net: UNet, z, t, labels=None, keys=None):
    return on_mesh(mesh)(net, z, t, labels, keys)


def num_params(net: UNet) -> int:
    """Elements of every array (or ShapeDtypeStruct, from eval_shape) in `net`."""
    return sum(
        x.size for x in jax.tree.leaves(net) if isinstance(x, jax.Array | jax.ShapeDtypeStruct)
    )


SINGLE = make_mesh(1, 1, jax.devices()[:1])


def inputs(cfg: ModelConfig, key, batch: int = 4):
    kz, kt = jax.random.split(key)
    z = jax.random.randint(kz, (batch, cfg.seq_len), 0, cfg.vocab_size + 1)  # the mask id included
    return z, jax.random.uniform(kt, (batch,))


def test_parameter_count_and_shape_match_the_reference(getkey):
    net = eqx.filter_eval_shape(UNet, FULL, ExecutionConfig(), key=getkey())  # nothing allocated
    assert num_params(net) == REFERENCE_PARAMS
    classes = eqx.filter_eval_shape(
        UNet, dataclasses.replace(FULL, num_classes=10), ExecutionConfig(), key=getkey()
    )
    assert num_params(classes) == REFERENCE_PARAMS_CLASSES
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(net) if hasattr(x, "dtype"))
    z = jax.ShapeDtypeStruct((2, FULL.seq_len), jnp.int32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    out = jax.eval_shape(lambda n, z, t: logits_on(SINGLE, n, z, t), net, z, t)
    assert out.shape == (2, 3072, FULL.padded_vocab) and out.dtype == jnp.float32


def test_fresh_unet_predicts_uniform_8_bits_per_dimension(getkey):
    cfg = small(num_classes=10)
    net = UNet(cfg, RUN, key=getkey())
    z, t = inputs(cfg, getkey())
    logits = logits_on(SINGLE, net, z, t, jnp.array([0, 3, 9, 10]))
    assert logits.shape == (4, cfg.seq_len, cfg.padded_vocab) and logits.dtype == jnp.float32
    # The zero output conv gives zero logits on the 256 values, the padding adds exact zeros.
    np.testing.assert_array_equal(logits, 0.0)
    real = np.asarray(logits[..., : cfg.vocab_size], np.float64)
    bits = -(real - np.log(np.exp(real).sum(-1, keepdims=True))) / np.log(2.0)
    np.testing.assert_allclose(bits, 8.0, rtol=1e-12)  # log2(256), float64


@pytest.mark.parametrize("shape", [(2, 2), (4, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_sharded_logits_equal_single_device(getkey, shape):
    cfg = small(num_classes=10)
    net = randomised(UNet(cfg, RUN, key=getkey()), getkey(), 0.2)
    z, t = inputs(cfg, getkey())
    labels = jnp.array([1, 10, 4, 7])
    mesh = make_mesh(*shape, jax.devices()[: shape[0] * shape[1]])
    one, many = logits_on(SINGLE, net, z, t, labels), logits_on(mesh, net, z, t, labels)
    assert float(jnp.std(one[..., : cfg.vocab_size])) > 0.1  # not the trivial zero output
    # The same float32 arithmetic on another batch split: only XLA's summation order (its conv
    # algorithm per batch size) differs, ~1e-7 relative per sum, compounded through ~10 convs of
    # 1,152-term sums to ~1e-5 of the logits' scale of 2.5 (1.3e-5 measured at worst).
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(many)[..., cfg.vocab_size :], 0.0)


def test_dropout_keys_matter_only_with_dropout(getkey):
    key, noise = getkey(), getkey()
    cfg = small()
    z, t = inputs(cfg, getkey())
    keys, other = jax.random.split(getkey(), 4), jax.random.split(getkey(), 4)
    plain = randomised(UNet(cfg, RUN, key=key), noise, 0.2)
    np.testing.assert_array_equal(
        logits_on(SINGLE, plain, z, t, keys=keys), logits_on(SINGLE, plain, z, t)
    )
    dropped = randomised(UNet(small(dropout=0.5), RUN, key=key), noise, 0.2)  # the same parameters
    train_a, train_b = (
        logits_on(SINGLE, dropped, z, t, keys=keys),
        logits_on(SINGLE, dropped, z, t, keys=other),
    )
    # The keys decide.
    np.testing.assert_array_equal(train_a, logits_on(SINGLE, dropped, z, t, keys=keys))
    assert not np.allclose(train_a, logits_on(SINGLE, plain, z, t), atol=1e-3)
    assert not np.allclose(train_a, train_b, atol=1e-3)


def test_remat_gives_the_same_gradients_with_fewer_temporaries(getkey):
    """remat recomputes each block in the backward pass: the same gradients (dropout included:
    each block keeps its keys) from fewer temporaries. Unrolled, XLA had hoisted every block's
    recomputation ahead of the backward pass, and remat saved nothing."""
    key, noise = getkey(), getkey()
    cfg = small(dropout=0.5)
    z, t = inputs(cfg, getkey())
    keys = jax.random.split(getkey(), 4)
    grads, temp = [], []
    for remat in (Remat.NONE, Remat.FULL):
        net = UNet(cfg, dataclasses.replace(RUN, remat=remat), key=key)
        params, static = eqx.partition(randomised(net, noise, 0.2), eqx.is_array)

        def loss(p, static=static):
            return jnp.sum(jnp.sin(logits_on(SINGLE, eqx.combine(p, static), z, t, keys=keys)))

        compiled = jax.jit(jax.grad(loss)).lower(params).compile()
        grads.append(jax.tree.leaves(compiled(params)))
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
    # Convolutions inside the scan sum in another order: float32 rounding, relative to the
    # largest gradient (some leaves' gradients are rounding noise around zero, a GroupNorm
    # removing their effect). Another block's dropout keys would change every element.
    scale = max(float(jnp.max(jnp.abs(b))) for b in grads[0])
    for a, b in zip(*grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5 * scale)
    assert temp[1] < 0.8 * temp[0], temp


def test_null_class(getkey):
    cfg = small(num_classes=10)
    net = randomised(UNet(cfg, RUN, key=getkey()), getkey(), 0.2)
    assert net.cond.class_embed.shape == (11, cfg.cond_dim)  # 10 classes + the null class
    z, t = inputs(cfg, getkey(), batch=2)
    z, t = jnp.concatenate([z, z]), jnp.concatenate([t, t])  # the same inputs under two labels
    out = logits_on(SINGLE, net, z, t, jnp.array([10, 10, 3, 3]))
    assert np.isfinite(np.asarray(out)).all()
    assert not np.allclose(out[:2], out[2:], atol=1e-3)  # the null class is a label of its own
    with pytest.raises(ValueError, match="pass `labels`"):
        logits_on(SINGLE, net, z, t)


def test_bfloat16_compute_matches_float32(getkey):
    key, noise = getkey(), getkey()
    z, t = inputs(small(), getkey())
    nets = {
        p: randomised(UNet(small(), ExecutionConfig(precision=p), key=key), noise, 0.2)
        for p in Precision
    }
    out = {p: logits_on(SINGLE, net, z, t) for p, net in nets.items()}
    f32, bf16 = out[Precision.FLOAT32], out[Precision.BFLOAT16]
    # bfloat16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); the float32 residual stream
    # passes about 8 bfloat16 conv/attention inputs on the way: ~1% of the logits' scale in rms
    # (0.9% measured), with tails of a few times that over the 49k logits (5.4% measured).
    scale = float(jnp.std(f32))
    assert float(jnp.sqrt(jnp.mean(jnp.square(bf16 - f32)))) < 0.03 * scale
    np.testing.assert_allclose(bf16, f32, atol=0.15 * scale)
    assert not np.allclose(bf16, f32, atol=1e-6)  # it really computed in bfloat16


@pytest.mark.parametrize(
    "overrides, message",
    [(dict(seq_len=50), "seq_len = 3 \\* side"), (dict(width=48, num_heads=1), "multiple of 32")],
    ids=["not-square-rgb", "groups"],
)
def test_bad_configs_raise(overrides, message):
    with pytest.raises(ConfigError, match=message):
        small(**overrides)


def test_model_axis_needs_only_the_vocabulary_to_split():
    """The U-Net's parameters are replicated over `model`: one head and 128 channels do not have
    to split, the padded vocabulary (256 + 1 -> 384 ids) does."""
    check_model_split(FULL, 2)
    with pytest.raises(MeshError, match="num_heads"):
        check_model_split(dataclasses.replace(FULL, backbone=Backbone.TRANSFORMER), 2)
    with pytest.raises(MeshError, match="padded vocabulary"):
        check_model_split(FULL, 5)
