"""Sample from a trained MD4: the EMA model of a checkpoint in a training workdir.

    python sample.py                                     # 4 samples from runs/tiny-pystdlib
    python sample.py --workdir runs/md4-s-owt --num-samples 8 --steps 1000 --top-p 0.98
    python sample.py --prompt 'import os' --out samples.jsonl
    python sample.py --infill $'def [MASK:12](path):\\n    [MASK:40]\\n    return result\\n'
    python sample.py --workdir runs/cifar10-cifar10 --label 3 --trajectory --out cats.png
    python sample.py --workdir runs/cifar10-classes --label 3 --guidance 2 --out cats.png

Text: the samples go to stdout and, with --out FILE.jsonl, one JSON object per sample with its
`text` and `tokens`. --prompt keeps the given text at the start and generates the rest;
--infill takes a template in which `[MASK:n]` stands for n generated tokens (everything else
is kept; positions after the template are generated too). Use bash's $'...' for newlines.
Images: a PNG grid (--out, default WORKDIR/samples_step<N>.png); --label picks the class and
--guidance W samples with classifier-free guidance (a model trained with --num-classes).
--trajectory shows how the samples unmasked step by step: a PNG strip and a GIF for images,
text snapshots for text.

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

from md4_eqx import checkpoint
from md4_eqx.cli import UsageError, check_positive, field_flag, run_command, script_parser
from md4_eqx.config import Loop, Rule
from md4_eqx.data import load
from md4_eqx.distributed import replicated_on_mesh
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import generate
from md4_eqx.visualize import image_grid, text_trajectory, to_images, trajectory_gif, trajectory_strip

MASK_MARKER = re.compile(r"\[MASK:(\d+)\]")


def build_parser() -> argparse.ArgumentParser:
    parser = script_parser(__doc__)
    parser.add_argument("--workdir", default="runs/tiny-pystdlib")
    parser.add_argument("--step", **field_flag(int), help="checkpoint step (default: the newest)")
    parser.add_argument("--num-samples", **field_flag(int), default=4)
    parser.add_argument("--steps", **field_flag(int), help="sampling steps (default: the run's config)")
    parser.add_argument("--sampler", **field_flag(Rule),
                        help="the per-step rule (default: the run's config, or top_p when --top-p is given)")
    parser.add_argument("--loop", **field_flag(Loop), help="which steps call the network (default: the run's config)")
    parser.add_argument("--top-p", **field_flag(float))
    parser.add_argument("--seed", **field_flag(int), default=0)
    parser.add_argument("--out", help="FILE.jsonl for text, FILE.png for images")
    parser.add_argument("--label", **field_flag(int), help="class of every image (default: 0, 1, 2, ...)")
    parser.add_argument("--guidance", **field_flag(float),
                        help="classifier-free guidance w for class-conditional models (default: the run's config, 0)")
    parser.add_argument("--prompt", help="text kept at the start of every sample")
    parser.add_argument("--infill", help="template; [MASK:n] = n generated tokens")
    parser.add_argument("--trajectory", action="store_true", help="show how the samples unmasked")
    parser.add_argument("--cache-dir", help="dataset cache, for the tokenizer (default: as train.py)")
    return parser


def template_row(args, ds, seq_len: int, mask_id: int) -> np.ndarray:
    """One template [L]: the prompt or infilling template's tokens, masks (id V) elsewhere."""
    pieces = []  # token arrays; -1 marks a generated position
    if args.prompt is not None:
        pieces.append(ds.encode(args.prompt))
    else:
        text = args.infill or ""
        for i, part in enumerate(MASK_MARKER.split(text)):
            # split alternates literal text and the numbers inside [MASK:n]
            pieces.append(ds.encode(part) if i % 2 == 0 else np.full(int(part), -1, np.int32))
    tokens = np.concatenate([np.zeros(0, np.int32), *pieces]).astype(np.int32)
    if tokens.size > seq_len:
        raise UsageError(f"the template is {tokens.size} tokens; the model's sequences are {seq_len}")
    outside = (tokens >= mask_id) | (tokens < -1)
    if outside.any():
        raise UsageError(f"token id {tokens[outside][0]} lies outside the model's vocabulary [0, {mask_id})")
    row = np.full(seq_len, mask_id, np.int32)
    row[: tokens.size] = np.where(tokens < 0, mask_id, tokens)
    return row


def check(args, config) -> None:
    if args.prompt is not None and args.infill is not None:
        raise UsageError("give --prompt or --infill, not both")
    check_positive(args, "num_samples", "steps")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UsageError(f"--top-p {args.top_p} must lie in (0, 1]")
    classes = config.model.num_classes
    if args.label is not None and not 0 <= args.label < classes:
        raise UsageError(f"--label {args.label}: this model has {classes} classes")
    if args.guidance and not classes:
        raise UsageError(f"--guidance {args.guidance} needs a class-conditional model; this one has no classes")


def sample(args) -> int:
    step, config, _ = checkpoint.read_meta(args.workdir, args.step)
    check(args, config)
    devices = jax.devices()[: math.gcd(args.num_samples, jax.device_count())]
    mesh = make_mesh(len(devices), 1, devices)
    _, model = checkpoint.load_for_inference(args.workdir, step, mesh)
    ds = load(config.train.dataset, seq_len=config.model.seq_len, cache_dir=args.cache_dir, progress=False)
    images = ds.image_shape is not None
    if images and (args.prompt is not None or args.infill is not None):
        raise UsageError("--prompt and --infill are for text; this model makes images")
    if args.out and not args.out.endswith(".png" if images else ".jsonl"):
        raise UsageError(f"--out {args.out}: expected a {'.png' if images else '.jsonl'} file")

    changes = {"steps": args.steps, "top_p": args.top_p,
               "rule": args.sampler or (Rule.TOP_P if args.top_p is not None else None), "loop": args.loop,
               "guidance": args.guidance}
    sampler_cfg = dataclasses.replace(config.sampler, **{k: v for k, v in changes.items() if v is not None})
    n, mask_id = args.num_samples, model.mask_id
    template = np.tile(template_row(args, ds, config.model.seq_len, mask_id), (n, 1))
    labels = None
    if config.model.num_classes:
        classes = np.arange(n) % config.model.num_classes if args.label is None else np.full(n, args.label)
        labels = replicated_on_mesh(classes.astype(np.int32), mesh)
    out = generate(model, jax.random.key(args.seed), replicated_on_mesh(template, mesh), mesh, sampler_cfg,
                   labels, trajectory=args.trajectory)
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

    records = []
    for i, row in enumerate(tokens):
        record = {"text": ds.decode(row), "tokens": row.tolist()}
        if trajectory is not None:
            snapshots = text_trajectory(trajectory[:, i], ds.decode, mask_id)
            record["trajectory"] = [{"step": s, "text": t} for s, t in snapshots]
            for s, t in snapshots:
                print(f"--- sample {i}, after step {s}/{sampler_cfg.steps}:\n{t}")
        print(f"{'=' * 30} sample {i} (step {step}) {'=' * 30}\n{record['text']}")
        records.append(record)
    if args.out:
        lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
        Path(args.out).write_text("".join(lines), encoding="utf-8")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), sample, argv)


if __name__ == "__main__":
    sys.exit(main())
