"""What both flash-attention kernels (TPU, Hopper) share: the custom_vjp that turns a forward and
a backward into one differentiable function of zero-padded sequences, and their output types
under shard_map.

Dao et al., "FlashAttention" (2022), Algorithms 1 and 2: three kernels, all bidirectional, with
scale = 1/sqrt(head_dim),

  forward   per q block, over kv blocks: online softmax; writes o and the log-sum-exp (lse)
            of every query row;
  dq        per q block, over kv blocks: dq = scale * sum_kv dS K;
  dk, dv    per kv block, over q blocks: dv = sum_q P^T dO,  dk = scale * sum_q dS^T Q,
with P = exp(Q K^T * scale - lse) recomputed from the residuals (q, k, v, o, lse), never stored,
dS = P * (dO V^T - delta), delta = rowsum(dO * O). Each kernel masks the padded tail of the
axis it reduces over (-inf logits); padded rows of the other axis are sliced away here.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def flash_vjp(forward: Callable, backward: Callable, *, seq_axis: int) -> Callable:
    """`flash(q, k, v, blocks, interpret, *, q_multiple, kv_multiple) -> o`, differentiable, from
    `forward(q, k, v, *, kv_len, blocks, interpret) -> (o, lse)` and
    `backward(q, k, v, do, lse, delta, *, q_len, kv_len, blocks, interpret) -> (dq, dk, dv)`,
    which see the sequences (axis `seq_axis`) zero-padded to multiples of q_multiple and
    kv_multiple; lse and delta are [b, h, seq]."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
    def padded(q, k, v, q_len, kv_len, blocks, interpret):
        return forward(q, k, v, kv_len=kv_len, blocks=blocks, interpret=interpret)[0]

    def padded_fwd(q, k, v, q_len, kv_len, blocks, interpret):
        o, lse = forward(q, k, v, kv_len=kv_len, blocks=blocks, interpret=interpret)
        return o, (q, k, v, o, lse)

    def padded_bwd(q_len, kv_len, blocks, interpret, residuals, do):
        q, k, v, o, lse = residuals
        delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # rowsum(dO * O)
        delta = jnp.moveaxis(delta, seq_axis, -1)  # (b, h, seq) in either layout
        return backward(
            q, k, v, do, lse, delta, q_len=q_len, kv_len=kv_len, blocks=blocks, interpret=interpret
        )

    padded.defvjp(padded_fwd, padded_bwd)

    def pad(x, multiple):
        widths = [(0, 0)] * x.ndim
        widths[seq_axis] = (0, -x.shape[seq_axis] % multiple)
        return jnp.pad(x, widths)

    def flash(q, k, v, blocks, interpret, *, q_multiple, kv_multiple):
        if not q.dtype == k.dtype == v.dtype:
            raise ValueError(f"q, k, v must share a dtype: {q.dtype=}, {k.dtype=}, {v.dtype=}")
        q_len, kv_len = q.shape[seq_axis], k.shape[seq_axis]
        k, v = pad(k, kv_multiple), pad(v, kv_multiple)
        o = padded(pad(q, q_multiple), k, v, q_len, kv_len, blocks, interpret)
        return jax.lax.slice_in_dim(o, 0, q_len, axis=seq_axis)

    return flash


def varying(*arrays: jax.Array) -> frozenset:
    """The mesh axes any of `arrays` varies over (empty outside a `jax.shard_map`)."""
    return frozenset().union(*(jax.typeof(x).mat.varying for x in arrays))


def out_type(shape: tuple[int, ...], dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output's type, varying over the mesh axes its inputs `like` vary over: inside
    `jax.shard_map(..., check_vma=True)` a kernel must declare them."""
    axes = jax.sharding.ManualAxisType(varying=varying(*like))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=axes)
