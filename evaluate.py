"""Evaluate a trained MD4: the likelihood bound of a checkpoint, or the quality of its samples.

    python evaluate.py nelbo --workdir runs/tiny-pystdlib --split valid --draws 8
    python evaluate.py nelbo --workdir runs/md4-s-owt --draws 4 --batches 100 --batch-size 64
    python evaluate.py samples --file samples.jsonl --model gpt2-large
    python evaluate.py samples --file samples.jsonl --model ./my-causal-lm --tokens

nelbo: the EMA model's NELBO on a dataset split (default: the whole split) in bits per token,
averaged over --draws draws of the time and masks per sequence, with its Monte Carlo standard
error (other draws, same sequences), its standard error over sequences, and the perplexity bound
exp(nats per token). Draw d is exactly the training-time evaluation with key fold_in(key(seed), d).

samples: for a .jsonl of samples (as sample.py --out writes), the unigram entropy of each
sample's tokens (nats; collapsed, repetitive samples score low) and the generative perplexity
under a `transformers` causal LM (a hub name such as gpt2-large, or a local directory), on the
text retokenised, or with --tokens on the token ids as they are (an LM sharing the diffusion
model's vocabulary). Needs PyTorch: pip install md4-eqx[eval].

The network runs as the run was trained (--attention, --precision, ... change that), except for
an attention kernel that does not run on this machine: this machine's default replaces it.
--json prints one JSON object instead of the table. Bad input prints one line on stderr and
exits with status 2.
"""

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from md4_eqx import checkpoint
from md4_eqx.cli import (
    add_execution_flags,
    check_positive,
    execution_here,
    field_flag,
    run_command,
    script_parser,
)
from md4_eqx.data import load
from md4_eqx.distributed import replicated_on_mesh
from md4_eqx.errors import UsageError
from md4_eqx.evaluate import NelboEstimate, nelbo_draws
from md4_eqx.genppl import CausalLM, unigram_entropy
from md4_eqx.parallel import DATA, make_mesh
from md4_eqx.validate import check_data, validate


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    nelbo = commands.add_parser(
        "nelbo", help="the NELBO (bits per token) of a checkpoint on a split"
    )
    nelbo.add_argument("--workdir", default="runs/tiny-pystdlib")
    nelbo.add_argument("--step", **field_flag(int), help="checkpoint step (default: the newest)")
    nelbo.add_argument("--split", default="valid")
    nelbo.add_argument("--draws", **field_flag(int), default=8, help="time draws per sequence")
    nelbo.add_argument(
        "--batches", **field_flag(int), help="evaluate the first N batches (default: all)"
    )
    nelbo.add_argument("--batch-size", **field_flag(int), help="default: the run's per-step batch")
    nelbo.add_argument(
        "--model-parallel", **field_flag(int), default=1, help="devices on the mesh's model axis"
    )
    nelbo.add_argument("--seed", **field_flag(int), default=0)
    nelbo.add_argument("--dataset", help="default: the run's dataset")
    nelbo.add_argument("--tokenizer", help="as train.py's --tokenizer, if the run used one")
    nelbo.add_argument("--data-path", help="as train.py's --data-path")
    nelbo.add_argument("--cache-dir", help="default: $MD4_CACHE or ~/.cache/md4_eqx")
    nelbo.add_argument("--no-progress", action="store_true")
    nelbo.add_argument("--json", action="store_true")
    add_execution_flags(nelbo)

    samples = commands.add_parser(
        "samples", help="generative perplexity and unigram entropy of samples"
    )
    samples.add_argument("--file", required=True, help="a .jsonl of samples with text and tokens")
    samples.add_argument(
        "--model", default="gpt2-large", help="a causal LM: hub name or local directory"
    )
    samples.add_argument(
        "--tokens", action="store_true", help="score the token ids, not the retokenised text"
    )
    samples.add_argument("--batch-size", **field_flag(int), default=8)
    samples.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    samples.add_argument("--json", action="store_true")
    return parser


def _se(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def run_nelbo(args) -> dict:
    check_positive(args, "draws", "batches", "batch_size", "model_parallel")
    with checkpoint.Checkpoints(args.workdir) as checkpoints:
        step, config, _ = checkpoints.read_meta(args.step)
        mesh = make_mesh(model=args.model_parallel)
        config = execution_here(config, args, mesh)
        parts = mesh.shape[DATA]
        batch = args.batch_size or max(
            parts, config.train.batch_size // config.train.microbatches // parts * parts
        )
        validate(config, mesh, batch)
        ds = load(
            args.dataset or config.train.dataset,
            seq_len=config.model.seq_len,
            cache_dir=args.cache_dir,
            tokenizer=args.tokenizer,
            data_path=args.data_path,
            progress=not args.no_progress,
        )
        check_data(config.model, ds)
        split = ds.split(args.split)
        n = (
            split.num_examples
            if args.batches is None
            else min(split.num_examples, args.batches * batch)
        )
        count = -(-n // batch)
        model = checkpoints.load_for_inference(step, config, mesh)
    labelled = config.model.num_classes > 0

    def batches():
        for i in tqdm(
            range(count), desc="nelbo", unit="batch", disable=args.no_progress, file=sys.stderr
        ):
            # The last batch is filled up with the last sequence; those extra rows are dropped.
            tokens, labels = split.get(np.minimum(np.arange(i * batch, (i + 1) * batch), n - 1))
            yield (
                replicated_on_mesh(tokens, mesh),
                (replicated_on_mesh(labels, mesh) if labelled else None),
            )

    nats = nelbo_draws(model, jax.random.key(args.seed), batches(), mesh, args.draws)[:, :n]
    est = NelboEstimate.from_nats(nats, config.model.seq_len)
    return {
        "workdir": str(args.workdir),
        "step": step,
        "dataset": ds.name,
        "split": args.split,
        "batch_size": batch,
        "batches": count,
        **est.to_json(),
    }


def print_nelbo(r: dict) -> None:
    print(f"checkpoint  {r['workdir']} step {r['step']} (EMA parameters)")
    print(
        f"data        {r['dataset']} {r['split']}: "
        f"{r['sequences']:,} sequences of {r['seq_len']} tokens "
        f"({r['batches']} batches of {r['batch_size']})"
    )
    print(
        f"NELBO       {r['bits_per_token']:.4f} bits/token  "
        f"± {_se(r['mc_stderr'])} Monte Carlo ({r['draws']} draws)  "
        f"± {_se(r['stderr'])} over sequences"
    )
    print(
        f"perplexity  <= {r['perplexity']:.3f}  "
        f"± {_se(r['perplexity_mc_stderr'])} Monte Carlo  "
        f"± {_se(r['perplexity_stderr'])} over sequences"
    )


def read_samples(path: str) -> list[tuple[str, list[int]]]:
    """The ("text", "tokens") of every line of a samples .jsonl."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text, ids = record["text"], record["tokens"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UsageError(
                f'{path}:{number}: expected a JSON object with "text" and "tokens"'
            ) from None
        if (
            not isinstance(text, str)
            or not isinstance(ids, list)
            or not all(type(t) is int for t in ids)
        ):
            raise UsageError(
                f'{path}:{number}: "text" must be a string and "tokens" a list of integers'
            )
        samples.append((text, ids))
    if not samples:
        raise UsageError(f"{path} has no samples")
    return samples


def run_samples(args) -> dict:
    check_positive(args, "batch_size")
    texts, tokens = zip(*read_samples(args.file), strict=True)
    entropy = np.array([unigram_entropy(ids) for ids in tokens if ids])
    lm = CausalLM(args.model, args.device)
    scored = tokens if args.tokens else lm.encode(texts)
    ppl = lm.perplexity(scored, args.batch_size)
    return {
        "file": args.file,
        "samples": len(texts),
        "tokens_per_sample": float(np.mean([len(t) for t in tokens])),
        "unigram_entropy": float(entropy.mean()),
        "unigram_entropy_min": float(entropy.min()),
        "unigram_entropy_max": float(entropy.max()),
        "model": args.model,
        "scored": "tokens" if args.tokens else "text",
        "tokens_scored": sum(ppl.scored),
        "gen_perplexity": ppl.value,
        "gen_perplexity_stderr": ppl.stderr,
    }


def print_samples(r: dict) -> None:
    how = "token ids as they are" if r["scored"] == "tokens" else "text retokenised"
    print(
        f"samples          {r['samples']} in {r['file']}, "
        f"{r['tokens_per_sample']:.0f} tokens each on average"
    )
    print(
        f"unigram entropy  {r['unigram_entropy']:.3f} nats per sample "
        f"(mean; min {r['unigram_entropy_min']:.3f}, "
        f"max {r['unigram_entropy_max']:.3f})"
    )
    print(
        f"gen. perplexity  {r['gen_perplexity']:.3f} ± {_se(r['gen_perplexity_stderr'])} "
        f"under {r['model']} "
        f"({r['tokens_scored']:,} tokens scored, {how})"
    )


def run(args) -> int:
    result = run_nelbo(args) if args.command == "nelbo" else run_samples(args)
    if (
        args.json
    ):  # JSON has no NaN or inf: a missing error bar (or an overflowed perplexity) is null
        print(
            json.dumps(
                {
                    k: None if isinstance(v, float) and not math.isfinite(v) else v
                    for k, v in result.items()
                }
            )
        )
    else:
        (print_nelbo if args.command == "nelbo" else print_samples)(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
