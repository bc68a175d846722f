"""train.py end to end through its command line: train, checkpoint, resume after SIGKILL, bad input
(the bad input that needs no run: tests/test_cli_errors.py).

Every run uses a model far smaller than the tiny preset (flags below) on a ~100 KB local file.
The subprocesses run XLA:CPU single-threaded so two runs of the same step give the same bits,
and "the resumed run's metrics equal the uninterrupted run's" can be checked exactly.
"""

import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL
from PIL import Image

import train
from md4_eqx import checkpoint
from md4_eqx import workdir as workdir_lock
from md4_eqx.cli import make_config
from md4_eqx.config import Config, ExecutionConfig, Remat, preset
from md4_eqx.metrics_log import MetricsLog, read_events
from md4_eqx.visualize import line_chart

ROOT = Path(__file__).resolve().parent.parent
# The runs compile the same few programs again and again: they share a persistent compilation
# cache, this module's own (a size limit turns on its file lock, so concurrent runs are safe).
# Every program goes in, however quick its compile: a run makes dozens of small ones (the
# initialisation, the evaluation's and the sampler's pieces), together seconds of each run.
COMPILED = tempfile.TemporaryDirectory(prefix="md4-eqx-test-compiled-")
ENV = {
    **os.environ,
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false",
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": COMPILED.name,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(2**30),
}


def run(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def assert_usage_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, exactly one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[list[str], Path]:
    """(dataset flags, a scratch directory): a ~100 KB Python file and its own cache."""
    tmp = tmp_path_factory.mktemp("train")
    sources = [Path(module.__file__).read_text() for module in (json, subprocess, signal)]
    path = tmp / "code.py"
    path.write_text("\n".join(sources)[:100_000])
    return ["--dataset", f"file:{path}", "--cache-dir", str(tmp / "cache")], tmp


def strict_json(line: str) -> dict:
    """`line` read as JSON by a reader that takes no NaN or Infinity (Python's json takes them)."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=refuse)


def events(workdir: Path) -> list[dict]:
    """metrics.jsonl as `read_events` gives it, without the timing, which differs between runs;
    every line must be strict JSON."""
    path = workdir / "metrics.jsonl"
    for line in path.read_text().splitlines():
        strict_json(line)
    return [{k: v for k, v in e.items() if k != "tokens_per_s"} for e in read_events(path)]


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return digest.hexdigest()


RESUME = ["--steps", "30", "--log-every", "1", "--eval-every", "10", "--checkpoint-every", "5"]


@pytest.fixture(scope="module")
def trained(data) -> tuple[list[str], Path]:
    """(flags, workdir) of an uninterrupted 30-step run."""
    flags, tmp = data
    flags = [*flags, *SMALL, *RESUME]
    proc = run("train.py", "--workdir", str(tmp / "full"), *flags)
    assert proc.returncode == 0, proc.stderr
    return flags, tmp / "full"


def wait_until_logged(workdir: Path, step: int, proc: subprocess.Popen) -> None:
    """Polls workdir's metrics.jsonl until `step` is logged; fails if `proc` ends or 240 s pass
    first."""
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and f'"step": {step},' in metrics.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, (
            f"the run ended before step {step}"
        )
        time.sleep(0.01)


def stopped_step(stdout: str) -> int:
    """The step train.py says it stopped at on a signal."""
    return int(stdout.split(": stopped by a signal")[0].rsplit("step ", 1)[1])


@pytest.mark.slow
def test_run_writes_metrics_samples_and_last_checkpoints(trained):
    flags, workdir = trained
    log = events(workdir)
    evals = [e for e in log if "eval_bpt" in e]
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert [e["step"] for e in log if "train_bpt" in e] == list(range(1, 31))
    # The zero-initialised head: log2(256) bits, within 4 standard errors.
    assert evals[0]["eval_bpt"] == pytest.approx(8.0, abs=4 * evals[0]["eval_bpt_stderr"])
    assert all(0 < e["eval_bpt_stderr"] < 0.1 * e["eval_bpt"] for e in evals)
    assert evals[-1]["eval_bpt"] < evals[0]["eval_bpt"]
    assert all({"lr", "train_bpt"} <= set(e) for e in log if "train_bpt" in e)
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [
        20,
        25,
        30,
    ]  # keep 3
    assert sorted(p.name for p in (workdir / "samples").iterdir()) == [
        f"step_{s:07d}.txt" for s in (0, 10, 20, 30)
    ]
    # The curves are those of the logged bits per token.
    curves = {
        name: (
            np.array([e["step"] for e in log if key in e]),
            np.array([e[key] for e in log if key in e]),
        )
        for key, name in (("train_bpt", "train"), ("eval_bpt", "eval (EMA model)"))
    }
    with Image.open(workdir / "curves.png") as png:
        np.testing.assert_array_equal(
            np.asarray(png), np.asarray(line_chart(curves, "step", "bits per token"))
        )
    # Rerunning the finished command does nothing.
    before = tree_digest(workdir)
    proc = run("train.py", "--workdir", str(workdir), *flags)
    assert proc.returncode == 0 and "already reaches" in proc.stdout
    assert tree_digest(workdir) == before


@pytest.mark.slow
def test_resume_after_sigkill_matches_the_uninterrupted_run(trained, data):
    flags, full = trained
    workdir = data[1] / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_until_logged(workdir, 7, proc)  # after checkpoint 5
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (
        5 <= max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) < 30
    )

    resumed = run("train.py", "--workdir", str(workdir), *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert events(workdir) == events(full)


@pytest.mark.slow
def test_damaged_or_different_checkpoint_is_reported_and_left_alone(trained, tmp_path):
    flags, full = trained
    # A checkpoint of another model: flags that change the network are refused (and only those
    # are named: an execution field may change).
    before = tree_digest(full)
    proc = run(
        "train.py",
        "--workdir",
        str(full),
        *flags,
        "--steps",
        "40",
        "--width",
        "64",
        "--remat",
        "full",
    )
    assert_usage_error(proc, "different model", "model.width: 32 -> 64")
    assert "remat" not in proc.stderr
    assert tree_digest(full) == before

    for damage in ("arrays", "meta"):
        workdir = tmp_path / damage
        subprocess.run(["cp", "-r", str(full), str(workdir)], check=True)
        latest = workdir / "checkpoints" / "30"
        if damage == "arrays":  # every stored array's bytes garbled
            for f in (latest / "state").rglob("*"):
                if f.is_file() and f.parent.name == "d":
                    f.write_bytes(b"\x00garbage" * 16)
        else:
            (latest / "meta" / "metadata").write_text("{not json")
        before = tree_digest(workdir)
        proc = run("train.py", "--workdir", str(workdir), *flags, "--steps", "40")
        assert_usage_error(proc, "checkpoint", "unreadable")
        assert tree_digest(workdir) == before  # nothing overwritten: no checkpoint, no metrics


def to_old_layout(meta_file: Path) -> None:
    """Rewrites a checkpoint's stored config as checkpoints before `ExecutionConfig` had it: the
    execution fields under "model", no "execution" section."""
    meta = json.loads(meta_file.read_text())
    config = meta["config"]
    assert set(config["execution"]) == {f.name for f in dataclasses.fields(ExecutionConfig)}
    config["model"].update(config.pop("execution"))
    meta_file.write_text(json.dumps(meta))


@pytest.mark.slow
def test_checkpoint_of_the_old_config_layout_resumes_and_loads(trained, tmp_path):
    """A checkpoint whose config JSON keeps the execution fields under "model" (written before
    the split) reads as the same Config, and the same command resumes it as the uninterrupted
    run."""
    flags, full = trained
    workdir = tmp_path / "old-layout"
    subprocess.run(["cp", "-r", str(full), str(workdir)], check=True)
    for step in ("25", "30"):  # as if the run had been stopped after checkpoint 20
        subprocess.run(["rm", "-r", str(workdir / "checkpoints" / step)], check=True)
    to_old_layout(workdir / "checkpoints" / "20" / "meta" / "metadata")
    saved = checkpoint.read_meta(full, 20)[1]
    assert checkpoint.read_meta(workdir, 20)[1] == saved
    with checkpoint.Checkpoints(workdir) as checkpoints:
        _, config, _ = checkpoints.read_meta(20)  # the old layout, read
        model = checkpoints.load_for_inference(20, config)
    assert config == saved and model.execution == saved.execution

    resumed = run("train.py", "--workdir", str(workdir), *flags)
    assert resumed.returncode == 0 and "from step 20" in resumed.stdout, resumed.stderr
    assert events(workdir) == events(full)
    meta = json.loads((workdir / "checkpoints" / "30" / "meta" / "metadata").read_text())
    assert (
        "execution" in meta["config"] and "remat" not in meta["config"]["model"]
    )  # written in the new layout


@pytest.mark.slow
def test_resume_takes_other_execution_fields(trained, tmp_path):
    """Execution fields say how the same model is computed: a resume may change them (the
    checkpoint then records the new ones); a model field is refused (the test above)."""
    flags, full = trained
    workdir = tmp_path / "execution"
    subprocess.run(["cp", "-r", str(full), str(workdir)], check=True)
    changed = ["--remat", "full", "--head-chunk", "16", "--unroll-layers", "false"]
    proc = run("train.py", "--workdir", str(workdir), *flags, "--steps", "35", *changed)
    assert proc.returncode == 0 and "from step 30" in proc.stdout, proc.stderr
    step, config, _ = checkpoint.read_meta(workdir)
    saved = checkpoint.read_meta(full)[1]
    assert step == 35 and config.model == saved.model
    assert (
        config.execution.remat,
        config.execution.head_chunk,
        config.execution.unroll_layers,
    ) == (Remat.FULL, 16, False)
    assert all(
        math.isfinite(e["train_bpt"])
        for e in events(workdir)
        if e["step"] > 30 and "train_bpt" in e
    )


@pytest.mark.slow
def test_two_processes_train_like_one_and_stop_together(trained, data):
    """Two processes, each loading half of every batch, train as the one-process run does (the
    same metrics up to the order of float sums); SIGTERM reaches process 1 only, and both stop
    at the same step with its checkpoint. (Resuming that checkpoint is the one-process SIGTERM
    test's, and test_parallel's two-process checkpoint test's, subject.)"""
    flags, full = trained
    workdir = data[1] / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--workdir",
        str(workdir),
        *flags,
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--process-id", str(i)],
            cwd=ROOT,
            env=ENV,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in (0, 1)
    ]
    wait_until_logged(workdir, 11, procs[1])
    procs[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert all("Traceback" not in out for out in outputs)
    assert "mesh {'data': 2, 'model': 1}" in outputs[0]
    stopped = stopped_step(outputs[0])
    assert 11 <= stopped < 30
    assert checkpoint.read_meta(workdir)[0] == stopped
    got, want = events(workdir), [e for e in events(full) if e["step"] <= stopped]
    assert [e.keys() for e in got] == [e.keys() for e in want]
    for g, w in zip(got, want, strict=True):
        assert g == pytest.approx(w, rel=1e-4), (g, w)


def main_exit(argv: list[str], capsys) -> tuple[int, str]:
    """train.main in-process: (exit status, stderr)."""
    try:
        code = train.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, capsys.readouterr().err


def test_config_flags_cover_every_field():
    args = train.build_parser().parse_args(
        [
            "--model.num-layers",
            "3",
            "--width",
            "64",
            "--sampler.steps",
            "7",
            "--steps",
            "9",
            "--schedule",
            "cosine",
            "--learnable",
            "true",
            "--optim.lr",
            "1e-3",
        ]
    )
    cfg, given = make_config(args)
    assert (cfg.model.num_layers, cfg.model.width, cfg.sampler.steps, cfg.train.steps) == (
        3,
        64,
        7,
        9,
    )
    assert (
        cfg.diffusion.schedule.value == "cosine"
        and cfg.diffusion.learnable
        and cfg.optim.lr == 1e-3
    )
    assert given == {
        "model.num_layers",
        "model.width",
        "sampler.steps",
        "train.steps",
        "diffusion.schedule",
        "diffusion.learnable",
        "optim.lr",
    }
    # Every field of every section has a --section.field flag.
    flags = {o for a in train.build_parser()._actions for o in a.option_strings}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type):
            assert f"--{section.name}.{f.name.replace('_', '-')}" in flags


def test_classes_come_from_the_data_only_for_a_class_conditional_preset():
    """cifar10 is unconditional, as the paper's model: a labelled dataset adds its classes only
    with --num-classes (checked against the data) or under a preset that has classes."""
    cifar = types.SimpleNamespace(name="cifar10", vocab_size=256, num_classes=10)
    base = preset("cifar10")
    assert train.fit_to_data(base, cifar, set()).model.num_classes == 0
    given = dataclasses.replace(base, model=dataclasses.replace(base.model, num_classes=10))
    assert train.fit_to_data(given, cifar, {"model.num_classes"}).model.num_classes == 10
    conditional = dataclasses.replace(base, model=dataclasses.replace(base.model, num_classes=3))
    assert train.fit_to_data(conditional, cifar, set()).model.num_classes == 10  # the data's count


def test_default_workdir_names():
    assert train.default_workdir("tiny", "pystdlib") == Path("runs/tiny-pystdlib")
    assert train.default_workdir("md4-s", "hf:roneneldan/TinyStories") == Path(
        "runs/md4-s-TinyStories"
    )
    assert train.default_workdir("tiny", "file:/data/my code.py") == Path("runs/tiny-my-code.py")


@pytest.mark.slow
def test_divergence_skips_steps_then_stops_with_exit_1(data):
    """lr 1e30 blows the weights up to overflow on step 2: every later step is non-finite and
    skipped; the third in a row stops the run, with its checkpoints from before the streak."""
    flags, tmp = data
    workdir = tmp / "diverged"
    proc = run(
        "train.py",
        "--workdir",
        str(workdir),
        *flags,
        *SMALL,
        "--steps",
        "20",
        "--lr",
        "1e30",
        "--warmup",
        "1",
        "--log-every",
        "1",
        "--eval-every",
        "20",
        "--checkpoint-every",
        "1",
        "--max-bad-steps",
        "3",
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "3 non-finite steps in a row" in lines[0], proc.stderr
    skipped = [e for e in events(workdir) if "skipped" in e]
    assert [e["skipped"] for e in skipped] == [1, 2, 3]
    first = skipped[0]["step"]
    assert [e["step"] for e in skipped] == [first, first + 1, first + 2]
    # Training losses are logged for the steps that updated, never a skipped step's NaN.
    assert [e["step"] for e in events(workdir) if "train_bpt" in e and "skipped" not in e] == list(
        range(1, first)
    )
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
    assert saved[-1] == first - 1  # none written during the streak
    assert checkpoint.read_meta(workdir)[0] == first - 1


@pytest.mark.slow
def test_finite_but_huge_loss_still_saves_evaluates_and_plots(data):
    """lr 1e4 drives the losses to ~1e10 bits per token, never non-finite, so no step is skipped:
    the last checkpoint is written, the evaluation logs a perplexity
    bound of inf (2^bits overflows a float), the curves are drawn and the run exits 0."""
    flags, tmp = data
    workdir = tmp / "huge"
    proc = run(
        "train.py",
        "--workdir",
        str(workdir),
        *flags,
        *SMALL,
        "--lr",
        "1e4",
        "--warmup",
        "1",
        "--steps",
        "10",
        "--max-bad-steps",
        "5",
        "--log-every",
        "5",
        "--eval-every",
        "10",
        "--checkpoint-every",
        "10",
    )
    assert proc.returncode == 0, proc.stderr
    log = events(workdir)
    assert not [e for e in log if "skipped" in e]
    assert min(e["train_bpt"] for e in log if "train_bpt" in e) > 1024  # 2^bits > the largest float
    last = [e for e in log if "eval_bpt" in e][-1]
    assert (
        last["step"] == 10 and 1024 < last["eval_bpt"] < math.inf and last["eval_ppl"] == math.inf
    )
    assert checkpoint.read_meta(workdir)[0] == 10
    with Image.open(workdir / "curves.png") as png:
        assert png.size == (720, 420)


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_the_rerun_matches_the_uninterrupted_run(trained, data):
    """SIGTERM (then SIGINT at once, landing in the step or the save) mid-run: exit 0 with a
    complete checkpoint at the step it stopped at; the rerun resumes there."""
    flags, full = trained
    workdir = data[1] / "preempted"
    cmd = [sys.executable, str(ROOT / "train.py"), "--workdir", str(workdir), *flags]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    wait_until_logged(workdir, 11, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    stopped = stopped_step(out)
    assert 11 <= stopped < 30
    assert checkpoint.read_meta(workdir)[0] == stopped  # saved there, on schedule or on the signal
    assert max(e["step"] for e in events(workdir)) == stopped

    resumed = run("train.py", "--workdir", str(workdir), *flags)
    assert resumed.returncode == 0, resumed.stderr
    assert f"from step {stopped}" in resumed.stdout
    assert events(workdir) == events(full)


def test_non_finite_metrics_are_written_as_json_and_read_back(tmp_path):
    """JSON has no NaN or Infinity: metrics.jsonl spells them as strings, which a strict JSON
    reader takes and `read_events` turns back into floats; a resumed run keeps them so."""
    log = MetricsLog(tmp_path, None, enabled=True)
    log.write(step=1, train_bpt=7.5, lr=1e-3, grad_norm=0.5)
    log.write(step=2, skipped=1, train_bpt=math.nan, grad_norm=math.inf)
    log.write(step=3, eval_bpt=2.0e9, eval_bpt_stderr=1.0, eval_ppl=math.inf, drift=-math.inf)
    path = tmp_path / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert [strict_json(line) for line in lines][1:] == [
        {"step": 2, "skipped": 1, "train_bpt": "nan", "grad_norm": "inf"},
        {"step": 3, "eval_bpt": 2.0e9, "eval_bpt_stderr": 1.0, "eval_ppl": "inf", "drift": "-inf"},
    ]
    first, skipped, evaluated = read_events(path)
    assert first == {"step": 1, "train_bpt": 7.5, "lr": 1e-3, "grad_norm": 0.5}
    assert math.isnan(skipped["train_bpt"]) and skipped["grad_norm"] == math.inf
    assert evaluated["eval_ppl"] == math.inf and evaluated["drift"] == -math.inf
    MetricsLog(tmp_path, 3, enabled=True)  # a resume from step 3 rewrites the events up to it
    assert path.read_text().splitlines() == lines


def test_unwritable_or_locked_workdir_exits_2_before_training(data, capsys):
    flags, tmp = data
    blocker = tmp / "a-file"
    blocker.write_text("")
    code, err = main_exit(["--workdir", str(blocker / "run"), *flags, *SMALL], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not writable" in err, err

    workdir = tmp / "taken"
    with workdir_lock.claim(
        workdir
    ):  # another run's lock (flock: per open file, so also in-process)
        code, err = main_exit(["--workdir", str(workdir), *flags, *SMALL], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "in use by another run" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]  # nothing written


def test_orbax_report_filters_stay_only_after_a_failed_call(monkeypatch):
    """A checkpoint call that succeeds leaves the process's hooks as they were (a program that
    only reads checkpoints keeps its own); after one that fails, the absl filter and the
    unraisable hook drop exactly orbax's late reports of that failure."""
    absl = logging.getLogger("absl")
    monkeypatch.setattr(absl, "filters", [])  # restored after the test
    shown = []
    monkeypatch.setattr(sys, "unraisablehook", shown.append)
    with checkpoint._failure_said_once():
        pass
    assert absl.filters == [] and sys.unraisablehook == shown.append

    with pytest.raises(ValueError), checkpoint._failure_said_once():
        raise ValueError("a failed write")

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("absl", logging.ERROR, __file__, 0, message, None, None)

    late = "[process=0][thread=array_type_handler] _SignalingThread.run() raised an exception: X"
    assert not absl.filter(record(late)) and absl.filter(record("another error"))
    closed, other = (
        types.SimpleNamespace(exc_value=RuntimeError(text))
        for text in ("Event loop is closed", "another error")
    )
    sys.unraisablehook(closed)
    sys.unraisablehook(other)
    assert shown == [other]


# In the child, files may not grow past 64 KiB (root ignores permissions, not this limit): a
# bigger write fails with EFBIG, as on a full disk. Set by the shell that execs the child, not by
# a preexec_fn, which would fork this process while JAX's threads run.
LIMIT_FILE_SIZE = ["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash"]


@pytest.mark.slow
def test_failed_save_keeps_the_newest_complete_checkpoint(trained, tmp_path):
    flags, full = trained
    workdir = tmp_path / "full-disk"
    subprocess.run(["cp", "-r", str(full), str(workdir)], check=True)
    for step in ("25", "30"):  # as if the run had been stopped after checkpoint 20
        subprocess.run(["rm", "-r", str(workdir / "checkpoints" / step)], check=True)
    cmd = [
        *LIMIT_FILE_SIZE,
        sys.executable,
        str(ROOT / "train.py"),
        "--workdir",
        str(workdir),
        *flags,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_usage_error(
        proc,
        "checkpoint 25 could not be written",
        "File too large",
        "newest complete one is step 20",
    )
    assert checkpoint.read_meta(workdir)[0] == 20

    resumed = run("train.py", "--workdir", str(workdir), *flags)
    assert resumed.returncode == 0 and "from step 20" in resumed.stdout, resumed.stderr
    assert resumed.stderr == ""  # not even orbax's warning about a partial checkpoint
    assert events(workdir) == events(full)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "25", "30"]
