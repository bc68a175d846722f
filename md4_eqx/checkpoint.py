"""Checkpoints with orbax: atomic, the last k kept, restorable onto any mesh.

    WORKDIR/checkpoints/<step>/state   step, model, optimizer state, base key (arrays)
                              /ema     the EMA model (arrays; all that inference reads)
                              /meta    JSON: the full Config, the data position, the step

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
while saving leaves the previous checkpoints intact. Restoring builds the state abstractly
(`eqx.filter_eval_shape`) and asks orbax for every array with the `NamedSharding` it has on the
target mesh, so a checkpoint saved on one mesh restores onto another; in a multi-process run
every process reads only its own shards. PRNG keys are stored as their raw uint32 data.
"""

import functools
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx.config import Config, config_from_json, config_to_json, model_differences
from md4_eqx.errors import CheckpointError, first_line
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh, param_specs, shardings
from md4_eqx.train_step import TrainState, init_state, state_specs


def _directory(workdir: str | Path) -> Path:
    return Path(workdir).absolute() / "checkpoints"


def _manager(workdir: str | Path, keep: int | None = None, create: bool = False) -> ocp.CheckpointManager:
    """Saves are synchronous: `save` returns once the checkpoint is complete on disk."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, enable_async_checkpointing=False)
    return ocp.CheckpointManager(_directory(workdir), options=options, item_names=("state", "ema", "meta"))


def latest_step(workdir: str | Path) -> int | None:
    """The newest complete checkpoint's step, or None (no checkpoint, or no such directory)."""
    if not _directory(workdir).is_dir():
        return None
    with _manager(workdir) as manager:
        return manager.latest_step()


def _flat(tree) -> dict[str, Any]:
    """{"model.net.embed.weight": array, ...} for the arrays of a module; keys as raw data."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): (
            jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x
        )
        for path, x in leaves
    }


def _unflat(flat: dict[str, Any], like):
    """The pytree of `like` (arrays or abstract arrays) with its leaves taken from `flat`."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    values = []
    for path, x in leaves:
        value = flat[jax.tree_util.keystr(path, simple=True, separator=".")]
        is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        values.append(jax.random.wrap_key_data(value) if is_key else value)
    return jax.tree_util.tree_unflatten(treedef, values)


def _arrays(abstract):
    """The abstract arrays of an `eqx.filter_eval_shape` result (None elsewhere)."""
    return eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _targets(arrays, specs, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets: every array's shape, dtype and sharding on `mesh`, flattened like `_flat`."""
    with_sharding = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        arrays, shardings(mesh, specs),
    )
    return _flat(jax.tree.map(_raw_abstract, with_sharding))


def _raw_abstract(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return x
    raw = jax.eval_shape(jax.random.key_data, x)
    return jax.ShapeDtypeStruct(raw.shape, raw.dtype, sharding=NamedSharding(x.sharding.mesh, P()))


def save(workdir: str | Path, state: TrainState, data_state: dict, config: Config) -> None:
    """Writes checkpoint `state.step` (atomically) and keeps the newest `train.keep_checkpoints`.
    Every process calls it; each writes its own shards."""
    step = int(state.step)
    rest = eqx.filter(eqx.tree_at(lambda s: s.ema, state, None), eqx.is_array)
    meta = {"step": step, "config": config_to_json(config), "data": data_state}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_flat(rest)),
        ema=ocp.args.StandardSave(_flat(eqx.filter(state.ema, eqx.is_array))),
        meta=ocp.args.JsonSave(meta),
    )
    with _manager(workdir, keep=config.train.keep_checkpoints, create=True) as manager:
        manager.save(step, args=args)
        manager.wait_until_finished()


def save_safely(workdir: str | Path, state: TrainState, data_state: dict, config: Config) -> None:
    """`save`, for a disk that may fill up or fail: a write that fails (tensorstore reports a full
    or unwritable disk as ValueError, Python as OSError) becomes a one-line CheckpointError, and
    orbax's logs of its writer threads' exceptions are dropped (from then on: some come late), as
    is the warning, when Python collects them, about the array writes a failed save abandons.
    Partial checkpoints (orbax's temporary directories) of a failed or killed save are removed,
    the completed ones are untouched: a rerun resumes from the newest."""
    logging.getLogger("absl").addFilter(_writer_failure)  # once: a filter is added only once
    warnings.filterwarnings(  # once: an identical filter replaces the earlier one
        "ignore", r"coroutine '.*write_fragment' was never awaited", RuntimeWarning)
    step = int(state.step)
    _remove_partial(workdir)  # left by an earlier run: no other run writes here (the workdir lock)
    try:
        save(workdir, state, data_state, config)
    except (OSError, ValueError) as e:
        _remove_partial(workdir)
        code = re.search(r"os_error_code='?(\d+)", str(e))  # tensorstore's errno, e.g. ENOSPC
        reason = os.strerror(int(code.group(1))) if code else first_line(e)
        raise CheckpointError(
            f"checkpoint {step} could not be written to {_directory(workdir)} ({reason}); "
            f"the newest complete one is step {latest_step(workdir)}"
        ) from None


def _writer_failure(record: logging.LogRecord) -> bool:
    """False for orbax's log of a writer thread's exception (save_safely reports it)."""
    return "_SignalingThread.run() raised an exception" not in record.getMessage()


def _remove_partial(workdir: str | Path) -> None:
    """Process 0 removes orbax's temporary directories (before any process starts a save: orbax
    has process 0 create the new one and the others wait for it)."""
    if jax.process_index() == 0 and _directory(workdir).is_dir():
        for partial in _directory(workdir).glob("*.orbax-checkpoint-tmp*"):
            shutil.rmtree(partial, ignore_errors=True)


def _step_or_latest(workdir: str | Path, step: int | None) -> int:
    found = latest_step(workdir)
    if found is None:
        raise CheckpointError(f"no checkpoint in {_directory(workdir)}")
    if step is None:
        return found
    with _manager(workdir) as manager:
        steps = manager.all_steps()
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {_directory(workdir)}; it has {sorted(steps)}")
    return step


def _read(workdir: str | Path, step: int, **items) -> ocp.args.Composite:
    """Restores the named items of checkpoint `step`. What a damaged checkpoint raises becomes a
    CheckpointError: tensorstore's ValueError (an array's bytes or its metadata), the JSON
    decoder's (meta), OSError (a missing file), KeyError (a missing item)."""
    where = _directory(workdir) / str(step)
    _silence_abandoned_reads()
    try:
        with _manager(workdir) as manager:
            return manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, OSError, KeyError) as e:
        raise CheckpointError(f"checkpoint {where} is unreadable ({type(e).__name__}: {first_line(e)})") from e


@functools.cache  # once per process, before its first read
def _silence_abandoned_reads() -> None:
    """When orbax gives up on a damaged checkpoint, the reads it started but no longer awaits
    still finish, each with the same error: asyncio logs "Future exception was never retrieved",
    or, once orbax's event loop has closed, Python reports an unraisable "Event loop is closed".
    The CheckpointError already says what is wrong, so both are dropped; anything else is shown."""
    default = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")
    )


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[int, Config, dict]:
    """(step, config, data position) of checkpoint `step` (default: the newest)."""
    step = _step_or_latest(workdir, step)
    meta = _read(workdir, step, meta=ocp.args.JsonRestore())["meta"]
    try:
        return step, config_from_json(meta["config"]), meta["data"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {_directory(workdir) / str(step)} has a bad config: {e}") from e


def restore(
    workdir: str | Path,
    mesh: Mesh,
    optimizer: optax.GradientTransformation,
    config: Config | None = None,
    step: int | None = None,
) -> tuple[Config, TrainState, dict]:
    """(config, state on `mesh`, data position) of checkpoint `step` (default: the newest).

    With `config`, the state is built for it (e.g. more steps, another learning rate), after
    checking that it describes the same model as the checkpoint (`model_differences`)."""
    step, saved, data_state = read_meta(workdir, step)
    if config is None:
        config = saved
    elif differences := model_differences(saved, config):
        raise CheckpointError(f"the checkpoint in {workdir} is a different model: {'; '.join(differences)}")
    abstract = eqx.filter_eval_shape(init_state, config, optimizer, mesh)
    arrays, specs = _arrays(abstract), state_specs(abstract, optimizer)
    rest, rest_specs = (eqx.tree_at(lambda s: s.ema, tree, None) for tree in (arrays, specs))
    targets = {"state": _targets(rest, rest_specs, mesh), "ema": _targets(arrays.ema, specs.ema, mesh)}
    items = _read(workdir, step, **{k: ocp.args.StandardRestore(v) for k, v in targets.items()})
    _check_shapes(workdir, step, targets, items)
    restored = eqx.tree_at(
        lambda s: s.ema, _unflat(items["state"], rest), _unflat(items["ema"], arrays.ema),
        is_leaf=lambda x: x is None,
    )
    return config, eqx.combine(restored, abstract), data_state


def load_for_inference(
    workdir: str | Path, step: int | None = None, mesh: Mesh | None = None
) -> tuple[Config, MD4]:
    """(config, EMA model) of checkpoint `step` (default: the newest), its parameters placed on
    `mesh` (default: the first device); only the EMA is read."""
    step, config, _ = read_meta(workdir, step)
    mesh = make_mesh(1, 1, jax.devices()[:1]) if mesh is None else mesh
    abstract = eqx.filter_eval_shape(MD4, config.model, config.diffusion, key=jax.random.key(0))
    arrays = _arrays(abstract)
    target = _targets(arrays, param_specs(arrays), mesh)
    items = _read(workdir, step, ema=ocp.args.StandardRestore(target))
    _check_shapes(workdir, step, {"ema": target}, items)
    return config, eqx.combine(_unflat(items["ema"], arrays), abstract)


def _check_shapes(workdir: str | Path, step: int, targets: dict, items: ocp.args.Composite) -> None:
    """Orbax restores into the target's shape; a stored array of another shape means the
    checkpoint does not belong to this config."""
    for item, target in targets.items():
        for name, want in target.items():
            got = items[item][name]
            if got.shape != want.shape or got.dtype != want.dtype:
                raise CheckpointError(
                    f"checkpoint {_directory(workdir) / str(step)}: {name} is {got.dtype}{list(got.shape)}, "
                    f"the config needs {want.dtype}{list(want.shape)}"
                )
