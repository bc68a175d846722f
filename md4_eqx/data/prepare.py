"""Tokenise a source once into a cache entry, in worker processes, with a tokens/s bar.

Each task writes its own part files (`parts/<stream>-<shard>.bin`), so workers never share a
file and the result does not depend on which worker finished first; the parts are then joined
in task order into one `<stream>.bin` per stream. Nothing holds a whole stream in memory.
"""

import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from md4_eqx.data.cache import FORMAT, EntryWriter, token_dtype
from md4_eqx.errors import DataError
from md4_eqx.data.sources import Source, Task
from md4_eqx.data.tokenizers import HFTokenizer, Tokenizer, get_tokenizer


@dataclass(frozen=True)
class _Worker:
    """What every task needs; set once per worker process (or in-process for one worker)."""

    source: Source
    tokenizer: Tokenizer
    parts: Path
    dtype: np.dtype
    report: Callable[[int], None]  # counts tokens for the progress bar


_worker: _Worker | None = None


def prepare(source: Source, entry: Path, fingerprint: dict, *, num_proc: int, progress: bool) -> dict:
    """Writes the cache entry for `source` (identified by `fingerprint`); returns its metadata."""
    source.fetch(progress)
    tokenizer = get_tokenizer(source.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    tasks = source.tasks()
    procs = min(num_proc, len(tasks)) if source.parallel else 1
    with EntryWriter(entry) as writer:
        parts = writer.tmp / "parts"
        parts.mkdir()
        # delay: no bar at all for work (or a bad input) done within a second.
        with tqdm(desc=f"tokenising {source.name}", unit="tok", unit_scale=True, delay=1,
                  disable=not progress) as bar:
            if procs > 1:
                counts = _run_pool(procs, tasks, source, tokenizer, parts, dtype, bar)
            else:
                counts = _run_here(tasks, _Worker(source, tokenizer, parts, dtype, bar.update))
        streams = _join_parts(tasks, counts, parts, writer.tmp)
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


def _run_here(tasks: list[Task], worker: _Worker) -> list[tuple[int, int]]:
    global _worker
    _worker = worker
    try:
        return [_run_task(task) for task in tasks]
    finally:
        _worker = None


def _run_pool(procs, tasks, source, tokenizer, parts, dtype, bar) -> list[tuple[int, int]]:
    # spawn, not fork: the parent may run JAX's threads, and fork copies them mid-flight.
    ctx = multiprocessing.get_context("spawn")
    counter = ctx.Value("q", 0)
    initargs = (source, tokenizer, parts, dtype, counter)
    with ctx.Pool(procs, initializer=_init_worker, initargs=initargs) as pool:
        result = pool.map_async(_run_task, tasks, chunksize=1)
        while not result.ready():
            result.wait(0.25)
            if counter.value > bar.n:
                bar.update(counter.value - bar.n)
        counts = result.get()  # re-raises a worker's error here
        # Let workers exit on their own (not terminate()d), so they release what they hold
        # (tqdm's and datasets' semaphores) instead of leaving it to the resource tracker.
        pool.close()
        pool.join()
    return counts


def _init_worker(source, tokenizer, parts, dtype, counter) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already

    def report(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    _worker = _Worker(source, tokenizer, parts, dtype, report)


def _run_task(task: Task) -> tuple[int, int]:
    """Tokenises one task into its part files; returns (tokens, labels) written."""
    w = _worker
    num_tokens = num_labels = 0
    stem = w.parts / f"{task.stream}-{task.shard:06d}"
    with open(f"{stem}.bin", "wb") as tokens, open(f"{stem}.labels", "wb") as labels:
        for block in w.source.run(task, w.tokenizer):
            tokens.write(block.tokens.astype(w.dtype).tobytes())
            num_tokens += block.tokens.size
            w.report(block.tokens.size)
            if block.labels is not None:
                labels.write(block.labels.astype(np.int32).tobytes())
                num_labels += block.labels.size
    return num_tokens, num_labels


def _join_parts(tasks: list[Task], counts: list[tuple[int, int]], parts: Path, out: Path) -> dict:
    """Concatenates the part files of each stream in task order; returns the streams' sizes."""
    streams = {}
    for task, (num_tokens, num_labels) in zip(tasks, counts):
        stream = streams.setdefault(task.stream, {"tokens": 0, "labels": 0})
        stream["tokens"] += num_tokens
        stream["labels"] += num_labels
        for suffix in ("bin", "labels"):
            part, whole = parts / f"{task.stream}-{task.shard:06d}.{suffix}", out / f"{task.stream}.{suffix}"
            if whole.exists():
                with open(part, "rb") as src, open(whole, "ab") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
                part.unlink()
            else:
                part.rename(whole)
    parts.rmdir()
    for name, stream in streams.items():
        if stream["labels"] == 0:
            (out / f"{name}.labels").unlink()
    return streams
