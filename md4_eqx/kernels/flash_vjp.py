"""What both flash-attention kernels (TPU, Hopper) share: the custom_vjp that turns a forward
and a backward into one differentiable function, and their output types under shard_map.

The forward returns o and the log-sum-exp of every query row; the backward recomputes P from
them (FlashAttention, Algorithm 2), so the residuals are (q, k, v, o, lse), never P itself.
"""

import functools
from collections.abc import Callable

import jax


def flash_vjp(forward: Callable, backward: Callable) -> Callable:
    """`flash(q, k, v, q_len, kv_len, blocks, interpret) -> o` from
    `forward(q, k, v, *, kv_len, blocks, interpret) -> (o, lse)` and
    `backward(q, k, v, o, lse, do, *, q_len, kv_len, blocks, interpret) -> (dq, dk, dv)`."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
    def flash(q, k, v, q_len, kv_len, blocks, interpret):
        return forward(q, k, v, kv_len=kv_len, blocks=blocks, interpret=interpret)[0]

    def flash_fwd(q, k, v, q_len, kv_len, blocks, interpret):
        o, lse = forward(q, k, v, kv_len=kv_len, blocks=blocks, interpret=interpret)
        return o, (q, k, v, o, lse)

    def flash_bwd(q_len, kv_len, blocks, interpret, residuals, do):
        return backward(*residuals, do, q_len=q_len, kv_len=kv_len, blocks=blocks, interpret=interpret)

    flash.defvjp(flash_fwd, flash_bwd)
    return flash


def varying(*arrays: jax.Array) -> frozenset:
    """The mesh axes any of `arrays` varies over (empty outside a `jax.shard_map`)."""
    return frozenset().union(*(jax.typeof(x).mat.varying for x in arrays))


def out_type(shape: tuple[int, ...], dtype, *like: jax.Array) -> jax.ShapeDtypeStruct:
    """A kernel output's type, varying over the mesh axes its inputs `like` vary over: inside
    `jax.shard_map(..., check_vma=True)` a kernel must declare them."""
    axes = jax.sharding.ManualAxisType(varying=varying(*like))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=axes)
