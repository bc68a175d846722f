"""Evaluation of the NELBO on held-out data, on the same mesh as training."""

import functools

import equinox as eqx
import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PRNGKeyArray

from md4_eqx.loss import losses
from md4_eqx.model import MD4
from md4_eqx.parallel import DATA, example_ids, param_specs, shard_map_modules


def _nelbo_local(
    model: MD4, key: PRNGKeyArray, tokens: Int[Array, "b l"], labels: Int[Array, " b"] | None,
    global_batch: int,
) -> Float[Array, " b"]:
    terms = losses(
        model, tokens, labels, example_ids(tokens.shape[0]), key, global_batch=global_batch, train=False
    )
    return terms.nelbo  # (b,), nats per sequence


@eqx.filter_jit
def _nelbo(model, key, tokens, labels, mesh):
    def specs(model, key, tokens, labels):
        return (param_specs(model), P(), P(DATA), None if labels is None else P(DATA))

    fn = functools.partial(_nelbo_local, global_batch=tokens.shape[0])
    return shard_map_modules(fn, mesh, specs, P(DATA))(model, key, tokens, labels)


def nelbo(
    model: MD4,
    key: PRNGKeyArray,
    tokens: Int[Array, "b l"],
    mesh: Mesh,
    labels: Int[Array, " b"] | None = None,
) -> Float[Array, " b"]:
    """The NELBO of each sequence in nats, one Monte Carlo time draw each (antithetic across the
    batch when the config says so); divide by L ln 2 for bits per token."""
    if tokens.shape[0] % mesh.shape[DATA]:
        raise ValueError(f"batch {tokens.shape[0]} must be a multiple of data={mesh.shape[DATA]}")
    return _nelbo(model, key, tokens, labels, mesh)
