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
unmask a position several times (`md4_eqx.validate.check_sampler`).

Text longer than the training length L comes from `generate_long`, window by window.
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

from md4_eqx.categorical import categorical, exponential
from md4_eqx.config import Loop, Rule, SamplerConfig, TimeGrid
from md4_eqx.errors import SamplingError
from md4_eqx.loss import example_keys
from md4_eqx.model import MD4
from md4_eqx.parallel import DATA, batch_specs, example_ids, shard_map_modules, vocab_all_gather
from md4_eqx.reverse_step import remasking, reverse_step, token_logits
from md4_eqx.schedule import MaskingSchedule


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


def guided_logits(
    model: MD4,
    z: Int[Array, "b l"],
    t: Float[Array, " b"],
    labels: Int[Array, " b"] | None,
    guidance: float,
) -> Float[Array, "b l v"]:
    """mu_theta's logits over the full vocabulary (sampling gathers the vocabulary slices). With
    classifier-free guidance w != 0: (1 + w) logits(z, t, y) - w logits(z, t, null), the null class
    being id num_classes, in one network call on the batch doubled; w = 0: the conditional model."""
    if guidance:
        null = jnp.full_like(labels, model.config.num_classes)
        both = model.logits(
            jnp.concatenate([z, z]), jnp.concatenate([t, t]), jnp.concatenate([labels, null])
        )
        cond, uncond = jnp.split(both, 2)  # each (b, l, v_local)
        logits = (1.0 + guidance) * cond - guidance * uncond
    else:
        logits = model.logits(z, t, labels)
    return vocab_all_gather(logits, model.vocab_size)


def sample_local(
    model: MD4,
    key: PRNGKeyArray,
    template: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    cfg: SamplerConfig,
    trajectory: bool,
) -> Samples:
    """The sampling loop on this device's examples (runs inside the mesh's shard_map)."""
    mask_id = model.mask_id
    keys = example_keys(key, example_ids(template.shape[0]))
    ts, ss = time_grid(cfg.steps, cfg.grid)
    generated = template == mask_id  # (b, l) the positions REMDM may remask

    def mu_logits(z, t):
        return guided_logits(model, z, jnp.full((z.shape[0],), t), labels, cfg.guidance)

    def step(z, inputs):
        i, t, s = inputs
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        unmask, remask = model.schedule.unmask_probs(t, s, model.vocab_size), jnp.zeros(())
        if cfg.rule is Rule.REMDM:  # MD4's schedule only (md4_eqx.validate.check_sampler)
            alpha = model.schedule.alpha
            unmask_one, remask = remasking(t, alpha(t), alpha(jnp.maximum(s, 0.0)), cfg)
            unmask = jnp.full_like(unmask, unmask_one)
        z = reverse_step(step_keys, z, generated, mu_logits(z, t), unmask, remask, mask_id, cfg)
        return z, (z if trajectory else None)

    z, traj = jax.lax.scan(step, template, (jnp.arange(cfg.steps), ts, ss))
    # Any position still masked after the last step takes the argmax of mu_theta(z, 0).
    final = jnp.argmax(mu_logits(z, jnp.zeros(())), axis=-1).astype(z.dtype)
    z = jnp.where(z == mask_id, final, z)
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
    ts = jnp.concatenate(
        [time_grid(steps, cfg.grid)[0], jnp.zeros(1)]
    )  # step T: the final argmax fill at t = 0
    energy = jax.vmap(lambda k: exponential(k, template.shape[1:], cfg.draws))(step_keys)  # (b, l)
    hazard = -log_survival(model.schedule, steps, cfg.grid)  # (T,), increasing
    drawn = jnp.searchsorted(hazard, energy).astype(template.dtype)  # (b, l) in [0, T]
    done = steps + 1  # k of a position that is given, or already unmasked
    first = jnp.where(template == mask_id, drawn, done)  # (b, l)

    def body(carry):
        z, k, calls = carry
        now = jnp.min(k, axis=-1)  # (b,) each example's next step with an unmasking
        logits = guided_logits(model, z, ts[jnp.minimum(now, steps)], labels, cfg.guidance)
        draw = jax.vmap(lambda key, i, lg: categorical(jax.random.fold_in(key, i), lg, cfg.draws))
        x = jnp.where(
            (now == steps)[:, None],
            jnp.argmax(logits, axis=-1),
            draw(token_keys, now, token_logits(logits, cfg)),
        )
        unmask = (k == now[:, None]) & (now < done)[:, None]  # (b, l)
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
    `md4_eqx.validate` checks the model, sampler and batch against the mesh."""
    if cfg.guidance and labels is None:
        raise SamplingError(f"guidance {cfg.guidance} needs labels (a class-conditional model)")
    if template.shape[1] != model.config.seq_len:
        raise SamplingError(
            f"template length {template.shape[1]} != seq_len {model.config.seq_len}"
        )

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
