"""The (data, model) mesh and the few collectives that tensor parallelism needs.

Every model computation runs inside one `jax.shard_map` over a 2-D mesh: the batch is split over
`data`, and Megatron-style tensor parallelism splits attention heads, MLP hidden units and the
(padded) vocabulary over `model`. Inside the map each device sees its local slice of every
parameter, so the layers are written once, for the local slice; a (1, 1) mesh is simply the
single-device run. Gradients need no explicit all-reduce: with `check_vma=True`, differentiating
through a replicated parameter sums its cotangents over the axes the computation varied on.
"""

import enum

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, Int, PyTree

from md4_eqx.config import Backbone, ModelConfig
from md4_eqx.errors import MeshError

DATA = "data"
MODEL = "model"


class Split(enum.Enum):
    """How a [in, out] weight (or a [vocab, width] table) is laid out over the `model` axis."""

    REPLICATED = "replicated"
    COLUMN = "column"  # output features split: no communication, output is a local slice
    ROW = "row"  # input features split: partial outputs are summed over `model`
    VOCAB = "vocab"  # rows of an embedding table split


def make_mesh(data: int | None = None, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh; `data` defaults to every device not used by `model`."""
    devices = list(jax.devices() if devices is None else devices)
    count = len(devices)
    if data is None:
        if model <= 0 or count % model:
            raise MeshError(f"the mesh's {model=} must divide the {count} devices")
        data = count // model
    if data <= 0 or model <= 0 or data * model != count:
        raise MeshError(f"the mesh's {data=} x {model=} must equal the {count} devices")
    array = np.asarray(devices, dtype=object).reshape(data, model)
    return Mesh(array, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


def check_model_split(cfg: ModelConfig, model: int) -> None:
    """Raise a MeshError unless a `model` axis of this size splits the padded vocabulary and,
    for the transformer, its heads and MLP units evenly (the U-Net's parameters are replicated
    over `model`: only its logits are split, by vocabulary)."""
    sizes = [("the padded vocabulary", cfg.padded_vocab)]
    if cfg.backbone is Backbone.TRANSFORMER:
        sizes += [("num_heads", cfg.num_heads), ("the MLP hidden size", cfg.hidden)]
    for what, size in sizes:
        if size % model:
            raise MeshError(f"the mesh's {model=} must divide {what} ({size})")


# Collectives over a mesh axis of size 1 cost nothing here. XLA:CPU keeps a collective over one
# device as a real all-reduce (a copy that also splits fusions), so these helpers (and the pmax in
# `vocab_log_normaliser`) skip the axis when its size is 1, and `shard_map_modules` drops such axes
# from every spec: no value ever varies over an axis of size 1, so skipping leaves its type
# unchanged.


def psum(x: PyTree, axis: str) -> PyTree:
    """`lax.psum` over `axis`; the identity on an axis of size 1."""
    return x if lax.axis_size(axis) == 1 else lax.psum(x, axis)


def pvary(x: PyTree, axis: str) -> PyTree:
    """Mark `x` as varying over `axis` (no communication); nothing on an axis of size 1."""
    return x if lax.axis_size(axis) == 1 else lax.pcast(x, (axis,), to="varying")


def vary_like(tree: PyTree, like: Array) -> PyTree:
    """Every array of `tree` marked as varying over the mesh axes `like` varies over (no
    communication): its gradient's sum over those axes, the mark's transpose, is then taken
    where the mark is, not where `tree` meets `like` (see `md4_eqx.model.selected_tokens`)."""
    manual = jax.typeof(like).manual_axis_type
    axes = manual.varying if manual else frozenset()

    def mark(x: Array) -> Array:
        have = jax.typeof(x).manual_axis_type
        missing = tuple(sorted(axes - (have.varying if have else frozenset())))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree.map(mark, tree)


def _axis_index(axis: str) -> Int[Array, ""]:
    """This device's position on `axis`: a constant 0 on an axis of size 1, so that nothing
    computed from it is typed as varying over that axis."""
    return jnp.zeros((), jnp.int32) if lax.axis_size(axis) == 1 else lax.axis_index(axis)


def spec(split: Split, ndim: int) -> P:
    """The PartitionSpec of a weight of `ndim` dims (leading dims, e.g. stacked layers, unsplit)."""
    if split is Split.REPLICATED:
        return P()
    lead = (None,) * (ndim - 2)
    return P(*lead, None, MODEL) if split is Split.COLUMN else P(*lead, MODEL, None)  # ROW or VOCAB


class Sharded(eqx.Module):
    """Base class of the layers that own a weight split over `model`."""

    weight: eqx.AbstractVar[Float[Array, "..."]]
    split: eqx.AbstractVar[Split]


def param_specs(tree: PyTree) -> PyTree:
    """A pytree of PartitionSpecs matching `tree`: `Sharded` weights split, everything else
    replicated."""

    def leaf_spec(node):
        if isinstance(node, Sharded):
            specs = jax.tree.map(lambda _: P(), node)
            return eqx.tree_at(lambda n: n.weight, specs, spec(node.split, node.weight.ndim))
        return P()

    return jax.tree.map(leaf_spec, tree, is_leaf=lambda n: isinstance(n, Sharded))


def shard_map_modules(fn, mesh: Mesh, in_specs, out_specs):
    """`jax.shard_map` for functions of Equinox modules: the arrays of every argument are mapped
    (`in_specs(*array_args)` gives their specs), static fields closed over. Every spec loses the
    mesh axes of size 1 (why: the comment above `psum`)."""

    def drop(spec: P) -> P:  # our specs name one axis per dimension, never a tuple of axes
        return P(*(None if name is None or mesh.shape[name] == 1 else name for name in spec))

    def wrapped(*args):
        arrays, static = eqx.partition(args, eqx.is_array)

        def inner(*arrays):
            return fn(*eqx.combine(arrays, static))

        specs = jax.tree.map(
            drop, (in_specs(*arrays), out_specs), is_leaf=lambda s: isinstance(s, P)
        )
        return jax.shard_map(inner, mesh=mesh, in_specs=specs[0], out_specs=specs[1])(*arrays)

    return wrapped


def batch_specs(model: eqx.Module, key, tokens, labels) -> tuple:
    """In-specs of (model, key, tokens, labels or None): `param_specs`, the key replicated, rows
    over `data`."""
    return param_specs(model), P(), P(DATA), P(DATA)


def shardings(mesh: Mesh, specs: PyTree) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def vocab_offset(local_vocab: int) -> Int[Array, ""]:
    """Global id of this device's first vocabulary row/column."""
    return _axis_index(MODEL) * local_vocab


def vocab_log_normaliser(logits: Float[Array, "*b v_local"], vocab_size: int) -> Float[Array, "*b"]:
    """log sum_v exp(logits_v) over the real vocabulary (ids < V), with the vocabulary split over
    `model`: padded columns are excluded, and no device ever holds the full [*b, V] logits."""
    v_local = logits.shape[-1]
    ids = vocab_offset(v_local) + jnp.arange(v_local)
    # Padded columns to -inf by adding a [v_local] row, not a `where` over [*b, v_local]: the
    # sum's gradient there is exp(-inf) = 0 either way, and an addition's transpose needs no mask
    # (XLA:TPU would materialise the [*b, v_local] mask again in the backward pass).
    padded = jnp.where(ids < vocab_size, 0.0, -jnp.inf).astype(logits.dtype)
    logits = logits + jnp.broadcast_to(padded, logits.shape)
    # The max is only a numerical shift: its gradient cancels, so it is held constant.
    m = lax.stop_gradient(jnp.max(logits, axis=-1))
    m = m if lax.axis_size(MODEL) == 1 else lax.pmax(m, MODEL)
    total = psum(jnp.sum(jnp.exp(logits - m[..., None]), axis=-1), MODEL)
    return jnp.log(total) + m


def vocab_gather(values: Float[Array, "*b v_local"], ids: Int[Array, "*b"]) -> Float[Array, "*b"]:
    """values[..., ids] with the last axis split over `model` (gather, never a one-hot)."""
    v_local = values.shape[-1]
    local = ids - vocab_offset(v_local)
    inside = (local >= 0) & (local < v_local)
    picked = jnp.take_along_axis(values, jnp.clip(local, 0, v_local - 1)[..., None], axis=-1)[
        ..., 0
    ]
    return psum(jnp.where(inside, picked, 0.0), MODEL)


def vocab_all_gather(values: Float[Array, "*b v_local"], vocab_size: int) -> Float[Array, "*b v"]:
    """The full last axis, [..., :V], on every device (used by the samplers only). Written as a
    psum of zero-padded slices so the result is known to be replicated over `model`."""
    v_local = values.shape[-1]
    full = jnp.zeros(values.shape[:-1] + (v_local * lax.axis_size(MODEL),), values.dtype)
    full = lax.dynamic_update_slice_in_dim(full, values, vocab_offset(v_local), axis=-1)
    return psum(full, MODEL)[..., :vocab_size]


def global_norm(tree: PyTree, specs: PyTree) -> Float[Array, ""]:
    """The L2 norm of a pytree whose leaves may be split over `model` (as `specs` says): a split
    leaf contributes the sum over its slices, a replicated leaf counts once."""

    def square(leaf, leaf_spec):
        sq = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        return psum(sq, MODEL) if MODEL in leaf_spec else sq

    return jnp.sqrt(sum(jax.tree.leaves(jax.tree.map(square, tree, specs))))


def example_ids(local_batch: int) -> Int[Array, " b"]:
    """Global indices of this device's examples: the randomness of each example is keyed by
    its global index, so any mesh draws the same times, masks and dropout."""
    return _axis_index(DATA) * local_batch + jnp.arange(local_batch)
