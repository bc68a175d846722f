"""Sample from a trained MD4: the EMA model of a checkpoint in a training workdir.

    python sample.py                                     # 4 samples from runs/tiny-pystdlib
    python sample.py --workdir runs/md4-s-owt --num-samples 8 --steps 1000 --top-p 0.98
    python sample.py --prompt 'import os' --out samples.jsonl
    python sample.py --infill $'def [MASK:12](path):\\n    [MASK:40]\\n    return result\\n'
    python sample.py --workdir runs/cifar10-cifar10 --label 3 --trajectory --out cats.png
    python sample.py --length 512 --block 32 --prompt "$(head -c 300 setup.py)"   # past seq_len
    python sample.py --workdir runs/cifar10-classes --label 3 --guidance 2 --out cats.png

Text: the samples go to stdout and, with --out FILE.jsonl, one JSON object per sample with its
`text`, `tokens` and what reproduces it (sampler settings, seed, checkpoint step, length, block,
index). Positions past an --infill template are generated too (use bash's $'...' for newlines).
--length N past the model's seq_len L samples window by window: each keeps the L - B tokens it
shares with the last and samples B = --block new ones (so a prompt may be longer than L); a bar
on stderr counts windows and network calls. Images: a PNG grid (--out, default
WORKDIR/samples_step<N>.png). --trajectory: a PNG strip and a GIF for images, text snapshots.
The network runs as the run was trained (--attention, --precision, ... change that), except for
an attention kernel that does not run on this machine: this machine's default replaces it.

Bad input prints one line on stderr and exits with status 2.
"""

import argparse
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from md4_eqx import checkpoint
from md4_eqx.cli import (
    add_execution_flags,
    add_field_flags,
    check_positive,
    execution_here,
    field_flag,
    replace_given,
    run_command,
    script_parser,
)
from md4_eqx.config import Config, Rule, config_to_json
from md4_eqx.data import load
from md4_eqx.distributed import replicated_on_mesh
from md4_eqx.errors import UsageError
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import Samples, block_starts, generate, generate_long
from md4_eqx.validate import validate
from md4_eqx.visualize import (
    frame_indices,
    image_grid,
    render_text,
    to_images,
    trajectory_gif,
    trajectory_strip,
)

MASK_MARKER = re.compile(r"\[MASK:(\d+)\]")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--workdir", default="runs/tiny-pystdlib")
    parser.add_argument("--step", **field_flag(int), help="checkpoint step (default: the newest)")
    parser.add_argument("--num-samples", **field_flag(int), default=4)
    parser.add_argument("--seed", **field_flag(int), default=0)
    parser.add_argument("--out", help="FILE.jsonl for text, FILE.png for images")
    parser.add_argument(
        "--label", **field_flag(int), help="class of every image (default: 0, 1, 2, ...)"
    )
    parser.add_argument("--prompt", help="text kept at the start of every sample")
    parser.add_argument("--infill", help="template; [MASK:n] = n generated tokens")
    parser.add_argument(
        "--length", **field_flag(int), help="tokens per text sample (default: the model's seq_len)"
    )
    parser.add_argument(
        "--block",
        **field_flag(int),
        help="new tokens per window past seq_len (default: seq_len // 4)",
    )
    parser.add_argument("--trajectory", action="store_true", help="show how the samples unmasked")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--cache-dir", help="dataset cache, for the tokenizer (default: as train.py)"
    )
    add_field_flags(parser, ["sampler"], "the sampler (default: the run's; --top-p alone: top_p)")
    add_execution_flags(parser)
    return parser


def template_row(args, ds, length: int, mask_id: int) -> np.ndarray:
    """One template [N]: the prompt or infilling template's tokens, masks (id V) elsewhere."""
    # -1 marks a generated position; split alternates literal text and the n inside [MASK:n].
    parts = [args.prompt] if args.prompt is not None else MASK_MARKER.split(args.infill or "")
    tokens = np.concatenate(
        [
            ds.tokenizer.encode(part) if i % 2 == 0 else np.full(int(part), -1, np.int32)
            for i, part in enumerate(parts)
        ]
    ).astype(np.int32)
    if tokens.size > length:
        raise UsageError(f"the template is {tokens.size} tokens; the samples are {length}")
    if (tokens >= mask_id).any():
        raise UsageError(
            f"token id {tokens.max()} lies outside the model's vocabulary [0, {mask_id})"
        )
    row = np.full(length, mask_id, np.int32)
    row[: tokens.size] = np.where(tokens < 0, mask_id, tokens)
    return row


def check(args, config) -> tuple[int, int]:
    """The flags against the checkpoint's model (the config's own checks are `validate`'s);
    returns (--length, --block), by default seq_len and a quarter of it."""
    if args.prompt is not None and args.infill is not None:
        raise UsageError("give --prompt or --infill, not both")
    check_positive(args, "num_samples")
    seq_len = config.model.seq_len
    length = seq_len if args.length is None else args.length
    block = max(seq_len // 4, 1) if args.block is None else args.block
    block_starts(seq_len, length, block)  # raises for a --length or --block that does not fit
    if args.out and not Path(args.out).parent.is_dir():  # found before sampling, not after
        raise UsageError(f"--out {args.out}: no folder {Path(args.out).parent}")
    if args.trajectory and length > seq_len:
        raise UsageError("--trajectory shows one window: leave --length at the model's seq_len")
    classes = config.model.num_classes
    if args.label is not None and not 0 <= args.label < classes:
        raise UsageError(f"--label {args.label}: this model has {classes} classes")
    return length, block


def with_flags(config: Config, args) -> Config:
    """The run's config with the sampler flags given; --top-p alone implies the top_p rule."""
    sampler = replace_given(config.sampler, "sampler", args)
    if "sampler.top_p" in vars(args) and "sampler.rule" not in vars(args):
        sampler = dataclasses.replace(sampler, rule=Rule.TOP_P)
    return dataclasses.replace(config, sampler=sampler)


def sample(args) -> int:
    with checkpoint.Checkpoints(args.workdir) as checkpoints:
        step, config, _ = checkpoints.read_meta(args.step)
        length, block = check(args, config)
        config = with_flags(config, args)
        mesh = make_mesh(devices=jax.devices()[: math.gcd(args.num_samples, jax.device_count())])
        config = execution_here(config, args, mesh)
        validate(config, mesh, batch=args.num_samples)
        model = checkpoints.load_for_inference(step, config, mesh)
    ds = load(
        config.train.dataset, seq_len=config.model.seq_len, cache_dir=args.cache_dir, progress=False
    )
    images = ds.image_shape is not None
    if images and (args.prompt is not None or args.infill is not None or args.length is not None):
        raise UsageError("--prompt, --infill and --length are for text; this model makes images")
    if args.out and not args.out.endswith(".png" if images else ".jsonl"):
        raise UsageError(f"--out {args.out}: expected a {'.png' if images else '.jsonl'} file")

    n, mask_id = args.num_samples, model.mask_id
    template = replicated_on_mesh(np.tile(template_row(args, ds, length, mask_id), (n, 1)), mesh)
    labels = None
    if config.model.num_classes:
        classes = (
            np.arange(n) % config.model.num_classes
            if args.label is None
            else np.full(n, args.label)
        )
        labels = replicated_on_mesh(classes.astype(np.int32), mesh)
    key = jax.random.key(args.seed)
    if args.trajectory:  # one window (check)
        out = generate(model, key, template, mesh, config.sampler, labels, trajectory=True)
    else:
        out = generate_with_progress(
            model, key, template, mesh, config.sampler, block, labels, args.no_progress
        )
    tokens = np.asarray(out.tokens)
    trajectory = None if out.trajectory is None else np.asarray(out.trajectory)

    if images:
        path = Path(args.out or Path(args.workdir) / f"samples_step{step}.png")
        image_grid(to_images(tokens, ds.image_shape, mask_id)).save(path)
        print(f"{n} samples of step {step} in {path}")
        if trajectory is not None:
            strip, gif = path.with_name(path.stem + "_trajectory.png"), path.with_suffix(".gif")
            trajectory_strip(trajectory, ds.image_shape, mask_id).save(strip)
            trajectory_gif(trajectory, ds.image_shape, mask_id, gif)
            print(f"trajectory in {strip} and {gif}")
        return 0

    settings = {
        "sampler": config_to_json(config)["sampler"],
        "seed": args.seed,
        "checkpoint_step": step,
        "length": length,
        "block": block,
        "workdir": args.workdir,
        "prompt": args.prompt,
        "infill": args.infill,
    }
    records = []
    for i, row in enumerate(tokens):
        record = {"text": ds.decode(row), "tokens": row.tolist(), "index": i, **settings}
        if labels is not None:
            record["label"] = int(classes[i])
        if trajectory is not None:
            snapshots = [
                (s + 1, render_text(trajectory[s, i], ds.decode, mask_id))  # six (step, text)
                for s in frame_indices(len(trajectory), 6)
            ]
            record["trajectory"] = [{"step": s, "text": t} for s, t in snapshots]
            for s, t in snapshots:
                print(f"--- sample {i}, after step {s}/{config.sampler.steps}:\n{t}")
        print(f"{'=' * 30} sample {i} (step {step}) {'=' * 30}\n{record['text']}")
        records.append(record)
    if args.out:
        Path(args.out).write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )
    return 0


def generate_with_progress(
    model, key, template, mesh, cfg, block: int, labels, quiet: bool
) -> Samples:
    """`generate_long` with a bar over its windows on stderr: the steps per window and the
    network calls so far (of the busiest data shard)."""
    windows = len(block_starts(model.config.seq_len, template.shape[1], block))
    calls = []
    with tqdm(total=windows, desc="sampling", unit="window", disable=quiet, file=sys.stderr) as bar:
        bar.set_postfix(steps=cfg.steps, calls=0)

        def on_block(samples: Samples) -> None:
            calls.append(np.asarray(samples.calls))
            bar.set_postfix(steps=cfg.steps, calls=int(np.max(np.sum(calls, axis=0))))
            bar.update()

        return generate_long(model, key, template, mesh, cfg, block, labels, on_block=on_block)


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), sample, argv)


if __name__ == "__main__":
    sys.exit(main())
