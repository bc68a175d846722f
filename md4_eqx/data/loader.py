"""Deterministic, resumable, per-process batches with background prefetching.

Epoch e visits the split's examples in the order `permutation(seed, e)`; global batch b of
the epoch is the b-th run of `batch_size` of them (the last incomplete run is dropped), and
process p of P takes its p-th contiguous slice of batch_size / P examples. The position (epoch,
examples consumed) is the same on every process, small, and JSON-able: save it with the
checkpoint and pass it back as `state` to continue the identical stream.
"""

import collections
import functools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from md4_eqx.data.dataset import Subset
from md4_eqx.errors import DataError


class BatchLoader:
    """Iterator of {"tokens": int32 [batch_size // process_count, seq_len], "labels": int32 [...]}
    ("labels" for labelled datasets only)."""

    def __init__(
        self,
        split: Subset,
        *,
        batch_size: int,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
        state: dict | None = None,
        prefetch: int = 2,
        shuffle: bool = True,
    ):
        if not 0 < batch_size <= split.num_examples:
            raise DataError(
                f"{batch_size=} must lie in [1, {split.num_examples}] (examples in {split.name!r})"
            )
        if process_count < 1 or batch_size % process_count:
            raise DataError(f"{batch_size=} must be a multiple of {process_count=}")
        if not 0 <= process_index < process_count:
            raise DataError(f"{process_index=} must lie in [0, {process_count})")
        if prefetch < 0:
            raise DataError(f"{prefetch=} must be >= 0")
        state = {"seed": seed, "epoch": 0, "position": 0} if state is None else state
        if not (isinstance(state, dict) and {"seed", "epoch", "position"} <= state.keys()):
            raise DataError(f"loader state must have seed, epoch and position; got {state!r}")
        if state["seed"] != seed:
            raise DataError(
                f"loader state was saved with seed={state['seed']}, but {seed=} was given"
            )
        epoch, position = state["epoch"], state["position"]
        if not (
            isinstance(epoch, int)
            and isinstance(position, int)
            and epoch >= 0
            and 0 <= position <= split.num_examples
        ):
            raise DataError(f"loader state has a bad epoch or position: {state!r}")
        self._state = {"seed": seed, "epoch": epoch, "position": position}
        rows = batch_size // process_count  # this process's share of every global batch
        part = slice(process_index * rows, (process_index + 1) * rows)
        batches = _batches(split, batch_size, part, shuffle, **self._state)
        # One thread computes the next `prefetch` batches. It holds `batches`, not the loader, so
        # dropping the loader stops it (the executor's own finaliser).
        self._pool = ThreadPoolExecutor(1)
        self._submit = functools.partial(self._pool.submit, next, batches)
        self._ahead = collections.deque(self._submit() for _ in range(prefetch))

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        self._ahead.append(self._submit())
        batch, self._state = self._ahead.popleft().result()  # raises what computing it raised
        return batch

    def state(self) -> dict:
        """The position after the last batch returned: {"seed", "epoch", "position"}."""
        return dict(self._state)

    def close(self) -> None:
        """Stops the prefetch thread (also done when the loader is garbage-collected)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _batches(
    split: Subset,
    batch_size: int,
    part: slice,
    shuffle: bool,
    *,
    seed: int,
    epoch: int,
    position: int,
) -> Iterator[tuple[dict, dict]]:
    """(this process's part of the next global batch, the state after it), forever. A function,
    not a method: the prefetch thread runs it and must not keep the loader alive."""
    n = split.num_examples
    while True:
        examples = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        while position + batch_size <= n:  # the incomplete last batch is dropped
            global_batch = examples[position : position + batch_size]
            position += batch_size
            tokens, labels = split.get(global_batch[part])
            batch = {"tokens": tokens} if labels is None else {"tokens": tokens, "labels": labels}
            yield batch, {"seed": seed, "epoch": epoch, "position": position}
        epoch, position = epoch + 1, 0
