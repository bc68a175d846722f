"""Compile targets: a TPU slice or NVIDIA GPUs, named on the command line, as the abstract devices
JAX compiles for on a host that has none of them.

`jax.experimental.topologies.get_topology_desc` asks a compiler's plugin for the devices of a
topology; a mesh over them and `jit(f).trace(...).lower().compile()` then run that platform's
real compiler (XLA TPU and Mosaic; XLA GPU and ptxas), so the memory plan and the kernels'
tests see what the hardware would, without it. Names:

    v5e:2x4  v6e:2x2     a TPU slice: generation and chip grid (v5e, v6e: AxB; v4, v5p: AxBxC)
    h100:8   a100-40gb   NVIDIA GPUs: model and count (default 1) on one host

The TPU compiler is libtpu (`pip install -e ".[tpu]"`); the GPU compiler is the CUDA plugin
(`pip install -e ".[cuda]"`, ~6 GB), which needs `JAX_PLATFORMS=cpu` on a machine without a
GPU, or it fails its driver check and registers nothing.
"""

import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
from pathlib import Path

import jax
from jax.experimental import topologies

from md4_eqx.errors import TargetError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Tpu:
    """A TPU generation (its name in CHIPS is its topology-name prefix): HBM per chip, the rank of
    its chip grid, and what a step-time estimate needs (md4_eqx.step_time), from Google's public
    specifications: the clock is the bf16 peak over its MXUs' multiply-adds per cycle."""

    kind: str  # the device_kind its devices report
    memory: int
    dims: int
    clock_ghz: float
    peak_flops: float  # bf16, per chip
    memory_bandwidth: int  # HBM bytes per second
    megacore: bool = False  # two TensorCores per chip that JAX drives as one device (v4, v5p)


@dataclasses.dataclass(frozen=True)
class Gpu:
    """An NVIDIA GPU as XLA's cost model and code generator need it (`_gpu_config`), from
    NVIDIA's public specifications (`memory` as the device reports its total, a little under
    the marketed size)."""

    name: str  # the device_kind a real one reports
    memory: int
    compute_capability: tuple[int, int]
    sms: int
    fp32_per_sm: int
    clock_ghz: float
    peak_flops: float  # dense bf16 tensor-core flops per second
    memory_bandwidth: int  # bytes per second
    l2_cache: int
    shared_memory_per_sm: int
    shared_memory_per_block: int  # the opt-in maximum


CHIPS = {
    # v5e: 4 MXUs x 128 x 128 multiply-adds x 1.5 GHz = 197 TF/s; v6e: 4 x 256 x 256 at 1.75 GHz.
    "v5e": Tpu("TPU v5 lite", 16 * GIB, 2, 1.5, 197e12, 819_000_000_000),
    "v6e": Tpu("TPU v6 lite", 32 * GIB, 2, 1.75, 918e12, 1_640_000_000_000),
    # Megacore: two TensorCores of 4 MXUs each, driven as one device.
    "v5p": Tpu("TPU v5", 95 * GIB, 3, 1.75, 459e12, 2_765_000_000_000, megacore=True),
    "v4": Tpu("TPU v4", 32 * GIB, 3, 1.05, 275e12, 1_228_000_000_000, megacore=True),
    "h100": Gpu(
        "NVIDIA H100 80GB HBM3",
        84_942_979_072,
        (9, 0),
        sms=132,
        fp32_per_sm=128,
        clock_ghz=1.98,
        peak_flops=989e12,
        memory_bandwidth=3_352_320_000_000,
        l2_cache=50 * 2**20,
        shared_memory_per_sm=228 * 2**10,
        shared_memory_per_block=227 * 2**10,
    ),
    "a100-40gb": Gpu(
        "NVIDIA A100-SXM4-40GB",
        42_298_834_944,
        (8, 0),
        sms=108,
        fp32_per_sm=64,
        clock_ghz=1.41,
        peak_flops=312e12,
        memory_bandwidth=1_555_200_000_000,
        l2_cache=40 * 2**20,
        shared_memory_per_sm=164 * 2**10,
        shared_memory_per_block=163 * 2**10,
    ),
}
# The same chips with more, faster memory: the H200 is an H100 die with 141 GB of HBM3e.
CHIPS["h200"] = dataclasses.replace(
    CHIPS["h100"], name="NVIDIA H200", memory=151_397_597_184, memory_bandwidth=4_800_000_000_000
)
CHIPS["a100-80gb"] = dataclasses.replace(
    CHIPS["a100-40gb"],
    name="NVIDIA A100-SXM4-80GB",
    memory=85_100_068_864,
    memory_bandwidth=2_039_040_000_000,
)
# Where a grid smaller than one host's chips (2x2x1 on every generation here) has to say so.
HOST_CHIPS = (2, 2, 1)


@dataclasses.dataclass(frozen=True)
class Target:
    """A named target: `chips` accelerators of one kind, laid out as `grid` (a TPU's chip grid,
    or (count,) GPUs on one host)."""

    name: str
    chip: Tpu | Gpu
    grid: tuple[int, ...]

    @property
    def platform(self) -> str:
        return "tpu" if isinstance(self.chip, Tpu) else "gpu"

    @property
    def chips(self) -> int:
        return math.prod(self.grid)

    # One set of devices per target, so meshes over them compare equal (a few targets per process).
    @functools.cache  # noqa: B019
    def devices(self) -> list[jax.Device]:
        """The target's abstract devices, one per chip (TargetError if its compiler, the module of
        the project's pip extra, is not installed: it is not loaded to find out)."""
        module, extra = (
            ("libtpu", "tpu") if self.platform == "tpu" else ("jax_cuda12_plugin", "cuda")
        )
        if importlib.util.find_spec(module) is None:
            raise TargetError(
                f'--target {self.name}: its compiler is not installed: pip install -e ".[{extra}]"'
            )
        if isinstance(self.chip, Tpu):
            quiet_libtpu()
            options = {"chip_config_name": "megacore"} if self.chip.megacore else {}
            grid3 = (*self.grid, 1, 1)[:3]
            if any(
                g < h for g, h in zip(grid3, HOST_CHIPS, strict=True)
            ):  # a slice of less than one host
                options.update(
                    chips_per_host_bounds=tuple(map(min, grid3, HOST_CHIPS)),
                    wrap=(False, False, False),
                )
            options.update(topology_name=self.name.lower(), platform="tpu")  # as parse() checked it
        else:
            options = dict(
                topology_name="",
                platform="cuda",
                target_config=_gpu_config(self.chip),
                topology=f"1x1x{self.chips}",
            )
        try:
            return topologies.get_topology_desc(**options).devices
        except NotImplementedError as e:  # the CUDA plugin is installed but did not register
            raise TargetError(
                f"--target {self.name}: the CUDA plugin did not register its platform; "
                f"run with JAX_PLATFORMS=cpu on a machine without a GPU"
            ) from e
        except jax.errors.JaxRuntimeError as e:  # e.g. a grid the generation has no slice of
            raise TargetError(f"--target {self.name}: {str(e).splitlines()[0]}") from e


def parse(name: str) -> Target:
    """The target `name` names (`v5e:2x4`, `h100:8`, `a100-40gb`); TargetError lists the known."""
    chip_name, _, shape = name.lower().partition(":")
    chip = CHIPS.get(chip_name)
    if (
        isinstance(chip, Tpu)
        and re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", shape)
        and shape.count("x") == chip.dims - 1
    ):
        return Target(name, chip, tuple(int(n) for n in shape.split("x")))
    if isinstance(chip, Gpu) and re.fullmatch(r"([1-9][0-9]*)?", shape):
        return Target(name, chip, (int(shape or 1),))
    known = [
        f"{n}:{'x'.join('AB' if c.dims == 2 else 'ABC')}" if isinstance(c, Tpu) else f"{n}[:N]"
        for n, c in CHIPS.items()
    ]
    raise TargetError(f"unknown target {name!r}; known: {', '.join(known)}")


def chip_of(device_kind: str) -> Tpu | Gpu | None:
    """The chip record of devices that report `device_kind` (None: not one of CHIPS, e.g. a CPU)."""
    return next(
        (c for c in CHIPS.values() if device_kind == (c.kind if isinstance(c, Tpu) else c.name)),
        None,
    )


def keep_jax_off_absent_tpus() -> None:
    """Where libtpu (the [tpu] extra) is the only accelerator plugin installed and this host has
    no TPU chip, JAX is kept to the CPU: it would otherwise load libtpu to look for chips, which
    prints five lines of warnings on stderr. Compile targets load libtpu themselves
    (`quiet_libtpu`). Left alone where JAX_PLATFORMS is set, a GPU plugin is installed, or on a
    TPU host. Call it before JAX starts a backend."""
    if (
        "JAX_PLATFORMS" not in os.environ
        and importlib.util.find_spec("libtpu") is not None
        and importlib.util.find_spec("jax_cuda12_plugin") is None
        and not _host_has_tpu()
    ):
        jax.config.update("jax_platforms", "cpu")


def quiet_libtpu() -> None:
    """For a TPU target's compiler on a host without TPU chips: libtpu looks for its own chip
    when it loads, prints five lines of warnings on stderr when it finds none, and (without
    ALLOW_MULTIPLE_LIBTPU_LOAD) lets only one process on the host load it. Naming a (nominal)
    chip and host silences it; compile targets come from the topology name, not from these.
    Left alone on a TPU host, or where set."""
    if not _host_has_tpu():
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _host_has_tpu() -> bool:
    """A TPU chip on this host's PCI bus (Google's vendor id, as libtpu looks for them)."""
    return any(
        Path(vendor).read_text().strip() == "0x1ae0"
        for vendor in glob.glob("/sys/bus/pci/devices/*/vendor")
    )


def _gpu_config(gpu: Gpu) -> str:
    """`gpu` as a GpuTargetConfigProto in text form: the fields of jaxlib 0.10.2's proto that
    XLA's GPU compiler reads (XLA's own examples: xla/backends/gpu/target_config/specs/)."""
    major, minor = gpu.compute_capability
    # sm_90a: Hopper's wgmma and TMA are "accelerated features" outside the portable sm_90.
    extension = "ACCELERATED_FEATURES" if major == 9 else "NONE"
    return f"""
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {gpu.sms}
  fpus_per_core: {gpu.fp32_per_sm}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {gpu.memory_bandwidth}
  l2_cache_size: {gpu.l2_cache}
  clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory}
  shared_memory_per_block_optin: {gpu.shared_memory_per_block}
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  name: "{gpu.name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{gpu.name}"
"""
