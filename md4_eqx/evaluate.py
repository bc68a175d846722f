"""The NELBO of held-out data, on the same mesh as training: once per sequence (`nelbo`, the
training-time evaluation), over several draws (`nelbo_draws`), and its error bars
(`NelboEstimate`)."""

import dataclasses
import math
from collections.abc import Iterable

import equinox as eqx
import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

from md4_eqx.distributed import gather
from md4_eqx.errors import DataError
from md4_eqx.loss import losses
from md4_eqx.model import MD4
from md4_eqx.parallel import DATA, batch_specs, example_ids, shard_map_modules


@eqx.filter_jit
def nelbo(
    model: MD4,
    key: PRNGKeyArray,
    tokens: Int[Array, "b l"],
    mesh: Mesh,
    labels: Int[Array, " b"] | None = None,
) -> Float[Array, " b"]:
    """The NELBO of each sequence in nats, one Monte Carlo time draw each (antithetic across the
    batch when the config says so); divide by L ln 2 for bits per token. The batch splits evenly
    over the mesh's `data` axis (`md4_eqx.validate`)."""
    global_batch = tokens.shape[0]

    def local(model, key, tokens, labels):  # this shard's b sequences
        ids = example_ids(tokens.shape[0])
        return losses(model, tokens, labels, ids, key, global_batch=global_batch, train=False).nelbo

    return shard_map_modules(local, mesh, batch_specs, P(DATA))(model, key, tokens, labels)


def nelbo_draws(
    model: MD4,
    key: PRNGKeyArray,
    batches: Iterable[tuple[Int[Array, "b l"], Int[Array, " b"] | None]],
    mesh: Mesh,
    draws: int,
) -> Float[np.ndarray, "draws n"]:
    """The NELBO in nats of every sequence of `batches` (n in all) under `draws` independent draws
    of (t, z_t): batch i of draw d has the key fold_in(fold_in(key, d), i), so row d is exactly
    the training-time evaluation with key fold_in(key, d)."""
    draw_keys = [jax.random.fold_in(key, d) for d in range(draws)]
    columns = []
    for i, (tokens, labels) in enumerate(batches):
        per_draw = [nelbo(model, jax.random.fold_in(k, i), tokens, mesh, labels) for k in draw_keys]
        # (draws, b), every process
        columns.append(np.stack([gather(x).astype(np.float64) for x in per_draw]))
    if not columns:
        raise DataError("no batches to evaluate: the split is empty")
    return np.concatenate(columns, axis=1)


@dataclasses.dataclass(frozen=True)
class NelboEstimate:
    """The NELBO of n sequences of L tokens in bits per token, averaged over D draws each.

    Two standard errors, for two questions:
    - `mc_stderr`: how far the number could move with other random times and masks on these same
      sequences. The D draws are independent, so it is std(per-draw means) / sqrt(D); it shrinks
      with more draws (it needs D >= 2).
    - `stderr`: how far it could be from the NELBO of the whole distribution the sequences were
      drawn from: std(per-sequence means over the draws) / sqrt(n), both sources of noise
      together (conservative under the antithetic times, which correlate a batch negatively).
    The NELBO bounds the negative log-likelihood, so exp(nats per token) = 2^bits bounds the
    perplexity: `perplexity`, with the delta-method standard errors `perplexity * ln 2 * se`.
    """

    per_draw: tuple[float, ...]  # bits per token of all n sequences under each draw
    per_sequence: tuple[float, ...]  # bits per token of each sequence, averaged over the draws
    seq_len: int

    @classmethod
    def from_nats(cls, nats: Float[np.ndarray, "draws n"], seq_len: int) -> "NelboEstimate":
        bits = np.asarray(nats, np.float64) / (seq_len * math.log(2.0))
        return cls(tuple(bits.mean(axis=1).tolist()), tuple(bits.mean(axis=0).tolist()), seq_len)

    @property
    def bits_per_token(self) -> float:
        return float(np.mean(self.per_draw))

    @property
    def mc_stderr(self) -> float:
        return standard_error(self.per_draw)

    @property
    def stderr(self) -> float:
        return standard_error(self.per_sequence)

    @property
    def perplexity(self) -> float:
        """2^bits, or inf past the float range (a diverged model's finite but huge NELBO)."""
        try:
            return 2.0**self.bits_per_token
        except OverflowError:
            return math.inf

    def to_json(self) -> dict:
        ppl_se = self.perplexity * math.log(2.0)  # d(2^bits) / d(bits): the delta method
        return {
            "bits_per_token": self.bits_per_token,
            "mc_stderr": self.mc_stderr,
            "stderr": self.stderr,
            "perplexity": self.perplexity,
            "perplexity_mc_stderr": ppl_se * self.mc_stderr,
            "perplexity_stderr": ppl_se * self.stderr,
            "draws": len(self.per_draw),
            "sequences": len(self.per_sequence),
            "seq_len": self.seq_len,
            "per_draw": list(self.per_draw),
        }


def standard_error(values: tuple[float, ...]) -> float:
    """std / sqrt(n) of the mean of n values; NaN for a single value."""
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
