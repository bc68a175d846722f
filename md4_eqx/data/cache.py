"""The on-disk cache: one directory per prepared dataset, written atomically.

    <cache_dir>/<name>-<key>/meta.json        tokenizer, vocabulary, source fingerprint, splits
                             <stream>.bin      token ids, a flat memmap (uint8/16/32 by vocab)
                             <stream>.labels   int32 class labels, one per example (images)
                             tokenizer/        a saved Hugging Face tokenizer, when one is used

The directory is built under a temporary name and renamed into place once complete, so a
reader sees either a whole entry or none, even if preparation is killed halfway. Preparation
holds `<name>-<key>.lock` (`preparing`): two runs (or two hosts on a shared cache, where the file
system honours flock) prepare an entry once, the second finding it done. Where flock is not
honoured both prepare, and the rename keeps one whole entry.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

FORMAT = 1  # bump when the layout changes: old entries then get new keys


def default_cache_dir() -> Path:
    return Path(os.environ.get("MD4_CACHE") or Path.home() / ".cache" / "md4_eqx")


def digest(obj: object) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def path_fingerprint(path: Path) -> str:
    """A digest of the names, sizes and modification times below `path` (cheap to compute,
    and it changes whenever a file does)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return digest([str(path.resolve()), [str(p) for p in files], stats])


def entry_dir(cache_dir: Path, name: str, fingerprint: dict) -> Path:
    """The entry of a source and its tokenizer, keyed by their JSON-able `fingerprint`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:48]
    return cache_dir / f"{slug}-{digest({'format': FORMAT, **fingerprint})}"


def read_meta(entry: Path) -> dict | None:
    """The entry's metadata, or None when the entry has not been (fully) prepared."""
    try:
        return json.loads((entry / "meta.json").read_text())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def preparing(entry: Path) -> Iterator[None]:
    """Holds the entry's lock (waiting for another preparer to finish), then removes the temporary
    directories killed preparations left (nobody else is writing them)."""
    with open(entry.with_name(f"{entry.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in entry.parent.glob(f"{entry.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield


class EntryWriter:
    """Builds an entry in a temporary sibling directory; `commit` renames it into place. Leaving
    its `with` block without `commit` (an error, Ctrl-C) removes the temporary directory."""

    def __init__(self, entry: Path):
        self.entry = entry
        self.tmp = entry.with_name(f"{entry.name}.tmp-{uuid.uuid4().hex[:8]}")
        self.tmp.mkdir(parents=True)

    def __enter__(self) -> "EntryWriter":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self, meta: dict) -> None:
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        try:
            os.rename(self.tmp, self.entry)
        except OSError:
            # Another process prepared the same entry first: keep theirs (ours is identical).
            if read_meta(self.entry) is None:
                raise
