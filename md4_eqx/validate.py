"""One check before any work: every program (train.py, sample.py, evaluate.py) calls `validate`
once its flags are parsed and the mesh is made, before it reads data or compiles anything.

It holds every check that crosses sections of the config, or the config and the mesh it runs on
(its devices, and the processes that hold them); a check of one section alone is that section's
`__post_init__`. A program that reads a dataset other than its run's (evaluate.py --dataset)
calls `check_data` once it is loaded. Failures are `ConfigError`s (`md4_eqx.cli.run_command`
shows the field as its flag), `MeshError`s or `DataError`s, one line each.
"""

import numpy as np
from jax.sharding import Mesh

from md4_eqx.config import AUTO, Backbone, Config, Loop, ModelConfig, Rule, SamplerConfig
from md4_eqx.data.dataset import Dataset
from md4_eqx.distributed import data_rows
from md4_eqx.errors import ConfigError, DataError, MeshError
from md4_eqx.kernels.attention import platform_of, resolve
from md4_eqx.parallel import DATA, MODEL, check_model_split


def validate(config: Config, mesh: Mesh, batch: int | None = None) -> None:
    """Raise unless `config` runs on `mesh`, `batch` rows at a time (default: training's
    batch in its microbatches; an `auto` one is the planner's to choose, and fits)."""
    model, execution = config.model, config.execution
    resolve(execution.attention, execution.precision.dtype, model.head_dim, platform_of(mesh))
    if execution.head_chunk and model.backbone is Backbone.UNET:
        raise ConfigError(
            "head_chunk", "head_chunk is the transformer's: the U-Net's head is a convolution"
        )
    check_model_split(model, mesh.shape[MODEL])
    check_processes(mesh.devices)
    check_sampler(config.sampler, per_token_schedule=config.diffusion.learnable)
    if config.sampler.guidance and not model.num_classes:
        raise ConfigError(
            "guidance",
            f"guidance={config.sampler.guidance} needs a class-conditional model "
            f"(num_classes > 0); this one has no classes",
        )
    if config.train.batch_size == AUTO and config.train.microbatches not in (AUTO, 1):
        raise ConfigError(
            "microbatches",
            "batch_size auto is the largest batch without accumulation: give a batch size",
        )
    microbatches = 1 if batch is not None else config.train.microbatches or 1
    batch = config.train.batch_size if batch is None else batch
    if batch != AUTO and batch % (mesh.shape[DATA] * microbatches):
        chunks = f" x {microbatches} microbatches" if microbatches > 1 else ""
        raise ConfigError(
            "batch_size",
            f"batch_size={batch} must be a multiple of the {mesh.shape[DATA]} "
            f"devices on the data axis{chunks}",
        )


def check_data(model: ModelConfig, ds: Dataset) -> None:
    """Raise unless a model of config `model` reads `ds`, a dataset other than the one it was
    trained on (evaluate.py --dataset): its tokens lie in the model's vocabulary and, for a
    class-conditional model, it has labels of the model's classes."""
    if ds.vocab_size > model.vocab_size:
        raise DataError(
            f"{ds.name}'s vocabulary ({ds.vocab_size}) is larger than the model's "
            f"({model.vocab_size})"
        )
    if model.num_classes and ds.num_classes != model.num_classes:
        labels = f"{ds.num_classes} classes" if ds.num_classes else "no labels"
        raise DataError(
            f"{ds.name} has {labels}; the model is class-conditional, with {model.num_classes}"
        )


def check_processes(devices: np.ndarray) -> None:
    """Raise a MeshError unless each process's devices lie in one of equal, contiguous parts of
    the data axis of a mesh's [data, model] array of `devices`: each process loads that part of
    every batch (`md4_eqx.distributed.batch_part`). With the devices in process order, that is
    a model axis that divides, or is a multiple of, every process's device count."""
    data, model = devices.shape
    processes = sorted({device.process_index for device in devices.flat})
    parts = {p: data_rows(devices, p) for p in processes}
    size = len(parts[processes[0]])
    for p, rows in parts.items():
        if rows != list(range(rows[0], rows[0] + size)) or rows[0] % size or data % size:
            raise MeshError(
                f"the mesh's {data=} x {model=} does not split over the {len(processes)} "
                f"processes: process {p} holds data rows {rows}, not one of equal contiguous parts"
            )


def check_sampler(cfg: SamplerConfig, per_token_schedule: bool) -> None:
    """Raise for a (rule, loop) pair that does not sample the model's law (md4_eqx.sampling's
    docstring says which pairs do)."""
    if cfg.loop is Loop.EXACT_SKIP and per_token_schedule:
        raise ConfigError(
            "loop",
            "the exact_skip loop needs unmask steps that do not depend on the tokens; "
            "GenMD4's learned per-token schedule makes them depend: use the every_step loop",
        )
    if cfg.rule is Rule.REMDM and (cfg.loop is Loop.EXACT_SKIP or per_token_schedule):
        raise ConfigError(
            "loop" if cfg.loop is Loop.EXACT_SKIP else "rule",
            "the remdm rule runs on the every_step loop under MD4's schedule: remasking lets a "
            "position unmask more than once, and its formulas need one alpha_t for every token",
        )
