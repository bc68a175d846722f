"""Where token streams come from: one `Source` class per kind of dataset, and one `SOURCES`
table (the --dataset specs) that `parse`, `dataset_help` and their error messages read.

A source names its streams (flat token sequences stored in the cache) and the splits read
from them (`layouts`); `tasks()` cuts its work into picklable `Task`s (a list of files, a byte
range, a hub shard; a stream is its tasks' output in order), `run(task, tokenizer)` turns one
into `Block`s, and `fingerprint()`, the JSON-able cache key, changes whenever the tokens would.
`prepare.py` runs the tasks, in worker processes where the source is `parallel`.
Adding a dataset: one `Source` subclass (its docstring says what it reads), one `SOURCES` row.
"""

import itertools
import os
import sys
import sysconfig
import urllib.request
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from md4_eqx.data.cache import digest, path_fingerprint
from md4_eqx.data.hub import hub_call
from md4_eqx.data.tokenizers import ALPHABETS, Tokenizer
from md4_eqx.errors import DataError

TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
OWT_DATASET = "Skylion007/openwebtext"
CIFAR10_DATASET = "uoft-cs/cifar10"
GPT2_TOKENIZER = "gpt2"
HOLDOUT_EVERY = 50  # every 50th chunk held out: the paper's 2% of OpenWebText chunks
FILE_PIECE = 1 << 24  # a file is tokenised in 16 MiB pieces, one task each
HUB_BATCH = 256  # rows read (and tokenised) at a time from a hub dataset


@dataclass(frozen=True)
class Layout:
    """How a split reads a stream: all of its chunks (`every` = 0), or, when `every` > 0,
    the chunks c with c % every == every - 1 (`held_out`) or all the others."""

    stream: str
    every: int = 0
    held_out: bool = False


TRAIN_VALID = {"train": Layout("train"), "valid": Layout("valid")}


@dataclass(frozen=True)
class Task:
    """One unit of work: shard `shard` of stream `stream`; `payload` is the source's own."""

    stream: str
    shard: int
    payload: tuple = ()


Block = tuple[
    np.ndarray, np.ndarray | None
]  # int32 tokens [n], and labels [n // example_len] or None


class Source:
    """A dataset as `prepare` reads it (see above); the sources below are frozen dataclasses."""

    name: str  # the cache entry's name
    tokenizer: str  # "bytes", "text8", or a Hugging Face tokenizer's name / directory
    default_seq_len: int = 256
    image_shape: tuple[int, int, int] | None = None
    num_classes: int = 0
    layouts: dict[str, Layout] = TRAIN_VALID  # split name -> how it reads a stream

    @property
    def parallel(self) -> bool:
        """Whether worker processes pay off: for a real tokenizer, not for bytes or characters."""
        return self.tokenizer not in ALPHABETS

    def fetch(self, progress: bool) -> None:
        """Downloads what `tasks` needs (only text8 downloads by itself)."""


@dataclass(frozen=True)
class PyStdlib(Source):
    """The offline default: the `.py` files of the running Python's standard library (no tests,
    no site-packages), about 12 MB; a file is "valid" when crc32(relative path) % 20 == 0 (~5%)."""

    tokenizer: str = "bytes"
    name = "pystdlib"

    @property
    def root(self) -> Path:
        return Path(sysconfig.get_paths()["stdlib"])

    def files(self) -> list[str]:
        skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
        found = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            rel = Path(dirpath).relative_to(self.root)
            found += [(rel / f).as_posix() for f in filenames if f.endswith(".py")]
        if not found:
            raise DataError(f"no .py files in the standard library at {self.root}")
        return sorted(found)

    def fingerprint(self) -> dict:
        files = self.files()
        sizes = [(self.root / f).stat().st_size for f in files]
        return {
            "kind": "pystdlib",
            "python": sys.version,
            "files": digest([files, sizes]),
            "tokenizer": _tok_id(self.tokenizer),
        }

    def tasks(self) -> list[Task]:
        files = self.files()
        split = {f: "valid" if zlib.crc32(f.encode()) % 20 == 0 else "train" for f in files}
        return [Task(s, 0, tuple(f for f in files if split[f] == s)) for s in ("train", "valid")]

    def run(self, task: Task, tokenizer: Tokenizer) -> Iterator[Block]:
        for rel in task.payload:
            yield tokenizer.encode_raw((self.root / rel).read_bytes(), rel), None


@dataclass(frozen=True)
class Text8(Source):
    """text8.zip (the first 10^8 characters of English Wikipedia, letters and spaces only),
    split at 90% / 95% of its length: 90M / 5M / 5M characters, as the paper."""

    zip_path: Path
    user_given: bool  # a local zip named by the user, rather than the downloaded one
    name = "text8"
    tokenizer = "text8"
    layouts = {**TRAIN_VALID, "test": Layout("test")}

    def fingerprint(self) -> dict:
        where = path_fingerprint(self.zip_path) if self.user_given else TEXT8_URL
        return {"kind": "text8", "zip": where}

    def fetch(self, progress: bool) -> None:
        """Downloads text8.zip, unless there, through a temporary file renamed once complete."""
        if self.zip_path.exists():
            return
        self.zip_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.zip_path.with_name(f"text8.zip.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with urllib.request.urlopen(TEXT8_URL, timeout=60) as response, open(tmp, "wb") as f:
                size = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=size,
                    unit="B",
                    unit_scale=True,
                    desc="downloading text8.zip",
                    delay=1,
                    disable=not progress,
                ) as bar:
                    while chunk := response.read(1 << 20):
                        f.write(chunk)
                        bar.update(len(chunk))
            os.replace(tmp, self.zip_path)
        except OSError as e:  # urllib's URLError included
            raise DataError(f"cannot download {TEXT8_URL}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def tasks(self) -> list[Task]:
        with self._open() as archive:
            n = archive.getinfo("text8").file_size
        cuts = [0, n * 90 // 100, n * 95 // 100, n]
        return [
            Task(split, 0, span)
            for split, span in zip(
                ("train", "valid", "test"), itertools.pairwise(cuts), strict=True
            )
        ]

    def run(self, task: Task, tokenizer: Tokenizer) -> Iterator[Block]:
        start, stop = task.payload
        with self._open() as archive:
            raw = archive.read("text8")[start:stop]
        yield tokenizer.encode_raw(raw, f"{self.zip_path}:text8"), None

    def _open(self) -> zipfile.ZipFile:
        try:
            archive = zipfile.ZipFile(self.zip_path)
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"cannot read {self.zip_path} as a zip file: {e}") from None
        if "text8" not in archive.namelist():
            archive.close()
            raise DataError(f"{self.zip_path} has no member named 'text8'")
        return archive


@dataclass(frozen=True)
class TextFile(Source):
    """A local file; the tail from 90% of its bytes on (at a UTF-8 character start) is "valid"."""

    name: str
    path: Path
    tokenizer: str = "bytes"

    def fingerprint(self) -> dict:
        return {
            "kind": "file",
            "file": path_fingerprint(self.path),
            "tokenizer": _tok_id(self.tokenizer),
        }

    def tasks(self) -> list[Task]:
        size = self.path.stat().st_size
        tasks = []
        with open(self.path, "rb") as f:
            tail = _char_start(f, size * 9 // 10)
            for split, (lo, hi) in {"train": (0, tail), "valid": (tail, size)}.items():
                inner = (_char_start(f, pos) for pos in range(lo + FILE_PIECE, hi, FILE_PIECE))
                cuts = sorted({lo, hi, *inner})
                tasks += [Task(split, i, span) for i, span in enumerate(itertools.pairwise(cuts))]
        return tasks

    def run(self, task: Task, tokenizer: Tokenizer) -> Iterator[Block]:
        start, stop = task.payload
        with open(self.path, "rb") as f:
            f.seek(start)
            yield tokenizer.encode_raw(f.read(stop - start), str(self.path)), None


class HubSource(Source):
    """A hub (or local) dataset, a task per shard of the hub split each stream reads
    (`hub_splits`); `payload(ds)` (what a split's tasks carry to `run`) fails, before any work,
    without its columns."""

    config: str | None = None
    parallel = True

    def tasks(self) -> list[Task]:
        tasks = []
        for stream, hub_split in self.hub_splits.items():
            ds = _open_stream(self.path, self.config, hub_split)
            payload = self.payload(ds)
            tasks += [Task(stream, i, payload) for i in range(ds.num_shards)]
        return tasks

    def rows(self, task: Task) -> Iterator[dict]:
        """The rows of the task's shard, `HUB_BATCH` at a time."""
        ds = _open_stream(self.path, self.config, self.hub_splits[task.stream])
        return ds.shard(num_shards=ds.num_shards, index=task.shard).iter(HUB_BATCH)


@dataclass(frozen=True)
class HubText(HubSource):
    """A dataset's "train" split: each document tokenised, EOS appended, all concatenated; 2% of
    the seq_len chunks held out (OpenWebText, the paper)."""

    name: str
    path: str  # hub name, or a local directory of data files
    config: str | None = None
    tokenizer: str = GPT2_TOKENIZER
    default_seq_len = 1024
    layouts = {
        "train": Layout("all", HOLDOUT_EVERY),
        "valid": Layout("all", HOLDOUT_EVERY, held_out=True),
    }
    hub_splits = {"all": "train"}

    def fingerprint(self) -> dict:
        local = path_fingerprint(Path(self.path)) if Path(self.path).exists() else None
        return {
            "kind": "hub-text",
            "path": self.path,
            "config": self.config,
            "local": local,
            "tokenizer": _tok_id(self.tokenizer),
        }

    def payload(self, ds) -> tuple[str]:
        """The text column: "text" if present, else the first string column."""
        features = ds.features or {}
        strings = [
            k
            for k, v in features.items()
            if getattr(v, "dtype", None) in ("string", "large_string")
        ]
        if not strings:
            raise DataError(
                f"dataset {self.path!r} has no text column (columns: {', '.join(features)})"
            )
        return ("text" if "text" in strings else strings[0],)

    def run(self, task: Task, tokenizer: Tokenizer) -> Iterator[Block]:
        (column,) = task.payload
        eos = [] if tokenizer.eos_id is None else [np.array([tokenizer.eos_id], np.int32)]
        for batch in self.rows(task):
            docs = tokenizer.encode_batch([text for text in batch[column] if text])
            if docs:
                yield np.concatenate([part for doc in docs for part in [doc, *eos]]), None


@dataclass(frozen=True)
class Cifar10(HubSource):
    """CIFAR-10 with columns "img" and "label": each image flattened row-major (H, W, C) into
    32 * 32 * 3 = 3072 sub-pixel tokens in [0, 256); the hub's "test" split is our "valid"."""

    path: str = CIFAR10_DATASET
    name = "cifar10"
    tokenizer = "bytes"
    image_shape = (32, 32, 3)
    default_seq_len = 32 * 32 * 3
    num_classes = 10
    hub_splits = {"train": "train", "valid": "test"}

    def fingerprint(self) -> dict:
        local = path_fingerprint(Path(self.path)) if Path(self.path).exists() else None
        return {"kind": "cifar10", "path": self.path, "local": local}

    def payload(self, ds) -> tuple:
        missing = {"img", "label"} - set(ds.features or {})
        if missing:
            raise DataError(f"dataset {self.path!r} lacks column(s) {sorted(missing)}")
        return ()

    def run(self, task: Task, tokenizer: Tokenizer) -> Iterator[Block]:
        for batch in self.rows(task):
            images = np.stack([np.asarray(img.convert("RGB")) for img in batch["img"]])
            labels = np.asarray(batch["label"], np.int32)
            if (
                images.shape[1:] != self.image_shape
                or labels.min() < 0
                or labels.max() >= self.num_classes
            ):
                raise DataError(
                    f"dataset {self.path!r} is not CIFAR-10: images {images.shape[1:]}, "
                    f"labels {labels.min()}..{labels.max()}"
                )
            yield images.reshape(-1).astype(np.int32), labels  # [n * 3072], [n]


@dataclass(frozen=True)
class Options:
    """A --dataset spec, its text after "kind:", and the options given (None: the default)."""

    spec: str
    arg: str
    data_path: str | None
    cache_dir: Path


@dataclass(frozen=True)
class Entry:
    """A row of `SOURCES`: how --dataset names a source, how it is built, which options apply."""

    kind: str  # the whole spec, or the part before ":" when the source takes an `arg`
    build: Callable[[Options], Source]
    arg: str | None = None  # what follows "kind:", as help shows it ("PATH")
    data_path: bool = False  # --data-path applies
    fixed_vocab: bool = False  # --tokenizer does not apply

    @property
    def usage(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def _text8(o: Options) -> Text8:
    if o.data_path is None:
        return Text8(o.cache_dir / "downloads" / "text8.zip", user_given=False)
    return Text8(_readable_file(Path(o.data_path).expanduser()), user_given=True)


def _hub(o: Options) -> HubText:
    name, _, config = o.arg.partition(":")
    return HubText(o.spec, name, config or None)


SOURCES = (
    Entry("pystdlib", lambda o: PyStdlib()),
    Entry("text8", _text8, data_path=True, fixed_vocab=True),
    Entry("owt", lambda o: HubText("owt", o.data_path or OWT_DATASET), data_path=True),
    Entry(
        "cifar10",
        lambda o: Cifar10(o.data_path or CIFAR10_DATASET),
        data_path=True,
        fixed_vocab=True,
    ),
    Entry("file", lambda o: TextFile(o.spec, _readable_file(Path(o.arg).expanduser())), arg="PATH"),
    Entry("hf", _hub, arg="NAME[:CONFIG]"),
)


def dataset_help() -> str:
    """The --dataset specs, for help texts: "pystdlib | text8 | ... | hf:NAME[:CONFIG]"."""
    return " | ".join(entry.usage for entry in SOURCES)


def parse(spec: str, *, tokenizer: str | None, data_path: str | None, cache_dir: Path) -> Source:
    """The source named by `spec` (a row of `SOURCES`) with the options given (None: its
    default)."""
    kind, colon, arg = spec.partition(":")
    # "kind:ARG" with a non-empty ARG where the row takes one, the bare kind where it does not
    entry = next(
        (e for e in SOURCES if e.kind == kind and (arg != "" if e.arg else not colon)), None
    )
    if entry is None:
        raise DataError(f"unknown dataset {spec!r}: choose one of {dataset_help()}")
    if data_path is not None and not entry.data_path:
        readers = ", ".join(e.kind for e in SOURCES if e.data_path)
        raise DataError(f"--data-path does not apply to {spec!r} (only to {readers})")
    if tokenizer is not None and entry.fixed_vocab:
        raise DataError(f"{spec} has a fixed vocabulary; --tokenizer does not apply")
    source = entry.build(Options(spec, arg, data_path, cache_dir))
    return replace(source, tokenizer=tokenizer) if tokenizer else source


def _readable_file(path: Path) -> Path:
    """`path`, once it reads as a regular file of at least one byte."""
    if path.exists() and not path.is_file():
        raise DataError(f"not a regular file: {path}")
    try:
        with open(path, "rb") as f:
            if f.read(1):
                return path
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    raise DataError(f"empty file: {path}")


def _tok_id(tokenizer: str) -> str:
    """A tokenizer's name, plus its files' fingerprint when it is a local directory."""
    return (
        f"{tokenizer}@{path_fingerprint(Path(tokenizer))}"
        if Path(tokenizer).exists()
        else tokenizer
    )


def _char_start(f, pos: int) -> int:
    """The first UTF-8 character start at or after byte `pos` (continuation bytes are 10xxxxxx)."""
    f.seek(pos)
    head = f.read(4)
    return pos + next((i for i, b in enumerate(head) if b & 0xC0 != 0x80), len(head))


def _open_stream(path: str, config: str | None, split: str):
    """A hub (or local) dataset split as a streamed `datasets.IterableDataset`: nothing is
    converted or held in memory, so OpenWebText needs no disk beyond its tokens."""
    import datasets

    with hub_call(DataError, f"open dataset {path!r} ({split=})"):
        return datasets.load_dataset(path, config, split=split, streaming=True)
