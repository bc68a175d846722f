"""The forward process and the NELBOs of MD4 and GenMD4 (MD4_MATH.md; paper sections 3 and 5).

All functions run per device inside the training `shard_map` (see `md4_eqx.parallel`): they see
this device's examples and this device's slice of the vocabulary. The randomness of example b is
keyed by its *global* index, so any mesh draws the same times and masks.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

from md4_eqx.model import MD4
from md4_eqx.parallel import (
    MODEL,
    psum,
    vary_like,
    vocab_gather,
    vocab_log_normaliser,
    vocab_offset,
)

# fold_in(key, LABEL_STREAM): the label dropout's key, apart from the split in `losses`
LABEL_STREAM = 1


class Losses(NamedTuple):
    """Per-example terms, in nats summed over positions (`bits_per_token` gives the reported
    number)."""

    diffusion: Float[Array, " b"]  # the diffusion term of the NELBO
    recon: Float[Array, " b"]  # the reconstruction term
    objective: Float[Array, " b"]  # what the gradient is taken of (GenMD4: the RLOO surrogate)

    @property
    def nelbo(self) -> Float[Array, " b"]:
        return self.diffusion + self.recon


def bits_per_token(nats: Float[Array, "*b"], seq_len: int) -> Float[Array, "*b"]:
    """NELBO per sequence in nats -> bits per token: nats / (L ln 2)."""
    return nats / (seq_len * math.log(2.0))


def example_keys(key: PRNGKeyArray, ids: Int[Array, " b"]) -> Key[Array, " b"]:
    """One key per example, from its global index."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)


def forward_mask(
    keys: Key[Array, " b"],
    x: Int[Array, "b l"],
    alpha: Float[Array, "b #l"],  # noqa: F821 (a jaxtyping shape: b and a broadcastable l)
    mask_id: int,
) -> Int[Array, "b l"]:
    """z_t ~ q(z_t | x): each token kept with probability alpha_t, else replaced by the mask
    m = V."""
    u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:]))(keys)  # (b, l)
    return jnp.where(u < alpha, x, mask_id)


def log_probs_at(
    logits: Float[Array, "*n v_local"], x: Int[Array, "*n"], vocab_size: int
) -> Float[Array, "*n"]:
    """log mu_theta[x] at every position: a gather and a distributed log-normaliser, no one-hot."""
    return vocab_gather(logits, x) - vocab_log_normaliser(logits, vocab_size)


def drop_labels(
    key: PRNGKeyArray, ids: Int[Array, " b"], labels: Int[Array, " b"], null: int, rate: float
) -> Int[Array, " b"]:
    """Label dropout for classifier-free guidance (Ho & Salimans 2022): each example's label
    becomes the null class `null` (= num_classes) with probability `rate`, keyed by its global
    index, so the model also learns mu_theta(z_t, t) without a label."""
    u = jax.vmap(lambda k: jax.random.uniform(k, ()))(example_keys(key, ids))  # (b,)
    return jnp.where(u < rate, null, labels)


def md4_losses(
    model: MD4,
    x: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    keys: Key[Array, " b"],
    t: Float[Array, " b"],
    dropout_keys: Key[Array, " b"] | None,
) -> Losses:
    """MD4's NELBO, given the batch's randomness (drawn in `losses`). Continuous time (timesteps
    = 0), MD4_MATH.md "Continuous-time NELBO":
        L_inf = E_t [ alpha'(t) / (1 - alpha(t)) * sum_{i: z_t^i = m} log mu_theta(z_t, t)[x^i] ];
    discrete time (T = timesteps, s = t - 1 / T), "Discrete-time NELBO":
        L_T = T E_t [ (alpha_s - alpha_t) / (1 - alpha_t)
                      * sum_{i masked} -log mu_theta(z_t, t)[x^i] ].
    Plus the reconstruction term L (1 - alpha(0)) log V.
    """
    cfg, schedule = model.diffusion, model.schedule
    if cfg.timesteps:
        big_t = cfg.timesteps
        t = (jnp.floor(t * big_t) + 1.0) / big_t  # round up to the grid: t in {1/T, ..., 1}
        mask_t = schedule.mask_prob(t)
        # (alpha_s - alpha_t) / (1 - alpha_t)
        weight = -big_t * (mask_t - schedule.mask_prob(t - 1.0 / big_t)) / mask_t
    else:
        weight = schedule.weight(t)
    z = forward_mask(
        jax.vmap(jax.random.split)(keys)[:, 0], x, schedule.alpha(t)[:, None], model.mask_id
    )
    masked = z == model.mask_id  # (b, l)
    log_probs = functools.partial(log_probs_at, vocab_size=model.vocab_size)
    logp = model.readout(log_probs, z, t, labels, x, masked, keys=dropout_keys)
    diffusion = weight * jnp.sum(jnp.where(masked, logp, 0.0), axis=-1)  # (b,)
    recon = jnp.full_like(
        diffusion, x.shape[1] * schedule.mask_prob(jnp.zeros(())) * math.log(model.vocab_size)
    )
    return Losses(diffusion, recon, diffusion + recon)


def genmd4_token_terms(
    logits: Float[Array, "*n v_local"],
    x: Int[Array, "*n"],
    w: Float[Array, " v_pad"],
    vocab_size: int,
) -> tuple[Float[Array, "*n"], Float[Array, "*n"]]:
    """What GenMD4's integrand needs of mu_theta at each token: log p[x] and sum_v w_v p[v].
    `w` is padded to the padded vocabulary (zeros past V) so each device takes its slice."""
    v_local = logits.shape[-1]
    w_local = jax.lax.dynamic_slice_in_dim(w, vocab_offset(v_local), v_local)  # (v_local,)
    log_norm = vocab_log_normaliser(logits, vocab_size)  # (*n,)
    logp = vocab_gather(logits, x) - log_norm
    probs = jnp.exp(logits - log_norm[..., None])  # padded columns are multiplied by w = 0 below
    return logp, psum(jnp.einsum("...v,v->...", probs, w_local), MODEL)


def genmd4_integrand(
    logp: Float[Array, "b l"],
    expected_w: Float[Array, "b l"],
    w_x: Float[Array, "b l"],
    t: Float[Array, " b"],
    masked: Bool[Array, "b l"],
) -> Float[Array, " b"]:
    """GenMD4's diffusion term for one draw of z_t (MD4_MATH.md, "GenMD4"):
        L_diff = sum_{i masked} sum_v (-w_v / t) [(log p[x^i] + 1) 1{v = x^i} - p[v]]
               = sum_{i masked} [ -w_{x^i} / t (log p[x^i] + 1) + (1 / t) sum_v w_v p[v] ].
    With all w_v = k it is -k / t sum_{i masked} log p[x^i], MD4's polynomial-schedule loss.
    """
    per_position = -w_x * (logp + 1.0) + expected_w  # (b, l), times 1 / t below
    return jnp.sum(jnp.where(masked, per_position, 0.0), axis=-1) / t


def genmd4_losses(
    model: MD4,
    x: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    keys: Key[Array, " b"],
    t: Float[Array, " b"],
    dropout_keys: Key[Array, " b"] | None,
) -> Losses:
    """GenMD4's NELBO with the RLOO REINFORCE estimator for the schedule's gradient: two draws
    z1, z2 of z_t, surrogate = (L1 + L2) / 2 + sg(L1 - L2) / 2 * (log q(z1|x) - log q(z2|x))."""
    cfg, learned = model.diffusion, model.schedule
    t = (1.0 - cfg.t1) * t + cfg.t1  # t in [t1, 1]
    w = learned.w  # (V,)
    w_pad = jnp.zeros((model.config.padded_vocab,)).at[: model.vocab_size].set(w)
    w_x = w[x]  # (b, l)
    alpha = learned.alpha(t[:, None], w_x)  # (b, l): alpha_t(x^i)

    # The head reads w only at masked tokens, inside `selected_tokens`' branches: w varies over
    # the batch's axes before it gets there (see `selected_tokens`).
    w_pad = vary_like(w_pad, x)
    terms = functools.partial(genmd4_token_terms, w=w_pad, vocab_size=model.vocab_size)

    def one_draw(draw: int) -> tuple[Float[Array, " b"], Float[Array, " b"]]:
        mask_keys = jax.vmap(lambda k: jax.random.fold_in(k, draw))(keys)
        z = forward_mask(mask_keys, x, jax.lax.stop_gradient(alpha), model.mask_id)
        masked = z == model.mask_id
        logp, expected_w = model.readout(terms, z, t, labels, x, masked, keys=dropout_keys)
        loss = genmd4_integrand(logp, expected_w, w_x, t, masked)
        log_q_masked = jnp.log1p(-learned.eps) + w_x * jnp.log(t)[:, None]
        log_q = jnp.sum(jnp.where(masked, log_q_masked, jnp.log(alpha)), axis=-1)  # log q(z | x)
        return loss, log_q

    (l1, q1), (l2, q2) = one_draw(1), one_draw(2)
    diffusion = 0.5 * (l1 + l2)
    surrogate = diffusion + 0.5 * jax.lax.stop_gradient(l1 - l2) * (q1 - q2)
    # recon = sum_i -(1 - eps) t1^{w_x} (w_x log t1 - logsumexp_v(w_v log t1))
    log_t1 = math.log(cfg.t1)
    per_token = (
        -(1.0 - learned.eps) * jnp.exp(w_x * log_t1) * (w_x * log_t1 - jax.nn.logsumexp(w * log_t1))
    )
    recon = jnp.sum(per_token, axis=-1)
    return Losses(diffusion, recon, surrogate + recon)


def strata(batch: int) -> np.ndarray:
    """perm(b) for b < B: the rank of b's base-2 radical inverse (van der Corput: b's binary
    digits mirrored about the point) among those of 0..B-1; for B a power of two, b's bits
    reversed. Antithetic times t_b = (u + perm(b) / B) mod 1 are the stratified set of t_b = (u +
    b / B) mod 1, but every contiguous block of a power-of-two size, a data shard, holds times
    spread over [0, 1) rather than one end of it: the loss's head runs only on masked tokens, so
    a shard of times near 1 would hold nearly all of them, and a step waits for its slowest
    shard. It depends on B and b alone, so any mesh draws the same run."""

    def radical_inverse(b: int) -> float:  # 0.b_0 b_1 b_2 ... in base 2, b_0 b's lowest bit
        value, digit = 0.0, 0.5
        while b:
            value, b, digit = value + digit * (b & 1), b >> 1, digit / 2
        return value

    order = np.argsort([radical_inverse(b) for b in range(batch)])  # distinct, exact in float64
    rank = np.empty(batch, np.int32)
    rank[order] = np.arange(batch, dtype=np.int32)
    return rank


def losses(
    model: MD4,
    x: Int[Array, "b l"],
    labels: Int[Array, " b"] | None,
    ids: Int[Array, " b"],
    key: PRNGKeyArray,
    *,
    global_batch: int,
    train: bool,
) -> Losses:
    """The model's NELBO terms for a batch: GenMD4's if its schedule is per token, else MD4's. Draws
    the batch's randomness: mask keys, times t ~ U[0, 1) (antithetic: t_b = (u + perm(b) / B) mod
    1 with one u, `strata`) and, when training, dropout keys and labels dropped to the null class
    at `label_dropout`."""
    cfg = model.config
    time_key, example_key = jax.random.split(key)
    keys = example_keys(example_key, ids)
    if model.diffusion.antithetic:
        stratum = jnp.asarray(strata(global_batch))[ids].astype(jnp.float32)  # (b,)
        t = jnp.mod(jax.random.uniform(time_key, ()) + stratum / global_batch, 1.0)  # (b,)
    else:
        t = jax.vmap(lambda k: jax.random.uniform(k, ()))(example_keys(time_key, ids))
    dropout_keys = jax.vmap(lambda k: jax.random.fold_in(k, 7))(keys) if train else None
    if train and labels is not None and cfg.label_dropout:
        labels = drop_labels(
            jax.random.fold_in(key, LABEL_STREAM), ids, labels, cfg.num_classes, cfg.label_dropout
        )
    fn = genmd4_losses if model.schedule.per_token else md4_losses
    return fn(model, x, labels, keys, t, dropout_keys)
