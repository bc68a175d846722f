"""A non-finite step keeps the state (all of it but the counter); `BadSteps` stops a streak."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from md4_eqx.config import preset
from md4_eqx.divergence import BadSteps, Diverged
from md4_eqx.loss import losses
from md4_eqx.parallel import make_mesh
from md4_eqx.train_step import Metrics, init_state, make_optimizer, make_train_step


def arrays(tree) -> list[np.ndarray]:
    return [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    ]


def small_run(mesh):
    """The tiny preset shrunk to one layer of width 32 on `mesh`: its step and a batch."""
    base = preset("tiny")
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, seq_len=16, width=32, num_layers=1, num_heads=2),
        optim=dataclasses.replace(base.optim, warmup=0),  # warmup would make step 0's lr zero
        train=dataclasses.replace(base.train, batch_size=4, steps=100),
    )
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(cfg, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.model.vocab_size, jnp.int32)
    return cfg, optimizer, state, step, tokens


def test_non_finite_step_keeps_the_state_and_a_finite_one_updates_it():
    # the skip must hold on every shard
    _, _, state, step, tokens = small_run(make_mesh(2, 2, jax.devices()[:4]))

    initial = arrays(state.model)
    state, metrics = step(state, tokens)  # a good step first, so the moments and EMA are non-zero
    assert not bool(metrics.skipped)
    assert any((a != b).any() for a, b in zip(arrays(state.model), initial, strict=True))
    # NaN weights, as an overflow would leave them: the loss and every gradient turn NaN.
    params, static = eqx.partition(state.model, eqx.is_array)
    nan = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), params)
    state = eqx.tree_at(lambda s: s.model, state, eqx.combine(nan, static))
    before = arrays(state)  # copied out: the step donates the state

    state, metrics = step(state, tokens)
    assert bool(metrics.skipped) and not np.isfinite(float(metrics.bpt))
    assert int(state.step) == 2
    after = arrays(eqx.tree_at(lambda s: s.step, state, jnp.ones((), jnp.int32)))
    for a, b in zip(after, before, strict=True):  # model (NaN included), EMA, moments, key
        np.testing.assert_array_equal(a, b)
    assert all(np.isfinite(x).all() for x in arrays(state.ema))


def test_skipped_step_keeps_every_bit():
    """Parameters with some -0.0 and an inf in every embedding, which makes the loss
    non-finite: the params, EMA and optimizer state come back bit for bit (bytes compared, so a
    -0.0 turned into 0.0 by a gated update would fail), the counter advanced."""
    _, _, state, step, tokens = small_run(make_mesh(1, 1, jax.devices()[:1]))
    state, metrics = step(state, tokens)  # non-zero moments and an EMA apart from the params
    assert not bool(metrics.skipped)
    params, static = eqx.partition(state.model, eqx.is_array)
    params = jax.tree.map(lambda x: x.at[..., :2].set(-0.0), params)
    params = eqx.tree_at(
        lambda p: p.net.embed.weight, params, replace_fn=lambda w: w.at[:, 2].set(jnp.inf)
    )
    state = eqx.tree_at(lambda s: s.model, state, eqx.combine(params, static))
    before = [a.tobytes() for a in arrays(state)]  # copied out: the step donates the state

    state, metrics = step(state, tokens)
    assert bool(metrics.skipped) and int(state.step) == 2
    after = arrays(eqx.tree_at(lambda s: s.step, state, jnp.ones((), jnp.int32)))
    assert [a.tobytes() for a in after] == before


def test_finite_step_is_adamw_and_the_ema():
    """A finite step against the update written out in plain optax, ungated: the same loss and
    key, clipping, AdamW and the EMA. float32 throughout (tiny preset); the two programs differ
    only in how XLA fuses the same float32 arithmetic, so the tolerance is a few float32 ulps
    of the values."""
    mesh = make_mesh(1, 1, jax.devices()[:1])
    cfg, optimizer, state, step, tokens = small_run(mesh)
    state, _ = step(state, tokens)  # the second step has non-zero moments and EMA to update

    params, static = eqx.partition(state.model, eqx.is_array)
    ema_params = eqx.filter(state.ema, eqx.is_array)
    batch, length = tokens.shape

    def update(params, ema_params, opt_state, count, key, tokens):
        def loss(params):
            terms = losses(
                eqx.combine(params, static), tokens, None, jnp.arange(batch),
                jax.random.fold_in(key, count), global_batch=batch, train=True,
            )  # fmt: skip
            return jnp.sum(terms.objective) / (batch * length)

        grads = jax.grad(loss)(params)
        norm = optax.global_norm(grads)
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, cfg.optim.clip / (norm + 1e-6)), grads)
        with jax.numpy_dtype_promotion("standard"):
            updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        step = count.astype(jnp.float32)
        decay = jnp.minimum(cfg.optim.ema, (1.0 + step) / (10.0 + step))
        return params, optax.incremental_update(params, ema_params, 1.0 - decay), opt_state

    expected = jax.jit(jax.shard_map(update, mesh=mesh, in_specs=P(), out_specs=P()))(
        params, ema_params, state.opt_state, state.step, state.key, tokens
    )
    old = arrays(state.model)  # copied out: the step donates the state
    state, metrics = step(state, tokens)
    assert not bool(metrics.skipped)
    actual = (
        eqx.filter(state.model, eqx.is_array),
        eqx.filter(state.ema, eqx.is_array),
        state.opt_state,
    )
    for a, e in zip(arrays(actual), arrays(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-7)
    # The update is far above the tolerance: a step that kept the params would fail above.
    assert any((a != b).any() for a, b in zip(arrays(state.model), old, strict=True))


def metrics(skipped: bool) -> Metrics:
    value = jnp.asarray(jnp.nan if skipped else 1.0)
    return Metrics(value, value, jnp.asarray(1e-3), jnp.asarray(skipped))


def test_bad_steps_count_streaks_and_stop_at_the_limit():
    bad = BadSteps(limit=3)
    assert bad.observe(1, metrics(False)) is None
    assert bad.observe(2, metrics(True)) == {
        "step": 2,
        "skipped": 1,
        "train_bpt": "nan",
        "grad_norm": "nan",
    }
    assert bad.observe(3, metrics(True))["skipped"] == 2
    bad.check()
    assert bad.observe(4, metrics(False)) is None and bad.streak == 0  # a good step ends the streak
    for step in (5, 6, 7):
        bad.observe(step, metrics(True))
    with pytest.raises(Diverged, match="3 non-finite steps in a row .*step 7"):
        bad.check()
