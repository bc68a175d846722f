"""Checkpoints with orbax: atomic, the last k kept, restorable onto any mesh.

    WORKDIR/checkpoints/<step>/state   step, model, optimizer state, base key (arrays)
                              /ema     the EMA model (arrays; all that inference reads)
                              /meta    JSON: the full Config, the data position, the step

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed while saving leaves the previous checkpoints intact, and the next writer removes the
partial one. Restoring builds the state abstractly (`eqx.filter_eval_shape`) and asks orbax for
every array with the `NamedSharding` it has on the target mesh, so a checkpoint saved on one mesh
restores onto another; in a multi-process run every process reads only its own shards. PRNG keys
are stored as their raw uint32 data.
"""

import contextlib
import functools
import gc
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from md4_eqx.config import Config, config_from_json, config_to_json, model_differences
from md4_eqx.errors import CheckpointError, ConfigError, first_line
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh, param_specs, shardings
from md4_eqx.train_step import TrainState, init_state, state_specs


class Checkpoints:
    """The checkpoints of one workdir, through one orbax `CheckpointManager`:
    `with Checkpoints(workdir, keep) as checkpoints:` (the module's `read_meta` opens one for one
    read).

    A writer (`keep` given: the run that holds the workdir's lock) creates the directory, removes
    the partial checkpoints that killed or failed saves left, and keeps the newest `keep`
    complete ones; a reader (sample.py, evaluate.py) changes nothing on disk."""

    def __init__(self, workdir: str | Path, keep: int | None = None):
        self.directory = Path(workdir).absolute() / "checkpoints"
        writer = keep is not None
        options = ocp.CheckpointManagerOptions(
            # `save` returns once the checkpoint is complete on disk
            enable_async_checkpointing=False,
            create=writer,
            cleanup_tmp_directories=writer,  # done by process 0 before this manager's first save
            preservation_policy=ocp.checkpoint_managers.LatestN(keep) if writer else None,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "ema", "meta")
        )

    def __enter__(
        self,
    ) -> "Checkpoints":  # not typing.Self: beartype refuses it outside a decorated class
        return self

    def __exit__(self, *exc) -> None:
        self._manager.close()

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, state: TrainState, data_state: dict, config: Config) -> None:
        """Writes checkpoint `state.step` (atomically); every process calls it and writes its own
        shards. A write that fails (tensorstore reports a full or unwritable disk as ValueError,
        Python as OSError) is a one-line CheckpointError; the complete checkpoints are untouched."""
        step = int(state.step)
        rest = eqx.filter(eqx.tree_at(lambda s: s.ema, state, None), eqx.is_array)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_flat(rest)),
            ema=ocp.args.StandardSave(_flat(eqx.filter(state.ema, eqx.is_array))),
            meta=ocp.args.JsonSave(
                {"step": step, "config": config_to_json(config), "data": data_state}
            ),
        )
        try:
            with _failure_said_once():
                self._manager.save(step, args=args)
            return
        except (OSError, ValueError) as e:
            code = re.search(r"os_error_code='?(\d+)", str(e))  # tensorstore's errno, e.g. ENOSPC
            reason = os.strerror(int(code.group(1))) if code else first_line(e)
        self._manager.reload()
        raise CheckpointError(
            f"checkpoint {step} could not be written to {self.directory} ({reason}); "
            f"the newest complete one is step {self.latest_step()}"
        )

    def _read(self, step: int, **items) -> ocp.args.Composite:
        """Restores the named items of checkpoint `step`. What a damaged checkpoint raises becomes
        a CheckpointError: tensorstore's ValueError (an array's bytes or its metadata), the JSON
        decoder's (meta), OSError (a missing file), KeyError (a missing item)."""
        try:
            with _failure_said_once():
                return self._manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, OSError, KeyError) as e:
            where = self.directory / str(step)
            raise CheckpointError(
                f"checkpoint {where} is unreadable ({type(e).__name__}: {first_line(e)})"
            ) from e

    def _read_arrays(self, step: int, mesh: Mesh, **items: tuple) -> dict:
        """The named items of checkpoint `step`, each given as (abstract arrays, their partition
        specs), restored onto `mesh`. Orbax restores into the target's shape; a stored array of
        another shape means the checkpoint does not belong to this config."""
        targets = {item: _targets(arrays, specs, mesh) for item, (arrays, specs) in items.items()}
        flat = self._read(
            step, **{item: ocp.args.StandardRestore(target) for item, target in targets.items()}
        )
        for item, target in targets.items():
            for name, want in target.items():
                got = flat[item][name]
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise CheckpointError(
                        f"checkpoint {self.directory / str(step)}: {name} is {got.dtype}"
                        f"{list(got.shape)}, the config needs {want.dtype}{list(want.shape)}"
                    )
        return {item: _unflat(flat[item], arrays) for item, (arrays, _) in items.items()}

    def read_meta(self, step: int | None = None) -> tuple[int, Config, dict]:
        """(step, config, data position) of checkpoint `step` (default: the newest)."""
        steps = self._manager.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; it has {sorted(steps)}"
            )
        meta = self._read(step, meta=ocp.args.JsonRestore())["meta"]
        try:
            return step, config_from_json(meta["config"]), meta["data"]
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has a bad config: {e}"
            ) from e

    def restore(
        self, mesh: Mesh, optimizer: optax.GradientTransformation, config: Config
    ) -> tuple[TrainState, dict]:
        """(state on `mesh`, data position) of the newest checkpoint, the state built for `config`
        (e.g. more steps, another learning rate) once it describes the checkpoint's model
        (`model_differences`; `read_meta` gives the saved config)."""
        step, saved, data_state = self.read_meta()
        if differences := model_differences(saved, config):
            raise CheckpointError(
                f"the checkpoint in {self.directory.parent} is a different model: "
                + "; ".join(differences)
            )
        abstract = eqx.filter_eval_shape(init_state, config, optimizer, mesh)
        arrays, specs = _arrays(abstract), state_specs(abstract, optimizer)
        rest, rest_specs = (eqx.tree_at(lambda s: s.ema, tree, None) for tree in (arrays, specs))
        items = self._read_arrays(step, mesh, state=(rest, rest_specs), ema=(arrays.ema, specs.ema))
        restored = eqx.tree_at(
            lambda s: s.ema, items["state"], items["ema"], is_leaf=lambda x: x is None
        )
        return eqx.combine(restored, abstract), data_state

    def load_for_inference(self, step: int, config: Config, mesh: Mesh | None = None) -> MD4:
        """The EMA model of checkpoint `step`, whose config `read_meta` gave, its parameters placed
        on `mesh` (default: the first device); only the EMA is read."""
        mesh = make_mesh(1, 1, jax.devices()[:1]) if mesh is None else mesh
        abstract = eqx.filter_eval_shape(
            MD4, config.model, config.diffusion, config.execution, key=jax.random.key(0)
        )
        arrays = _arrays(abstract)
        ema = self._read_arrays(step, mesh, ema=(arrays, param_specs(arrays)))["ema"]
        return eqx.combine(ema, abstract)


@contextlib.contextmanager
def _failure_said_once() -> Iterator[None]:
    """Around an orbax save or restore. When one fails, orbax raises the first error and abandons
    the array writes or reads it started, in its threads and tensorstore's; they go on reporting
    the same failure, which the CheckpointError already says, and orbax has no option to stop
    them. This drops exactly those reports:
    - orbax's threads log, through absl, the exception each met ("_SignalingThread.run() raised
      an exception"): the one `save` raises, and those of the writes it abandoned;
    - an abandoned read or write that finishes after orbax closed its event loop raises "Event loop
      is closed" in its callback (`loop.call_soon_threadsafe`), which Python prints as an
      unraisable exception;
    - an abandoned write that never started is a coroutine never awaited (`write_fragment`), a
      RuntimeWarning when collected: collected here, its warning dropped.
    The first two come until Python exits, so after a failure their filters stay for the rest of
    the process (which then ends with the CheckpointError); a call that succeeds leaves none."""
    absl = logging.getLogger("absl")
    absl.addFilter(_thread_report)
    default = sys.unraisablehook
    sys.unraisablehook = functools.partial(_unless_loop_closed, default=default)
    try:
        yield
    except BaseException:
        # An abandoned write's task fails after orbax stopped awaiting it: asyncio logs "Task
        # exception was never retrieved" with its traceback when the task is collected.
        logging.getLogger("asyncio").addFilter(_never_retrieved)
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", r"coroutine '.*write_fragment' was never awaited", RuntimeWarning
            )
            gc.collect()
        raise
    absl.removeFilter(_thread_report)
    sys.unraisablehook = default


def _never_retrieved(record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _thread_report(record: logging.LogRecord) -> bool:
    return "_SignalingThread.run() raised an exception" not in record.getMessage()


def _unless_loop_closed(unraisable, default) -> None:
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
        default(unraisable)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _flat(tree) -> dict[str, Any]:
    """{"model.net.embed.weight": array, ...} for the arrays of a module; PRNG keys as raw data."""
    return {
        _name(path): jax.random.key_data(x) if _is_key(x) else x
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def _unflat(flat: dict[str, Any], like):
    """The pytree of `like` (arrays or abstract arrays) with its leaves taken from `flat`."""

    def leaf(path, x):
        return jax.random.wrap_key_data(flat[_name(path)]) if _is_key(x) else flat[_name(path)]

    return jax.tree_util.tree_map_with_path(leaf, like)


def _arrays(abstract):
    """The abstract arrays of an `eqx.filter_eval_shape` result (None elsewhere)."""
    return eqx.filter(abstract, lambda x: isinstance(x, jax.ShapeDtypeStruct))


def _targets(arrays, specs, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """Restore targets: every array's shape, dtype and sharding on `mesh`, flattened like `_flat`
    (a PRNG key as its raw data, replicated)."""

    def target(x: jax.ShapeDtypeStruct, sharding: NamedSharding) -> jax.ShapeDtypeStruct:
        if _is_key(x):
            x, sharding = jax.eval_shape(jax.random.key_data, x), NamedSharding(mesh, P())
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return _flat(jax.tree.map(target, arrays, shardings(mesh, specs)))


def read_meta(workdir: str | Path, step: int | None = None) -> tuple[int, Config, dict]:
    """`Checkpoints.read_meta`, for a program (or a test) that reads a workdir's checkpoints
    once."""
    with Checkpoints(workdir) as checkpoints:
        return checkpoints.read_meta(step)
