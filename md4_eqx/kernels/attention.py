"""Bidirectional multi-head attention: the one entry point the model calls.

Layout everywhere is [batch, seq, heads, head_dim] and the softmax scale is 1/sqrt(head_dim).
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def attention_reference(
    q: Float[Array, "b t h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"]
) -> Float[Array, "b t h d"]:
    """Plain-JAX softmax(q k^T / sqrt(d)) v, accumulated in float32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)  # (b, h, t, s), float32
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h d"],
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b t h d"]:
    """Bidirectional attention. `impl` picks the implementation ("auto" or "xla" for now)."""
    del interpret
    if impl not in ("auto", "xla"):
        raise ValueError(f"unknown attention {impl=}")
    return attention_reference(q, k, v)
