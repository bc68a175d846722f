"""A prepared dataset: `load` tokenises once (or reuses the cache) and opens the splits.

Streams are stored flat; a split reads them as consecutive seq_len windows ("chunks"), so one
cache serves every seq_len. For an image, seq_len is the flattened image, 32 * 32 * 3 = 3072
sub-pixels (the paper's x in {0..255}^L with L = 3072 for CIFAR-10).
"""

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from jaxtyping import Int32, Integer

from md4_eqx.data.cache import default_cache_dir, entry_dir, preparing, read_meta
from md4_eqx.data.prepare import prepare
from md4_eqx.data.sources import Layout, parse
from md4_eqx.data.tokenizers import Tokenizer, get_tokenizer
from md4_eqx.errors import DataError


@dataclass(eq=False)  # compared by identity, as arrays cannot be
class Subset:
    """The examples of one split ("train", "valid", ...): seq_len windows of a stream, possibly
    every n-th (a hold-out). (Not `parallel.Split`, which says how a weight is sharded.)"""

    name: str
    tokens: np.ndarray  # [stream_len], a read-only memmap
    labels: np.ndarray | None  # [stream_len // seq_len] or None
    seq_len: int
    layout: Layout

    def __post_init__(self):
        chunks = self.tokens.size // self.seq_len
        every = self.layout.every
        held_out = chunks // every if every else 0  # chunks every-1, 2*every-1, ...
        self.num_examples = held_out if self.layout.held_out else chunks - held_out

    def chunks(self, indices: Integer[np.ndarray, " n"]) -> Integer[np.ndarray, " n"]:
        """The stream chunk behind each example index."""
        every = self.layout.every
        if every == 0:
            return indices
        if self.layout.held_out:
            return indices * every + (every - 1)  # chunks every-1, 2*every-1, ...
        return indices + indices // (every - 1)  # skips one chunk after every every-1 kept

    def get(
        self, indices: Integer[np.ndarray, " n"]
    ) -> tuple[Int32[np.ndarray, "n seq_len"], Int32[np.ndarray, " n"] | None]:
        """Tokens [n, seq_len] (and class labels [n] for images) of the given examples."""
        indices = np.asarray(indices, np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_examples):
            raise IndexError(
                f"example indices must lie in [0, {self.num_examples}) for {self.name!r}"
            )
        chunks = self.chunks(indices)
        windows = chunks[:, None] * self.seq_len + np.arange(self.seq_len)  # [n, seq_len]
        tokens = np.asarray(self.tokens[windows], np.int32)
        labels = None if self.labels is None else np.asarray(self.labels[chunks], np.int32)
        return tokens, labels


class Dataset:
    """A cache entry opened at one seq_len. See `load`."""

    def __init__(self, path: Path, meta: dict, seq_len: int):
        self.path = path
        self.name: str = meta["name"]
        self.vocab_size: int = meta["vocab_size"]
        self.seq_len = seq_len
        self.image_shape = None if meta["image_shape"] is None else tuple(meta["image_shape"])
        self.num_classes: int = meta["num_classes"]
        self.meta = meta
        self.splits = tuple(meta["splits"])

    def split(self, name: str) -> Subset:
        """The examples of split `name`, one of `self.splits`."""
        if name not in self.meta["splits"]:
            raise DataError(f"{self.name} has no split {name!r}; it has {', '.join(self.splits)}")
        layout = Layout(**self.meta["splits"][name])
        stream, sizes = self.path / layout.stream, self.meta["streams"][layout.stream]
        tokens = np.memmap(f"{stream}.bin", self.meta["dtype"], "r", shape=(sizes["tokens"],))
        labels = (
            np.memmap(f"{stream}.labels", np.int32, "r", shape=(sizes["labels"],))
            if sizes["labels"]
            else None
        )
        split = Subset(name, tokens, labels, self.seq_len, layout)
        if split.num_examples == 0:
            raise DataError(
                f"the {name!r} split of {self.name} has {tokens.size} tokens: "
                f"not one example of seq_len={self.seq_len}"
            )
        return split

    @functools.cached_property
    def tokenizer(self) -> Tokenizer:
        if self.image_shape is not None:
            raise DataError(
                f"{self.name} is an image dataset: reshape tokens to {self.image_shape}"
            )
        kind = self.meta["tokenizer"]["kind"]  # a Hugging Face tokenizer is saved in the entry
        return get_tokenizer(str(self.path / "tokenizer") if kind == "hf" else kind)

    def decode(self, tokens: Integer[np.ndarray, " n"]) -> str:
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(
                f"token ids must lie in [0, {self.vocab_size}); got {tokens.min()}..{tokens.max()}"
            )
        return self.tokenizer.decode(tokens)


def load(
    spec: str,
    *,
    seq_len: int | None = None,
    cache_dir: str | Path | None = None,
    tokenizer: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    data_path: str | None = None,
) -> Dataset:
    """Prepares the dataset named by `spec` (a row of `sources.SOURCES`: "owt", "file:PATH", ...)
    or reuses its cache, and opens it at `seq_len` (None: the dataset's default, owt 1024, text8
    256, ...; images take only their flattened size, 3072). `tokenizer` ("bytes" or a Hugging Face
    name / directory) and `data_path` (text8's zip, the hub name or directory owt and cifar10 read)
    replace the source's own; `num_proc` tokeniser processes (default: all cores)."""
    for flag, value in (("seq_len", seq_len), ("num_proc", num_proc)):
        if value is not None and (isinstance(value, bool) or value < 1):
            raise DataError(f"{flag} must be a positive integer, got {value}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    source = parse(spec, tokenizer=tokenizer, data_path=data_path, cache_dir=cache_dir)
    if source.image_shape is not None and seq_len not in (None, source.default_seq_len):
        raise DataError(
            f"{spec} examples are whole images of 32*32*3 = {source.default_seq_len} tokens; "
            f"got seq_len={seq_len}"
        )
    parts = source.fingerprint()
    entry = entry_dir(cache_dir, source.name, parts)
    meta = read_meta(entry)
    if meta is None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create cache directory {cache_dir}: {e.strerror}") from None
        with preparing(entry):  # one preparer at a time: the first prepares, the others find it
            meta = read_meta(entry) or prepare(
                source, entry, parts, num_proc=num_proc or os.cpu_count() or 1, progress=progress
            )
    return Dataset(entry, meta, seq_len or source.default_seq_len)
