"""bench/train_step.py runs end to end, and its figures agree with what the test measures
itself: the step time with the test's own clock, the FLOPs per token with XLA's count of the
compiled step."""

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax

from md4_eqx.config import (
    Config,
    ExecutionConfig,
    Impl,
    ModelConfig,
    Precision,
    Remat,
    TrainConfig,
    preset,
)
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import lowered_step

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a folder of scripts, not a package: load the one script by path, leaving sys.path
# alone (bench/sample.py would otherwise shadow the sample.py program for later tests).
_spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_step_time_and_tokens_per_s_match_the_tests_own_clock(tmp_path, capsys, monkeypatch):
    """Every call of the step is timed here too, blocking until it is done. The bench's clock runs
    around each of those calls, so its median is at least the test's median of the timed calls,
    and more only by the bench's own Python around a call: microseconds, but a loaded machine can
    pause the process between the two clocks, so up to twice a step (~70 ms here) is allowed.
    Fails on the errors of 4x or more that slip into such arithmetic: a wrong unit (ms as s or
    us), tokens/s without the sequence length or the batch."""
    calls = []  # seconds of every step call, compile included, by this test's clock
    build = bench.build

    def timed_build(config):
        state, step = build(config)

        def timed_step(*args):
            start = time.perf_counter()
            out = jax.block_until_ready(step(*args))
            calls.append(time.perf_counter() - start)
            return out

        return state, timed_step

    monkeypatch.setattr(bench, "build", timed_build)
    out = tmp_path / "bench.json"
    bench.main(
        "--preset tiny --batch 4 --precision float32 --steps 3 --warmup 1 --json".split()
        + [str(out)]
    )
    table = capsys.readouterr().out
    assert "| 4 | xla | float32 |" in table and "JAX" in table
    (case,) = json.loads(out.read_text())["cases"]
    assert len(calls) == 1 + 1 + 3  # the compiling call, --warmup, --steps
    ours = statistics.median(calls[-3:])
    assert ours <= case["ms_per_step"] / 1e3 <= 2 * ours
    tokens = 4 * preset("tiny").model.seq_len
    assert tokens / (2 * ours) <= case["tokens_per_s"] <= tokens / ours
    assert case["mfu"] is None and case["peak_memory_gib"] is None  # a CPU has neither
    # A fresh model predicts log2(256) = 8 bits/token; a batch of 4 estimates it with the 1 / t
    # weights' noise (one example may have t near 0). Per sequence it would be 128 times that.
    assert 4 < case["bits_per_token"] < 16


def test_flops_per_token_matches_xlas_count_of_the_compiled_step():
    """XLA's cost analysis of the whole compiled training step (forward, backward, AdamW, EMA;
    float32, XLA attention, layers unrolled so that no loop hides its trip count), per token,
    against `flops_per_token`. The formula counts the matrix multiplies only; XLA counts every
    operation (norms, softmax, activations, the optimizer: ~4% more here), so the ratio is in
    [1, 1.08]. The smallest plausible slip in the formula moves it by 13% or more: attention
    counted as 6 x layers x seq x width (forward only twice), a GLU MLP as two matrices, no
    output head, no attention term, or 4 x parameters (forward and one backward product)."""
    model = ModelConfig(width=128, num_layers=2, num_heads=4, seq_len=256, vocab_size=1024)
    # The masked-only head runs in a loop over chunks, whose body XLA counts once: one chunk of
    # all 2 x 256 tokens counts the whole head. The chunk is recomputed in the backward pass,
    # one more head matmul (2 d V_pad a token) than the formula's model flops.
    execution = ExecutionConfig(
        precision=Precision.FLOAT32,
        attention=Impl.XLA,
        remat=Remat.NONE,
        unroll_layers=True,
        head_chunk=2 * 256,
    )
    config = Config(
        model=model, execution=execution, train=TrainConfig(batch_size=2, microbatches=1)
    )
    compiled = lowered_step(
        config, make_mesh(1, 1, jax.devices()[:1]), batch=2, microbatches=1
    ).compile()
    xla = compiled.cost_analysis()["flops"] / (2 * model.seq_len)
    expected = bench.flops_per_token(config) + 2 * model.width * model.padded_vocab
    assert 1.0 <= xla / expected <= 1.08, (xla, expected)


def test_bad_attention_is_one_line_error():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--attention", "cudnn"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not run here" in proc.stderr
