"""Bidirectional multi-head attention: the one entry point the model calls, and the table of
implementations it chooses from. Layout everywhere is [batch, seq, heads, head_dim] and the
softmax scale 1/sqrt(head_dim). `Impl` (in `md4_eqx.config`) is what a config names; `KERNELS`
says, for each concrete kernel, what it runs and where it can run. Adding a kernel is one file
plus one row here.
"""

import dataclasses
import functools
import re
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jaxtyping import Array, Float

from md4_eqx.config import Impl
from md4_eqx.errors import ConfigError
from md4_eqx.kernels import flash_attention_gpu as hopper
from md4_eqx.kernels.flash_attention_tpu import flash_attention


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


def _cudnn(q: Array, k: Array, v: Array) -> Array:
    return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, implementation="cudnn")


@dataclasses.dataclass(frozen=True)
class Platform:
    """What a kernel's choice depends on: the platform ("cpu", "gpu", "tpu") and the device
    kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3") of the devices it will run on, real or
    abstract (md4_eqx.targets: compiled for hardware this host does not have)."""

    name: str
    device_kind: str


def platform_of(mesh: Mesh | None = None) -> Platform:
    """The platform `mesh` runs on; with no mesh, that of the mesh being traced for (inside
    `jax.shard_map`, where the model calls `attention`), else this process's first device."""
    if mesh is not None:
        device = mesh.devices.flat[0]
    else:
        abstract = jax.sharding.get_abstract_mesh().abstract_device
        device = abstract if abstract is not None else jax.devices()[0]
    # A jax.Device or an AbstractDevice; CUDA and ROCm devices are both "gpu".
    return Platform(
        "gpu" if device.platform in ("cuda", "rocm") else device.platform, device.device_kind
    )


def _cudnn_refuses(platform: Platform, dtype: jnp.dtype, head_dim: int) -> str | None:
    if platform.name != "gpu":
        return f"needs a GPU, this is {platform.name}"
    if dtype not in (jnp.float16, jnp.bfloat16) or head_dim % 8 or head_dim > 128:
        return (
            f"takes float16/bfloat16 with head_dim a multiple of 8 and <= 128, "
            f"got dtype={dtype.name} and {head_dim=}"
        )
    return None


def _tpu_refuses(platform: Platform, dtype: jnp.dtype, head_dim: int) -> str | None:
    if platform.name != "tpu":
        return (
            f"compiles only for TPU, this is {platform.name}; use 'pallas-interpret' to run it here"
        )
    return None


# Hopper's names (H100, H200, H800, H20, GH200): the device kind says it, abstract devices too,
# where a compute capability is there to ask only of a real GPU.
HOPPER = re.compile(r"\bG?H(100|200|800|20)\b")


def _hopper_refuses(platform: Platform, dtype: jnp.dtype, head_dim: int) -> str | None:
    if platform.name != "gpu":
        return f"compiles only for Hopper GPUs, this is {platform.name}"
    if not HOPPER.search(platform.device_kind):  # wgmma is Hopper's alone
        return f"needs a Hopper GPU (H100, H200, ...), this one is {platform.device_kind!r}"
    if dtype not in hopper.DTYPES or head_dim not in hopper.HEAD_DIMS:
        return (
            f"takes float16/bfloat16 with head_dim in {hopper.HEAD_DIMS}, "
            f"got dtype={dtype.name} and {head_dim=}"
        )
    return None


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One concrete implementation: `run(q, k, v)`, and `refuses(platform, dtype, head_dim)`,
    which says why it cannot run there (None: it can; by default it runs anywhere)."""

    impl: Impl
    run: Callable[[Array, Array, Array], Array]
    refuses: Callable[[Platform, jnp.dtype, int], str | None] = lambda platform, dtype, head_dim: (
        None
    )


# In order of preference: `Impl.AUTO` takes the first compiled row that runs on the platform.
# On a Hopper GPU cuDNN comes before our kernel until bench/attention.py measures otherwise
# (no GPU figure of the Hopper kernel exists yet: bench/RESULTS.md).
KERNELS = (
    Kernel(Impl.PALLAS, flash_attention, _tpu_refuses),
    Kernel(Impl.CUDNN, _cudnn, _cudnn_refuses),
    Kernel(Impl.PALLAS, hopper.flash_attention_gpu, _hopper_refuses),
    Kernel(Impl.XLA, attention_reference),
    Kernel(Impl.PALLAS_INTERPRET, functools.partial(flash_attention, interpret=True)),
)
COMPILED = tuple(k for k in KERNELS if k.impl is not Impl.PALLAS_INTERPRET)


def available_impls(platform: Platform | None = None) -> tuple[Impl, ...]:
    """The compiled implementations that run on `platform` (default: `platform_of()`) for some
    dtype and head_dim."""
    platform = platform or platform_of()
    runs = [k.impl for k in COMPILED if k.refuses(platform, jnp.dtype(jnp.bfloat16), 64) is None]
    return tuple(dict.fromkeys(runs))


def resolve(
    impl: Impl, dtype: jnp.dtype, head_dim: int, platform: Platform | None = None
) -> Kernel:
    """The first row of `impl` (for `Impl.AUTO`: of any compiled kernel) that runs on `platform`
    (default: `platform_of()`), or a ConfigError saying why none can run there."""
    platform = platform or platform_of()
    rows = COMPILED if impl is Impl.AUTO else [k for k in KERNELS if k.impl is impl]
    reasons = [k.refuses(platform, jnp.dtype(dtype), head_dim) for k in rows]
    if None in reasons:
        return rows[reasons.index(None)]
    raise ConfigError("attention", f"'{impl.value}' {'; '.join(reasons)}")


def attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s h d"],
    v: Float[Array, "b s h d"],
    *,
    impl: Impl = Impl.AUTO,
) -> Float[Array, "b t h d"]:
    """Bidirectional softmax(q k^T / sqrt(d)) v with the implementation `impl` picks."""
    return resolve(impl, q.dtype, q.shape[-1]).run(q, k, v)
