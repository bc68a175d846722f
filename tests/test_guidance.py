"""Class conditioning for classifier-free guidance: label dropout to the null class in the
training loss, and the guided logits (1 + w) cond - w uncond of the samplers, on both backbones."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised
from jax.sharding import PartitionSpec as P

from md4_eqx.config import (
    Backbone,
    Config,
    ExecutionConfig,
    Loop,
    ModelConfig,
    Precision,
    SamplerConfig,
)
from md4_eqx.errors import ConfigError
from md4_eqx.loss import LABEL_STREAM, drop_labels, losses
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import FullHead, generate, guided_logits
from md4_eqx.validate import validate

MESH = make_mesh(1, 1, jax.devices()[:1])
CLASSES = 3
CONFIGS = {
    Backbone.TRANSFORMER: ModelConfig(
        vocab_size=20,
        seq_len=12,
        width=32,
        num_layers=1,
        num_heads=2,
        cond_dim=16,
        num_classes=CLASSES,
    ),
    # Width 64: two channels per GroupNorm group (with one, the norm after the conditioning
    # removes it).
    Backbone.UNET: ModelConfig(
        backbone=Backbone.UNET,
        vocab_size=20,
        seq_len=12,
        width=64,
        num_layers=1,
        num_heads=1,
        cond_dim=16,
        num_classes=CLASSES,
    ),
}
RUN = ExecutionConfig(precision=Precision.FLOAT32)


def on_mesh(fn, *args):
    """`fn` inside a (1, 1)-mesh shard_map, as the samplers and the training step run."""
    arrays, static = eqx.partition(args, eqx.is_array)
    inner = lambda *a: fn(*eqx.combine(a, static))  # noqa: E731
    return jax.jit(jax.shard_map(inner, mesh=MESH, in_specs=P(), out_specs=P()))(*arrays)


def test_drop_labels_rate_and_keys(getkey):
    key, n, rate = getkey(), 20_000, 0.25
    ids = jnp.arange(n)
    labels = jnp.asarray(np.random.default_rng(0).integers(0, CLASSES, n), jnp.int32)
    out = np.asarray(drop_labels(key, ids, labels, CLASSES, rate))
    dropped = out == CLASSES
    np.testing.assert_array_equal(
        out[~dropped], np.asarray(labels)[~dropped]
    )  # kept labels unchanged
    # Binomial(20000, 0.25): standard deviation 0.31% of the rate's 25%; 4 sigma.
    assert abs(dropped.mean() - rate) < 4 * np.sqrt(rate * (1 - rate) / n)
    # Keyed by the global index: any split of the batch drops the same examples.
    half = np.asarray(drop_labels(key, ids[n // 2 :], labels[n // 2 :], CLASSES, rate))
    np.testing.assert_array_equal(half, out[n // 2 :])


def test_training_loss_sees_the_dropped_labels(getkey):
    """train=True with label dropout = train=False on the labels `drop_labels` gives (no network
    dropout, so the two differ only in the labels)."""
    cfg = dataclasses.replace(CONFIGS[Backbone.TRANSFORMER], label_dropout=0.5)
    model = randomised(MD4(cfg, execution=RUN, key=getkey()), getkey(), 0.3)
    key, x = getkey(), jax.random.randint(getkey(), (16, cfg.seq_len), 0, cfg.vocab_size)
    labels, ids = jnp.arange(16, dtype=jnp.int32) % CLASSES, jnp.arange(16)

    def loss(model, x, labels, key, train):
        return losses(model, x, labels, ids, key, global_batch=16, train=train).nelbo

    dropped = drop_labels(jax.random.fold_in(key, LABEL_STREAM), ids, labels, CLASSES, 0.5)
    assert 0 < int(jnp.sum(dropped == CLASSES)) < 16  # some, not all, dropped
    trained = on_mesh(lambda *a: loss(*a, train=True), model, x, labels, key)
    np.testing.assert_array_equal(
        trained, on_mesh(lambda *a: loss(*a, train=False), model, x, dropped, key)
    )
    assert not np.allclose(
        trained, on_mesh(lambda *a: loss(*a, train=False), model, x, labels, key)
    )


@pytest.mark.parametrize("backbone", list(Backbone), ids=lambda b: b.value)
def test_guided_logits(getkey, backbone):
    cfg = CONFIGS[backbone]
    model = randomised(MD4(cfg, execution=RUN, key=getkey()), getkey(), 0.3)
    z = jax.random.randint(getkey(), (4, cfg.seq_len), 0, cfg.vocab_size + 1)
    t, labels = jax.random.uniform(getkey(), (4,)), jnp.array([0, 1, 2, 1], jnp.int32)
    null = jnp.full_like(labels, CLASSES)

    def parts(model, z, t, labels):  # guided, and both halves unguided (two traces, not three)
        double = (jnp.concatenate([z, z]), jnp.concatenate([t, t]), jnp.concatenate([labels, null]))
        return guided_logits(model, z, t, labels, 1.5), jnp.split(
            guided_logits(model, *double, 0.0), 2
        )

    guided, (cond, uncond) = jax.tree.map(
        lambda a: np.asarray(a, np.float64), on_mesh(parts, model, z, t, labels)
    )
    assert guided.shape == (4, cfg.seq_len, cfg.vocab_size)
    assert np.std(cond - uncond) > 0.1  # the label matters
    # The same doubled batch combined inside or outside: float32 rounding of logits of scale ~3.
    np.testing.assert_allclose(guided, 2.5 * cond - 1.5 * uncond, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("loop", [Loop.EVERY_STEP, Loop.EXACT_SKIP], ids=lambda lp: lp.value)
def test_guided_sampling_with_the_sparse_head(loop):
    """Guidance at the selected positions only, (1 + w) head(h_cond) - w head(h_null): the
    tokens of the full head's guided logits, the sparse head on one device and the full one on
    a (data 2, model 2) mesh."""
    cfg = CONFIGS[Backbone.TRANSFORMER]
    sparse = randomised(MD4(cfg, execution=RUN, key=jax.random.key(0)), jax.random.key(1), 0.5)
    full = eqx.tree_at(lambda m: m.net, sparse, FullHead(sparse.net))
    template = jnp.full((4, cfg.seq_len), sparse.mask_id, jnp.int32)
    labels, key = jnp.array([0, 1, 2, 1], jnp.int32), jax.random.key(2)
    sampler = SamplerConfig(loop=loop, steps=8, guidance=1.5)
    mesh = make_mesh(2, 2, jax.devices()[:4])
    expected = generate(full, key, template, mesh, sampler, labels).tokens
    np.testing.assert_array_equal(
        generate(sparse, key, template, MESH, sampler, labels).tokens, expected
    )


def test_guidance_needs_a_class_conditional_model():
    config = Config(
        model=dataclasses.replace(CONFIGS[Backbone.TRANSFORMER], num_classes=0),
        sampler=SamplerConfig(guidance=1.0),
    )
    with pytest.raises(ConfigError, match="class-conditional"):
        validate(config, MESH, batch=2)
