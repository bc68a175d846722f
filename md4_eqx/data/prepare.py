"""Tokenise a source once into a cache entry, in worker processes, with a tokens/s bar.

Each task writes its own part files (`parts/<stream>-<shard>.bin`), so workers never share a
file and the result does not depend on which worker finished first; the parts are then appended
in task order to one `<stream>.bin` per stream. Nothing holds a whole stream in memory.
"""

import multiprocessing
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from md4_eqx.data.cache import FORMAT, EntryWriter
from md4_eqx.data.sources import Source, Task
from md4_eqx.data.tokenizers import HFTokenizer, get_tokenizer
from md4_eqx.errors import DataError

# What every task needs, set once per worker process: (source, tokenizer, parts, dtype, report).
_worker: tuple | None = None


def prepare(
    source: Source, entry: Path, fingerprint: dict, *, num_proc: int, progress: bool
) -> dict:
    """Writes the cache entry for `source` (identified by `fingerprint`); returns its metadata."""
    source.fetch(progress)
    tokenizer = get_tokenizer(source.tokenizer)
    # the narrowest unsigned one: GPT-2's 50257 ids fit uint16
    dtype = np.min_scalar_type(tokenizer.vocab_size - 1)
    tasks = source.tasks()
    procs = min(num_proc, len(tasks)) if source.parallel else 1
    with EntryWriter(entry) as writer:
        parts = writer.tmp / "parts"
        parts.mkdir()
        # delay: no bar at all for work (or a bad input) done within a second.
        with tqdm(
            desc=f"tokenising {source.name}",
            unit="tok",
            unit_scale=True,
            delay=1,
            disable=not progress,
        ) as bar:
            if procs > 1:
                _run_pool(procs, tasks, (source, tokenizer, parts, dtype), bar)
            else:
                for task in tasks:
                    _run_task(task, (source, tokenizer, parts, dtype, bar.update))
        streams = _join_parts(tasks, parts, writer.tmp, dtype)
        for layout in source.layouts.values():
            if streams.get(layout.stream, {"tokens": 0})["tokens"] == 0:
                raise DataError(f"{source.name}: its {layout.stream!r} split came out empty")
        if isinstance(tokenizer, HFTokenizer):
            tokenizer.save(writer.tmp / "tokenizer")
        meta = {
            "format": FORMAT,
            "name": source.name,
            "fingerprint": fingerprint,
            "tokenizer": tokenizer.describe(),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "dtype": dtype.name,
            "image_shape": source.image_shape,
            "num_classes": source.num_classes,
            "default_seq_len": source.default_seq_len,
            "streams": streams,
            "splits": {name: asdict(layout) for name, layout in source.layouts.items()},
        }
        writer.commit(meta)
    return meta


def _run_pool(procs: int, tasks: list[Task], worker: tuple, bar: tqdm) -> None:
    # spawn, not fork: the parent may run JAX's threads, and fork copies them mid-flight.
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    with ctx.Pool(procs, initializer=_init_worker, initargs=(*worker, counter)) as pool:
        result = pool.map_async(_run_task, tasks, chunksize=1)
        while not result.ready():
            result.wait(0.25)
            bar.update(counter.value - bar.n)
        result.get()  # re-raises a worker's error here
        # Let workers exit on their own (not terminate()d), so they release what they hold
        # (tqdm's and datasets' semaphores) instead of leaving it to the resource tracker.
        pool.close()
        pool.join()


def _init_worker(source, tokenizer, parts, dtype, counter) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already

    def report(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _worker = (source, tokenizer, parts, dtype, report)


def _run_task(task: Task, worker: tuple | None = None) -> None:
    """Tokenises one task into its part files, with `worker` (default: this process's)."""
    source, tokenizer, parts, dtype, report = worker or _worker
    stem = parts / f"{task.stream}-{task.shard:06d}"
    with open(f"{stem}.bin", "wb") as token_file, open(f"{stem}.labels", "wb") as label_file:
        for tokens, labels in source.run(task, tokenizer):
            token_file.write(tokens.astype(dtype).tobytes())
            report(tokens.size)
            if labels is not None:
                label_file.write(labels.astype(np.int32).tobytes())


def _join_parts(tasks: list[Task], parts: Path, out: Path, dtype: np.dtype) -> dict:
    """Appends the part files to their stream's, in task order; returns the streams' sizes."""
    for task in tasks:
        for suffix in ("bin", "labels"):
            part = parts / f"{task.stream}-{task.shard:06d}.{suffix}"
            with open(part, "rb") as src, open(out / f"{task.stream}.{suffix}", "ab") as dst:
                shutil.copyfileobj(src, dst, 1 << 24)
            part.unlink()  # at once: the disk holds one part twice, not the whole dataset
    parts.rmdir()
    streams = {}
    for name in dict.fromkeys(task.stream for task in tasks):
        labels = out / f"{name}.labels"
        streams[name] = {
            "tokens": (out / f"{name}.bin").stat().st_size // dtype.itemsize,
            "labels": labels.stat().st_size // 4,
        }  # int32
        if streams[name]["labels"] == 0:
            labels.unlink()
    return streams
