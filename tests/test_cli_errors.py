"""Every program meets bad input with one line on stderr and exit status 2, never a traceback:
train.py, sample.py and evaluate.py run in-process (what `run_command` does is the same there),
and once through the real entry point for the case that used to print 93 lines.

The cases that need a trained checkpoint are next to it (tests/test_sample.py and
tests/test_evaluate.py), but for those that a class-conditional checkpoint meets, below.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL
from test_evaluate import save_run

import evaluate
import sample
import train
from md4_eqx.cli import flag_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[str], Path]:
    """(dataset flags, a scratch directory): a 40 KB text file, an empty one and a tiny one."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "code.py").write_text(Path(os.__file__).read_text()[:40_000])
    (tmp / "empty.txt").write_text("")
    (tmp / "tiny.txt").write_text("x = 1\n")
    return ["--dataset", f"file:{tmp / 'code.py'}", "--cache-dir", str(tmp / "cache")], tmp


def exit_and_stderr(main, argv: list[str], capsys) -> tuple[int, str]:
    """main(argv) in-process: (exit status, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's errors
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize(
    "argv, needle",
    [
        # the attention kernel x this machine (CPU)
        (["--attention", "cudnn"], "needs a GPU"),
        (["--attention", "pallas"], "pallas"),
        # the mesh, alone and against the model
        (["--mesh", "data=3"], "data=3"),
        (["--mesh", "model=16"], "model=16"),
        (["--mesh", "data=2,pipeline=4"], "data=D,model=M"),
        (["--mesh", "data=1,model=8"], "must divide num_heads (2)"),
        # one field
        (["--lr", "0"], "lr=0"),
        (["--lr", "fast"], "expected float"),
        (["--steps", "0"], "steps=0"),
        (["--seq-len", "0"], "seq_len=0"),
        (["--width", "-3"], "width=-3"),
        (["--width", "wide"], "expected int"),
        (["--schedule", "square"], "linear"),
        (["--antithetic", "maybe"], "true or false"),
        (["--batch-size", "0"], "batch_size=0"),
        (["--head-chunk", "-1"], "head_chunk=-1"),
        (["--preset", "huge"], "huge"),
        (["--no-such-flag", "1"], "--no-such-flag"),
        (["--memory-limit", "80 gigs"], "80 gigs"),
        (["--num-processes", "2"], "go together"),
        # fields that do not go together
        (["--microbatches", "3"], "multiple of microbatches=3"),
        (["--microbatches", "2"], "8 devices on the data axis x 2 microbatches"),
        (["--batch-size", "12"], "multiple of the 8 devices"),
        (["--preset", "cifar10", "--head-chunk", "64"], "U-Net"),
        (["--guidance", "2"], "no classes"),
        (["--rule", "remdm", "--loop", "exact_skip"], "every_step loop"),
        (["--learnable", "true", "--loop", "exact_skip"], "per-token schedule"),
        # the data
        (["--dataset", "nosuch"], "nosuch"),
        (["--dataset", "file:/no/such/file.txt"], "/no/such/file.txt"),
        (["--dataset", "file:{tmp}/empty.txt"], "empty"),
        (["--dataset", "file:{tmp}/tiny.txt"], "tiny.txt"),
        (["--vocab-size", "100"], "outside"),
        (["--num-classes", "10"], "classes"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_train(argv, needle, data, tmp_path, capsys):
    flags, tmp = data
    argv = [a.format(tmp=tmp) for a in argv]
    code, err = exit_and_stderr(
        train.main, ["--workdir", str(tmp_path / "run"), *flags, *SMALL, *argv], capsys
    )
    assert_one_line(code, err, needle)
    # No file written (a split too small is found once the run holds its workdir: the lock only).
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != ".lock"]


def test_train_through_its_entry_point(tmp_path):
    """The command the issue tried, as a user runs it: no traceback, whatever JAX prints."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--attention",
            "cudnn",
            "--workdir",
            str(tmp_path / "never"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line(proc.returncode, proc.stderr, "needs a GPU")
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "main, argv, needle",
    [
        (sample.main, ["--workdir", "{tmp}/none"], "no checkpoint"),
        (evaluate.main, ["nelbo", "--workdir", "{tmp}/none"], "no checkpoint"),
        (evaluate.main, ["nelbo", "--draws", "0"], "--draws must be positive"),
        (evaluate.main, ["samples", "--file", "{tmp}/none.jsonl"], "cannot read"),
    ],
    ids=["sample-workdir", "nelbo-workdir", "nelbo-draws", "samples-file"],
)
def test_sample_and_evaluate(main, argv, needle, tmp_path, capsys):
    code, err = exit_and_stderr(main, [a.format(tmp=tmp_path) for a in argv], capsys)
    assert_one_line(code, err, needle)


@pytest.mark.parametrize(
    "program, argv, needle",
    [
        ("data.py", ["--dataset", "owt"], "cannot load tokenizer 'gpt2': We couldn't connect"),
        (
            "train.py",
            ["--dataset", "hf:someone/stories", "--tokenizer", "bytes", "--workdir", "{tmp}/w"],
            "cannot open dataset 'someone/stories' (split='train'): Couldn't reach",
        ),
    ],
    ids=["data-owt", "train-hf"],
)
def test_unreachable_hub(program, argv, needle, tmp_path):
    """An unreachable hub (nothing listens on loopback's port 9) is one line, not the hub
    library's warnings about each of its retries. Its waits between retries (23 s) are skipped:
    time.sleep returns at once in this process."""
    argv = [program, *[a.format(tmp=tmp_path) for a in argv], "--cache-dir", str(tmp_path / "c")]
    run = f"import runpy, sys, time; time.sleep = lambda s: None; sys.argv = {argv!r}; "
    run += f"runpy.run_path({program!r}, run_name='__main__')"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = subprocess.run(
        [sys.executable, "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert_one_line(proc.returncode, proc.stderr, needle)
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def classes_run(tmp_path_factory) -> Path:
    """The checkpoint of a class-conditional model (2 classes) whose run read a text file."""
    return save_run(tmp_path_factory.mktemp("classes"), model={"num_classes": 2})


@pytest.mark.parametrize(
    "main, argv, needle",
    [
        (sample.main, ["--out", "{tmp}/no/such/x.jsonl"], "--out {tmp}/no/such/x.jsonl: no folder"),
        (
            evaluate.main,
            ["nelbo", "--dataset", "file:{run}/../corpus.txt"],
            "corpus.txt has no labels; the model is class-conditional, with 2",
        ),
    ],
    ids=["sample-out-folder", "nelbo-unlabelled"],
)
def test_a_class_conditional_checkpoint(main, argv, needle, classes_run, tmp_path, capsys):
    """Each found before any work: nothing is sampled or evaluated."""
    fill = {"tmp": tmp_path, "run": classes_run}
    argv += ["--workdir", str(classes_run), "--no-progress", "--cache-dir", str(tmp_path / "c")]
    code, err = exit_and_stderr(main, [a.format(**fill) for a in argv], capsys)
    assert_one_line(code, err, needle.format(**fill))


def test_config_errors_name_the_programs_own_flags():
    """A field is shown as the flag that sets it in that program, or not at all."""
    assert flag_of(train.build_parser(), "batch_size") == "--batch-size"
    assert flag_of(sample.build_parser(), "attention") == "--attention"
    assert flag_of(evaluate.build_parser(), "head_chunk") == "--head-chunk"
    assert flag_of(sample.build_parser(), "rule") == "--rule"
    assert flag_of(evaluate.build_parser(), "guidance") is None  # the checkpoint's sampler
