"""Training against ground truth: on i.i.d. tokens of known entropy H, the NELBO of a trained
model must approach H from above, and its samples must reproduce the token frequencies. The
same for the CIFAR-10 U-Net on small RGB images whose sub-pixels are i.i.d. per channel, and a
fresh U-Net's exact 8 bits per dimension through the real loss."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from md4_eqx.config import (
    Backbone,
    Config,
    DiffusionConfig,
    ExecutionConfig,
    ModelConfig,
    OptimConfig,
    Precision,
    SamplerConfig,
    TrainConfig,
)
from md4_eqx.evaluate import nelbo
from md4_eqx.loss import bits_per_token
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import generate
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

FLOAT32 = ExecutionConfig(precision=Precision.FLOAT32)
PROBS = np.array([0.45, 0.2, 0.12, 0.08, 0.06, 0.045, 0.03, 0.015])
ENTROPY_BITS = float(-(PROBS * np.log2(PROBS)).sum())  # 2.33 bits


def config(learnable: bool) -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=len(PROBS), seq_len=32, width=32, num_layers=1, num_heads=2, cond_dim=16
        ),
        execution=FLOAT32,
        diffusion=DiffusionConfig(learnable=learnable),
        optim=OptimConfig(lr=3e-3, warmup=20, ema=0.99),
        train=TrainConfig(batch_size=64, steps=300),
    )


def draw(key, shape):
    return jax.random.categorical(
        key, jnp.log(jnp.asarray(PROBS, jnp.float32)), shape=shape
    ).astype(jnp.int32)


def train(cfg: Config, mesh, key, data=draw):
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    state = init_state(cfg, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
    for k in jax.random.split(key, cfg.train.steps):
        state, metrics = step(state, data(k, (cfg.train.batch_size, cfg.model.seq_len)))
    return state, metrics


def held_out_bpt(
    state, mesh, key, data=draw, rows: int = 8192, batches: int = 4
) -> tuple[float, float]:
    """Mean NELBO in bits per token over `batches` x `rows` fresh sequences, and its standard
    error."""
    seq_len = state.model.config.seq_len
    bpt = jnp.concatenate(
        [
            bits_per_token(nelbo(state.ema, k2, data(k1, (rows, seq_len)), mesh), seq_len)
            for k1, k2 in jax.random.split(key, (batches, 2))
        ]
    )
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


# ---------------------------------------------------------------------------------------------
# The U-Net on 4x4 RGB images: each sub-pixel i.i.d. from its channel's distribution over 8 values.

CHANNEL_PROBS = np.stack(
    [PROBS, PROBS[::-1], np.array([0.3, 0.3, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])]
)
# 2.46 bits/dim
IMAGE_ENTROPY_BITS = float(-(CHANNEL_PROBS * np.log2(CHANNEL_PROBS)).sum(-1).mean())
# Small: width 32 (one channel per GroupNorm group, which removes the time conditioning; the
# ideal denoiser here is the per-channel marginal whatever t, so it needs none) and 2 blocks.
UNET = ModelConfig(
    backbone=Backbone.UNET,
    vocab_size=8,
    seq_len=4 * 4 * 3,
    width=32,
    num_layers=2,
    num_heads=1,
    cond_dim=32,
)


def draw_images(key, shape):
    """[b, 48] flattened 4x4x3 images (row-major h, w, c): position i has channel i mod 3."""
    logits = jnp.log(jnp.asarray(CHANNEL_PROBS, jnp.float32))  # (3, 8)
    pixels = jax.random.categorical(key, logits, shape=(shape[0], shape[1] // 3, 3))  # (b, hw, 3)
    return pixels.reshape(shape).astype(jnp.int32)


def test_fresh_unet_scores_8_bits_per_dimension(getkey):
    """A fresh U-Net's logits are exactly zero, so through the real loss it scores what a fresh
    transformer scores on the same times and masks (test_loss: log2(V) (1 - eps) bits per token),
    and its mean over 2048 images is 8 (1 - eps) bits per dimension within its standard error."""
    mesh = make_mesh(1, 1, jax.devices()[:1])
    cfg = dataclasses.replace(UNET, vocab_size=256)
    unet, transformer = (
        MD4(dataclasses.replace(cfg, backbone=b), execution=FLOAT32, key=getkey()) for b in Backbone
    )
    x = jax.random.randint(getkey(), (1024, cfg.seq_len), 0, 256)
    keys = jax.random.split(getkey(), 4)
    bpt = np.concatenate([bits_per_token(nelbo(unet, k, x, mesh), cfg.seq_len) for k in keys])
    reference = np.concatenate(
        [bits_per_token(nelbo(transformer, k, x, mesh), cfg.seq_len) for k in keys]
    )
    np.testing.assert_allclose(bpt, reference, rtol=1e-6)  # the same float32 sums of zero logits
    expected = 8.0 * (1 - DiffusionConfig().eps)
    assert abs(bpt.mean() - expected) < 4 * bpt.std() / math.sqrt(bpt.size), (bpt.mean(), expected)


def test_unet_nelbo_approaches_entropy_and_samples_match(getkey):
    mesh = make_mesh(1, 1, jax.devices()[:1])
    cfg = Config(
        model=UNET,
        execution=FLOAT32,
        optim=OptimConfig(lr=3e-3, warmup=10, ema=0.9),
        train=TrainConfig(batch_size=32, steps=100),
    )
    state, metrics = train(cfg, mesh, getkey(), draw_images)
    assert np.isfinite(float(metrics.bpt))

    mean, stderr = held_out_bpt(state, mesh, getkey(), draw_images, rows=4096, batches=2)
    assert stderr < 0.01 * IMAGE_ENTROPY_BITS  # 8192 images of 48 sub-pixels: ~0.5%
    assert mean <= 1.05 * IMAGE_ENTROPY_BITS, (mean, IMAGE_ENTROPY_BITS)
    assert mean >= IMAGE_ENTROPY_BITS - 4 * stderr, (mean, IMAGE_ENTROPY_BITS, stderr)

    template = jnp.full((64, cfg.model.seq_len), cfg.model.vocab_size)
    samples = np.asarray(
        generate(state.ema, getkey(), template, mesh, SamplerConfig(steps=16)).tokens
    )
    for channel, probs in enumerate(CHANNEL_PROBS):
        counts = np.bincount(samples[:, channel::3].ravel(), minlength=len(probs))
        # 1,024 draws per channel: a wrong distribution (e.g. another channel's) gives p ~ 0.
        assert stats.chisquare(counts, probs * counts.sum()).pvalue > 1e-3, (channel, counts)
