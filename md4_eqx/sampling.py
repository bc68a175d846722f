"""Samplers for the reverse process (paper section 4; MD4_MATH.md, "Reverse process").

From t to s < t, independently per position: an unmasked token stays; a masked one becomes
x ~ mu_theta(z_t, t) with probability (alpha_s - alpha_t) / (1 - alpha_t), else stays masked.
Positions given in the template (infilling, prompts) are never masked, so never change.

A sampler is a per-step rule (`Rule`, in `md4_eqx.reverse_step`) run by a loop (`Loop`):
EVERY_STEP calls the network at every step (`sample_local`); EXACT_SKIP samples the same law
calling it only at steps where something unmasks (`sample_skip_local`), which needs the unmask
step of a position to be independent of the network and of the token. So EXACT_SKIP takes
ANCESTRAL, TOP_P and MEAN (whose unmask probability is the same for every token) under MD4's
schedule; GenMD4's per-token schedule makes the unmask step depend on the token, and REMDM may
unmask a position several times (`md4_eqx.validate.check_sampler`). `Loop.AUTO`, the default, is
EXACT_SKIP wherever it runs, else EVERY_STEP (`resolve_loop`).

At each network call the positions that unmask are known before the network runs: their drawn
unmask step (EXACT_SKIP), or Bernoulli draws that do not read mu_theta under MD4's schedule
(EVERY_STEP; `md4_eqx.reverse_step.moves`). So the transformer runs its trunk on every position
but its head, the [V]-wide matmul, and the categorical draw over V only on those (`head_draws`,
through `md4_eqx.model.selected_tokens`). Each position draws with its own key, so the tokens are
those of the full head for the same key. The full head stays where this does not hold: GenMD4's
every-step loop (the unmask probability depends on the token, so every position needs mu_theta)
and the U-Net, whose head is a convolution over the image rather than a map of each token's
features.

Text longer than the training length L comes from `generate_long`, window by window.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

from md4_eqx.categorical import exponential
from md4_eqx.config import Loop, Rule, SamplerConfig, TimeGrid
from md4_eqx.errors import ConfigError, SamplingError
from md4_eqx.loss import example_keys
from md4_eqx.model import MD4, selected_tokens
from md4_eqx.parallel import DATA, batch_specs, example_ids, shard_map_modules, vocab_all_gather
from md4_eqx.reverse_step import moves, remasking, reverse_step, unmasked_token
from md4_eqx.schedule import MaskingSchedule
from md4_eqx.transformer import Transformer
from md4_eqx.validate import check_sampler

# The sparse head's tokens go in this many chunks, each skipped when no selected token lands in
# it: with few unmasking the head reads about 1/16 of the tokens, and the chunk loop stays 16
# iterations long whatever the batch and length.
HEAD_CHUNKS = 16


class Samples(NamedTuple):
    tokens: Int[Array, "b l"]
    trajectory: Int[Array, "steps b l"] | None  # z after each step, if asked for
    calls: Int[Array, " data"]  # network calls made on each data shard


def time_grid(steps: int, grid: TimeGrid) -> tuple[Float[Array, " steps"], Float[Array, " steps"]]:
    """(t, s) for steps i = 0..T-1: t = (T - i) / T, s = t - 1/T; the cosine grid maps both
    through u -> cos(pi/2 (1 - u))."""
    t = (steps - jnp.arange(steps, dtype=jnp.float32)) / steps
    s = t - 1.0 / steps
    if grid is TimeGrid.COSINE:
        t, s = (jnp.cos(jnp.pi / 2 * (1.0 - u)) for u in (t, s))
    return t, s


def resolve_loop(cfg: SamplerConfig, per_token_schedule: bool) -> SamplerConfig:
    """`cfg` with `Loop.AUTO` made concrete: EXACT_SKIP (the same law, fewer network calls)
    wherever `md4_eqx.validate.check_sampler` accepts it for the rule and schedule, else
    EVERY_STEP. An explicit loop is kept as it is."""
    if cfg.loop is not Loop.AUTO:
        return cfg
    skip = dataclasses.replace(cfg, loop=Loop.EXACT_SKIP)
    try:
        check_sampler(skip, per_token_schedule)
    except ConfigError:
        return dataclasses.replace(cfg, loop=Loop.EVERY_STEP)
    return skip


def with_null_class(
    model: MD4, z: Int[Array, "b l"], t: Float[Array, " b"], labels: Int[Array, " b"]
) -> tuple[Int[Array, "b2 l"], Float[Array, " b2"], Int[Array, " b2"]]:
    """The batch doubled for classifier-free guidance: the second half has the null class, id
    num_classes, so one network call gives both terms of `guide`."""
    null = jnp.full_like(labels, model.config.num_classes)
    return jnp.concatenate([z, z]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])


def guide(
    cond: Float[Array, "*b v"], uncond: Float[Array, "*b v"], w: float
) -> Float[Array, "*b v"]:
    """Classifier-free guidance's logits (1 + w) logits(z, t, y) - w logits(z, t, null)."""
    return (1.0 + w) * cond - w * uncond


def guided_logits(
    model: MD4,
    z: Int[Array, "b l"],
    t: Float[Array, " b"],
    labels: Int[Array, " b"] | None,
    guidance: float,
) -> Float[Array, "b l v"]:
    """mu_theta's logits over the full vocabulary at every position (sampling gathers the
    vocabulary slices): `guide`d for w != 0, in one network call on the batch doubled; w = 0: the
    conditional model."""
    if guidance:
        both = model.logits(*with_null_class(model, z, t, labels))
        logits = guide(*jnp.split(both, 2), guidance)  # (b, l, v_local)
    else:
        logits = model.logits(z, t, labels)
    return vocab_all_gather(logits, model.vocab_size)


class FullHead(eqx.Module):
    """A transformer seen as one map (z, t, labels) -> logits, without its features/head split:
    the samplers run its whole head and draw at every position, then keep what unmasks. The
    reference that the sparse head must match token for token (tests/test_sampling.py) and is
    timed against (bench/sample.py)."""

    net: Transformer

    def __call__(
        self,
        z: Int[Array, "b l"],
        t: Float[Array, " b"],
        labels: Int[Array, " b"] | None = None,
        *,
        keys: Key[Array, " b"] | None = None,
    ) -> Float[Array, "b l v_local"]:
        return self.net(z, t, labels, keys=keys)


def position_keys(keys: Key[Array, " b"], length: int) -> Key[Array, "b l"]:
    """One key per position, fold_in(key of the example, position): a position's draw depends on
    it and its logits alone, not on which other positions draw with it."""
    return jax.vmap(
        lambda k: jax.vmap(functools.partial(jax.random.fold_in, k))(jnp.arange(length))
    )(keys)


def head_draws(
    model: MD4,
    z: Int[Array, "b l"],
    t: Float[Array, " b"],
    labels: Int[Array, " b"] | None,
    cfg: SamplerConfig,
    where: Bool[Array, "b l"],
    keys: Key[Array, "b l"],
    final: Bool[Array, "b l"],
) -> Int[Array, "b l"]:
    """`unmasked_token` of mu_theta(z, t) at the positions `where`, 0 elsewhere: one network call.
    The transformer's trunk reads every position, its head and the draw only `where`
    (`selected_tokens`); any other network (the U-Net, `FullHead`) runs its whole head, then
    draws at every position."""
    draw = jax.vmap(functools.partial(unmasked_token, cfg=cfg))  # over tokens
    if not isinstance(model.net, Transformer):
        logits = guided_logits(model, z, t, labels, cfg.guidance)  # (b, l, V)
        return jnp.where(where, jax.vmap(draw)(keys, logits, final), 0)
    head, guidance, impl = model.net.head, cfg.guidance, jax.random.key_impl(keys)
    if guidance:
        h, h_null = jnp.split(model.net.features(*with_null_class(model, z, t, labels)), 2)
    else:
        h, h_null = model.net.features(z, t, labels), None  # (b, l, d)

    def fn(h, *aux):  # n selected tokens: h (n, d), [h_null (n, d)], key data (n, 2), final (n,)
        *h_null, key_data, final = aux
        logits = guide(head(h), head(*h_null), guidance) if guidance else head(h)  # (n, v_local)
        logits = vocab_all_gather(logits, model.vocab_size)  # (n, V)
        return draw(jax.random.wrap_key_data(key_data, impl=impl), logits, final)

    aux = (*([h_null] if guidance else []), jax.random.key_data(keys), final)
    return selected_tokens(fn, h, where, aux, -(-z.size // HEAD_CHUNKS))


def sample_local(
    model: MD4,
    key: PRNGKeyArray,
    template: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    cfg: SamplerConfig,
    trajectory: bool,
) -> Samples:
    """The sampling loop on this device's examples (runs inside the mesh's shard_map). Under
    MD4's schedule each step draws which positions unmask (and REMDM's remasks) first, then runs
    the head only there (`head_draws`); GenMD4's every position reads mu_theta (`reverse_step`)."""
    (b, length), mask_id = template.shape, model.mask_id
    keys = example_keys(key, example_ids(b))
    ts, ss = time_grid(cfg.steps, cfg.grid)
    generated = template == mask_id  # (b, l) the positions REMDM may remask
    never = jnp.zeros(template.shape, bool)

    def step(z, inputs):
        i, t, s = inputs
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        if model.schedule.per_token:
            logits = guided_logits(model, z, jnp.full((b,), t), labels, cfg.guidance)
            unmask = model.schedule.unmask_probs(t, s, model.vocab_size)
            z = reverse_step(step_keys, z, logits, unmask, mask_id, cfg)
            return z, (z if trajectory else None)
        unmask, remask = model.schedule.unmask_probs(t, s, 1)[0], jnp.zeros(())  # one for all v
        if cfg.rule is Rule.REMDM:
            alpha = model.schedule.alpha
            unmask, remask = remasking(t, alpha(t), alpha(jnp.maximum(s, 0.0)), cfg)
        move_keys, token_keys = jax.vmap(jax.random.split, out_axes=1)(step_keys)
        draw_moves = jax.vmap(moves, in_axes=(0, 0, 0, None, None, None, None))
        unmasks, remasks = draw_moves(move_keys, z, generated, unmask, remask, mask_id, cfg.draws)
        x = head_draws(
            model,
            z,
            jnp.full((b,), t),
            labels,
            cfg,
            unmasks,
            position_keys(token_keys, length),
            never,
        )
        z = jnp.where(unmasks, x.astype(z.dtype), jnp.where(remasks, mask_id, z))
        return z, (z if trajectory else None)

    z, traj = jax.lax.scan(step, template, (jnp.arange(cfg.steps), ts, ss))
    # Any position still masked after the last step takes the argmax of mu_theta(z, 0).
    still = z == mask_id
    fill = head_draws(
        model, z, jnp.zeros((b,)), labels, cfg, still, position_keys(keys, length), ~never
    )
    z = jnp.where(still, fill.astype(z.dtype), z)
    return Samples(z, traj, jnp.full((1,), cfg.steps + 1, jnp.int32))


def log_survival(schedule: MaskingSchedule, steps: int, grid: TimeGrid) -> Float[Array, " steps"]:
    """log P(a masked position is still masked after step i) = sum_{j<=i} log(1 - p_j), with p_j =
    (alpha_s - alpha_t) / (1 - alpha_t) the unmask probability of step j. As s_j = t_{j+1}, the
    product telescopes to (1 - alpha(s_i)) / (1 - alpha(t_0)), computed so without rounding."""
    ts, ss = time_grid(steps, grid)
    return jnp.log(schedule.mask_prob(ss)) - jnp.log(schedule.mask_prob(ts[0]))


def unmask_step_probs(
    schedule: MaskingSchedule, steps: int, grid: TimeGrid
) -> Float[Array, " steps_and_final"]:
    """The law of the step at which a masked position unmasks, the same for every position and
    independent of the network (MD4_MATH.md, "Reverse process"): entry i < T is
    prod_{j<i} (1 - p_j) p_i and entry T is prod_j (1 - p_j), the chance of still being masked
    for the final argmax fill."""
    survival = jnp.exp(log_survival(schedule, steps, grid))  # (T,)
    return -jnp.diff(jnp.concatenate([jnp.ones(1), survival, jnp.zeros(1)]))


def expected_skip_calls(schedule: MaskingSchedule, cfg: SamplerConfig, seq_len: int) -> float:
    """E[network calls] of `Loop.EXACT_SKIP` for one all-mask sequence: the expected number of
    distinct unmask steps (the final fill counted as one), sum_i 1 - (1 - P_i)^L. The ancestral
    sampler makes T + 1 calls."""
    probs = np.asarray(unmask_step_probs(schedule, cfg.steps, cfg.grid), np.float64)
    return float(np.sum(-np.expm1(seq_len * np.log1p(-probs))))


def sample_skip_local(
    model: MD4,
    key: PRNGKeyArray,
    template: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    cfg: SamplerConfig,
    trajectory: bool,
) -> Samples:
    """The ancestral law with network calls only where something unmasks (runs inside shard_map).

    Each masked position unmasks at exactly one step k in {0..T-1}, or is still masked at the end
    (k = T, the final argmax fill), with the law of `unmask_step_probs` whatever the network says;
    given k = i, its value is x ~ mu_theta(z_t_i, t_i) (or the rule's `token_logits` of it). So
    draw every k up front (inverse CDF: k = #{i : -log P(k > i) < E}, E ~ Exp(1)), then let each
    example jump from one of its unmask steps to the next: a step where nothing unmasks leaves z
    as it is, so skipping it is exact, time conditioning included. Each call serves every example
    at its own next step and time, so a device makes as many calls as its busiest example has
    distinct unmask steps. The trajectory is rebuilt from the k's afterwards."""
    steps, mask_id = cfg.steps, model.mask_id
    keys = example_keys(key, example_ids(template.shape[0]))
    step_keys, token_keys = jax.vmap(jax.random.split, out_axes=1)(keys)
    token_keys = position_keys(token_keys, template.shape[1])  # (b, l): a position unmasks once
    # step T: the final argmax fill at t = 0
    ts = jnp.concatenate([time_grid(steps, cfg.grid)[0], jnp.zeros(1)])
    energy = jax.vmap(lambda k: exponential(k, template.shape[1:], cfg.draws))(step_keys)  # (b, l)
    hazard = -log_survival(model.schedule, steps, cfg.grid)  # (T,), increasing
    drawn = jnp.searchsorted(hazard, energy).astype(template.dtype)  # (b, l) in [0, T]
    done = steps + 1  # k of a position that is given, or already unmasked
    first = jnp.where(template == mask_id, drawn, done)  # (b, l)

    def body(carry):
        z, k, calls = carry
        now = jnp.min(k, axis=-1)  # (b,) each example's next step with an unmasking
        unmask = (k == now[:, None]) & (now < done)[:, None]  # (b, l)
        final = jnp.broadcast_to((now == steps)[:, None], z.shape)  # the argmax fill at t = 0
        t = ts[jnp.minimum(now, steps)]
        x = head_draws(model, z, t, labels, cfg, unmask, token_keys, final)
        return jnp.where(unmask, x.astype(z.dtype), z), jnp.where(unmask, done, k), calls + 1

    init = (template, first, jnp.zeros((1,), jnp.int32))
    z, _, calls = jax.lax.while_loop(lambda carry: jnp.any(carry[1] < done), body, init)
    traj = None
    if trajectory:  # z after step i keeps the values of the positions with k <= i
        traj = jnp.where(first[None] <= jnp.arange(steps)[:, None, None], z[None], template[None])
    return Samples(z, traj, calls)


@eqx.filter_jit
def generate(
    model: MD4,
    key: PRNGKeyArray,
    template: Int[Array, "b l"],
    mesh: Mesh,
    cfg: SamplerConfig,
    labels: Int[Array, " b"] | None = None,
    trajectory: bool = False,
) -> Samples:
    """Samples for every row of `template`: positions equal to the mask id V are generated, the
    others are kept (all masks: unconditional; a prompt or an infilling template otherwise).
    The batch is split over the mesh's `data` axis; the result does not depend on the mesh.
    `md4_eqx.validate` checks the model, sampler and batch against the mesh (guidance needs
    labels, the loop suits the rule and schedule)."""
    if template.shape[1] != model.config.seq_len:
        raise SamplingError(
            f"template length {template.shape[1]} != seq_len {model.config.seq_len}"
        )

    cfg = resolve_loop(cfg, model.schedule.per_token)
    local = functools.partial(
        sample_skip_local if cfg.loop is Loop.EXACT_SKIP else sample_local,
        cfg=cfg,
        trajectory=trajectory,
    )
    out = Samples(P(DATA), P(None, DATA) if trajectory else None, P(DATA))
    return shard_map_modules(local, mesh, batch_specs, out)(model, key, template, labels)


def block_starts(seq_len: int, length: int, block: int) -> list[int]:
    """First position of each window of `generate_long`: 0, B, 2B, ... while the window ends
    before `length`, then length - L, so the last window ends at the end (and may keep more
    than L - B tokens)."""
    if not 0 < block <= seq_len:
        raise SamplingError(f"block {block} must lie in [1, seq_len {seq_len}]")
    if length < seq_len:
        raise SamplingError(f"length {length} must be at least the model's seq_len {seq_len}")
    return [*range(0, length - seq_len, block), length - seq_len]


@eqx.filter_jit
def _sample_window(model, key, tokens, start, labels, mesh, cfg):
    """tokens[:, start : start + L] sampled as a template, in place; one compilation serves
    every window, as `start` is traced."""
    window = jax.lax.dynamic_slice_in_dim(tokens, start, model.config.seq_len, axis=1)  # (b, L)
    out = generate(model, key, window, mesh, cfg, labels)
    return jax.lax.dynamic_update_slice_in_dim(tokens, out.tokens, start, axis=1), out.calls


def generate_long(
    model: MD4,
    key: PRNGKeyArray,
    template: Int[Array, "b n"],
    mesh: Mesh,
    cfg: SamplerConfig,
    block: int,
    labels: Int[Array, " b"] | None = None,
    on_block: Callable[[Samples], None] | None = None,
) -> Samples:
    """Samples of any length n >= L, semi-autoregressively as MDLM (Sahoo et al. 2024, section
    4.2): the first window is `template[:, :L]`; each next one moves B = `block` positions on,
    keeps the L - B tokens it shares with the last as its prompt, and samples the B new positions
    that are masks in `template` (the others, e.g. a prompt longer than L, are kept). Window i > 0
    draws with fold_in(key, i), the first with `key`, so n = L is `generate`. `on_block(samples)`
    sees the tokens after each window and that window's calls; the result's calls sum them."""
    starts = block_starts(model.config.seq_len, template.shape[1], block)
    tokens, calls = template, jnp.zeros((mesh.shape[DATA],), jnp.int32)
    for i, start in enumerate(starts):
        window_key = key if i == 0 else jax.random.fold_in(key, i)
        tokens, window_calls = _sample_window(
            model, window_key, tokens, jnp.int32(start), labels, mesh, cfg
        )
        calls = calls + window_calls
        if on_block is not None:
            on_block(Samples(tokens, None, window_calls))
    return Samples(tokens, None, calls)
