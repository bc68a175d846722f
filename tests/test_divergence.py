"""A non-finite step keeps the state (all of it but the counter); `BadSteps` stops a streak."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from md4_eqx.config import preset
from md4_eqx.divergence import BadSteps, Diverged
from md4_eqx.parallel import make_mesh
from md4_eqx.train_step import Metrics, init_state, make_optimizer, make_train_step


def arrays(tree) -> list[np.ndarray]:
    return [
        np.asarray(
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))
    ]


def test_non_finite_step_keeps_the_state_and_a_finite_one_updates_it():
    base = preset("tiny")
    cfg = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, seq_len=16, width=32, num_layers=1, num_heads=2),
        optim=dataclasses.replace(base.optim, warmup=0),  # warmup would make step 0's lr zero
        train=dataclasses.replace(base.train, batch_size=4, steps=100),
    )
    mesh = make_mesh(2, 2, jax.devices()[:4])  # the skip must hold on every shard
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(cfg, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
    tokens = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.model.vocab_size, jnp.int32)

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
