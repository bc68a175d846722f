"""Samplers driven by a model with fixed, known outputs: token frequencies (chi-square),
infilling, class conditioning, trajectories, and the time grids."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomised
from scipy import stats

from md4_eqx.categorical import top_p_filter
from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    Loop,
    ModelConfig,
    Precision,
    Remask,
    Rule,
    SamplerConfig,
    TimeGrid,
)
from md4_eqx.errors import ConfigError, SamplingError
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import (
    FullHead,
    block_starts,
    generate,
    generate_long,
    resolve_loop,
    time_grid,
)
from md4_eqx.validate import check_sampler

MESH = make_mesh(1, 1, jax.devices()[:1])
LOOPS = [Loop.EVERY_STEP, Loop.EXACT_SKIP]  # AUTO is one of them (test_auto_loop)
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])


def fixed_output_model(
    probs: np.ndarray, seq: int, num_classes: int = 0, learnable: bool = False
) -> MD4:
    """An MD4 whose mu_theta(z_t, t) is `probs` at every position, whatever z_t and t: the final
    adaLN gets scale = -1 and shift = e_0, so the head sees e_0, and head row 0 holds log probs."""
    vocab = len(probs)
    cfg = Config(
        model=ModelConfig(
            vocab_size=vocab,
            seq_len=seq,
            width=16,
            num_layers=1,
            num_heads=2,
            cond_dim=16,
            num_classes=num_classes,
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
        diffusion=DiffusionConfig(learnable=learnable),
    )
    model = MD4(cfg.model, cfg.diffusion, cfg.execution, key=jax.random.key(0))
    width = cfg.model.width
    shift = jnp.zeros(width).at[0].set(1.0)
    model = eqx.tree_at(
        lambda m: m.net.final_ada.bias, model, jnp.concatenate([shift, -jnp.ones(width)])
    )
    head = (
        jnp.zeros_like(model.net.head.weight)
        .at[0, :vocab]
        .set(jnp.log(jnp.asarray(probs, jnp.float32)))
    )
    return eqx.tree_at(lambda m: m.net.head.weight, model, head)


def token_counts(tokens, vocab):
    return np.bincount(np.asarray(tokens).ravel(), minlength=vocab)


def frequency_config(rule: Rule, loop: Loop) -> SamplerConfig:
    """The sampler of the token-frequency tests (one compile per rule and loop, which
    `test_wrong_distribution_is_detected` shares)."""
    return SamplerConfig(rule=rule, loop=loop, steps=32, top_p=0.75, eta=0.1)


@pytest.mark.parametrize(
    "rule, expected",
    [
        (Rule.ANCESTRAL, PROBS),
        (Rule.MEAN, PROBS),
        (Rule.REMDM, PROBS),  # every draw of a remasked position is again from mu
        # top-p 0.75 keeps {0, 1, 2} (mass 0.8 reaches 0.75; {0, 1} holds only 0.65).
        (Rule.TOP_P, np.r_[PROBS[:3] / PROBS[:3].sum(), np.zeros(3)]),
    ],
    ids=["ancestral", "mean", "remdm", "top_p"],
)
@pytest.mark.parametrize("loop", LOOPS, ids=lambda loop: loop.value)
def test_token_frequencies_match_the_model(rule, expected, loop):
    seq = 64
    model = fixed_output_model(PROBS, seq)
    cfg = frequency_config(rule, loop)
    template = jnp.full((64, seq), model.mask_id)
    if rule is Rule.REMDM and loop is Loop.EXACT_SKIP:
        with pytest.raises(ConfigError, match="every_step"):
            check_sampler(cfg, per_token_schedule=False)
        return
    tokens = generate(model, jax.random.key(1), template, MESH, cfg).tokens
    assert int(jnp.max(tokens)) < model.vocab_size  # no mask left
    counts = token_counts(tokens, model.vocab_size)
    support = expected > 0
    assert counts[~support].sum() == 0
    # 4096 draws; a correct sampler fails this at the fixed seed with probability 1e-4.
    p = stats.chisquare(counts[support], counts.sum() * expected[support]).pvalue
    assert p > 1e-4, (counts, p)


def test_genmd4_sampler_follows_its_per_token_schedule():
    """Under GenMD4 a masked position becomes v between t and s with probability
    mu[v] (1 - (s/t)^(w_v)): tokens with small exponents unmask early. With a fixed mu the final
    law, P(v) = sum_i prod_{j<i} stay_j * mu[v] u_i(v), is computed exactly in float64; it
    differs from mu, and the samples must follow it, not mu."""
    seq, steps = 64, 8
    w = np.array([3.0, 0.3, 1.0, 1.0, 0.5, 2.0])
    model = fixed_output_model(PROBS, seq, learnable=True)
    model = eqx.tree_at(
        lambda m: m.schedule.theta, model, jnp.asarray(np.log(np.expm1(w)), jnp.float32)
    )
    cfg = SamplerConfig(steps=steps, grid=TimeGrid.UNIFORM)
    tokens = generate(
        model, jax.random.key(2), jnp.full((64, seq), model.mask_id), MESH, cfg
    ).tokens

    t = (steps - np.arange(steps)) / steps
    unmask = 1 - (np.maximum(t - 1 / steps, 0)[:, None] / t[:, None]) ** w[None, :]  # (T, V)
    stay = 1 - (PROBS[None, :] * unmask).sum(-1)  # (T,)
    alive = np.concatenate([[1.0], np.cumprod(stay)[:-1]])  # still masked before step i
    law = (alive[:, None] * PROBS[None, :] * unmask).sum(0)
    np.testing.assert_allclose(law.sum(), 1.0, rtol=1e-12)  # the last step unmasks everything
    assert np.abs(law - PROBS).max() > 0.05  # the schedule matters
    counts = token_counts(tokens, model.vocab_size)
    assert stats.chisquare(counts, counts.sum() * law).pvalue > 1e-4, (counts / counts.sum(), law)
    assert stats.chisquare(counts, counts.sum() * PROBS).pvalue < 1e-10
    with pytest.raises(ConfigError, match="exact_skip"):
        check_sampler(
            SamplerConfig(loop=Loop.EXACT_SKIP), per_token_schedule=model.schedule.per_token
        )


def test_wrong_distribution_is_detected():
    """The chi-square check above has power: the same samples (its ancestral sampler's, for
    the same key) fail against shuffled probabilities."""
    seq = 64
    model = fixed_output_model(PROBS, seq)
    cfg = frequency_config(Rule.ANCESTRAL, Loop.EXACT_SKIP)
    tokens = generate(
        model, jax.random.key(1), jnp.full((64, seq), model.mask_id), MESH, cfg
    ).tokens
    counts = token_counts(tokens, model.vocab_size)
    assert stats.chisquare(counts, counts.sum() * PROBS[::-1]).pvalue < 1e-10


@pytest.mark.parametrize("rule", list(Rule), ids=lambda r: r.value)
@pytest.mark.parametrize("loop", LOOPS, ids=lambda loop: loop.value)
def test_infilling_keeps_given_tokens(getkey, rule, loop):
    seq = 48
    model = fixed_output_model(PROBS, seq)
    given = jax.random.bernoulli(getkey(), 0.4, (8, seq))
    values = jax.random.randint(getkey(), (8, seq), 0, model.vocab_size)
    template = jnp.where(given, values, model.mask_id)
    if rule is Rule.REMDM and loop is Loop.EXACT_SKIP:
        return  # rejected: see test_token_frequencies_match_the_model
    out = generate(
        model, getkey(), template, MESH, SamplerConfig(rule=rule, loop=loop, steps=16, eta=0.3)
    ).tokens
    np.testing.assert_array_equal(
        np.asarray(out)[np.asarray(given)], np.asarray(values)[np.asarray(given)]
    )
    assert int(jnp.max(out)) < model.vocab_size


def test_class_conditional_sampling_and_trajectory(getkey):
    seq, steps = 12, 10
    model = fixed_output_model(PROBS, seq, num_classes=3)
    template = jnp.full((4, seq), model.mask_id)
    labels = jnp.array([0, 1, 2, 0])
    out = generate(
        model, getkey(), template, MESH, SamplerConfig(steps=steps), labels=labels, trajectory=True
    )
    traj = np.asarray(out.trajectory)
    assert traj.shape == (steps, 4, seq)
    masked = (traj == model.mask_id).sum(axis=(1, 2))
    assert np.all(np.diff(masked) <= 0)  # tokens are only ever unmasked
    np.testing.assert_array_equal(
        np.where(traj[-1] == model.mask_id, out.tokens, traj[-1]), out.tokens
    )
    with pytest.raises(ValueError, match="class-conditional"):
        generate(model, getkey(), template, MESH, SamplerConfig(steps=steps))


def test_time_grids():
    for grid in TimeGrid:
        t, s = time_grid(8, grid)
        assert float(t[0]) == pytest.approx(1.0) and float(s[-1]) == pytest.approx(0.0, abs=1e-6)
        np.testing.assert_allclose(t[1:], s[:-1])
        assert jnp.all(s < t)
    t_uniform, _ = time_grid(8, TimeGrid.UNIFORM)
    np.testing.assert_allclose(t_uniform, (8 - np.arange(8)) / 8, rtol=1e-6)


def test_top_p_filter_keeps_smallest_reaching_set():
    logits = jnp.log(jnp.asarray(PROBS, jnp.float32))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.75)))
    np.testing.assert_array_equal(kept, [True, True, True, False, False, False])
    assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.3))).sum() == 1


@pytest.mark.parametrize("remask", list(Remask), ids=lambda r: r.value)
def test_remdm_keeps_the_forward_marginal(remask):
    """ReMDM's posterior keeps q(z_s | x): after each step t -> s a generated position is masked
    with probability exactly 1 - alpha(s), remasking included (Wang et al. 2025, eq. 4), while
    tokens are remasked and redrawn."""
    seq, steps, n = 32, 16, 256
    model = fixed_output_model(PROBS, seq)
    cfg = SamplerConfig(rule=Rule.REMDM, remask=remask, eta=0.5, steps=steps, grid=TimeGrid.UNIFORM)
    out = generate(
        model, jax.random.key(4), jnp.full((n, seq), model.mask_id), MESH, cfg, trajectory=True
    )
    is_mask = np.asarray(out.trajectory) == model.mask_id  # (T, n, seq)
    masked = is_mask.reshape(steps, -1).sum(1)  # (T,)
    s = (steps - 1 - np.arange(steps)) / steps
    mask_prob = (1 - 2e-4) * s + 1e-4  # the linear schedule's 1 - alpha(s)
    p = [
        stats.binomtest(int(m), n * seq, q).pvalue
        for m, q in zip(masked[:-1], mask_prob[:-1], strict=True)
    ]
    assert min(p) > 1e-4 / steps, (masked / (n * seq), mask_prob)
    assert (~is_mask[:-1] & is_mask[1:]).sum() > 100  # decoded tokens were remasked


def random_model(seq: int, vocab: int = 11) -> MD4:
    """A freshly initialised MD4: its predictions depend on every token of the window."""
    cfg = Config(
        model=ModelConfig(
            vocab_size=vocab, seq_len=seq, width=16, num_layers=1, num_heads=2, cond_dim=16
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
    )
    return MD4(cfg.model, cfg.diffusion, cfg.execution, key=jax.random.key(5))


def test_generate_long_is_generate_window_by_window():
    """The reference: plain `generate` on each window, the window's first L - B (here more, for
    the last) tokens taken from the previous result, on a (data=2, model=2) mesh."""
    seq, block, length, b = 8, 3, 15, 4  # windows start at 0, 3, 6, 7
    model, cfg, key = random_model(seq), SamplerConfig(steps=6), jax.random.key(3)
    mesh = make_mesh(2, 2, jax.devices()[:4])
    template = np.full((b, length), model.mask_id, np.int32)
    template[:, :10] = np.arange(10) % model.vocab_size  # a prompt longer than L: 10 > 8 tokens
    template[:, 12] = 4  # a given token inside a later block
    seen = []
    out = generate_long(
        model,
        key,
        jnp.asarray(template),
        mesh,
        cfg,
        block,
        on_block=lambda s: seen.append(np.asarray(s.calls)),
    )
    assert out.tokens.shape == (b, length) and len(seen) == 4
    np.testing.assert_array_equal(out.calls, np.sum(seen, axis=0))

    expected = template.copy()
    for i, start in enumerate([0, 3, 6, 7]):
        window_key = key if i == 0 else jax.random.fold_in(key, i)
        window = generate(
            model, window_key, jnp.asarray(expected[:, start : start + seq]), mesh, cfg
        )
        expected[:, start : start + seq] = np.asarray(window.tokens)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(np.asarray(out.tokens)[:, :10], template[:, :10])
    assert (
        np.all(np.asarray(out.tokens)[:, 12] == 4) and int(jnp.max(out.tokens)) < model.vocab_size
    )


def test_generate_long_of_one_window_is_generate():
    model, cfg = (
        random_model(8),
        SamplerConfig(rule=Rule.TOP_P, loop=Loop.EXACT_SKIP, steps=5, top_p=0.9),
    )
    template = jnp.full((2, 8), model.mask_id, jnp.int32).at[:, 0].set(1)
    plain = generate(model, jax.random.key(7), template, MESH, cfg)
    long = generate_long(model, jax.random.key(7), template, MESH, cfg, block=3)
    np.testing.assert_array_equal(long.tokens, plain.tokens)
    np.testing.assert_array_equal(long.calls, plain.calls)


@pytest.mark.parametrize(
    "length, block, message",
    [(10, 0, "block 0"), (10, 9, "block 9"), (7, 2, "length 7")],
    ids=["zero-block", "block-over-seq", "too-short"],
)
def test_generate_long_rejects_bad_windows(length, block, message):
    model = random_model(8)
    with pytest.raises(SamplingError, match=message):
        generate_long(
            model,
            jax.random.key(0),
            jnp.full((1, length), model.mask_id),
            MESH,
            SamplerConfig(steps=2),
            block,
        )


def test_block_starts():
    assert block_starts(8, 8, 3) == [0]
    assert block_starts(8, 15, 3) == [0, 3, 6, 7]
    assert block_starts(8, 16, 4) == [0, 4, 8]
    assert block_starts(8, 24, 8) == [0, 8, 16]


def sparse_and_full(seq: int) -> tuple[MD4, MD4]:
    """A transformer whose head and adaLN act (random weights), and the same network behind
    `FullHead`, whose head the samplers run at every position."""
    sparse = randomised(random_model(seq), jax.random.key(6), 0.5)
    return sparse, eqx.tree_at(lambda m: m.net, sparse, FullHead(sparse.net))


@pytest.mark.parametrize(
    "rule, loop",
    [(r, lp) for r in Rule for lp in LOOPS if not (r is Rule.REMDM and lp is Loop.EXACT_SKIP)],
    ids=lambda v: v.value,
)
def test_sparse_head_draws_the_full_heads_tokens(rule, loop):
    """The head and the draw over V only where a position unmasks give the tokens of the full
    head for the same key: the sparse head on one device, the full head on a (data 2, model 2)
    mesh (the samplers are mesh-invariant). 4 x 16 tokens in chunks of 4: most chunks are
    skipped at each call."""
    seq = 16
    sparse, full = sparse_and_full(seq)
    template = jnp.full((4, seq), sparse.mask_id, jnp.int32).at[:, :3].set(2)  # a prompt
    cfg = SamplerConfig(rule=rule, loop=loop, steps=12, top_p=0.9, eta=0.3)
    key = jax.random.key(8)
    expected = generate(full, key, template, make_mesh(2, 2, jax.devices()[:4]), cfg).tokens
    assert np.unique(expected[:, 3:]).size > 4  # mu_theta is spread: a wrong draw would show
    np.testing.assert_array_equal(generate(sparse, key, template, MESH, cfg).tokens, expected)


def test_sparse_head_long_text():
    """`generate_long`, window by window, with the sparse head on a (2, 2) mesh: the full head's
    tokens on one device. The windows, sampler and mesh of
    `test_generate_long_is_generate_window_by_window`, whose compiled window this shares."""
    seq = 8
    sparse, full = sparse_and_full(seq)
    template = jnp.full((4, 15), sparse.mask_id, jnp.int32).at[:, :4].set(3)
    cfg, key = SamplerConfig(steps=6), jax.random.key(9)
    expected = generate_long(full, key, template, MESH, cfg, block=3)
    out = generate_long(sparse, key, template, make_mesh(2, 2, jax.devices()[:4]), cfg, block=3)
    np.testing.assert_array_equal(out.tokens, expected.tokens)
    assert int(jnp.max(out.tokens)) < sparse.vocab_size


def test_auto_loop():
    """The default loop skips exactly wherever the rule and schedule allow it, and an explicit
    loop is kept: an unsupported explicit choice stays `check_sampler`'s error."""
    assert SamplerConfig().loop is Loop.AUTO
    for rule in Rule:
        for per_token in (False, True):
            auto = resolve_loop(SamplerConfig(rule=rule), per_token_schedule=per_token)
            skips = rule is not Rule.REMDM and not per_token
            assert auto.loop is (Loop.EXACT_SKIP if skips else Loop.EVERY_STEP)
            for loop in LOOPS:
                assert resolve_loop(SamplerConfig(rule=rule, loop=loop), per_token).loop is loop
