"""The per-step rules of the reverse process (paper section 4; MD4_MATH.md, "Reverse process").

A rule says how one step t -> s changes z given mu_theta(z_t, t); `md4_eqx.sampling` loops over
the steps. Under MD4's schedule a masked position unmasks with a probability that is the same for
every token, so which positions change is drawn first, without mu_theta (`moves`), and a token
only where one unmasks (`unmasked_token`): the sampler runs the network's head only there. Under
GenMD4's per-token schedule that probability depends on the token, and `reverse_step` draws both
at once from the logits of every position.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, Key, PRNGKeyArray

from md4_eqx.categorical import categorical, top_p_filter, uniform_below
from md4_eqx.config import Draws, Remask, Rule, SamplerConfig


def token_logits(logits: Float[Array, "*b v"], cfg: SamplerConfig) -> Float[Array, "*b v"]:
    """The law of a token when it unmasks: mu_theta, or its top-p part (the draw renormalises)."""
    return top_p_filter(logits, cfg.top_p) if cfg.rule is Rule.TOP_P else logits


def remasking(
    t: Float[Array, ""], alpha_t: Float[Array, ""], alpha_s: Float[Array, ""], cfg: SamplerConfig
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """ReMDM's posterior (Wang et al. 2025, eq. 4): a decoded token is remasked with probability
    sigma_t, and a masked one unmasks with probability (alpha_s - (1 - sigma_t) alpha_t) /
    (1 - alpha_t), which keeps q(z_s | x)'s masked fraction 1 - alpha_s. sigma_t <= sigma_max =
    min(1, (1 - alpha_s) / alpha_t) keeps both probabilities in [0, 1]; sigma_t = 0 (the
    ancestral step) outside the switch-on window. Returns (unmask, remask)."""
    sigma_max = jnp.minimum(1.0, (1.0 - alpha_s) / alpha_t)
    sigma = jnp.minimum(cfg.eta, sigma_max) if cfg.remask is Remask.CAP else cfg.eta * sigma_max
    sigma = jnp.where((t <= cfg.remask_from) & (t > cfg.remask_until), sigma, 0.0)
    return (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t), sigma


def moves(
    key: PRNGKeyArray,
    z: Int[Array, " l"],
    generated: Bool[Array, " l"],
    unmask: Float[Array, ""],
    remask: Float[Array, ""],
    mask_id: int,
    draws: Draws,
) -> tuple[Bool[Array, " l"], Bool[Array, " l"]]:
    """Which positions of one sequence change in a step t -> s under MD4's schedule, drawn before
    mu_theta is read: (unmasks, remasks). A masked position unmasks with probability `unmask`
    = (alpha_s - alpha_t) / (1 - alpha_t) whatever its token, then takes x ~ mu_theta: the law of
    the paper's one categorical over V + 1 outcomes (v with probability mu[v] unmask, "stay
    masked" with 1 - unmask) and of MEAN's z0 ~ mu first (App. G), as `unmask` does not depend
    on the token. REMDM: a decoded `generated` position is remasked with probability `remask`
    (0 for the other rules)."""
    k_unmask, k_remask = jax.random.split(key)
    masked = z == mask_id
    unmasks = masked & uniform_below(k_unmask, jnp.broadcast_to(unmask, z.shape), draws)
    remasked = uniform_below(k_remask, jnp.broadcast_to(remask, z.shape), draws)
    return unmasks, generated & ~masked & remasked


def unmasked_token(
    key: PRNGKeyArray, logits: Float[Array, " v"], final: Bool[Array, ""], cfg: SamplerConfig
) -> Int[Array, ""]:
    """The value a position takes as it unmasks: x ~ `token_logits`, or at the final fill of the
    positions still masked at t = 0 the argmax of mu_theta."""
    x = categorical(key, token_logits(logits, cfg), cfg.draws)
    return jnp.where(final, jnp.argmax(logits), x)


def reverse_step(
    keys: Key[Array, " b"],
    z: Int[Array, "b l"],
    logits: Float[Array, "b l v"],
    unmask: Float[Array, " v"],
    mask_id: int,
    cfg: SamplerConfig,
) -> Int[Array, "b l"]:
    """One step t -> s under GenMD4's per-token schedule, given mu_theta(z_t, t) as logits over V
    at every position and unmask[v] = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v)) (the
    schedule's `unmask_probs`). Whether a position unmasks depends on the token it would take,
    so the draw needs mu_theta first (REMDM needs one alpha_t: `md4_eqx.validate.check_sampler`)."""
    logits = token_logits(logits, cfg)
    log_unmask, log_stay = jnp.log(unmask)[None, :], jnp.log1p(-unmask)[None, :]  # (1, V)

    def one_step(key, z, logits):
        # ANCESTRAL / TOP_P: one categorical over V + 1 outcomes, token v with probability
        # mu[v] unmask[v] and "stay masked" with sum_v mu[v] (1 - unmask[v]) (the paper's one-step
        # form).
        log_mu = jax.nn.log_softmax(logits, axis=-1)  # (l, V)
        stay = jax.nn.logsumexp(log_mu + log_stay, axis=-1, keepdims=True)  # (l, 1)
        x = categorical(key, jnp.concatenate([log_mu + log_unmask, stay], -1), cfg.draws)
        return jnp.where(z == mask_id, x, z)  # outcome V is the mask id itself

    def two_stage(key, z, logits):
        # MEAN: z0 ~ mu, then unmask with probability unmask[z0], taking z0's value: the same law,
        # which the paper (App. G) finds samples worse in finite precision than one step.
        k_draw, k_unmask = jax.random.split(key)
        z0 = categorical(k_draw, logits, cfg.draws)  # (l,)
        unmasked = uniform_below(k_unmask, unmask[z0], cfg.draws)
        return jnp.where(z == mask_id, jnp.where(unmasked, z0, mask_id), z)

    return jax.vmap(two_stage if cfg.rule is Rule.MEAN else one_step)(keys, z, logits)
