"""The data pipeline end to end on local stand-ins for the hub (no network):
parquet datasets shaped like Skylion007/openwebtext and uoft-cs/cifar10, a GPT-2-format BPE
tokenizer trained here, a tiny text8.zip, the real standard library, and the CLI."""

import gc
import json
import os
import subprocess
import sys
import time
import weakref
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import ByteLevelBPETokenizer

import data as data_script
from md4_eqx import checkpoint
from md4_eqx.config import Backbone
from md4_eqx.data import BatchLoader, DataError, Subset, dataset_help, load
from md4_eqx.data.sources import SOURCES, Layout, PyStdlib, Source, parse

REPO = Path(__file__).resolve().parents[1]
WORDS = "the of and to in is was for on that with as by at from his her an which or".split()


def _documents(seed: int, count: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=rng.integers(3, 40))).capitalize() + "."
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory) -> Path:
    """A byte-level BPE in GPT-2's on-disk format (vocab.json, merges.txt, config.json)."""
    out = tmp_path_factory.mktemp("bpe")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _documents(0, 300),
        vocab_size=400,
        min_frequency=2,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    bpe.save_model(str(out))
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return out


@pytest.fixture(scope="module")
def owt_dir(tmp_path_factory) -> tuple[Path, list[str]]:
    """Three parquet shards with a "text" column, like OpenWebText (one empty document)."""
    out = tmp_path_factory.mktemp("owt")
    docs = _documents(1, 240)
    docs[5] = ""
    for shard in range(3):
        table = pa.table({"text": docs[shard * 80 : (shard + 1) * 80]})
        pq.write_table(table, out / f"train-{shard:05d}-of-00003.parquet")
    return out, docs


def _gpt2(bpe_dir: Path):
    from transformers import GPT2TokenizerFast

    return GPT2TokenizerFast.from_pretrained(bpe_dir)


def _expected_stream(tok, docs: list[str]) -> np.ndarray:
    ids = []
    for doc in docs:
        if doc:
            ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return np.asarray(ids, np.int32)


def _all_examples(split: Subset) -> np.ndarray:
    return split.get(np.arange(split.num_examples))[0]


OWT_ARGS = dict(seq_len=16, progress=False)


@pytest.fixture(scope="module")
def owt(tmp_path_factory, owt_dir, bpe_dir):
    """OpenWebText's pipeline on the local stand-ins, in one process."""
    return load(
        "owt",
        cache_dir=tmp_path_factory.mktemp("cache"),
        tokenizer=str(bpe_dir),
        num_proc=1,
        data_path=str(owt_dir[0]),
        **OWT_ARGS,
    )


def test_owt_pipeline_matches_gpt2_tokenizer(owt, owt_dir, bpe_dir):
    ds, docs = owt, owt_dir[1]
    tok = _gpt2(bpe_dir)
    stream = _expected_stream(tok, docs)
    chunks = stream[: stream.size // 16 * 16].reshape(-1, 16)
    held_out = np.arange(len(chunks)) % 50 == 49  # the paper's 2% of chunks
    assert (ds.vocab_size, ds.image_shape, ds.num_classes) == (len(tok), None, 0)
    np.testing.assert_array_equal(_all_examples(ds.split("train")), chunks[~held_out])
    np.testing.assert_array_equal(_all_examples(ds.split("valid")), chunks[held_out])
    text = "The of and, to in is!"
    assert ds.decode(ds.tokenizer.encode(text)) == text
    assert ds.decode(chunks[0]) == tok.decode(chunks[0].tolist())


def test_owt_worker_processes_match_one_process(tmp_path, owt, owt_dir, bpe_dir):
    two = load(
        "owt",
        cache_dir=tmp_path,
        tokenizer=str(bpe_dir),
        num_proc=2,
        data_path=str(owt_dir[0]),
        **OWT_ARGS,
    )
    assert (owt.path / "all.bin").read_bytes() == (two.path / "all.bin").read_bytes()


def test_hub_text_column_is_detected(tmp_path, bpe_dir):
    docs = _documents(2, 200)
    (tmp_path / "hub").mkdir()
    pq.write_table(
        pa.table({"id": np.arange(200), "content": docs}), tmp_path / "hub" / "train.parquet"
    )
    ds = load(
        f"hf:{tmp_path / 'hub'}",
        seq_len=8,
        cache_dir=tmp_path / "cache",
        tokenizer=str(bpe_dir),
        num_proc=1,
        progress=False,
    )
    stream = _expected_stream(_gpt2(bpe_dir), docs)
    train, valid = ds.split("train"), ds.split("valid")
    assert (train.num_examples + valid.num_examples) * 8 == stream.size // 8 * 8
    np.testing.assert_array_equal(_all_examples(train)[0], stream[:8])


def test_cifar10_pipeline(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image
    from PIL import Image as PILImage

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    labels = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    features = Features({"img": Image(), "label": ClassLabel(names=[str(i) for i in range(10)])})
    hub = tmp_path / "hub"
    for name, rows in (("train", slice(0, 6)), ("test", slice(6, 9))):
        images = [PILImage.fromarray(p) for p in pixels[rows]]
        table = Dataset.from_dict({"img": images, "label": labels[rows]}, features=features)
        table.to_parquet(hub / f"{name}.parquet")
    ds = load(
        "cifar10", cache_dir=tmp_path / "cache", num_proc=1, progress=False, data_path=str(hub)
    )
    assert (ds.seq_len, ds.image_shape, ds.num_classes, ds.vocab_size) == (
        3072,
        (32, 32, 3),
        10,
        256,
    )
    tokens, got = ds.split("valid").get(np.array([2, 0]))
    np.testing.assert_array_equal(tokens, pixels[[8, 6]].reshape(2, -1))  # row-major H, W, C
    np.testing.assert_array_equal(got, [5, 2])
    assert ds.split("train").num_examples == 6
    batch = next(BatchLoader(ds.split("train"), batch_size=4, prefetch=0))
    assert batch["tokens"].shape == (4, 3072) and batch["labels"].shape == (4,)
    with pytest.raises(DataError, match="3072"):
        load("cifar10", seq_len=1024, cache_dir=tmp_path / "cache", data_path=str(hub))
    with pytest.raises(DataError, match="image dataset"):
        ds.decode(tokens[0])

    # The cifar10 preset trains its U-Net on it (made small by flags): unconditional, as the
    # paper's, a fresh model's ~8 bits per dimension, a PNG of samples. One device, XLA:CPU.
    run = tmp_path / "run"
    small = [
        "--width",
        "32",
        "--num-layers",
        "1",
        "--cond-dim",
        "32",
        "--batch-size",
        "2",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-batches",
        "1",
        "--eval-draws",
        "1",
        "--sampler.steps",
        "2",
        "--num-samples",
        "1",
        "--no-progress",
    ]
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train.py"),
            "--preset",
            "cifar10",
            "--data-path",
            str(hub),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--workdir",
            str(run),
            *small,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    saved = checkpoint.read_meta(run)[1].model
    assert (saved.backbone, saved.num_classes, saved.seq_len) == (Backbone.UNET, 0, 3072)
    evals = [
        e
        for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "eval_bpt" in e
    ]
    assert (
        evals and 7.5 < evals[-1]["eval_bpt"] < 8.5
    )  # two steps at lr 2e-4 x warmup: still ~8 bits
    assert list((run / "samples").glob("*.png"))


def test_pystdlib_is_fast_deterministic_and_bytes(tmp_path):
    start = time.perf_counter()
    ds = load("pystdlib", cache_dir=tmp_path / "a", progress=False)
    elapsed = time.perf_counter() - start
    again = load("pystdlib", cache_dir=tmp_path / "b", progress=False)
    # It runs in the quick start: seconds, not minutes (0.5 s here; 20 s leaves room for CI).
    assert elapsed < 20
    assert ds.vocab_size == 256 and ds.splits == ("train", "valid")
    for split in ds.splits:
        assert (ds.path / f"{split}.bin").read_bytes() == (again.path / f"{split}.bin").read_bytes()
    source = PyStdlib()
    files = source.files()
    assert not any(
        part in f.split("/") for f in files for part in ("test", "tests", "site-packages")
    )
    valid = [f for f in files if zlib.crc32(f.encode()) % 20 == 0]
    assert ds.meta["streams"]["valid"]["tokens"] == sum(
        (source.root / f).stat().st_size for f in valid
    )
    assert 5_000_000 < ds.meta["streams"]["train"]["tokens"] < 40_000_000
    text = "def f(x):\n    return 'héllo ✓'\n"
    assert ds.decode(ds.tokenizer.encode(text)) == text
    assert ds.tokenizer.encode("é").tolist() == [0xC3, 0xA9]


def test_file_bytes_hold_out_the_tail(tmp_path):
    raw = ("naïve café " * 300).encode() + b"\xff\xfe raw bytes"
    path = tmp_path / "input.txt"
    path.write_bytes(raw)
    ds = load(f"file:{path}", seq_len=4, cache_dir=tmp_path / "cache", progress=False)
    train, valid = ((ds.path / f"{s}.bin").read_bytes() for s in ("train", "valid"))
    assert train + valid == raw and len(train) >= len(raw) * 9 // 10
    valid.decode("utf-8", "surrogateescape")  # the tail starts at a character boundary
    assert ds.decode(ds.split("train").get(np.array([0]))[0][0]) == "naï"  # 4 bytes: ï takes two


def test_file_with_bpe_tokenizer(tmp_path, bpe_dir):
    path = tmp_path / "input.txt"
    path.write_text(" ".join(_documents(3, 50)))
    ds = load(
        f"file:{path}",
        seq_len=4,
        cache_dir=tmp_path / "cache",
        tokenizer=str(bpe_dir),
        num_proc=1,
        progress=False,
    )
    train = np.fromfile(ds.path / "train.bin", np.uint16)
    assert (
        ds.decode(train) + ds.decode(np.fromfile(ds.path / "valid.bin", np.uint16))
        == path.read_text()
    )
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DataError, match="not UTF-8"):
        load(
            f"file:{path}",
            cache_dir=tmp_path / "cache",
            tokenizer=str(bpe_dir),
            num_proc=1,
            progress=False,
        )


def test_every_row_of_the_sources_table_is_parsed_helped_and_listed(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("x")
    specs = {"file": f"file:{path}", "hf": "hf:org/name"}
    for entry in SOURCES:
        source = parse(
            specs.get(entry.kind, entry.kind), tokenizer=None, data_path=None, cache_dir=tmp_path
        )
        assert isinstance(source, Source) and entry.usage in dataset_help()
    for spec in ("imagenet", "file:", "text8:"):  # an argument only where the row takes one
        with pytest.raises(DataError, match="unknown dataset") as error:
            parse(spec, tokenizer=None, data_path=None, cache_dir=tmp_path)
        assert dataset_help() in str(error.value)


def _text8_zip(path: Path, text: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("text8", text)
    return path


def test_text8_on_a_tiny_zip(tmp_path):
    text = " ".join(_documents(4, 60)).lower().replace(".", "").encode()
    zip_path = _text8_zip(tmp_path / "text8.zip", text)
    ds = load(
        "text8", seq_len=8, cache_dir=tmp_path / "cache", progress=False, data_path=str(zip_path)
    )
    n = len(text)
    streams = ds.meta["streams"]
    assert ds.vocab_size == 27 and ds.splits == ("train", "valid", "test")
    assert [streams[s]["tokens"] for s in ds.splits] == [
        n * 9 // 10,
        n * 95 // 100 - n * 9 // 10,
        n - n * 95 // 100,
    ]
    assert ds.decode(ds.split("train").get(np.array([0]))[0][0]) == text[:8].decode()
    assert ds.tokenizer.encode("a z").tolist() == [1, 0, 26]
    bad = _text8_zip(tmp_path / "bad.zip", b"hello World")
    with pytest.raises(DataError, match="only ' ' and a-z"):
        load("text8", cache_dir=tmp_path / "cache", progress=False, data_path=str(bad))


def test_holdout_layout_partitions_the_chunks():
    tokens = np.arange(1000 * 3, dtype=np.uint16)  # 1000 chunks of 3
    train = Subset("train", tokens, None, 3, Layout("all", 50, held_out=False))
    valid = Subset("valid", tokens, None, 3, Layout("all", 50, held_out=True))
    chunks = np.concatenate(
        [train.chunks(np.arange(train.num_examples)), valid.chunks(np.arange(valid.num_examples))]
    )
    np.testing.assert_array_equal(np.sort(chunks), np.arange(1000))
    assert valid.num_examples == 20 and set(valid.chunks(np.arange(20)) % 50) == {49}


@pytest.fixture
def labelled_split() -> Subset:
    tokens = np.arange(103 * 2, dtype=np.uint16)  # 103 examples of 2 tokens
    return Subset("train", tokens, np.arange(103, dtype=np.int32), 2, Layout("train"))


def _take(loader: BatchLoader, steps: int) -> list[np.ndarray]:
    return [next(loader)["tokens"] for _ in range(steps)]


def test_loader_is_deterministic_and_visits_each_example_once_per_epoch(labelled_split):
    a = _take(BatchLoader(labelled_split, batch_size=10, seed=3), 25)
    b = _take(BatchLoader(labelled_split, batch_size=10, seed=3, prefetch=0), 25)
    c = _take(BatchLoader(labelled_split, batch_size=10, seed=4), 25)
    np.testing.assert_array_equal(np.stack(a), np.stack(b))
    assert not np.array_equal(np.stack(a), np.stack(c))
    first_epoch = np.concatenate(a[:10])[:, 0] // 2  # 10 full batches, 3 examples dropped
    assert len(set(first_epoch.tolist())) == 100
    batch = next(BatchLoader(labelled_split, batch_size=10, shuffle=False))
    np.testing.assert_array_equal(batch["labels"], np.arange(10))
    np.testing.assert_array_equal(batch["tokens"][:, 0], 2 * np.arange(10))


def test_loader_resumes_from_saved_state(labelled_split):
    loader = BatchLoader(labelled_split, batch_size=10, seed=1)
    _take(loader, 7)
    state = json.loads(json.dumps(loader.state()))
    assert state == {"seed": 1, "epoch": 0, "position": 70}
    resumed = BatchLoader(labelled_split, batch_size=10, seed=1, state=state)
    np.testing.assert_array_equal(np.stack(_take(resumed, 12)), np.stack(_take(loader, 12)))
    with pytest.raises(DataError, match="seed"):
        BatchLoader(labelled_split, batch_size=10, seed=2, state=state)


def test_process_slices_partition_the_global_batch(labelled_split):
    whole = BatchLoader(labelled_split, batch_size=12, seed=5)
    parts = [
        BatchLoader(labelled_split, batch_size=12, seed=5, process_index=p, process_count=4)
        for p in range(4)
    ]
    for _ in range(20):
        expected = next(whole)
        got = [next(part) for part in parts]
        assert all(g["tokens"].shape == (3, 2) for g in got)
        for key in ("tokens", "labels"):
            np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), expected[key])


def test_loader_rejects_bad_arguments_and_is_collectable(labelled_split):
    for kwargs in (
        dict(batch_size=0),
        dict(batch_size=200),
        dict(batch_size=10, process_count=3),
        dict(batch_size=10, process_index=2, process_count=2),
        dict(batch_size=10, prefetch=-1),
    ):
        with pytest.raises(DataError):
            BatchLoader(labelled_split, **kwargs)
    loader = BatchLoader(labelled_split, batch_size=10)
    next(loader)
    ref = weakref.ref(loader)
    del loader
    gc.collect()
    assert ref() is None  # the prefetch thread does not keep the loader alive


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MD4_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, str(REPO / "data.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_cli_prepares_and_summarises(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("hello world\n" * 100)
    result = _cli("--dataset", f"file:{path}", "--seq-len", "8", "--no-progress", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "train    135 examples" in result.stdout and str(tmp_path) in result.stdout


BAD_INPUTS = {
    "unknown dataset": ["--dataset", "imagenet"],
    "missing file": ["--dataset", "file:{tmp}/missing.txt"],
    "empty file": ["--dataset", "file:{tmp}/empty.txt"],
    "directory": ["--dataset", "file:{tmp}"],
    "not a zip": ["--dataset", "text8", "--data-path", "{tmp}/binary.bin"],
    "not text8's alphabet": ["--dataset", "text8", "--data-path", "{tmp}/bad.zip"],
    "seq-len zero": ["--seq-len", "0"],
    "seq-len word": ["--seq-len", "many"],
    "num-proc zero": ["--num-proc", "0"],
    "unknown flag": ["--epochs", "3"],
    "fixed vocabulary": ["--dataset", "text8", "--tokenizer", "gpt2"],
    "misplaced data path": ["--dataset", "pystdlib", "--data-path", "x"],
    "image seq-len": ["--dataset", "cifar10", "--seq-len", "1024"],
    "seq-len too long": ["--seq-len", "100000000", "--no-progress"],
}


def _bad_input_files(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").touch()
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00 binary")
    _text8_zip(tmp_path / "bad.zip", b"Capital letters")


def _assert_one_line_and_exit_2(status: int, stderr: str) -> None:
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and stderr.startswith("data.py: error: ")


@pytest.mark.parametrize("args", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, monkeypatch, capfd):
    """data.py's main in-process, as its entry point calls it (the entry point itself: the test
    below): what reaches file descriptor 2, from Python or from a native library, is one line.
    An exception that escapes main fails the test, as its traceback would."""
    _bad_input_files(tmp_path)
    args = [a.format(tmp=tmp_path) for a in args]
    monkeypatch.setenv("MD4_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [str(REPO / "data.py"), *args])  # argparse's prog
    monkeypatch.chdir(REPO)
    try:
        status = data_script.main(args)
    except SystemExit as e:  # argparse's errors
        status = e.code
    _assert_one_line_and_exit_2(status, capfd.readouterr().err)


def test_cli_bad_input_through_the_entry_point(tmp_path):
    """One bad input through `python data.py`: nothing else (an import's warning) on stderr. The
    image case: it reaches the dataset libraries."""
    _bad_input_files(tmp_path)
    result = _cli(*BAD_INPUTS["image seq-len"], cache=tmp_path / "cache")
    _assert_one_line_and_exit_2(result.returncode, result.stderr)


def test_two_processes_preparing_at_once_make_one_cache(tmp_path):
    """Started together, both succeed and leave one complete entry; a killed preparation's
    temporary directory is removed by the next one."""
    path = tmp_path / "input.txt"
    path.write_bytes(Path(json.__file__).read_bytes() * 20)
    cache = tmp_path / "cache"
    code = (
        "from md4_eqx.data import load; "
        f"print(load('file:{path}', cache_dir={str(cache)!r}, progress=False).path)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    entry = Path(outputs[0][0].strip())
    assert outputs[1][0].strip() == str(entry)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name, f"{entry.name}.lock"]
    assert (entry / "train.bin").read_bytes() + (
        entry / "valid.bin"
    ).read_bytes() == path.read_bytes()

    for f in entry.iterdir():  # as if killed halfway: a temporary directory, no entry
        f.unlink()
    entry.rename(entry.with_name(f"{entry.name}.tmp-deadbeef"))
    ds = load(f"file:{path}", cache_dir=cache, progress=False)
    assert sorted(p.name for p in cache.iterdir()) == [entry.name, f"{entry.name}.lock"]
    assert ds.meta["streams"]["train"]["tokens"] == (entry / "train.bin").stat().st_size
