"""The memory plan: sizes parse, and the planner's choice is the largest that XLA says fits.

Each compilation of even this small step takes seconds on 2 CPU cores, so the tests share one
config and mesh (step_memory caches its compilations).
"""

import dataclasses
import os

import jax
import pytest

import train
from md4_eqx import targets
from md4_eqx.config import AUTO, Config, ExecutionConfig, ModelConfig, Precision, Remat
from md4_eqx.parallel import make_mesh
from md4_eqx.plan import (
    HEAD_CHUNKS,
    MARGIN,
    PlanError,
    Planner,
    StepMemory,
    _over,
    compiler_log,
    parse_size,
    step_memory,
)
from md4_eqx.step_time import Basis, StepTime

CONFIG = Config(
    model=ModelConfig(vocab_size=32, seq_len=16, width=32, num_layers=1, num_heads=2, cond_dim=8),
    execution=ExecutionConfig(precision=Precision.FLOAT32),
)
BATCH = 16  # global: 8 per device on data=2


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 1, jax.devices()[:2])


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("80GiB", 80 * 2**30),
        ("40GB", 40 * 10**9),
        ("16 gib", 16 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5KiB", 1536),
        ("1e9", 10**9),
        ("100", 100),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "80 GiBs", "-1GB", "0", "eighty"])
def test_parse_size_rejects(text):
    with pytest.raises(PlanError, match="expected a positive size"):
        parse_size(text)


@pytest.mark.parametrize("forced", [2, 4])
def test_microbatches_auto_is_the_fewest_that_fit(mesh, forced):
    """A limit between the peaks of `forced` and forced / 2 microbatches: the planner picks
    `forced`, whose compiled step is within the budget; one size larger (forced / 2) is not."""
    fewer = step_memory(CONFIG, mesh, batch=BATCH, microbatches=forced // 2).peak
    chosen = step_memory(CONFIG, mesh, batch=BATCH, microbatches=forced).peak
    assert chosen < fewer  # smaller chunks need less memory: the premise of accumulation
    planner = Planner(CONFIG, mesh, int((chosen + fewer) / 2 / (1.0 - MARGIN)))
    assert planner.microbatches(BATCH) == forced
    assert chosen <= planner.budget < fewer
    assert planner.budget < planner.memory  # the margin is kept free


def test_batch_size_auto_is_the_largest_that_fits(mesh):
    """With room for 4 examples per device (a limit between the peaks at 4 and 5 per device):
    the global batch is 4 x data, without accumulation."""
    compiled = step_memory.cache_info().misses
    four = step_memory(CONFIG, mesh, batch=8, microbatches=1).peak
    five = step_memory(CONFIG, mesh, batch=10, microbatches=1).peak
    planner = Planner(CONFIG, mesh, int((four + five) / 2 / (1.0 - MARGIN)))
    assert planner.batch_size() == 8
    (fixed, per_example), largest = planner.fit(planner.run)
    assert largest == 4 and per_example > 0
    # The reported line runs through the answer and half of it, where the slope matters.
    for m in (2, 4):
        assert abs(fixed + per_example * m - planner.step(planner.run, m).peak) <= m, m
    # At this size the peak does not grow from 1 to 2 examples per device (XLA's buffer reuse
    # varies more than an example's activations); the search still stays near the answer:
    # 4 and 5 per device above, 1 and 2 for the line, then 3 (the gallop from a guess of 2).
    assert step_memory.cache_info().misses - compiled <= 5


@pytest.mark.parametrize(
    ("refusal", "over"),
    [
        (
            "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            "temporaries (12.50G) exceeds available HBM (15.75G).",
            12.5 / 15.75,  # temporaries alone: the compiler's first check
        ),
        (
            "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 16.26G of 15.75G hbm. "
            "Exceeded hbm capacity by 520.50M.",
            16.26 / 15.75,
        ),
        ("RESOURCE_EXHAUSTED: Ran out of memory in memory space vmem.", None),
    ],
    ids=["temporaries", "used", "no-sizes"],
)
def test_refusal_says_how_far_over_the_memory(refusal, over):
    measured = _over(refusal)
    assert measured == (None if over is None else pytest.approx(over))


@pytest.mark.parametrize(
    ("fixed", "fits"),
    [(0.33, 31), (0.97, 1), (1.1, 0), (0.0, 1024)],
    ids=["md4-s", "one", "none", "all"],
)
def test_search_finds_the_largest_the_compiler_accepts_in_few_compiles(mesh, fixed, fits):
    """Memory linear in the microbatch: a fixed part and 2.15% of the chip per example, as MD4-S's
    refusals read on a v5e. The compiler refuses above the memory (`over` from its text) and
    accepts below (its peak): the search returns the largest that fits after a handful of
    compiles, from 1,024 examples per device down, not the ~20 of a bisection."""
    tried = []

    def step_at(m):
        tried.append(m)
        load = fixed + 0.0215 * m * (fits != 1024)
        if load > 1:
            return StepMemory(0, 0, 0, 0, None, 0.0, refused="out of memory", over=load)
        return StepMemory(int(load * 2**30), 0, 0, 0, None, 0.0)

    assert Planner(CONFIG, mesh, 2**30).search(step_at, range(1, 1025)) == fits
    assert Planner(CONFIG, mesh, 2**30).search(step_at, []) == 0  # nothing left to try
    assert tried[0] == 1024 and len(tried) == len(set(tried)) and len(tried) <= 5, tried
    assert sum(m <= fits for m in tried) <= 1  # one accepted compile: the answer's


def test_search_past_the_first_check_takes_one_accepted_compile(mesh):
    """MD4-S on a v5e as the 2x4 plan met it: the first refusals (temporaries alone) put the
    HBM at 35.3 examples; 35 passes that check and is refused after scheduling ("Used 15.76G of
    15.75G"), and 34 fits (the compiler rematerialises to fit it). The search stays among the
    refusals until the answer: one accepted compile."""
    tried = []

    def step_at(m):
        tried.append(m)
        if m >= 35:
            over = 1.0006 if m == 35 else 0.1 + 0.0255 * m
            return StepMemory(0, 0, 0, 0, None, 0.0, refused="out of memory", over=over)
        return StepMemory(int(0.98 * 2**30), 0, 0, 0, None, 0.0)

    assert Planner(CONFIG, mesh, 2**30).search(step_at, range(1, 1025)) == 34
    assert sum(m <= 34 for m in tried) == 1 and len(tried) <= 5, tried


def test_report_says_where_the_search_stops(mesh, monkeypatch):
    """Where the compiler accepts the search's first size (2^20 tokens per device), the report
    says so, and compiles nothing above it to name a refusal."""
    tried = []

    def step(run, microbatch, microbatches=1):
        tried.append(microbatch)
        return StepMemory(2**20, 0, 0, 0, 1.0, 0.0)

    planner = Planner(CONFIG, mesh, 2**30, by_compiler=True)
    planner.chip = None  # no step-time estimate: the largest microbatch's line alone
    monkeypatch.setattr(planner, "step", step)
    report = planner.report()
    assert f"largest microbatch {2**20 // 16} per device" in report
    assert "the most the search tries (1,048,576 tokens)" in report
    assert max(tried) == 2**20 // 16


def test_nothing_fits_names_the_numbers(mesh):
    planner = Planner(CONFIG, mesh, 2**10)
    with pytest.raises(
        PlanError,
        match=r"one example per device needs [0-9.]+ MiB \([0-9.]+ MiB with --remat full\), "
        r"the budget is 0.0 MiB",
    ):
        planner.microbatches(BATCH)


def test_bad_memory_limit_is_one_line_and_status_2(capsys):
    assert train.main(["--plan", "--memory-limit", "80 gigs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--memory-limit '80 gigs'" in err


def test_auto_batch_with_microbatches_is_refused_before_any_work(capsys):
    assert train.main(["--plan", "--batch-size", "auto", "--microbatches", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--microbatches: batch_size auto is the largest batch" in err


def test_compiler_log_is_kept_off_stderr(capfd):
    """What a C++ logger writes to file descriptor 2 during a compile comes back as lines."""
    with compiler_log() as log:
        os.write(2, b"W hlo_rematerialization.cc:3021] Can't reduce memory use below 60GiB\n")
    assert log == ["W hlo_rematerialization.cc:3021] Can't reduce memory use below 60GiB"]
    assert capfd.readouterr().err == ""


def test_auto_flags_parse_to_auto():
    args = train.build_parser().parse_args(["--batch-size", "auto", "--microbatches", "auto"])
    cfg, _ = train.make_config(args)
    assert (cfg.train.batch_size, cfg.train.microbatches) == (AUTO, AUTO)
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--steps", "auto"])


@pytest.mark.parametrize(
    ("seconds_per_example", "fastest"),
    [
        ({Remat.NONE: 1.0, Remat.MINIMAL: 1.1, Remat.FULL: 1.05}, (Remat.FULL, 0, 1)),
        ({Remat.NONE: 1.0, Remat.MINIMAL: 1.6, Remat.FULL: 2.5}, (Remat.NONE, 0, 4)),
        ({Remat.NONE: 1.0, Remat.MINIMAL: 1.02, Remat.FULL: 2.5}, (Remat.MINIMAL, 0, 2)),
    ],
    ids=["full-in-one", "none-in-four", "minimal-in-two"],
)
@pytest.mark.parametrize("by_compiler", [False, True], ids=["by-memory", "by-compiler"])
def test_fastest_is_the_fastest_that_fits(
    mesh, monkeypatch, seconds_per_example, fastest, by_compiler
):
    """With steps whose peak and time follow a model (more recomputation: less memory, more time;
    more microbatches: a fixed cost each; the default head chunk, the larger, saves time and costs
    memory), the plan is the fastest of every (remat, head chunk, microbatches) that fits, found
    by brute force, and steps that cannot beat one already found are never compiled; alike where
    the compiler's refusal says what fits (a TPU)."""
    per_example = {Remat.NONE: 100, Remat.MINIMAL: 50, Remat.FULL: 25}  # bytes
    budget = 8 * 25 + 10  # FULL fits 8 per device
    compiled = []

    def step(run, microbatch, microbatches=1):
        compiled.append((run.remat, run.head_chunk, microbatches))
        peak = per_example[run.remat] * microbatch + (0 if run.head_chunk else 10)
        seconds = microbatches * (0.5 + seconds_per_example[run.remat] * microbatch)
        seconds -= 0.0 if run.head_chunk else 0.1
        estimate = StepTime(seconds, 0.0, Basis.ROOFLINE)
        if by_compiler and peak > budget:
            return StepMemory(0, 0, 0, 0, None, 0.0, refused="out", over=peak / budget)
        return StepMemory(peak, 0, 0, 0, None, 0.0, estimate=estimate)

    planner = Planner(CONFIG, mesh, budget, by_compiler=by_compiler)
    planner.budget, planner.chip = budget, targets.CHIPS["v5e"]
    monkeypatch.setattr(planner, "step", step)
    plans = planner.fastest(BATCH)
    best = plans[0]
    assert (best.run.remat, best.run.head_chunk, best.microbatches) == fastest
    per_device = BATCH // 2
    every = [
        (step(dataclasses.replace(CONFIG.execution, remat=r, head_chunk=c), per_device // k, k), k)
        for r in Remat
        for c in HEAD_CHUNKS
        for k in (1, 2, 4, 8)
    ]
    fitting = [s.estimate.seconds for s, _ in every if not s.refused and s.peak <= planner.budget]
    assert best.step.estimate.seconds == min(fitting)
    assert [p.step.estimate.seconds for p in plans] == sorted(
        p.step.estimate.seconds for p in plans
    )
    searched = compiled[: -len(every)]
    assert not any(k == 8 and r is not Remat.NONE for r, _, k in searched)  # never beats NONE's 4
