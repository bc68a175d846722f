"""Training against ground truth: on i.i.d. tokens of known entropy H, the NELBO of a trained
model must approach H from above, and its samples must reproduce the token frequencies."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from md4_eqx.config import Config, DiffusionConfig, ModelConfig, OptimConfig, Precision, SamplerConfig, TrainConfig
from md4_eqx.evaluate import nelbo
from md4_eqx.loss import bits_per_token
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import generate
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

PROBS = np.array([0.45, 0.2, 0.12, 0.08, 0.06, 0.045, 0.03, 0.015])
ENTROPY_BITS = float(-(PROBS * np.log2(PROBS)).sum())  # 2.33 bits


def config(learnable: bool) -> Config:
    return Config(
        model=ModelConfig(vocab_size=len(PROBS), seq_len=32, width=32, num_layers=1, num_heads=2,
                          cond_dim=16, precision=Precision.FLOAT32),
        diffusion=DiffusionConfig(learnable=learnable),
        optim=OptimConfig(lr=3e-3, warmup=20, ema=0.99),
        train=TrainConfig(batch_size=64, steps=300),
    )


def draw(key, shape):
    return jax.random.categorical(key, jnp.log(jnp.asarray(PROBS, jnp.float32)), shape=shape).astype(jnp.int32)


def train(cfg: Config, mesh, key):
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(cfg, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
    for k in jax.random.split(key, cfg.train.steps):
        state, metrics = step(state, draw(k, (cfg.train.batch_size, cfg.model.seq_len)))
    return state, metrics


def held_out_bpt(state, mesh, key) -> tuple[float, float]:
    """Mean NELBO in bits per token over 4 x 8192 fresh sequences, and its standard error."""
    seq_len = state.model.config.seq_len
    bpt = jnp.concatenate([
        bits_per_token(nelbo(state.ema, k2, draw(k1, (8192, seq_len)), mesh), seq_len)
        for k1, k2 in jax.random.split(key, (4, 2))
    ])
    return float(jnp.mean(bpt)), float(jnp.std(bpt)) / math.sqrt(bpt.size)


def test_md4_nelbo_approaches_entropy_and_samples_match(getkey):
    mesh = make_mesh(1, 1, jax.devices()[:1])
    cfg = config(learnable=False)
    state, metrics = train(cfg, mesh, getkey())
    assert np.isfinite(float(metrics.bpt))

    mean, stderr = held_out_bpt(state, mesh, getkey())
    assert stderr < 0.005 * ENTROPY_BITS  # the bound below is not swamped by Monte Carlo noise
    assert mean <= 1.03 * ENTROPY_BITS, (mean, ENTROPY_BITS)
    assert mean >= ENTROPY_BITS - 4 * stderr, (mean, ENTROPY_BITS, stderr)  # a bound, never below H

    template = jnp.full((256, cfg.model.seq_len), cfg.model.vocab_size)
    samples = generate(state.ema, getkey(), template, mesh, SamplerConfig(steps=64)).tokens
    freq = np.bincount(np.asarray(samples).ravel(), minlength=len(PROBS)) / samples.size
    assert 0.5 * np.abs(freq - PROBS).sum() < 0.03, freq  # total variation on 8192 draws


def test_genmd4_nelbo_approaches_entropy(getkey):
    mesh = make_mesh(1, 1, jax.devices()[:1])
    cfg = config(learnable=True)
    state, _ = train(cfg, mesh, getkey())
    assert not np.allclose(state.model.schedule.w, 1.0)  # the schedule did learn
    mean, stderr = held_out_bpt(state, mesh, getkey())
    assert ENTROPY_BITS - 4 * stderr <= mean <= 1.03 * ENTROPY_BITS, (mean, ENTROPY_BITS, stderr)
