"""The custom_vjp that turns a flash-attention forward and backward into one differentiable
function; every kernel file (TPU, Hopper) builds its own with `flash_vjp`.

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
