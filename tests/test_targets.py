"""Compile targets: the real TPU compiler (libtpu, the [tpu] extra) on abstract devices, on this
CPU.

These are compiles, not lowerings: Mosaic compiles our TPU kernel at the block sizes the TPU
uses, and a kernel over VMEM is refused (the negative control: a lowering alone would pass it).
Every test skips with one line without libtpu; the GPU target's test without the CUDA plugin.
Shapes are small: a compile costs 1-2 s on 2 cores.
"""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import train
from md4_eqx import targets
from md4_eqx.config import Impl, preset
from md4_eqx.errors import TargetError
from md4_eqx.kernels.attention import Platform, platform_of, resolve
from md4_eqx.kernels.flash_attention_tpu import flash_attention
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import Planner, lowered_step

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason='the TPU compiler is not installed: pip install -e ".[tpu]"',
)


def compile_for(target: str, fn, *shapes: jax.ShapeDtypeStruct) -> jax.stages.Compiled:
    """jit(fn) compiled for one chip of `target`, on inputs of `shapes` placed there."""
    mesh = Mesh(np.asarray(targets.parse(target).devices()[:1]).reshape(1, 1), ("data", "model"))
    placed = [
        jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, P())) for s in shapes
    ]
    return jax.jit(fn).trace(*placed).lower().compile()


def test_parse_names():
    assert targets.parse("v5e:2x4").grid == (2, 4) and targets.parse("v5e:2x4").chips == 8
    assert targets.parse("v4:2x2x1").platform == "tpu"
    h100 = targets.parse("h100:8")
    assert (h100.platform, h100.chips, h100.chip.memory) == ("gpu", 8, targets.CHIPS["h100"].memory)
    assert targets.parse("a100-40gb").chips == 1


@pytest.mark.parametrize(
    "name", ["v5e", "v5e:2x2x1", "v4:2x2", "h100:0", "tpu-v5e:2x4", "v5litepod-8"]
)
def test_unknown_target_lists_the_known(name):
    with pytest.raises(
        TargetError,
        match=r"^unknown target .*; known: v5e:AxB, v6e:AxB, v5p:AxBxC, v4:AxBxC, h100\[:N\]",
    ):
        targets.parse(name)


@needs_libtpu
@pytest.mark.parametrize("target", ["v5e:1x1", "v6e:1x1"])
@pytest.mark.parametrize(
    ("head_dim", "dtype"), [(64, jnp.bfloat16), (128, jnp.float32)], ids=["d64-bf16", "d128-f32"]
)
def test_tpu_kernel_compiles(target, head_dim, dtype):
    """Forward and backward, compiled by Mosaic with the TPU's default blocks (512 forward, 256
    backward), a ragged length (600: the last block part padding), counted by XLA's cost
    analysis."""
    x = jax.ShapeDtypeStruct((1, 600, 2, head_dim), dtype)

    def loss(q, k, v):
        return jnp.sum(flash_attention(q, k, v).astype(jnp.float32))

    compiled = compile_for(target, jax.grad(loss, argnums=(0, 1, 2)), x, x, x)
    # The kernels' cost estimates: 4 + 6 + 8 products of [t, t] scores with head_dim over the
    # padded length.
    attention_flops = 18 * 2 * 1024**2 * head_dim
    assert compiled.cost_analysis()["flops"] >= attention_flops


@needs_libtpu
def test_compiler_refuses_a_kernel_over_vmem():
    """The negative control: 256 MiB of VMEM scratch lowers, but Mosaic's compile says no."""

    def kernel(x_ref, o_ref, scratch):
        scratch[...] = jnp.zeros(scratch.shape, jnp.float32)
        o_ref[...] = x_ref[...] + scratch[:8, :]

    def fn(x):
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
            scratch_shapes=[pltpu.VMEM((512 * 1024, 128), jnp.float32)],
        )(x)

    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        compile_for("v5e:1x1", fn, jax.ShapeDtypeStruct((8, 128), jnp.float32))


@needs_libtpu
def test_training_step_with_pallas_compiles_for_v5e_2x2():
    """The whole tiny step, `--attention pallas`, on a (2, 2) mesh of v5e chips: the kernel
    inside the (data, model) shard_map, heads split over `model`, chosen for the mesh's
    devices (no TPU in this process), and compiled with them."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(
        cfg, execution=dataclasses.replace(cfg.execution, attention=Impl.PALLAS)
    )
    mesh = make_mesh(2, 2, targets.parse("v5e:2x2").devices())
    assert platform_of(mesh) == Platform("tpu", "TPU v5 lite")
    compiled = lowered_step(cfg, mesh, batch=8, microbatches=1).compile()
    assert "tpu_custom_call" in compiled.as_text()


# One layer of width 64 and a 300,000-token head, at 12,288 positions. In chunks of 2048 (the
# default) XLA's attention scores ([heads, seq, seq] an example) bound the batch at a few
# examples, so the plan's search compiles few and small programs (the TPU compiler takes longer
# for each batch it accepts, the larger the longer); a chunk of all 12,288 positions is more
# than the chip, even for one example.
BIG_HEAD = [
    "--preset",
    "tiny",
    "--width",
    "64",
    "--num-layers",
    "1",
    "--num-heads",
    "2",
    "--vocab-size",
    "300000",
    "--seq-len",
    "12288",
]


@needs_libtpu
def test_plan_for_a_target(capsys):
    """`train.py --plan --target v5e:1x1`: compiled for the chip by its own compiler, the largest
    batch is where that compiler stops accepting the step."""
    assert (
        train.main(
            [
                *BIG_HEAD,
                "--attention",
                "xla",
                "--plan",
                "--target",
                "v5e:1x1",
                "--batch-size",
                "auto",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "of TPU v5 lite" in out and "a batch fits when the TPU compiler accepts it" in out
    assert out.count("largest microbatch") == 1 and "TFLOP per step" in out
    largest = int(out.split("remat none: largest microbatch ")[1].split()[0])
    assert largest >= 1 and f"planned: --batch-size {largest} --microbatches 1" in out
    fastest = out.split(f" for the global batch {largest}: ")[1]
    assert "estimated step" in fastest and "the TPU compiler's cost model" in fastest
    assert "tokens/s per chip, MFU" in fastest and "(the compiler's estimate" in fastest


@needs_libtpu
def test_plan_for_a_target_that_holds_no_example(capsys):
    """The head in one chunk of all 12,288 positions: one example is more than the chip's HBM, and
    the compiler's refusal is the one line."""
    args = [
        *BIG_HEAD,
        "--head-chunk",
        "12288",
        "--plan",
        "--target",
        "v5e:1x1",
    ]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and "one example per device does not fit: the TPU compiler says" in err
    )
    assert "HBM" in err


@needs_libtpu
def test_tpu_compiler_refusal_marks_a_batch_too_big():
    """On a TPU the compiler's own HBM check decides: a batch it refuses does not fit, and the
    refusal is kept (a VMEM refusal or any other error would be raised)."""
    planner = Planner(
        preset("tiny"),
        make_mesh(1, 1, targets.parse("v5e:1x1").devices()),
        targets.CHIPS["v5e"].memory,
    )
    assert planner.by_compiler and planner.fits(planner.run, 1)
    assert not planner.fits(planner.run, 8192)  # ~25 GiB of temporaries against 15.75 GiB
    assert "memory" in planner.step(planner.run, 8192).refused.lower()


def test_unknown_target_is_one_line_and_status_2(capsys):
    assert train.main(["--plan", "--target", "v5e:3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown target 'v5e:3'" in err


@pytest.mark.skipif(
    importlib.util.find_spec("jax_cuda12_plugin") is None,
    reason='the GPU compiler is not installed: pip install -e ".[cuda]" (~6 GB)',
)
def test_gpu_target_compiles_the_step():
    """Eight abstract H100s from the project's own target description; the step compiles for
    them with XLA's attention (cuDNN's and the Mosaic GPU kernel compile only on a device)."""
    h100 = targets.parse("h100:8")
    devices = h100.devices()
    assert len(devices) == 8
    platform = platform_of(make_mesh(8, 1, devices))
    assert (
        resolve(Impl.PALLAS, jnp.dtype(jnp.bfloat16), 64, platform).run.__name__
        == "flash_attention_gpu"
    )
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, execution=dataclasses.replace(cfg.execution, attention=Impl.XLA))
    compiled = lowered_step(cfg, make_mesh(8, 1, devices), batch=8, microbatches=1).compile()
    assert compiled.memory_analysis().temp_size_in_bytes > 0


@needs_libtpu
def test_a_program_without_a_target_does_not_load_libtpu():
    """On this host (no TPU chip) with libtpu installed, a program that names no TPU target runs
    on the CPU and its stderr stays empty: libtpu, left to load, prints five lines there."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_ACCELERATOR_TYPE")
    }
    code = (
        "from md4_eqx.targets import keep_jax_off_absent_tpus\n"
        "keep_jax_off_absent_tpus()\n"
        "import jax\n"
        "print(jax.devices()[0].platform)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "cpu\n", "")
