"""The Hopper (Mosaic GPU) flash attention on CPU: its numbers through the interpreter, its
compiled form through Mosaic GPU's lowering for CUDA.

No GPU here. The numbers come from `flash_attention_gpu(..., interpret=True)`, the Mosaic GPU
interpreter (private in JAX 0.10.2), which runs the kernels' warpgroups as concurrent
threads with simulated shared memory, TMA copies and barriers. It fills every fresh buffer
with NaN, so an output tile the kernels never write fails the finiteness check. Where the
compiled kernel uses what the interpreter lacks, the interpreted form differs in four small
spots (see the kernel's module docstring); those spots are checked by lowering the compiled
form for CUDA (`lowering_platforms=("cuda",)`), which runs Mosaic GPU's own lowering down to
NVVM and wgmma PTX: register layouts, transposed and register operands and in-place
accumulation are checked there; ptxas and a run are not (test_attention.py lowers the
training step with it).
Each interpreted kernel costs seconds, so shapes are one or two tiles of 64/128 rows.
"""

import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P
from test_attention import assert_matches, output_and_gradients, random_inputs, reference_float64

from md4_eqx.kernels.flash_attention_gpu import BlockSizes, flash_attention_gpu

needs_interpreter = pytest.mark.skipif(
    importlib.util.find_spec("jax._src.pallas.mosaic_gpu.interpret") is None,
    reason="this JAX has no Mosaic GPU interpreter to run the kernels on CPU",
)

CASES = {
    # (batch, q_len, kv_len, heads, head_dim, dtype)
    # One q block, two forward kv tiles (the second ragged): the online softmax rescales, the
    # dq kernel's ring refills its slots (4 kv steps, 2 slots), dk/dv has two kv blocks.
    "d64-kv-tiles-ragged": (1, 100, 150, 2, 64, jnp.bfloat16),
    # Two q blocks (the second ragged): the dk/dv kernel's ring refills (4 q steps).
    "d128-q-tiles-ragged": (2, 130, 70, 1, 128, jnp.float16),
}


def lowered_for(platform: str, fn, *args) -> str:
    """The StableHLO text of jit(fn)(*args) lowered for `platform` ("cuda") on this CPU: each
    Pallas kernel is a custom call holding the module Mosaic GPU's lowering produced (down to
    NVVM and inline PTX); nothing is compiled (Mosaic GPU compiles only on a device)."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def interpreted(q, k, v):
    return flash_attention_gpu(q, k, v, interpret=True)


@needs_interpreter
@pytest.mark.slow  # 20-90 s each on 2 shared cores: the interpreter pays per simulated op
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_float64(case):
    """Output and the gradients of <o, do> for q, k, v, against float64 numpy."""
    batch, q_len, kv_len, heads, head_dim, dtype = case
    inputs = random_inputs(jax.random.key(q_len), batch, q_len, kv_len, heads, head_dim, dtype)
    actual = output_and_gradients(interpreted, *inputs)
    assert [x.dtype for x in actual] == [dtype] * 4
    assert_matches(actual, reference_float64(*inputs), dtype)


@needs_interpreter
def test_traces_inside_shard_map_with_vma_checked():
    """Batch over "data", heads over "model", check_vma=True: how the training step calls
    it. Forward and backward are traced and lowered, not run: under shard_map the GPU
    interpreter waits at a barrier across all eight simulated GPUs, and the CPU runtime does
    not run their callbacks concurrently, so running it hangs (JAX 0.10.2)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    spec = P("data", None, "model")
    inputs = random_inputs(jax.random.key(5), 2, 64, 64, 4, 64, jnp.bfloat16)
    sharded = [jax.device_put(x, jax.NamedSharding(mesh, spec)) for x in inputs]
    per_shard = jax.shard_map(
        lambda *args: output_and_gradients(interpreted, *args),
        mesh=mesh, in_specs=(spec,) * 4, out_specs=(spec,) * 4, check_vma=True,
    )  # fmt: skip
    out = jax.jit(per_shard).trace(*sharded).out_info
    assert [x.shape for x in out] == [x.shape for x in inputs]


@pytest.mark.parametrize(
    "shape, dtype, message",
    [
        ((1, 8, 1, 64), jnp.float32, "dtype=float32 must be bfloat16 or float16"),
        ((1, 8, 1, 96), jnp.bfloat16, r"head_dim=96 must be one of \(64, 128\)"),
    ],
    ids=["float32", "head_dim-96"],
)
def test_rejects_what_the_kernel_does_not_take(shape, dtype, message):
    q = jnp.zeros(shape, dtype)
    with pytest.raises(ValueError, match=message):
        flash_attention_gpu(q, q, q, interpret=True)


def test_block_sizes_must_suit_wgmma():
    with pytest.raises(ValueError, match="block_kv=96 must be a positive multiple of 64"):
        BlockSizes(block_kv=96)
    with pytest.raises(ValueError, match="stages=0 must be at least 1"):
        BlockSizes(stages=0)
    assert (BlockSizes().q_multiple, BlockSizes().kv_multiple) == (128, 128)


@pytest.mark.parametrize(
    "head_dim, dtype", [(64, jnp.bfloat16), (128, jnp.float16)], ids=["d64-bf16", "d128-f16"]
)
def test_compiled_form_lowers_for_hopper(head_dim, dtype):
    """Forward, dq and dk/dv in their compiled form (layouts, transposed SMEM operands,
    register left operands, in-place accumulators: the spots the interpreter cannot run) at a
    ragged length and MD4-S's head count, lowered through Mosaic GPU to wgmma instructions."""
    x = jax.ShapeDtypeStruct((2, 1000, 12, head_dim), dtype)

    def loss(q, k, v):
        return jnp.sum(flash_attention_gpu(q, k, v).astype(jnp.float32))

    text = lowered_for("cuda", jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    assert text.count("custom_call @mosaic_gpu") == 3  # forward, dq, dk+dv
    kind = "bf16" if dtype == jnp.bfloat16 else "f16"
    assert f"wgmma.mma_async.sync.aligned.m64n{head_dim}k16.f32.{kind}.{kind}" in text
