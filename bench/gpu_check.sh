#!/usr/bin/env bash
# Everything that needs a GPU, in one command (< 8 min on one H100/H200), figures in one JSON:
#
#   bash bench/gpu_check.sh                   # on the lent GPU, from the repository root
#   GPU_CHECK_TINY=1 bash bench/gpu_check.sh  # the same steps at tiny shapes, on a CPU (~5 min)
#
# Steps, the figures first: bench/attention.py at full shapes; bench/train_step.py on MD4-S
# (bf16, attention auto = cuDNN inside the shard_map) at batch 16, 32, 64, 128, one process per
# batch so each peak-memory figure is that batch's own, our Hopper kernel (attention pallas) at
# batch 16 right after cuDNN's, the loss's head in chunks of 2048 tokens (--head-chunk) at batch
# 64, plus XLA attention in bf16 and f32 at batch 16; train.py
# --preset md4-s for 30 steps on a random-token OpenWebText-shaped cache (bench/owt_cache.py:
# the real loader, no network); then the GPU-relevant tests (attention, samplers). Imports
# neither beartype nor datasets (the GPU machine has neither). A failing step is recorded and
# the rest still run. The whole run keeps to $GPU_CHECK_BUDGET seconds (480): a
# step still running at the deadline is stopped and recorded as rc 124, the steps after it as
# skipped (rc -1), and the JSON and table are written all the same, so a lent machine's time
# limit never costs the figures already measured. Writes bench/results/gpu_check-<time>.json
# (or $GPU_CHECK_JSON) and prints a markdown table for bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
OUT_JSON=${GPU_CHECK_JSON:-bench/results/gpu_check-$(date -u +%Y%m%dT%H%M%SZ).json}
mkdir -p "$(dirname "$OUT_JSON")"

if [[ "${GPU_CHECK_TINY:-0}" == 1 ]]; then
  TESTS=(tests/test_attention.py -k "xla_matches or auto_picks or rejects")
  ATTENTION=(--small --dtype float32 --repeats 2)
  PRESET=tiny; BATCHES=(4 8); STEP=(--steps 2 --warmup 0); ALL_CASES=(--batch 4 --precision float32)
  KERNEL_CASE=(--batch 4 --attention xla --precision float32)  # no Hopper kernel on a CPU
  CHUNK_CASE=(--batch 8 --head-chunk 256)
  TOKENS=200000
  TRAIN=(--width 32 --num-layers 1 --num-heads 2 --seq-len 128 --batch-size 4 --steps 3
    --log-every 1)
else
  TESTS=(tests/test_attention.py tests/test_sampling.py tests/test_fast_sampler.py -m "not slow")
  ATTENTION=()
  PRESET=md4-s; BATCHES=(16 32 64 128); STEP=(--steps 10 --warmup 2)
  ALL_CASES=(--batch 16 --attention xla)
  KERNEL_CASE=(--batch 16 --attention pallas --precision bfloat16)  # our Hopper kernel in the step
  CHUNK_CASE=(--batch 64 --head-chunk 2048)  # does 64 fit without remat, at what speed (#11)
  TOKENS=8000000
  TRAIN=(--batch-size 32 --steps 30 --log-every 10)
fi

: > "$TMP/steps.tsv"
DEADLINE=$(( $(date +%s) + ${GPU_CHECK_BUDGET:-480} ))
run() {  # run NAME CMD...: log to $TMP/NAME.log, record status and seconds, show the tail
  local name=$1 start rc left; shift
  start=$(date +%s); left=$(( DEADLINE - start ))
  : > "$TMP/$name.log"
  if (( left < 10 )); then
    echo "== $name: skipped, the budget is spent"
    printf '%s\t%s\t%s\n' "$name" -1 0 >> "$TMP/steps.tsv"
    return
  fi
  echo "== $name (at most ${left} s): $*"
  timeout --kill-after=10 "$left" "$@" > "$TMP/$name.log" 2>&1; rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" >> "$TMP/steps.tsv"
  tail -n 25 "$TMP/$name.log"
}

run attention "$PY" bench/attention.py "${ATTENTION[@]}"
for b in "${BATCHES[@]}"; do
  run "train_step_b$b" "$PY" bench/train_step.py --preset "$PRESET" --batch "$b" \
    --attention auto --precision bfloat16 "${STEP[@]}" --json "$TMP/train_step_b$b.json"
  [[ $b == "${BATCHES[0]}" ]] && run train_step_pallas "$PY" bench/train_step.py \
    --preset "$PRESET" "${KERNEL_CASE[@]}" "${STEP[@]}" --json "$TMP/train_step_pallas.json"
done
run train_step_chunk "$PY" bench/train_step.py --preset "$PRESET" "${CHUNK_CASE[@]}" \
  --attention auto --precision bfloat16 "${STEP[@]}" --json "$TMP/train_step_chunk.json"
run train_step_all "$PY" bench/train_step.py --preset "$PRESET" "${ALL_CASES[@]}" "${STEP[@]}" \
  --json "$TMP/train_step_all.json"
run owt_cache "$PY" bench/owt_cache.py "$TMP/cache" --tokens "$TOKENS"
run train "$PY" train.py --preset md4-s --dataset owt --cache-dir "$TMP/cache" \
  --workdir "$TMP/run" --eval-every 100000 --eval-batches 2 --sampler.steps 16 --num-samples 2 \
  --no-progress "${TRAIN[@]}"
run tests "$PY" -m pytest -q -p no:cacheprovider -o addopts="" "${TESTS[@]}"

"$PY" - "$TMP" "$OUT_JSON" <<'PY'
"""Collect every figure into one JSON and print the markdown table."""

import json
import sys
from pathlib import Path

tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = []
for line in (tmp / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps.append({"step": name, "rc": int(rc), "seconds": int(seconds)})
result = {"steps": steps, "train_step": []}
for path in sorted(tmp.glob("train_step_*.json")):
    data = json.loads(path.read_text())
    result["machine"] = data["machine"]
    result["train_step"] += data["cases"]
tests = (tmp / "tests.log").read_text().strip().splitlines()
result["tests"] = tests[-1] if tests else ""
attention = (tmp / "attention.log").read_text().splitlines()
result["attention_table"] = [row for row in attention if row.startswith("|")]
metrics = tmp / "run" / "metrics.jsonl"
events = [json.loads(e) for e in metrics.read_text().splitlines()] if metrics.exists() else []
result["train"] = [e for e in events if "tokens_per_s" in e]
out.write_text(json.dumps(result, indent=1))

STATUS = {0: "ok", -1: "skipped (budget spent)", 124: "stopped at the deadline"}
print(f"\n### GPU check: {result.get('machine', '?')}\n")
print("| step | status | seconds |\n|---|---|---|")
for s in result["steps"]:
    status = STATUS.get(s["rc"], f"FAILED rc={s['rc']}")
    print(f"| {s['step']} | {status} | {s['seconds']} |")
print(f"\ntests: {result['tests']}\n")
print("\n".join(result["attention_table"]))
columns = "batch | attention | compute | head chunk | ms/step | tokens/s | MFU | peak GiB"
print(f"\n| {columns} | planned GiB |\n|---|---|---|---|---|---|---|---|---|")
for c in result["train_step"]:
    case = f"| {c['batch']} | {c['attention']} | {c['precision']} | {c['head_chunk'] or 'whole'} "
    if "error" in c:
        print(f"{case}| {c['error']} | | | | |")
        continue
    mfu = "n/a" if c["mfu"] is None else f"{c['mfu']:.1%}"
    mem = "n/a" if c["peak_memory_gib"] is None else f"{c['peak_memory_gib']:.1f}"
    print(
        f"{case}| {c['ms_per_step']:.1f} "
        f"| {c['tokens_per_s']:,.0f} | {mfu} | {mem} | {c['planned_memory_gib']:.1f} |"
    )
if result["train"]:
    last = result["train"][-1]
    print(
        f"\ntrain.py --preset md4-s: step {last['step']}, {last['tokens_per_s']:,.0f} tokens/s "
        f"(last log interval), train {last['train_bpt']:.3f} bits/token"
    )
print(f"\nall figures: {out}")
sys.exit(1 if any(s["rc"] for s in result["steps"]) else 0)
PY
