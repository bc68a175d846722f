"""Train MD4 / GenMD4 (Shi et al., 2024): a preset plus command-line overrides, on any mesh.

    python train.py                                   # tiny preset on pystdlib: ~5 min, 2 cores
    python train.py --preset text8 --dataset text8
    python train.py --preset md4-s --dataset owt --batch-size 512 --mesh data=4,model=2
    python train.py --preset cifar10 --dataset cifar10
    python train.py --learnable true --workdir runs/genmd4  # GenMD4's learnable schedule

Every config field (md4_eqx/config.py) is a flag: `--section.field VALUE` (--model.width 256,
--optim.lr 1e-3, --model.num-layers 6) or just `--field` where the name is unique (--width 256);
`--steps` is train.steps (the sampler's is --sampler.steps). Enums take their values
(--schedule cosine), booleans true/false. The vocabulary size (and the number of classes of a
class-conditional preset's dataset) comes from the dataset unless given.

WORKDIR (default runs/<preset>-<dataset>) gets checkpoints/ (the last --keep-checkpoints, each
with params, EMA, optimizer state, step, key, data position and the full config), metrics.jsonl
(one JSON object per event), curves.png (its bits per token) and samples/ (both at each
evaluation) and, when tensorboardX is installed, tb/. Rerunning the same command resumes from
the newest checkpoint and continues exactly as an uninterrupted run; flags that change the model
must match the checkpoint.

Several processes (e.g. one per GPU host; every process runs the same command and reads its own
slice of each batch): --coordinator HOST:PORT --num-processes N --process-id I, or --distributed
to let JAX find them itself (SLURM, Open MPI, Cloud TPU, Kubernetes). WORKDIR must be shared.

Bad input prints one line on stderr and exits with status 2.
"""

import argparse
import contextlib
import dataclasses
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import equinox as eqx
import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from tqdm import tqdm

from md4_eqx import checkpoint, plan, targets
from md4_eqx.cli import (
    add_config_flags,
    add_process_flags,
    make_config,
    parse_mesh,
    run_command,
    script_parser,
    start_processes,
)
from md4_eqx.config import Config
from md4_eqx.data import BatchLoader, Dataset, load
from md4_eqx.distributed import batch_part, gather, global_batch, replicated_on_mesh
from md4_eqx.divergence import BadSteps
from md4_eqx.errors import UsageError
from md4_eqx.evaluate import NelboEstimate, nelbo_draws
from md4_eqx.metrics_log import MetricsLog
from md4_eqx.model import MD4
from md4_eqx.parallel import DATA
from md4_eqx.preemption import Preemption
from md4_eqx.sampling import generate
from md4_eqx.train_step import Metrics, init_state, make_optimizer, make_train_step
from md4_eqx.validate import validate
from md4_eqx.visualize import image_grid, to_images
from md4_eqx.workdir import check_space, claim


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(
        __doc__,
        usage="%(prog)s [--preset NAME] [--dataset SPEC] [--workdir DIR] "
        "[--mesh data=D,model=M] [--section.field VALUE ...]",
    )
    parser.add_argument("--workdir", help="default: runs/<preset>-<dataset>")
    parser.add_argument("--mesh", help="data=D,model=M (default: every device on data)")
    parser.add_argument(
        "--cache-dir", help="dataset cache (default: $MD4_CACHE or ~/.cache/md4_eqx)"
    )
    parser.add_argument(
        "--tokenizer", help="for file:/hf: datasets: 'bytes' or a Hugging Face tokenizer"
    )
    parser.add_argument(
        "--data-path", help="text8's zip, or the hub name / directory owt and cifar10 read"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--plan", action="store_true", help="print the memory plan for these devices and exit"
    )
    parser.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="device memory for the plan, e.g. 80GiB (default: what the device reports)",
    )
    parser.add_argument(
        "--target",
        metavar="NAME",
        help="plan for hardware this machine need not have, compiled "
        "by its own compiler: a TPU slice (v5e:2x4, v6e:2x2, v5p:2x2x1, v4:2x2x1) or GPUs "
        "(h100, h200, a100-40gb, a100-80gb; h100:8 for eight); with --plan",
    )
    add_process_flags(parser)
    add_config_flags(parser)
    return parser


def default_workdir(preset_name: str, dataset: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", re.split(r"[:/\\]", dataset.rstrip("/"))[-1]) or "data"
    return Path("runs") / f"{preset_name}-{name}"


def fit_to_data(cfg: Config, ds: Dataset, given: set[str]) -> Config:
    """The dataset's vocabulary size, unless given (and then checked). Classes: as given (and
    checked); else the dataset's when the preset is class-conditional, none when it is not (the
    cifar10 preset is unconditional, as the paper's model: `--num-classes 10` adds them)."""
    vocab = cfg.model.vocab_size if "model.vocab_size" in given else ds.vocab_size
    if vocab < ds.vocab_size:
        raise UsageError(
            f"--vocab-size {vocab} is smaller than {ds.name}'s vocabulary of {ds.vocab_size}: "
            f"its token ids would lie outside the model's vocabulary"
        )
    classes = (
        cfg.model.num_classes
        if "model.num_classes" in given or not cfg.model.num_classes
        else ds.num_classes
    )
    if classes and classes != ds.num_classes:
        raise UsageError(f"--num-classes {classes}: {ds.name} has {ds.num_classes} classes")
    return dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab, num_classes=classes)
    )


def load_dataset(cfg: Config, args: argparse.Namespace) -> Dataset:
    """Process 0 prepares the cache (once); the others open it after."""
    first = jax.process_index() == 0
    if not first:
        multihost_utils.sync_global_devices("dataset prepared")
    ds = load(
        cfg.train.dataset,
        seq_len=cfg.model.seq_len,
        cache_dir=args.cache_dir,
        tokenizer=args.tokenizer,
        data_path=args.data_path,
        progress=first and not args.no_progress,
    )
    if first and jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset prepared")
    return ds


def on_mesh(batch: dict, mesh: Mesh, labelled: bool) -> tuple[jax.Array, jax.Array | None]:
    """This process's rows of a batch -> global arrays split over `data` (works multi-process)."""
    tokens = global_batch(batch["tokens"], mesh)
    labels = global_batch(batch["labels"], mesh) if labelled else None
    return tokens, labels


def eval_batches(ds: Dataset, cfg: Config, mesh: Mesh) -> list[tuple[jax.Array, jax.Array | None]]:
    """The same held-out batches at every evaluation: the first `eval_batches` of "valid", in
    order."""
    split = ds.split("valid")
    parts = mesh.shape[DATA]
    size = min(cfg.train.batch_size, split.num_examples // parts * parts)
    if size == 0:
        raise UsageError(
            f"{ds.name}'s valid split has {split.num_examples} examples, fewer than data={parts}"
        )
    part, part_count = batch_part(mesh)  # this process's part of every batch
    loader = BatchLoader(
        split,
        batch_size=size,
        seed=0,
        shuffle=False,
        prefetch=0,
        process_index=part,
        process_count=part_count,
    )
    count = min(cfg.train.eval_batches, split.num_examples // size)
    return [on_mesh(next(loader), mesh, cfg.model.num_classes > 0) for _ in range(count)]


def draw_samples(model: MD4, cfg: Config, mesh: Mesh, key: jax.Array, count: int) -> np.ndarray:
    """`count` unconditional samples [count, L] (labels 0, 1, ... for class-conditional models)."""
    if count == 0:
        return np.zeros((0, cfg.model.seq_len), np.int32)
    rows = -(-count // mesh.shape[DATA]) * mesh.shape[DATA]  # whole rows on every data shard
    template = np.full((rows, cfg.model.seq_len), model.mask_id, np.int32)
    classes = cfg.model.num_classes
    labels = (
        replicated_on_mesh(np.arange(rows, dtype=np.int32) % classes, mesh) if classes else None
    )
    out = generate(model, key, replicated_on_mesh(template, mesh), mesh, cfg.sampler, labels)
    return gather(out.tokens)[:count]


def write_samples(
    tokens: np.ndarray, ds: Dataset, mask_id: int, stem: Path
) -> tuple[Path, list[str]]:
    """Samples as `stem`.png (images) or `stem`.txt; returns the path and the texts."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    if ds.image_shape is not None:
        path = stem.with_suffix(".png")
        image_grid(to_images(tokens, ds.image_shape, mask_id)).save(path)
        return path, []
    texts = [ds.decode(t) for t in tokens]
    path = stem.with_suffix(".txt")
    path.write_text(("\n" + "=" * 80 + "\n").join(texts) + "\n", encoding="utf-8", errors="replace")
    return path, texts


def planned_flags(cfg: Config) -> str:
    """The line that says what `plan.resolve` chose for an `auto` batch size or microbatches."""
    return f"planned: --batch-size {cfg.train.batch_size} --microbatches {cfg.train.microbatches}"


def train(args: argparse.Namespace) -> int:
    """Config, data and mesh; then the run, holding the workdir (`md4_eqx.workdir.claim`)."""
    began = time.perf_counter()
    start_processes(args)
    cfg, given = make_config(args)
    memory = plan.parse_size(args.memory_limit) if args.memory_limit else None
    target = targets.parse(args.target) if args.target else None
    if target is not None and not args.plan:
        raise UsageError(
            f"--target {args.target} compiles for hardware this machine need not have: "
            "use it with --plan"
        )
    mesh = parse_mesh(args.mesh, None if target is None else target.devices())
    validate(cfg, mesh)  # before reading data or compiling anything
    if args.plan:  # the memory plan, without loading data (the vocabulary is the preset's)
        # On a TPU the compiler's refusal marks the largest batch, unless a memory limit is given.
        by_compiler = None if memory is None else False
        memory = memory or (target.chip.memory if target else plan.device_memory())
        print(plan.Planner(cfg, mesh, memory, by_compiler=by_compiler, echo=print).report())
        # an `auto` batch size or microbatch count
        planned = plan.resolve(cfg, mesh, memory, by_compiler=by_compiler)
        if planned != cfg:
            print(planned_flags(planned))
        return 0
    workdir = (
        Path(args.workdir) if args.workdir else default_workdir(args.preset, cfg.train.dataset)
    )
    ds = load_dataset(cfg, args)
    cfg = fit_to_data(cfg, ds, given)
    with claim(workdir), checkpoint.Checkpoints(workdir, cfg.train.keep_checkpoints) as checkpoints:
        return run(args, cfg, ds, mesh, memory, workdir, checkpoints, began)


def say(text: str) -> None:
    """Prints on process 0, between the progress bar's updates."""
    if jax.process_index() == 0:
        tqdm.write(text, file=sys.stdout)


class StepsInFlight:
    """The train steps' metrics, read a step late, and the window of steps the log averages.

    Reading a step's metrics waits for the device to finish it. `add` reads the previous step's
    while the step just dispatched runs, so the host then loads and places the next batch with a
    step still queued; `settle` reads the newest, before the state is logged, saved or evaluated.
    Reading a step checks its `skipped` flag (`md4_eqx.divergence`): a skipped step is logged and
    said, and `BadSteps.check` raises `Diverged` after --max-bad-steps of them in a row.

    `window` hands the log the steps since its last call and their tokens per second, the time
    spent `paused` (checkpoints, evaluations) left out."""

    def __init__(self, bad_steps: BadSteps, log: MetricsLog):
        self.bad_steps, self.log = bad_steps, log
        self.unread: tuple[int, Metrics] | None = None  # the newest step, its flag not read yet
        self.window_steps: list[Metrics] = []
        self.window_began, self.window_paused = time.perf_counter(), 0.0

    def add(self, step: int, metrics: Metrics) -> None:
        self.settle()
        self.unread = (step, metrics)
        self.window_steps.append(metrics)

    def settle(self) -> None:
        if self.unread is None:
            return
        step, metrics = self.unread
        self.unread = None
        if event := self.bad_steps.observe(step, metrics):  # its update was skipped
            self.log.write(**event)
            say(
                f"step {step}: non-finite loss or gradient norm, update skipped "
                f"({event['skipped']} in a row)"
            )
            self.bad_steps.check()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.window_paused += time.perf_counter() - began

    def window(self, tokens_per_step: int) -> tuple[list[Metrics], float]:
        """(metrics of the steps since the last call, their tokens per second); a new window."""
        now = time.perf_counter()
        steps, seconds = self.window_steps, now - self.window_began - self.window_paused
        self.window_steps, self.window_began, self.window_paused = [], now, 0.0
        return steps, len(steps) * tokens_per_step / seconds


def run(
    args: argparse.Namespace,
    cfg: Config,
    ds: Dataset,
    mesh: Mesh,
    memory: int | None,
    workdir: Path,
    checkpoints: checkpoint.Checkpoints,
    began: float,
) -> int:
    """The training run: state (fresh, or the newest checkpoint's), data, and the loop."""
    # An `auto` batch size or number of microbatches: planned now, the checkpoint's on resume.
    resume = checkpoints.latest_step()
    planned = plan.resolve(
        cfg, mesh, memory, None if resume is None else checkpoints.read_meta()[1]
    )
    if planned != cfg:
        say(planned_flags(planned))
    cfg = planned
    validate(cfg, mesh)  # again, for what the data and the plan set: the vocabulary, the batch
    tc = cfg.train
    optimizer = make_optimizer(cfg.optim, tc.steps)
    if resume is None:
        state, data_state = init_state(cfg, optimizer, mesh), None
    else:
        state, data_state = checkpoints.restore(mesh, optimizer, cfg)
        if resume >= tc.steps:
            say(f"{workdir}: checkpoint at step {resume} already reaches --steps {tc.steps}")
            return 0
    check_space(workdir, state)

    # Data: this process's part of every training batch; the same held-out batches every time.
    part, part_count = batch_part(mesh)
    loader = BatchLoader(
        ds.split("train"),
        batch_size=tc.batch_size,
        seed=tc.seed,
        process_index=part,
        process_count=part_count,
        state=data_state,
    )
    labelled = cfg.model.num_classes > 0
    evals = eval_batches(ds, cfg, mesh)
    log = MetricsLog(workdir, resume, jax.process_index() == 0)  # from here on: into workdir
    params = sum(x.size for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array)))
    say(
        f"{'resuming' if resume else 'training'} {params / 1e6:.2f}M parameters on {ds.name} "
        f"(vocab {cfg.model.vocab_size}, seq {cfg.model.seq_len}), mesh {dict(mesh.shape)}, "
        f"workdir {workdir}" + (f", from step {resume}" if resume else "")
    )
    eval_key, sample_key = jax.random.key(tc.seed + 2), jax.random.key(tc.seed + 3)
    train_step = make_train_step(
        state, optimizer, mesh, microbatches=tc.microbatches, clip=cfg.optim.clip, ema=cfg.optim.ema
    )
    bad_steps = BadSteps(tc.max_bad_steps)  # Diverged: exit status 1
    in_flight = StepsInFlight(bad_steps, log)
    preemption = Preemption()  # SIGTERM / SIGINT: stop after the step, checkpointed, exit 0
    bar = tqdm(
        total=tc.steps,
        initial=resume or 0,
        unit="step",
        disable=args.no_progress or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    step, stop, texts = resume or 0, False, []
    while True:
        # Evaluate and sample, with the EMA model: at step 0, every --eval-every steps and at the
        # end (a resumed run's first step is the checkpoint's, evaluated by the run that saved it).
        if step != resume and (step % tc.eval_every == 0 or step == tc.steps):
            in_flight.settle()
            with in_flight.paused():
                nats = nelbo_draws(state.ema, eval_key, evals, mesh, tc.eval_draws)
                est = NelboEstimate.from_nats(nats, cfg.model.seq_len)
                bpt, se, ppl = est.bits_per_token, est.stderr, est.perplexity
                log.write(step=step, eval_bpt=bpt, eval_bpt_stderr=se, eval_ppl=ppl)
                key = jax.random.fold_in(sample_key, step)
                tokens = draw_samples(state.ema, cfg, mesh, key, tc.num_samples)
                if jax.process_index() == 0:
                    stem = workdir / "samples" / f"step_{step:07d}"
                    path, texts = write_samples(tokens, ds, state.ema.mask_id, stem)
                    say(
                        f"step {step}: eval {bpt:.4f} ± {se:.4f} bits/token "
                        f"(perplexity <= {ppl:.2f}), samples in {path}"
                    )
                log.plot()
        if step == tc.steps or stop:
            break

        # Step: dispatched; the device runs it while the host reads the previous step's metrics
        # and loads the next batch.
        tokens, labels = on_mesh(next(loader), mesh, labelled)
        state, metrics = train_step(state, tokens, labels)
        step += 1
        bar.update()
        in_flight.add(step, metrics)
        stop = preemption.requested()  # every process stops at the same step

        # Log: the mean bits per token of the window's steps that updated (a skipped step's loss
        # is not finite).
        if step % tc.log_every == 0 or step == tc.steps:
            in_flight.settle()
            window, tokens_per_s = in_flight.window(tc.batch_size * cfg.model.seq_len)
            if good := [m for m in window if not bool(m.skipped)]:
                bpt = float(np.mean([float(m.bpt) for m in good]))
                lr, grad_norm = float(good[-1].lr), float(good[-1].grad_norm)
                log.write(
                    step=step, train_bpt=bpt, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s
                )
                bar.set_postfix(bpt=f"{bpt:.3f}", tok_s=f"{tokens_per_s:,.0f}")

        # Checkpoint: on schedule, but not during a streak of skipped steps (the kept ones are
        # then from before it), and on a stop. Before the evaluation: a failed one costs no steps.
        if step % tc.checkpoint_every == 0 or step == tc.steps or stop:
            in_flight.settle()
            if stop or not bad_steps.streak:
                with in_flight.paused():
                    checkpoints.save(state, loader.state(), cfg)
    bar.close()
    loader.close()
    if stop:
        say(f"step {step}: stopped by a signal; checkpoint saved, rerun the same command to resume")
    say(f"step {step} reached in {(time.perf_counter() - began) / 60:.1f} min")
    if texts:
        say(f"\nsamples of the EMA model at step {step}:")
        for text in texts:
            say("-" * 80 + "\n" + text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
