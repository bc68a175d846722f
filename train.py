"""Train MD4 / GenMD4 (Shi et al., 2024): a preset plus command-line overrides, on any mesh.

    python train.py                                    # tiny preset on pystdlib: ~5 min, 2 CPU cores
    python train.py --preset text8 --dataset text8
    python train.py --preset md4-s --dataset owt --batch-size 512 --mesh data=4,model=2
    python train.py --preset cifar10 --dataset cifar10
    python train.py --learnable true --workdir runs/genmd4   # GenMD4's learnable schedule

Every config field (md4_eqx/config.py) is a flag: `--section.field VALUE` (--model.width 256,
--optim.lr 1e-3, --model.num-layers 6) or just `--field` where the name is unique (--width 256);
`--steps` is train.steps (the sampler's is --sampler.steps). Enums take their values
(--schedule cosine), booleans true/false. The vocabulary size (and the number of classes of a
labelled dataset) comes from the dataset unless given.

WORKDIR (default runs/<preset>-<dataset>) gets checkpoints/ (the last --keep-checkpoints, each
with params, EMA, optimizer state, step, key, data position and the full config), metrics.jsonl
(one JSON object per event), samples/ (at each evaluation) and, when tensorboardX is installed,
tb/. Rerunning the same command resumes from the newest checkpoint and continues exactly as an
uninterrupted run; flags that change the model must match the checkpoint.

Several processes (e.g. one per GPU host; every process runs the same command and reads its own
slice of each batch): --coordinator HOST:PORT --num-processes N --process-id I, or --distributed
to let JAX find them itself (SLURM, Open MPI, Cloud TPU, Kubernetes). WORKDIR must be shared.

Bad input prints one line on stderr and exits with status 2.
"""

import argparse
import dataclasses
import enum
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from md4_eqx import checkpoint, plan
from md4_eqx.checkpoint import CheckpointError
from md4_eqx.config import AUTO, AUTO_FIELDS, PRESETS, Config, preset
from md4_eqx.data import BatchLoader, DataError, Dataset, load
from md4_eqx.distributed import batch_part, gather, global_batch, initialize
from md4_eqx.evaluate import nelbo
from md4_eqx.model import MD4
from md4_eqx.parallel import DATA, check_model_split, make_mesh
from md4_eqx.sampling import generate
from md4_eqx.train_step import TrainState, init_state, make_optimizer, make_train_step
from md4_eqx.visualize import image_grid, to_images


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---------------------------------------------------------------------------------------------
# Command line: fixed flags plus one flag per config field.


def parse_field(kind: type, text: str):
    """A command-line string as a config field of type `kind` (an Enum by value, bool as true/false)."""
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        values = [m.value for m in kind]
        if text not in values:
            raise argparse.ArgumentTypeError(f"expected one of {', '.join(values)}; got {text!r}")
        return kind(text)
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")
        return text.lower() == "true"
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}; got {text!r}") from None


def field_flag(kind: type, auto: bool = False) -> dict:
    """add_argument's `type` and `metavar` for a config field of type `kind` (and `auto`: AUTO)."""
    if auto:  # memory plan: the field takes `auto` (AUTO, resolved by md4_eqx.plan) or an int
        return {"type": lambda text: AUTO if text == "auto" else parse_field(kind, text), "metavar": "{INT,auto}"}
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        metavar = "{" + ",".join(m.value for m in kind) + "}"
    else:
        metavar = "{true,false}" if kind is bool else kind.__name__.upper()
    return {"type": lambda text: parse_field(kind, text), "metavar": metavar}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--section.field for every field of every section, plus --field where no earlier section
    (train first) took the name. Defaults are left out, so `args` holds only what was given."""
    group = parser.add_argument_group("config fields (default: the preset's)")
    taken = set()
    for section in sorted(dataclasses.fields(Config), key=lambda s: s.name != "train"):
        for f in dataclasses.fields(section.type):
            flag = f.name.replace("_", "-")
            names = [f"--{section.name}.{flag}"] + ([f"--{flag}"] if flag not in taken else [])
            taken.add(flag)
            group.add_argument(*names, dest=f"{section.name}.{f.name}", default=argparse.SUPPRESS,
                               **field_flag(f.type, section.name == "train" and f.name in AUTO_FIELDS))


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        usage="%(prog)s [--preset NAME] [--dataset SPEC] [--workdir DIR] [--mesh data=D,model=M] "
              "[--section.field VALUE ...]",
        description=__doc__.splitlines()[0], allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]),
    )
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--workdir", help="default: runs/<preset>-<dataset>")
    parser.add_argument("--mesh", help="data=D,model=M (default: every device on data)")
    parser.add_argument("--cache-dir", help="dataset cache (default: $MD4_CACHE or ~/.cache/md4_eqx)")
    parser.add_argument("--tokenizer", help="for file:/hf: datasets: 'bytes' or a Hugging Face tokenizer")
    parser.add_argument("--data-path", help="text8's zip, or the hub name / directory owt and cifar10 read")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # memory plan (md4_eqx/plan.py)
    parser.add_argument("--plan", action="store_true", help="print the memory plan for these devices and exit")
    parser.add_argument("--memory-limit", metavar="SIZE", help="device memory for the plan, e.g. 80GiB "
                        "(default: what the device reports)")
    multi = parser.add_argument_group("several processes")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    multi.add_argument("--distributed", action="store_true", help="let JAX detect the processes")
    add_config_flags(parser)
    return parser


def make_config(args: argparse.Namespace) -> tuple[Config, set[str]]:
    """The preset with the given fields replaced, and the names ("model.width") given."""
    given = {name: value for name, value in vars(args).items() if "." in name}
    base = preset(args.preset)
    sections = {}
    for section in dataclasses.fields(Config):
        prefix = section.name + "."
        changes = {name.removeprefix(prefix): v for name, v in given.items() if name.startswith(prefix)}
        try:
            sections[section.name] = dataclasses.replace(getattr(base, section.name), **changes)
        except ValueError as e:
            raise UsageError(str(e).replace("self.", "")) from None
    return Config(**sections), set(given)


def fit_to_data(cfg: Config, ds: Dataset, given: set[str]) -> Config:
    """The dataset's vocabulary size and number of classes, unless given (and then checked)."""
    vocab = cfg.model.vocab_size if "model.vocab_size" in given else ds.vocab_size
    if vocab < ds.vocab_size:
        raise UsageError(f"--vocab-size {vocab} is smaller than {ds.name}'s vocabulary of {ds.vocab_size}: "
                         f"its token ids would lie outside the model's vocabulary")
    classes = cfg.model.num_classes if "model.num_classes" in given else ds.num_classes
    if classes and classes != ds.num_classes:
        raise UsageError(f"--num-classes {classes}: {ds.name} has {ds.num_classes} classes")
    model = dataclasses.replace(cfg.model, vocab_size=vocab, num_classes=classes)
    return dataclasses.replace(cfg, model=model)


def parse_mesh(text: str | None, cfg: Config) -> Mesh:
    """`data=D,model=M` over all devices; each part optional (data defaults to the rest)."""
    sizes = {}
    for part in (text or "").split(",") if text else []:
        name, _, value = part.partition("=")
        if name not in ("data", "model") or not value.isdigit() or int(value) < 1 or name in sizes:
            raise UsageError(f"--mesh {text!r}: expected data=D,model=M with positive integers")
        sizes[name] = int(value)
    devices = jax.device_count()
    model = sizes.get("model", 1)
    data = sizes.get("data", devices // model if devices % model == 0 else 0)
    if data * model != devices:
        raise UsageError(f"--mesh {text}: data x model must equal the number of devices, {devices}")
    try:
        check_model_split(cfg.model, model)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    if cfg.train.microbatches and cfg.train.batch_size % (data * cfg.train.microbatches):
        raise UsageError(f"--batch-size {cfg.train.batch_size} must be a multiple of data={data} x "
                         f"microbatches={cfg.train.microbatches}")
    return make_mesh(data, model)


def default_workdir(preset_name: str, dataset: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", re.split(r"[:/\\]", dataset.rstrip("/"))[-1]) or "data"
    return Path("runs") / f"{preset_name}-{name}"


def start_processes(args: argparse.Namespace) -> None:
    """jax.distributed.initialize for a multi-process run (before any other JAX call)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id {args.process_id} must lie in [0, {args.num_processes})")
        initialize(args.coordinator, args.num_processes, args.process_id)
    elif args.distributed:
        initialize()


# ---------------------------------------------------------------------------------------------
# Data on the mesh, evaluation and samples.


def load_dataset(cfg: Config, args: argparse.Namespace) -> Dataset:
    """Process 0 prepares the cache (once); the others open it after."""
    options = dict(seq_len=cfg.model.seq_len, cache_dir=args.cache_dir, tokenizer=args.tokenizer,
                   data_path=args.data_path)
    if jax.process_index() == 0:
        ds = load(cfg.train.dataset, progress=not args.no_progress, **options)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dataset prepared")
    if jax.process_index() > 0:
        ds = load(cfg.train.dataset, progress=False, **options)
    return ds


def on_mesh(batch: dict, mesh: Mesh, labelled: bool) -> tuple[jax.Array, jax.Array | None]:
    """This process's rows of a batch -> global arrays split over `data` (works multi-process)."""
    tokens = global_batch(batch["tokens"], mesh)
    labels = global_batch(batch["labels"], mesh) if labelled else None
    return tokens, labels


def replicated_on_mesh(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array every process holds in full -> a global array split over `data`."""
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, P(DATA)), lambda index: x[index])


def eval_batches(ds: Dataset, cfg: Config, mesh: Mesh) -> list[tuple[jax.Array, jax.Array | None]]:
    """The same held-out batches at every evaluation: the first `eval_batches` of "valid", in order."""
    split = ds.split("valid")
    parts = mesh.shape[DATA]
    size = min(cfg.train.batch_size, split.num_examples // parts * parts)
    if size == 0:
        raise UsageError(
            f"{ds.name}'s valid split has {split.num_examples} examples, fewer than data={parts}"
        )
    part, part_count = batch_part(mesh)  # this process's part of every batch
    loader = BatchLoader(split, batch_size=size, seed=0, shuffle=False, prefetch=0,
                         process_index=part, process_count=part_count)
    count = min(cfg.train.eval_batches, split.num_examples // size)
    return [on_mesh(next(loader), mesh, cfg.model.num_classes > 0) for _ in range(count)]


def evaluate(model: MD4, batches, key: jax.Array, mesh: Mesh) -> tuple[float, float]:
    """(bits per token, perplexity bound exp(nats per token)) of the NELBO on `batches`."""
    total, tokens = 0.0, 0
    for i, (x, labels) in enumerate(batches):
        total += float(jnp.sum(nelbo(model, jax.random.fold_in(key, i), x, mesh, labels)))
        tokens += x.size
    return total / tokens / math.log(2.0), math.exp(total / tokens)


def draw_samples(model: MD4, cfg: Config, mesh: Mesh, key: jax.Array, count: int) -> np.ndarray:
    """`count` unconditional samples [count, L] (labels 0, 1, ... for class-conditional models)."""
    if count == 0:
        return np.zeros((0, cfg.model.seq_len), np.int32)
    rows = -(-count // mesh.shape[DATA]) * mesh.shape[DATA]  # whole rows on every data shard
    template = np.full((rows, cfg.model.seq_len), model.mask_id, np.int32)
    labels = None
    if cfg.model.num_classes:
        labels = replicated_on_mesh(np.arange(rows, dtype=np.int32) % cfg.model.num_classes, mesh)
    out = generate(model, key, replicated_on_mesh(template, mesh), mesh, cfg.sampler, labels)
    return gather(out.tokens)[:count]


def write_samples(tokens: np.ndarray, ds: Dataset, mask_id: int, stem: Path) -> tuple[Path, list[str]]:
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


# ---------------------------------------------------------------------------------------------
# Logging.


class Log:
    """Events to WORKDIR/metrics.jsonl and, when tensorboardX is installed, WORKDIR/tb.

    Only process 0 writes. A resumed run first drops the events after its checkpoint's step
    (the interrupted run logged them, and this run logs them again)."""

    def __init__(self, workdir: Path, resume_step: int | None, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        workdir.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError, TypeError):  # e.g. half a line from a killed run
                    continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return
        self.tb = SummaryWriter(str(workdir / "tb"))

    def write(self, **event) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        if self.tb is not None:
            for name, value in event.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(name, value, event["step"])
            self.tb.flush()


# ---------------------------------------------------------------------------------------------
# The run.


def train(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    start_processes(args)
    cfg, given = make_config(args)
    workdir = Path(args.workdir) if args.workdir else default_workdir(args.preset, cfg.train.dataset)
    main_process = jax.process_index() == 0
    # memory plan: --plan prints it without loading data (the vocabulary is the preset's)
    memory = plan.parse_size(args.memory_limit) if args.memory_limit else None
    if args.plan:
        print(plan.Planner(cfg, parse_mesh(args.mesh, cfg), plan.device_memory(memory)).report())
        return 0

    def say(*words) -> None:  # process 0 prints, between progress bar updates
        if main_process:
            tqdm.write(" ".join(map(str, words)), file=sys.stdout)

    ds = load_dataset(cfg, args)
    cfg = fit_to_data(cfg, ds, given)
    mesh = parse_mesh(args.mesh, cfg)
    optimizer = make_optimizer(cfg.optim, cfg.train.steps)
    resume = checkpoint.latest_step(workdir)
    # memory plan: an `auto` batch size or microbatch count, the checkpoint's when resuming
    planned = plan.resolve(cfg, mesh, memory, None if resume is None else checkpoint.read_meta(workdir)[1])
    if planned != cfg:
        say(f"planned: --batch-size {planned.train.batch_size} --microbatches {planned.train.microbatches}")
    cfg = planned
    if resume is None:
        state, data_state = init_state(cfg, optimizer, mesh), None
    else:
        _, state, data_state = checkpoint.restore(workdir, mesh, optimizer, cfg)
        if resume >= cfg.train.steps:
            say(f"{workdir}: checkpoint at step {resume} already reaches --steps {cfg.train.steps}")
            return 0
    part, part_count = batch_part(mesh)  # this process's part of every batch
    loader = BatchLoader(
        ds.split("train"), batch_size=cfg.train.batch_size, seed=cfg.train.seed,
        process_index=part, process_count=part_count, state=data_state,
    )
    evals = eval_batches(ds, cfg, mesh)
    log = Log(workdir, resume, main_process)  # from here on the run writes into workdir

    params = sum(x.size for x in jax.tree.leaves(eqx.filter(state.model, eqx.is_array)))
    say(f"{'resuming' if resume else 'training'} {params / 1e6:.2f}M parameters on {ds.name} "
        f"(vocab {cfg.model.vocab_size}, seq {cfg.model.seq_len}), mesh {dict(mesh.shape)}, "
        f"workdir {workdir}" + (f", from step {resume}" if resume else ""))
    eval_key, sample_key = jax.random.key(cfg.train.seed + 2), jax.random.key(cfg.train.seed + 3)

    def eval_and_sample(state: TrainState, step: int) -> list[str]:
        bpt, ppl = evaluate(state.ema, evals, eval_key, mesh)
        log.write(step=step, eval_bpt=bpt, eval_ppl=ppl)
        key = jax.random.fold_in(sample_key, step)
        tokens = draw_samples(state.ema, cfg, mesh, key, cfg.train.num_samples)
        if not main_process:
            return []
        path, texts = write_samples(tokens, ds, state.ema.mask_id, workdir / "samples" / f"step_{step:07d}")
        say(f"step {step}: eval {bpt:.4f} bits/token (perplexity <= {ppl:.2f}), samples in {path}")
        return texts

    texts = eval_and_sample(state, 0) if resume is None else []
    tc = cfg.train
    train_step = make_train_step(state, optimizer, mesh, microbatches=tc.microbatches,
                                 clip=cfg.optim.clip, ema=cfg.optim.ema)
    step = resume or 0
    bar = tqdm(total=tc.steps, initial=step, unit="step", disable=args.no_progress or not main_process,
               dynamic_ncols=True)
    pending, busy, tick = [], 0.0, time.perf_counter()  # busy: seconds spent outside train steps
    while step < tc.steps:
        tokens, labels = on_mesh(next(loader), mesh, cfg.model.num_classes > 0)
        state, metrics = train_step(state, tokens, labels)
        pending.append(metrics)
        step += 1
        bar.update()
        if step % tc.log_every == 0 or step == tc.steps:
            bpt = float(np.mean([float(m.bpt) for m in pending]))  # waits for the steps to finish
            elapsed = time.perf_counter() - tick - busy
            tokens_per_s = len(pending) * tc.batch_size * cfg.model.seq_len / elapsed
            log.write(step=step, train_bpt=bpt, lr=float(metrics.lr), grad_norm=float(metrics.grad_norm),
                      tokens_per_s=tokens_per_s)
            bar.set_postfix(bpt=f"{bpt:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            pending, busy, tick = [], 0.0, time.perf_counter()
        started = time.perf_counter()
        if step % tc.eval_every == 0 or step == tc.steps:
            texts = eval_and_sample(state, step)
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            checkpoint.save(workdir, state, loader.state(), cfg)
        busy += time.perf_counter() - started
    bar.close()
    loader.close()
    say(f"step {step} reached in {(time.perf_counter() - began) / 60:.1f} min")
    if texts:
        say(f"\nsamples of the EMA model at step {step}:")
        for text in texts:
            say("-" * 80 + "\n" + text)
    return 0


def silence_abandoned_reads() -> None:
    """When orbax gives up on a corrupt checkpoint, the reads it started but no longer awaits
    still finish, each with the same error: asyncio logs "Future exception was never retrieved",
    or, once orbax's event loop has closed, Python reports an unraisable "Event loop is closed".
    The one-line error already says what is wrong, so both are dropped; anything else is shown."""
    default = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
            default(unraisable)

    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(
        lambda record: not record.getMessage().partition("\n")[0].endswith("exception was never retrieved")
    )


def run_command(parser: argparse.ArgumentParser, command, argv: list[str] | None) -> int:
    """command(parsed argv); bad input (flags, data, checkpoints) is one line on stderr, status 2."""
    args = parser.parse_args(argv)
    try:
        return command(args)
    except (UsageError, DataError, CheckpointError, plan.PlanError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), train, argv)


if __name__ == "__main__":
    silence_abandoned_reads()
    sys.exit(main())
