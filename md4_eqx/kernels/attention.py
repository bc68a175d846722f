"""Bidirectional multi-head attention: the one entry point the model calls.

Layout everywhere is [batch, seq, heads, head_dim] and the softmax scale is 1/sqrt(head_dim)
for every implementation:
  "xla"     the plain-JAX reference below, on any backend;
  "pallas"  the hand-written flash attention (flash_attention.py), compiled for TPU, or run
            on any backend by the Pallas interpreter with interpret=True;
  "cudnn"   cuDNN's fused kernel through jax.nn.dot_product_attention, on GPU, float16 or
            bfloat16 inputs with head_dim a multiple of 8 and at most 128;
  "auto"    the fastest that applies: pallas on TPU, cudnn on GPU (xla where cuDNN does not
            take the inputs), xla on CPU.
"""

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from md4_eqx.kernels.flash_attention import flash_attention

IMPLS = ("auto", "pallas", "xla", "cudnn")


def attention_reference(
    q: Float[Array, "b t h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"]
) -> Float[Array, "b t h d"]:
    """Plain-JAX softmax(q k^T / sqrt(d)) v, accumulated in float32."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1)  # (b, h, t, s), float32
    out = jnp.einsum(
        "bhts,bshd->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return out.astype(q.dtype)


def _cudnn_takes(dtype: jnp.dtype, head_dim: int) -> bool:
    return dtype in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def available_impls(backend: str | None = None) -> tuple[str, ...]:
    """The concrete implementations that compile on `backend` (default: JAX's default)."""
    backend = backend or jax.default_backend()
    return {"tpu": ("pallas", "xla"), "gpu": ("cudnn", "xla")}.get(backend, ("xla",))


def resolve_impl(impl: str, dtype: jnp.dtype, head_dim: int, *, interpret: bool = False) -> str:
    """The concrete implementation `attention` runs, or a ValueError naming what is wrong."""
    if impl not in IMPLS:
        raise ValueError(f"unknown attention {impl=}; expected one of {IMPLS}")
    if interpret and impl != "pallas":
        raise ValueError(
            f"{interpret=} runs the Pallas kernel; it needs impl='pallas', not {impl=}"
        )
    backend = jax.default_backend()
    if impl == "auto":
        if backend == "tpu":
            return "pallas"
        if backend == "gpu" and _cudnn_takes(dtype, head_dim):
            return "cudnn"
        return "xla"
    if impl == "pallas" and not interpret and backend != "tpu":
        raise ValueError(
            f"{impl=} compiles only for TPU, this is {backend=}; pass interpret=True to run it here"
        )
    if impl == "cudnn":
        if backend != "gpu":
            raise ValueError(f"{impl=} needs a GPU, this is {backend=}")
        if not _cudnn_takes(dtype, head_dim):
            raise ValueError(
                f"{impl=} takes float16/bfloat16 with head_dim a multiple of 8 and <= 128, "
                f"got {dtype=} and {head_dim=}"
            )
    return impl


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h d"],
    *,
    impl: str = "auto",
    interpret: bool = False,
) -> Float[Array, "b t h d"]:
    """Bidirectional softmax(q k^T / sqrt(d)) v with the implementation `impl` picks."""
    chosen = resolve_impl(impl, q.dtype, q.shape[-1], interpret=interpret)
    if chosen == "pallas":
        return flash_attention(q, k, v, interpret=interpret)
    if chosen == "cudnn":
        scale = q.shape[-1] ** -0.5
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    return attention_reference(q, k, v)
