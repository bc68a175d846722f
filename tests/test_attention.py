"""Attention: every implementation against a float64 numpy reference, forward and gradients.

The Pallas kernel runs in interpret mode on CPU. The interpreter fills every output buffer
with NaN before the kernel runs, so an output block the kernel never wrote fails the
comparison (test_interpreter_poisons_unwritten_outputs shows the poison is there).
Interpret mode pays a host round trip per grid step, so shapes are small and grids short.
The Hopper kernel is lowered for CUDA here, inside the training step; the TPU kernel is
compiled for TPU targets in tests/test_targets.py.
"""

import dataclasses
import importlib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec as P

from md4_eqx.config import Precision, Remat, preset
from md4_eqx.errors import ConfigError
from md4_eqx.kernels import Impl, attention
from md4_eqx.kernels.attention import Platform, available_impls, platform_of, resolve
from md4_eqx.kernels.flash_attention_gpu import flash_attention_gpu
from md4_eqx.kernels.flash_attention_tpu import INTERPRET, BlockSizes, flash_attention
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import lowered_step
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

attention_module = importlib.import_module(
    "md4_eqx.kernels.attention"
)  # the package exports the function

# Tolerance on max |error| / max |reference|, per input dtype.
# float32: the kernel differs from the float64 reference only by float32 rounding in sums of
#   <= ~100 terms taken in another order (online softmax); observed <= 1e-6, i.e. ~8 eps.
# bfloat16: inputs are bf16-exact for both sides, but P and dS are rounded to bf16 before
#   their matmuls and the outputs to bf16: each rounding is up to 2^-8 = 3.9e-3 relative;
#   observed <= 6e-3, so 2e-2 is about five bf16 ulps of the largest element.
# float16 (the Hopper kernel): the same roundings at 2^-11 = 4.9e-4; 3e-3 is about five ulps.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}


def reference_float64(q, k, v, do):
    """o = softmax(q k^T / sqrt(d)) v and the gradients of <o, do>, in float64 numpy."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    scale = q.shape[-1] ** -0.5
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (b, h, t, s)
    o = np.einsum("bhts,bshd->bthd", p, v)
    dp = np.einsum("bthd,bshd->bhts", do, v)
    ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    dq = np.einsum("bhts,bshd->bthd", ds, k) * scale
    dk = np.einsum("bhts,bthd->bshd", ds, q) * scale
    dv = np.einsum("bhts,bthd->bshd", p, do)
    return o, dq, dk, dv


def random_inputs(key, batch, q_len, kv_len, heads, head_dim, dtype):
    """Standard-normal q, k, v and an output cotangent do."""
    kq, kk, kv, kd = jax.random.split(key, 4)
    q_shape, kv_shape = (batch, q_len, heads, head_dim), (batch, kv_len, heads, head_dim)
    return (
        jax.random.normal(kq, q_shape, jnp.float32).astype(dtype),
        jax.random.normal(kk, kv_shape, jnp.float32).astype(dtype),
        jax.random.normal(kv, kv_shape, jnp.float32).astype(dtype),
        jax.random.normal(kd, q_shape, jnp.float32).astype(dtype),
    )


def output_and_gradients(fn, q, k, v, do):
    """fn(q, k, v) and the gradients of <fn(q, k, v), do>, in one jitted program."""

    @jax.jit
    def run(q, k, v, do):
        o, vjp = jax.vjp(fn, q, k, v)
        return (o, *vjp(do))

    return run(q, k, v, do)


def assert_matches(actual, expected, dtype):
    for name, a, e in zip(("o", "dq", "dk", "dv"), actual, expected, strict=True):
        a = np.asarray(a, np.float64)
        assert np.isfinite(a).all(), f"{name} has non-finite elements (unwritten?)"
        error = np.abs(a - e).max() / np.abs(e).max()
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.2e} with {dtype=}"


# (batch, q_len, kv_len, heads, head_dim, dtype): no length is a multiple of its blocks.
# With the long-sequence test (bfloat16, 64) every head_dim meets every dtype; each case
# costs seconds in the interpreter, so there are no more. The kernels' blocks hold groups of
# heads 128 lanes wide: 4 heads of 64 are two groups of two, 2 of 128 two groups of one.
CASES = [
    (1, 70, 70, 4, 64, jnp.float32),
    (2, 45, 45, 2, 128, jnp.bfloat16),
    (1, 61, 40, 2, 128, jnp.float32),
]
CASE_IDS = [f"b{b}-t{t}-s{s}-h{h}-d{d}-{dt.__name__}" for b, t, s, h, d, dt in CASES]
# Forward and backward blocks differ, so the sequences pad to their least common multiple.
SMALL_BLOCKS = BlockSizes(block_q=32, block_k=24, block_q_bwd=16, block_k_bwd=24)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pallas_matches_float64(case):
    batch, q_len, kv_len, heads, head_dim, dtype = case
    inputs = random_inputs(jax.random.key(q_len), batch, q_len, kv_len, heads, head_dim, dtype)

    def fn(q, k, v):
        return flash_attention(q, k, v, block_sizes=SMALL_BLOCKS, interpret=True)

    assert_matches(output_and_gradients(fn, *inputs), reference_float64(*inputs), dtype)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_xla_matches_float64(case):
    batch, q_len, kv_len, heads, head_dim, dtype = case
    inputs = random_inputs(jax.random.key(q_len), batch, q_len, kv_len, heads, head_dim, dtype)

    def fn(q, k, v):
        return attention(q, k, v, impl=Impl.XLA)

    assert_matches(output_and_gradients(fn, *inputs), reference_float64(*inputs), dtype)


def test_pallas_default_blocks_long_sequence():
    """T = 1000 with the default interpret blocks (128): an 8 x 8 grid with a ragged tail."""
    inputs = random_inputs(jax.random.key(1000), 1, 1000, 1000, 1, 64, jnp.bfloat16)

    def fn(q, k, v):
        return attention(q, k, v, impl=Impl.PALLAS_INTERPRET)

    assert_matches(output_and_gradients(fn, *inputs), reference_float64(*inputs), jnp.bfloat16)


def test_pallas_inside_shard_map():
    """Batch over "data", heads over "model", vma checked: how the training step calls it."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    spec = P("data", None, "model")
    inputs = random_inputs(jax.random.key(7), 2, 40, 40, 4, 64, jnp.float32)
    sharded = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in inputs]
    blocks = BlockSizes(block_q=24, block_k=24, block_q_bwd=24, block_k_bwd=24)

    def fn(q, k, v):
        return flash_attention(q, k, v, block_sizes=blocks, interpret=True)

    per_shard = jax.shard_map(
        lambda *args: output_and_gradients(fn, *args),
        mesh=mesh,
        in_specs=(spec,) * 4,
        out_specs=(spec,) * 4,
        check_vma=True,
    )
    assert_matches(jax.jit(per_shard)(*sharded), reference_float64(*inputs), jnp.float32)


def test_interpreter_poisons_unwritten_outputs():
    """The NaN fill that the comparisons above rely on: a block the kernel never wrote comes
    back NaN. (A block skipped after another was written holds that block's stale values,
    as on a TPU; the numerical comparisons catch those.)"""

    def write_last_block_only(x_ref, o_ref):
        @pl.when(pl.program_id(0) == 1)
        def _():
            o_ref[...] = x_ref[...]

    x = jnp.ones((16, 128), jnp.float32)
    out = pl.pallas_call(
        write_last_block_only,
        grid=(2,),
        in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
        out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        interpret=INTERPRET,
    )(x)
    assert np.isnan(out[:8]).all() and np.isfinite(out[8:]).all()


@pytest.mark.parametrize("remat", [Remat.NONE, Remat.FULL], ids=["unrolled", "remat-scan"])
def test_training_step_with_hopper_kernel_lowers(monkeypatch, remat):
    """The whole training step with `--attention pallas` as an H100 runs it: the Mosaic GPU
    kernel inside the (data, model) shard_map with heads split over `model` and vma checked,
    bfloat16, a ragged sequence; unrolled, and rolled into a scan with remat. Lowered for CUDA
    (Mosaic GPU's lowering down to PTX); compiling it needs the CUDA plugin, and the kernel
    itself compiles only on a GPU. The mesh is of CPUs, so the kernel's row is chosen by hand.
    (The TPU kernel is compiled for real: tests/test_targets.py.)"""
    row = next(k for k in attention_module.KERNELS if k.run is flash_attention_gpu)
    monkeypatch.setattr(attention_module, "resolve", lambda *args, **kwargs: row)
    cfg = preset("tiny")
    model = dataclasses.replace(cfg.model, width=256, num_heads=4, seq_len=200)
    execution = dataclasses.replace(
        cfg.execution, precision=Precision.BFLOAT16, remat=remat, unroll_layers=remat is Remat.NONE
    )
    cfg = dataclasses.replace(cfg, model=model, execution=execution)
    mesh = make_mesh(2, 2, jax.devices("cpu")[:4])
    text = lowered_step(cfg, mesh, batch=8, microbatches=1, platform="cuda").as_text()
    assert "custom_call @mosaic_gpu" in text


def test_auto_picks_per_platform():
    cpu, tpu = Platform("cpu", "cpu"), Platform("tpu", "TPU v5 lite")
    h100, a100 = Platform("gpu", "NVIDIA H100 80GB HBM3"), Platform("gpu", "NVIDIA A100-SXM4-80GB")
    assert available_impls(cpu) == (Impl.XLA,)
    assert available_impls(tpu) == (Impl.PALLAS, Impl.XLA)
    assert available_impls(h100) == (Impl.CUDNN, Impl.PALLAS, Impl.XLA)
    assert available_impls(a100) == (Impl.CUDNN, Impl.XLA)
    assert platform_of() == cpu  # this process, outside any mesh
    assert resolve(Impl.AUTO, jnp.dtype(jnp.bfloat16), 64).impl is Impl.XLA
    assert resolve(Impl.AUTO, jnp.dtype(jnp.bfloat16), 64, h100).impl is Impl.CUDNN
    assert resolve(Impl.AUTO, jnp.dtype(jnp.float32), 64, h100).impl is Impl.XLA
    assert resolve(Impl.AUTO, jnp.dtype(jnp.float32), 64, tpu).impl is Impl.PALLAS
    assert resolve(Impl.PALLAS, jnp.dtype(jnp.bfloat16), 64, h100).run is flash_attention_gpu


@pytest.mark.parametrize(
    ("impl", "message"),
    [
        ("cudnn", "'cudnn' needs a GPU, this is cpu"),
        (
            "pallas",
            "'pallas' compiles only for TPU, this is cpu; use 'pallas-interpret' to run it here; "
            "compiles only for Hopper GPUs, this is cpu",
        ),
    ],
)
def test_attention_rejects_bad_impl(impl, message):
    q = jnp.zeros((1, 8, 1, 64), jnp.float32)
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$") as e:
        attention(q, q, q, impl=Impl(impl))
    assert e.value.field == "attention"


def test_block_size_errors_name_the_value():
    with pytest.raises(ValueError, match="block_k=12 must be a positive multiple of 8"):
        BlockSizes(block_q=128, block_k=12, block_q_bwd=128, block_k_bwd=128)
    q = jnp.zeros((1, 8, 1, 64), jnp.float32)
    blocks = BlockSizes(block_q=64, block_k=128, block_q_bwd=128, block_k_bwd=128)
    with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128 on TPU"):
        flash_attention(q, q, q, block_sizes=blocks)


@pytest.mark.slow
def test_tiny_model_trains_the_same_with_pallas_as_with_xla():
    """The real train step (shard_map over a (2, 2) mesh, heads split over "model") with the
    interpreted kernel follows the XLA run. The tiny preset, shrunk so that the interpreter's
    grid stays small; compiling the train step twice takes most of the time. float32
    throughout: the runs differ by attention's rounding (~1e-6 relative, see TOLERANCE),
    which AdamW turns into parameter differences far below lr = 1e-2 (observed ~3e-6)."""
    base = preset("tiny")
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, seq_len=48, width=64, num_layers=1, num_heads=2),
        optim=dataclasses.replace(base.optim, lr=1e-2, warmup=1),
        train=dataclasses.replace(base.train, batch_size=4, steps=4),
    )
    mesh = make_mesh(2, 2, jax.devices()[:4])
    vocab = config.model.vocab_size
    tokens = jax.random.randint(jax.random.key(3), (4, 4, 48), 0, vocab, jnp.int32)  # 4 steps

    def train(impl: Impl):
        cfg = dataclasses.replace(
            config, execution=dataclasses.replace(config.execution, attention=impl)
        )
        optimizer = make_optimizer(cfg.optim, cfg.train.steps)
        state = init_state(cfg, optimizer, mesh)
        step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
        losses = []
        for batch in tokens:
            state, metrics = step(state, batch)
            losses.append(float(metrics.bpt))
        params = jax.tree.leaves(eqx.filter(state.model, eqx.is_array))
        return np.asarray(losses), [np.asarray(x) for x in params]

    xla_losses, xla_params = train(Impl.XLA)
    pallas_losses, pallas_params = train(Impl.PALLAS_INTERPRET)
    np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
    assert max(np.abs(a - b).max() for a, b in zip(pallas_params, xla_params, strict=True)) < 1e-4
