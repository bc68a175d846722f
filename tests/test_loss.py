"""The NELBOs against exact facts: log2(V) at init, L_T -> L_inf, GenMD4 = MD4 at equal exponents;
and the chunked head against the whole one."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    ModelConfig,
    Precision,
    Schedule,
)
from md4_eqx.evaluate import nelbo
from md4_eqx.loss import bits_per_token, genmd4_integrand, genmd4_token_terms, log_probs_at, losses
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.schedule import MaskingSchedule

MESH = make_mesh(1, 1, jax.devices()[:1])


def small(vocab: int, seq: int, **diffusion) -> Config:
    model = ModelConfig(
        vocab_size=vocab, seq_len=seq, width=32, num_layers=1, num_heads=2, cond_dim=16
    )
    execution = ExecutionConfig(precision=Precision.FLOAT32)
    return Config(model=model, execution=execution, diffusion=DiffusionConfig(**diffusion))


def build(cfg: Config, key) -> MD4:
    return MD4(cfg.model, cfg.diffusion, cfg.execution, key=key)


def on_mesh(fn, *args):
    """Run `fn` inside a (1, 1)-mesh shard_map, as the training step does."""
    return jax.jit(jax.shard_map(fn, mesh=MESH, in_specs=P(), out_specs=P()))(*args)


def perturbed(model: MD4, key, scale: float = 0.5) -> MD4:
    """A model whose output head is not zero, so its predictions depend on z_t and t."""
    head = model.net.head.weight
    return eqx.tree_at(
        lambda m: m.net.head.weight, model, scale * jax.random.normal(key, head.shape)
    )


def test_fresh_model_scores_log2_vocab(getkey):
    """A zero head predicts uniform over V, so the per-example NELBO / log V does not depend on V
    (given the same times and masks): it is checked equal across V = 27, 256, 50257, and its
    mean checked within 1% of log2(V) (1 - eps) bits per token on 2M tokens at V = 27."""
    seq, batch = 64, 16  # the equality is per example: 16 of them (logits at V = 50257: 200 MB)
    eps = DiffusionConfig().eps
    key = getkey()
    per_v = {}
    for vocab in (27, 256, 50257):
        model = build(small(vocab, seq), getkey())
        x = jax.random.randint(getkey(), (batch, seq), 0, vocab)
        per_v[vocab] = bits_per_token(nelbo(model, key, x, MESH), seq) / math.log2(vocab)
    # Identical noise, different V: equal up to float32 rounding of log V.
    np.testing.assert_allclose(per_v[256], per_v[27], rtol=2e-5)
    np.testing.assert_allclose(per_v[50257], per_v[27], rtol=2e-5)

    # The estimator's mean: per-example relative std is ~sqrt(ln(1/eps) / L) ~ 0.36 at L = 64,
    # so 32768 examples give a standard error of ~0.2%: 1% is 5 sigma.
    model = build(small(27, seq), getkey())
    x = jnp.zeros((8192, seq), jnp.int32)
    draws = jnp.stack([nelbo(model, k, x, MESH) for k in jax.random.split(getkey(), 4)])
    bpt = bits_per_token(draws, seq) / math.log2(27)
    assert float(jnp.mean(bpt)) == pytest.approx(1 - eps, rel=0.01)
    assert float(jnp.std(bpt) / math.sqrt(bpt.size)) < 0.003


@pytest.mark.parametrize("schedule", [Schedule.LINEAR, Schedule.COSINE])
def test_discrete_nelbo_approaches_continuous(getkey, schedule):
    """With common random numbers (the same u for t and the same uniforms for the masks) L_T
    converges to L_inf pathwise as T grows: t_T -> t, the weights converge, and the masks agree
    but for uniforms within O(1/T) of alpha_t."""
    seq, vocab = 32, 16
    init_key, head_key, key = getkey(), getkey(), getkey()
    x = jax.random.randint(getkey(), (256, seq), 0, vocab)

    def estimate(timesteps):
        cfg = small(vocab, seq, schedule=schedule, timesteps=timesteps)
        model = perturbed(build(cfg, init_key), head_key)  # the same parameters for every T
        return float(jnp.mean(nelbo(model, key, x, MESH)))

    continuous = estimate(0)
    gaps = [abs(estimate(t) - continuous) / continuous for t in (4, 64, 4096)]
    assert all(b < a for a, b in zip(gaps[:-1], gaps[1:], strict=True)), gaps
    assert gaps[-1] < 1e-3, gaps
    assert gaps[0] > 10 * gaps[-1], gaps


def test_genmd4_equal_exponents_is_md4_poly(getkey):
    """With w_v = k for every v, GenMD4's integrand sum_v (-w_v/t)[(log p[x] + 1) 1{v=x} - p[v]]
    equals MD4's -k/t sum log p[x]; and MD4's poly-k weight alpha'/(1 - alpha) equals -k/t up to
    its eps shift (relative difference < 2 eps / t^k)."""
    b, seq, vocab, k = 4, 16, 40, 2.5
    padded = 128
    logits = jax.random.normal(getkey(), (b, seq, padded)) * 3.0
    x = jax.random.randint(getkey(), (b, seq), 0, vocab)
    t = jnp.array([0.2, 0.4, 0.7, 0.95])
    masked = jax.random.bernoulli(getkey(), 0.5, (b, seq))
    w = jnp.zeros((padded,)).at[:vocab].set(k)

    gen = on_mesh(
        lambda lg: genmd4_integrand(*genmd4_token_terms(lg, x, w, vocab), w[x], t, masked), logits
    )
    logp = on_mesh(lambda lg: log_probs_at(lg, x, vocab), logits)
    md4 = -k / t * jnp.sum(jnp.where(masked, logp, 0.0), axis=-1)
    np.testing.assert_allclose(gen, md4, rtol=1e-5)  # float32 sums of ~16 terms

    sched = MaskingSchedule(Schedule.POLY, exponent=k)
    rel = jnp.abs(sched.weight(t) / (-k / t) - 1)
    assert jnp.all(rel < 2 * sched.eps / t**k)


def test_log_softmax_excludes_padding_float64(getkey):
    """The distributed log-normaliser and gather match a float64 numpy log-softmax over the
    first V columns, however large the padded columns are."""
    vocab, padded = 27, 128
    logits = jax.random.normal(getkey(), (3, 5, padded)) * 4.0
    logits = logits.at[..., vocab:].set(1e4)  # must be ignored
    x = jax.random.randint(getkey(), (3, 5), 0, vocab)
    got = on_mesh(lambda lg: log_probs_at(lg, x, vocab), logits)
    ref = np.asarray(logits, np.float64)[..., :vocab]
    ref = ref - ref.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    expected = np.take_along_axis(ref, np.asarray(x)[..., None], -1)[..., 0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 of values ~ -10


def test_head_chunks_change_the_memory_not_the_loss(getkey):
    """`head_chunk` runs the head and the log-softmax on a few tokens at a time and again in the
    backward pass: the same NELBO and gradients, float32 sums in another order, from a fraction of
    the temporaries when the logits dominate them (V = 2000 against width 32 here)."""
    vocab, seq, batch = 2000, 24, 4
    key, head_key, noise_key = getkey(), getkey(), getkey()
    x = jax.random.randint(getkey(), (batch, seq), 0, vocab)
    results, temp = [], []
    for chunk in (96, 7):  # one chunk; 7 divides no part of the 96 tokens: the last is padded
        cfg = small(vocab, seq)
        cfg = dataclasses.replace(
            cfg, execution=dataclasses.replace(cfg.execution, head_chunk=chunk)
        )
        model = perturbed(build(cfg, key), head_key)
        params, static = eqx.partition(model, eqx.is_array)

        def loss(params, static=static):
            def per_example(params):
                return losses(
                    eqx.combine(params, static),
                    x,
                    None,
                    jnp.arange(batch),
                    noise_key,
                    global_batch=batch,
                    train=True,
                ).objective

            return jnp.mean(on_mesh(per_example, params))

        compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
        results.append(jax.tree.leaves(compiled(params)))
        temp.append(compiled.memory_analysis().temp_size_in_bytes)
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(b))))
    # The chunks' loop also holds the head's weight gradient [32, 2000] once more: the skip
    # branch of each chunk's `lax.cond` gives it as a separate output.
    assert temp[1] < 0.6 * temp[0], temp
