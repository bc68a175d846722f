"""bench/train_step.py runs end to end (two steps of a small tiny-preset case) and reports sane figures."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# bench/ is a folder of scripts, not a package: load the one script by path, leaving sys.path
# alone (bench/sample.py would otherwise shadow the sample.py program for later tests).
_spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_train_step_bench_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main(["--preset", "tiny", "--batch", "4", "--precision", "float32", "--steps", "2",
                "--warmup", "0", "--json", str(out)])
    table = capsys.readouterr().out
    assert "| 4 | xla | float32 |" in table and "JAX" in table
    (case,) = json.loads(out.read_text())["cases"]
    assert case["ms_per_step"] > 0
    assert case["tokens_per_s"] == 4 * 128 / (case["ms_per_step"] / 1e3)
    assert case["mfu"] is None and case["peak_memory_gib"] is None  # a CPU has neither
    assert 0 < case["bits_per_token"] < 9  # a fresh model predicts ~log2(256) = 8 bits/token


def test_flops_per_token_counts_layers_head_and_attention():
    config = bench.case_config("md4-s", 16, "xla", bench.Precision.BFLOAT16)
    d, h, layers, seq, v_pad = 768, 2048, 12, 1024, 50304
    expected = 6 * (layers * (4 * d * d + 3 * d * h) + d * v_pad) + 12 * layers * seq * d
    assert bench.flops_per_token(config) == expected


def test_bad_attention_is_one_line_error():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--attention", "cudnn"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not run here" in proc.stderr
