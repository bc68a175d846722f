"""sample.py on a checkpoint saved on another mesh; prompts, infilling, trajectories, bad input;
and the pictures of md4_eqx.visualize."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL
from PIL import Image

import sample
from md4_eqx.metrics_log import MetricsLog
from md4_eqx.visualize import (
    COLOURS,
    MASK_CHAR,
    frame_indices,
    image_grid,
    line_chart,
    render_text,
    ticks,
    to_images,
    trajectory_gif,
    trajectory_strip,
)

ROOT = Path(__file__).resolve().parent.parent
SEQ = int(SMALL[SMALL.index("--seq-len") + 1])  # the run's sequence length


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A 4-step run on a (data=2, model=2) mesh of 4 CPU devices, checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("sample")
    data = tmp / "code.py"
    data.write_text(Path(json.__file__).read_text() * 4)
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--workdir",
            str(tmp / "run"),
            "--dataset",
            f"file:{data}",
            "--cache-dir",
            str(tmp / "cache"),
            "--mesh",
            "data=2,model=2",
            *SMALL,
            "--steps",
            "4",
            "--eval-every",
            "4",
            "--checkpoint-every",
            "2",
            "--eval-batches",
            "1",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return tmp / "run"


def cache_flags(workdir: Path) -> list[str]:
    return ["--workdir", str(workdir), "--cache-dir", str(workdir.parent / "cache")]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """sample.main in-process: (exit status, stdout, stderr)."""
    try:
        code = sample.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_writes_jsonl_from_a_checkpoint_of_another_mesh(workdir, tmp_path):
    out = tmp_path / "s.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "sample.py"),
            *cache_flags(workdir),
            "--num-samples",
            "3",
            "--steps",
            "8",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # one device: restored from (2, 2)
    )
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and proc.stdout.count("sample ") == 3
    for r in records:
        assert len(r["tokens"]) == SEQ and all(0 <= t < 256 for t in r["tokens"])
        assert r["text"] == bytes(r["tokens"]).decode("utf-8", "replace")


def test_prompt_infill_and_trajectory(workdir, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    flags = [*cache_flags(workdir), "--num-samples", "2", "--steps", "6", "--out", str(out)]
    code, stdout, _ = run_main(
        [*flags, "--prompt", "def ", "--step", "2", "--top-p", "0.9"], capsys
    )
    assert code == 0 and "(step 2)" in stdout
    for r in map(json.loads, out.read_text().splitlines()):
        assert r["tokens"][:4] == list(b"def ")

    template = "x = [MASK:3]\nreturn [MASK:2]!"
    code, stdout, _ = run_main(
        [*flags, "--infill", template, "--trajectory", "--seed", "3"], capsys
    )
    assert code == 0 and "after step 6/6" in stdout
    for r in map(json.loads, out.read_text().splitlines()):
        tokens = r["tokens"]
        assert (
            tokens[:4] == list(b"x = ")
            and tokens[7:15] == list(b"\nreturn ")
            and tokens[17] == ord("!")
        )
        snapshots = r["trajectory"]
        assert snapshots[-1]["text"] == r["text"] and MASK_CHAR in snapshots[0]["text"]
        assert snapshots[0]["text"].startswith("x = ")  # given tokens are never masked


def test_long_samples_keep_a_long_prompt_and_record_their_settings(workdir, tmp_path, capsys):
    """--length 80 past SEQ = 32 in windows of 8 new tokens, a 40-token prompt (longer than a
    window) kept exactly; every record says how to reproduce it; a bar counts the windows."""
    out, prompt = tmp_path / "long.jsonl", "def load(path):\n    return json.load(path)\n"[:40]
    argv = [
        *cache_flags(workdir),
        "--num-samples",
        "2",
        "--steps",
        "3",
        "--length",
        "80",
        "--block",
        "8",
        "--prompt",
        prompt,
        "--seed",
        "5",
        "--rule",
        "remdm",
        "--out",
        str(out),
    ]
    code, stdout, stderr = run_main(argv, capsys)
    assert code == 0, stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and stdout.count("sample ") == 2
    for i, r in enumerate(records):
        assert len(r["tokens"]) == 80 and r["tokens"][:40] == list(prompt.encode())
        assert all(0 <= t < 256 for t in r["tokens"])
        assert (r["index"], r["seed"], r["checkpoint_step"], r["length"], r["block"]) == (
            i,
            5,
            4,
            80,
            8,
        )
        assert r["sampler"] == {
            "rule": "remdm",
            "loop": "auto",  # the default, which runs remdm on every_step (calls below)
            "steps": 3,
            "grid": "cosine",
            "top_p": 0.8,
            "draws": "exact",
            "remask": "cap",
            "eta": 0.02,
            "remask_from": 1.0,
            "remask_until": 0.0,
            "guidance": 0.0,
        }
    # windows start at 0, 8, ..., 40 and 48: 7 windows of 3 steps + the final fill each
    assert "7/7" in stderr and "calls=28" in stderr and "steps=3" in stderr


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--step", "3"], "[2, 4]"),
        (["--label", "1"], "0 classes"),
        (["--guidance", "2"], "no classes"),
        (["--prompt", "a" * (SEQ + 1)], f"{SEQ + 1} tokens"),
        (["--prompt", "a", "--infill", "[MASK:2]"], "not both"),
        (["--infill", "[MASK:40]"], "40 tokens"),
        (["--out", "x.png"], ".jsonl"),
        (["--num-samples", "0"], "positive"),
        (["--top-p", "1.5"], "(0, 1]"),
        (["--rule", "greedy"], "ancestral"),
        (["--steps", "many"], "expected int"),
        (["--length", "31"], "at least the model's seq_len 32"),
        (["--length", "64", "--block", "0"], "block 0 must lie in [1, seq_len 32]"),
        (["--block", "33"], "block 33 must lie"),
        (["--length", "64", "--trajectory"], "one window"),
        (["--length", "64", "--prompt", "a" * 65], "65 tokens"),
        (["--rule", "remdm", "--loop", "exact_skip"], "every_step loop"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v)[:30],
)
def test_bad_input_exits_2_with_one_line(workdir, argv, needle, capsys):
    code, _, err = run_main([*cache_flags(workdir), *argv], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_missing_or_corrupt_checkpoint(workdir, tmp_path, capsys):
    code, _, err = run_main(["--workdir", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "no checkpoint" in err
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(workdir), str(broken)], check=True)
    for f in (broken / "checkpoints" / "4" / "ema").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"not an array")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "sample.py"), "--workdir", str(broken)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "unreadable" in proc.stderr


def test_image_grid_strip_and_gif(tmp_path):
    shape = (4, 5, 3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (6, 60)).astype(np.int32)
    images = to_images(tokens, shape, mask_id=256)
    assert images.shape == (6, 4, 5, 3) and images.dtype == np.uint8
    grid = image_grid(images, columns=3, scale=2, pad=1)
    assert grid.size == ((3 * 6 + 1) * 2, (2 * 5 + 1) * 2)  # (width, height)

    steps = 7
    traj = np.where(
        rng.random((steps, 2, 60)) < np.linspace(1, 0, steps)[:, None, None], 256, tokens[:2]
    )
    assert to_images(traj[0], shape, 256)[traj[0].reshape(2, *shape) == 256].tolist() == [
        128
    ] * int((traj[0] == 256).sum())
    strip = trajectory_strip(traj, shape, 256, frames=4)
    assert strip.size == ((4 * 7 + 2) * 2, (2 * 6 + 2) * 2)
    gif = tmp_path / "t.gif"
    trajectory_gif(traj, shape, 256, gif, frames=5)
    with Image.open(gif) as animation:
        assert animation.n_frames == 5


def test_frames_and_text_rendering():
    assert frame_indices(1000, 4) == [0, 333, 666, 999]
    assert frame_indices(3, 10) == [0, 1, 2]
    decode = lambda ids: bytes(ids.astype(np.uint8)).decode("utf-8", "replace")  # noqa: E731
    tokens = np.array([*b"ab", 256, 256, *"é".encode(), 256])
    assert render_text(tokens, decode, 256) == f"ab{MASK_CHAR * 2}é{MASK_CHAR}"


def test_ticks_are_round_evenly_spaced_and_inside():
    np.testing.assert_allclose(ticks(0.0, 1000.0), [0, 200, 400, 600, 800, 1000])
    np.testing.assert_allclose(ticks(2.9, 8.35), [3, 4, 5, 6, 7, 8])
    rng = np.random.default_rng(0)
    for lo, span in zip(rng.normal(0, 100, 200), 10.0 ** rng.uniform(-4, 6, 200), strict=True):
        got = ticks(lo, lo + span)
        step = np.diff(got)
        assert (
            3 <= got.size <= 13 and got[0] >= lo - 1e-9 * span and got[-1] <= lo + span * (1 + 1e-9)
        )
        np.testing.assert_allclose(step, step[0], rtol=1e-6)
        mantissa = step[0] / 10 ** np.floor(np.log10(step[0]) + 1e-6)
        assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6


def test_line_chart_draws_each_series_where_its_values_are():
    # Blue falls from 8 to 3 over the steps, red stays at 5.5; the legend sits top right.
    steps = np.arange(0, 101, 10)
    chart = line_chart(
        {
            "falls": (steps, np.linspace(8, 3, steps.size)),
            "flat": (steps, np.full(steps.size, 5.5)),
        },
        "step",
        "bits",
        size=(400, 300),
    )
    assert chart.size == (400, 300)
    pixels = np.array(chart)
    pixels[:70, 300:] = 255  # the legend's corner
    (fall_y, fall_x), (flat_y, flat_x) = (
        np.nonzero((pixels == colour).all(-1)) for colour in COLOURS[:2]
    )
    assert fall_x.min() < 70 and fall_x.max() > 370 and flat_x.min() < 70 and flat_x.max() > 370
    assert np.ptp(flat_y) <= 5  # one horizontal line, its dots included
    left, right = fall_y[fall_x < 80].mean(), fall_y[fall_x > 360].mean()
    assert left < flat_y.mean() - 80 and right > flat_y.mean() + 80  # 8 above 5.5 above 3


def test_curves_leave_out_skipped_steps_and_non_finite_values(tmp_path):
    log = MetricsLog(tmp_path, None, enabled=True)
    log.write(step=0, eval_bpt=8.0)
    log.write(step=1, train_bpt=7.5, lr=1e-3)
    log.write(step=2, skipped=1, train_bpt="nan", grad_norm="inf")
    log.write(step=3, train_bpt=6.0, lr=1e-3)
    log.write(step=4, eval_bpt=float("nan"))
    log.write(step=5, eval_bpt=5.5)
    log.plot()
    expected = line_chart(
        {
            "train": (np.array([1.0, 3.0]), np.array([7.5, 6.0])),
            "eval (EMA model)": (np.array([0.0, 5.0]), np.array([8.0, 5.5])),
        },
        "step",
        "bits per token",
    )
    with Image.open(tmp_path / "curves.png") as png:
        np.testing.assert_array_equal(np.asarray(png), np.asarray(expected))
