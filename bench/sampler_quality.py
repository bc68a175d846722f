"""Sample quality of each sampler: unigram entropy and generative perplexity against the steps.

    python bench/sampler_quality.py                                   # ~5 min on 2 CPU cores
    python bench/sampler_quality.py --workdir runs/tiny-pystdlib --steps 128 256 1024 --samples 64

The MD4 is the `tiny` preset on pystdlib (byte-level Python source), trained here through the
library for --train-steps (or the EMA model of --workdir's newest checkpoint). The scorer is a
small GPT-2 (`transformers`, PyTorch) trained here on the same training split, with a BOS token
added to the 256 bytes, so no network is needed: gen. perplexity is exp(pooled NLL per token) of
the samples under it (md4_eqx.genppl), unigram entropy the mean over samples of the entropy of
each sample's bytes. The "data" row scores held-out windows of the data itself: the figures a
sampler would reach if it sampled the data's law. Low perplexity with low entropy is repetition,
not quality (Zheng et al. 2024). Every sampler draws its categoricals exactly (Draws.EXACT), on
the cosine grid, from the same seed; ReMDM remasks over the whole run (no switch-on window) and,
unlike the paper's best setting, without top-p. Prints a markdown table for bench/RESULTS.md.
"""

import argparse
import dataclasses
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from train_step import machine  # bench/train_step.py: this folder is first on sys.path

from md4_eqx import checkpoint
from md4_eqx.config import Remask, Rule, SamplerConfig, preset
from md4_eqx.data import BatchLoader, load
from md4_eqx.genppl import CausalLM, unigram_entropy
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.sampling import generate
from md4_eqx.targets import keep_jax_off_absent_tpus
from md4_eqx.train_step import init_state, make_optimizer, make_train_step

BOS = 256  # the scorer's extra token, after the 256 bytes


def train_md4(ds, steps: int, batch: int, mesh) -> tuple[MD4, float]:
    """The tiny preset trained for `steps` at `batch`: its EMA model and the mean bits/token of
    the last 20 steps."""
    cfg = preset("tiny")
    cfg = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, steps=steps, batch_size=batch)
    )
    optimizer = make_optimizer(cfg.optim, steps)
    state = init_state(cfg, optimizer, mesh)
    step = make_train_step(state, optimizer, mesh, clip=cfg.optim.clip, ema=cfg.optim.ema)
    loader = BatchLoader(ds.split("train"), batch_size=batch, seed=0)
    bpts = []
    for _ in range(steps):
        state, metrics = step(state, jnp.asarray(next(loader)["tokens"]))
        bpts.append(metrics.bpt)
    loader.close()
    return state.ema, float(np.mean([float(b) for b in bpts[-20:]]))


def train_scorer(ds, steps: int, batch: int, directory: str) -> tuple[int, float]:
    """A 2-layer GPT-2 over bytes + BOS trained on the training split, saved to `directory`:
    (its parameter count, its last 20 steps' mean loss in nats/token)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    seq = ds.split("train").seq_len
    config = GPT2Config(
        vocab_size=BOS + 1,
        n_positions=seq + 1,
        n_embd=128,
        n_layer=2,
        n_head=4,
        bos_token_id=BOS,
        eos_token_id=BOS,
    )
    model = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = BatchLoader(ds.split("train"), batch_size=batch, seed=1)
    losses = []
    for _ in range(steps):
        tokens = torch.as_tensor(next(loader)["tokens"], dtype=torch.long)
        ids = torch.cat([torch.full((batch, 1), BOS), tokens], dim=1)  # (b, 1 + L)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    loader.close()
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters()), float(np.mean(losses[-20:]))


def quality(scorer: CausalLM, samples: np.ndarray) -> tuple[float, float, float]:
    """(mean unigram entropy, gen. perplexity, its standard error) of samples [n, L]."""
    rows = samples.tolist()
    ppl = scorer.perplexity(rows, batch_size=32)
    return float(np.mean([unigram_entropy(r) for r in rows])), ppl.value, ppl.stderr


def samplers(top_p: float, eta: float) -> dict[str, SamplerConfig]:
    return {
        "ancestral": SamplerConfig(rule=Rule.ANCESTRAL),
        f"top-p {top_p}": SamplerConfig(rule=Rule.TOP_P, top_p=top_p),
        f"ReMDM cap, eta {eta}": SamplerConfig(rule=Rule.REMDM, remask=Remask.CAP, eta=eta),
        f"ReMDM rescale, eta {eta}": SamplerConfig(rule=Rule.REMDM, remask=Remask.RESCALE, eta=eta),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", help="a tiny-pystdlib training run to load instead of training here"
    )
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scorer-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, nargs="+", default=[128, 256, 1024])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--eta", type=float, default=0.02)
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)

    began = time.perf_counter()
    mesh = make_mesh(1, 1, jax.devices()[:1])
    seq_len = preset("tiny").model.seq_len
    ds = load("pystdlib", seq_len=seq_len, cache_dir=args.cache_dir, progress=False)
    if args.workdir:
        with checkpoint.Checkpoints(args.workdir) as checkpoints:
            step, config, _ = checkpoints.read_meta()
            if config.model.vocab_size != 256 or config.model.seq_len != seq_len:
                sys.exit(f"{args.workdir}: expected a byte-level model of seq_len {seq_len}")
            model = checkpoints.load_for_inference(step, config, mesh)
        trained = f"{args.workdir} at step {step}"
    else:
        model, bpt = train_md4(ds, args.train_steps, args.batch_size, mesh)
        trained = (
            f"trained here {args.train_steps} steps at batch {args.batch_size} "
            f"(last train NELBO {bpt:.2f} bits/token)"
        )
    with tempfile.TemporaryDirectory() as directory:
        params, loss = train_scorer(ds, args.scorer_steps, args.batch_size, directory)
        scorer = CausalLM(directory, device="cpu")
        held_out, _ = ds.split("valid").get(np.arange(args.samples))

        rows = [("data (held-out windows)", "-", "-", *quality(scorer, held_out))]
        for steps in args.steps:
            for name, cfg in samplers(args.top_p, args.eta).items():
                cfg = dataclasses.replace(cfg, steps=steps)
                template = jnp.full((args.samples, seq_len), model.mask_id, jnp.int32)
                out = generate(model, jax.random.key(steps), template, mesh, cfg)
                rows.append(
                    (name, steps, int(out.calls[0]), *quality(scorer, np.asarray(out.tokens)))
                )
                print(
                    f"{name} at {steps} steps done ({time.perf_counter() - began:.0f} s)",
                    file=sys.stderr,
                )

    m = model.config
    command = " ".join(
        ["python bench/sampler_quality.py", *(argv if argv is not None else sys.argv[1:])]
    )
    print(f"`{command}`: {machine()}")
    print(
        f"MD4: tiny preset ({m.num_layers} layers, width {m.width}, seq {m.seq_len}), {trained}. "
        f"Scorer: GPT-2, 2 layers, width 128, {params / 1e6:.2f}M parameters, trained here "
        f"{args.scorer_steps} steps at batch {args.batch_size} "
        f"(last train loss {loss:.2f} nats/token). "
        f"{args.samples} samples of {seq_len} bytes per row; "
        f"{time.perf_counter() - began:.0f} s in all.\n"
    )
    print("| sampler | steps | network calls | unigram entropy (nats) | gen. perplexity |")
    print("|---|---|---|---|---|")
    for name, steps, calls, entropy, ppl, stderr in rows:
        print(f"| {name} | {steps} | {calls} | {entropy:.3f} | {ppl:.2f} ± {stderr:.2f} |")
    return 0


if __name__ == "__main__":
    keep_jax_off_absent_tpus()  # no libtpu warnings on a host without a TPU
    sys.exit(main())
