"""The evaluation commands: the NELBO with several draws agrees with the training-time evaluation
and its standard error covers a known answer; generative perplexity agrees with the causal LM's
own loss; bad input and a missing PyTorch give one line and status 2."""

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import evaluate
import sample
from md4_eqx import checkpoint
from md4_eqx.config import (
    Config,
    DiffusionConfig,
    ExecutionConfig,
    Impl,
    ModelConfig,
    Precision,
    TrainConfig,
)
from md4_eqx.data import load
from md4_eqx.evaluate import NelboEstimate, nelbo, nelbo_draws
from md4_eqx.genppl import unigram_entropy
from md4_eqx.model import MD4
from md4_eqx.parallel import make_mesh
from md4_eqx.train_step import init_state, make_optimizer

V, L = 256, 32
# A fresh model predicts uniform over V, so its NELBO is known: log2(V) (1 - eps) bits per token.
UNIFORM_BITS = math.log2(V) * (1 - DiffusionConfig().eps)


def tiny_config(dataset: str = "pystdlib") -> Config:
    return Config(
        model=ModelConfig(
            vocab_size=V, seq_len=L, width=32, num_layers=1, num_heads=2, cond_dim=16
        ),
        execution=ExecutionConfig(precision=Precision.FLOAT32),
        train=TrainConfig(dataset=dataset, batch_size=8, steps=10),
    )


def tiny_model(key) -> MD4:
    config = tiny_config()
    return MD4(config.model, config.diffusion, config.execution, key=key)


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def save_run(root: Path, **changes) -> Path:
    """root/run: the checkpoint (step 0) of a fresh tiny model whose run read root/corpus.txt,
    a small local byte file; `changes` replace fields of its config's sections, by section."""
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "for", "in", "(x)", "\n", "    ", "=", "+", "1"]
    (root / "corpus.txt").write_text(" ".join(rng.choice(words, 12_000)))
    config = tiny_config(f"file:{root / 'corpus.txt'}")
    config = dataclasses.replace(
        config,
        **{name: dataclasses.replace(getattr(config, name), **c) for name, c in changes.items()},
    )
    # How the network is computed and what it read change none of the state's arrays.
    base = tiny_config()
    state = fresh_state(dataclasses.replace(config, execution=base.execution, train=base.train))
    with checkpoint.Checkpoints(root / "run", config.train.keep_checkpoints) as checkpoints:
        checkpoints.save(state, {}, config)
    return root / "run"


@functools.cache
def fresh_state(config: Config):
    """A fresh TrainState of the model and optimiser of `config` (once per config: seconds)."""
    optimizer = make_optimizer(config.optim, config.train.steps)
    return init_state(config, optimizer, make_mesh(1, 1, jax.devices()[:1]))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A checkpoint of a fresh tiny model trained on a small local byte file."""
    root = tmp_path_factory.mktemp("eval")
    save_run(root)
    return root


def test_draws_are_the_training_time_eval(getkey):
    model, mesh = tiny_model(getkey()), make_mesh(8, 1)
    batches = [(jax.random.randint(getkey(), (16, L), 0, V), None) for _ in range(2)]
    key = getkey()
    nats = nelbo_draws(model, key, batches, mesh, draws=3)  # (3, 32)
    # Draw d of batch i is `nelbo`, the training-time evaluation, with key
    # fold_in(fold_in(key, d), i).
    for d, i in [(0, 0), (2, 1)]:
        once = nelbo(model, jax.random.fold_in(jax.random.fold_in(key, d), i), batches[i][0], mesh)
        np.testing.assert_array_equal(nats[d, 16 * i : 16 * (i + 1)], np.asarray(once, np.float64))
    bits = NelboEstimate.from_nats(nats, L).bits_per_token  # what train.py logs as eval_bpt
    # float32 per-sequence values, summed in float64 both here and there
    assert nats.mean() / L / math.log(2) == pytest.approx(bits, rel=1e-6)


def test_standard_error_covers_the_known_nelbo(getkey):
    model, mesh = tiny_model(getkey()), make_mesh(8, 1)
    batches = [(jax.random.randint(getkey(), (64, L), 0, V), None)]
    est = NelboEstimate.from_nats(nelbo_draws(model, getkey(), batches, mesh, draws=16), L)
    assert 0 < est.mc_stderr < 0.2 and 0 < est.stderr < 0.2
    assert abs(est.bits_per_token - UNIFORM_BITS) < 4 * est.mc_stderr
    assert est.perplexity == pytest.approx(2**est.bits_per_token)
    assert math.isnan(
        NelboEstimate.from_nats(np.ones((1, 3)), L).mc_stderr
    )  # one draw: no error bar
    assert (
        NelboEstimate.from_nats(np.full((1, 3), 1e6), L).perplexity == math.inf
    )  # 2^(45,000 bits)


def test_nelbo_command(workdir, capsys):
    argv = [
        "nelbo",
        "--workdir",
        str(workdir / "run"),
        "--draws",
        "8",
        "--batches",
        "2",
        "--batch-size",
        "16",
        "--cache-dir",
        str(workdir / "cache"),
        "--no-progress",
    ]
    code, out, err = run(argv + ["--json"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert (r["sequences"], r["draws"], r["seq_len"], r["step"]) == (32, 8, L, 0)
    assert abs(r["bits_per_token"] - UNIFORM_BITS) < 5 * r["mc_stderr"]
    assert r["perplexity"] == pytest.approx(2 ** r["bits_per_token"])
    # The whole split, with a last batch that is filled up and trimmed: every sequence once.
    code, out, err = run(
        argv[:5] + ["--draws", "1", "--batch-size", "40"] + argv[9:] + ["--json"], capsys
    )
    assert code == 0, err
    r = json.loads(out)
    valid = load(
        f"file:{workdir / 'corpus.txt'}", seq_len=L, cache_dir=workdir / "cache", progress=False
    )
    assert r["sequences"] == valid.split("valid").num_examples and r["mc_stderr"] is None
    code, out, _ = run(argv, capsys)
    assert code == 0 and out.splitlines()[2].startswith("NELBO ") and "Monte Carlo (8 draws)" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--draws", "0"], "--draws must be positive"),
        (["--batch-size", "12"], "multiple of the 8 devices"),
        (["--split", "test"], "no split 'test'"),
        (["--step", "5"], "no checkpoint for step 5"),
        (["--model-parallel", "3"], "model=3 must divide the 8 devices"),
    ],
    ids=["draws", "batch", "split", "step", "model-parallel"],
)
def test_nelbo_bad_input(workdir, capsys, argv, message):
    base = [
        "nelbo",
        "--workdir",
        str(workdir / "run"),
        "--cache-dir",
        str(workdir / "cache"),
        "--no-progress",
    ]
    code, out, err = run(base + argv, capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_a_run_trained_with_pallas_samples_and_evaluates_here(tmp_path, capsys):
    """A run trained with the TPU's Pallas kernel, read on this CPU: both programs run it with
    XLA's attention and say so in one line; an explicit --attention wins (and is refused here,
    naming the flag these programs have)."""
    run_dir = save_run(tmp_path, execution={"attention": Impl.PALLAS})
    data = ["--workdir", str(run_dir), "--cache-dir", str(tmp_path / "cache")]
    note = "the run's attention does not run here ('pallas' compiles only for TPU, this is cpu"
    programs = {
        "sample": (sample.main, [*data, "--num-samples", "2", "--steps", "2", "--no-progress"]),
        "nelbo": (
            evaluate.main,
            ["nelbo", *data, "--draws", "1", "--batches", "1", "--no-progress", "--json"],
        ),
    }
    for name, (main, argv) in programs.items():
        assert main(argv) == 0, name
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and note in lines[0] and "using 'xla'" in lines[0], (name, err)
        assert out, name
        assert main([*argv, "--attention", "pallas"]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "error: --attention: 'pallas' compiles only for TPU" in err, err


def test_unigram_entropy():
    assert unigram_entropy([3, 3, 3]) == 0.0
    assert unigram_entropy([0, 1, 0, 1]) == pytest.approx(math.log(2))
    assert unigram_entropy(list(range(8))) == pytest.approx(math.log(8))


def write_samples(path, rows: list[list[int]]) -> None:
    path.write_text(
        "".join(json.dumps({"text": bytes(r).decode("latin-1"), "tokens": r}) + "\n" for r in rows)
    )


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A randomly initialised one-layer GPT-2 with a byte-level BPE tokenizer, saved locally."""
    torch = pytest.importorskip("torch")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(root)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=300,
        n_positions=24,
        n_embd=32,
        n_layer=1,
        n_head=2,
        bos_token_id=299,
        eos_token_id=299,
    )
    GPT2LMHeadModel(config).save_pretrained(root)
    return root


def reference_nll(root, rows: list[list[int]]) -> tuple[float, int]:
    """Total NLL and tokens scored with the LM's own loss, on windows [BOS] + 23 tokens."""
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(root).eval()
    total, count = 0.0, 0
    for row in rows:
        for i in range(0, len(row), 23):
            ids = torch.tensor([[299, *row[i : i + 23]]])
            with torch.no_grad():
                loss = model(input_ids=ids, labels=ids).loss.item()  # mean over len(ids) - 1 tokens
            total, count = total + loss * (ids.shape[1] - 1), count + ids.shape[1] - 1
    return total, count


def test_generative_perplexity_of_token_ids(causal_lm, tmp_path, capsys):
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 256, size=n).tolist() for n in (40, 40, 10, 23)]  # windows of 23 + BOS
    write_samples(tmp_path / "s.jsonl", rows)
    argv = [
        "samples",
        "--file",
        str(tmp_path / "s.jsonl"),
        "--model",
        str(causal_lm),
        "--tokens",
        "--batch-size",
        "3",
        "--json",
    ]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    r = json.loads(out)
    total, count = reference_nll(causal_lm, rows)
    assert r["tokens_scored"] == count == 113
    # float32 logits: the two computations differ in summation order only
    assert r["gen_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert r["unigram_entropy"] == pytest.approx(np.mean([unigram_entropy(x) for x in rows]))
    assert r["gen_perplexity_stderr"] > 0


def test_generative_perplexity_of_text(causal_lm, tmp_path, capsys):
    from transformers import AutoTokenizer

    texts = ["the quick brown fox", "jumps over the lazy dog the end"]
    (tmp_path / "s.jsonl").write_text(
        "".join(json.dumps({"text": t, "tokens": list(t.encode())}) + "\n" for t in texts)
    )
    code, out, err = run(
        ["samples", "--file", str(tmp_path / "s.jsonl"), "--model", str(causal_lm)], capsys
    )
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(causal_lm)
    scored = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    lines = out.splitlines()
    assert lines[1].startswith("unigram entropy") and lines[2].startswith("gen. perplexity")
    assert f"({scored} tokens scored, text retokenised)" in lines[2]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has no samples"),
        ('{"text": "a"}\n', ":1: expected a JSON object"),
        ('{"text": "a", "tokens": ["x"]}\n', "a list of integers"),
        ("not json\n", ":1: expected"),
    ],
    ids=["empty", "no-tokens", "bad-tokens", "not-json"],
)
def test_samples_bad_file(tmp_path, capsys, content, message):
    (tmp_path / "s.jsonl").write_text(content)
    code, out, err = run(["samples", "--file", str(tmp_path / "s.jsonl")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out


def test_samples_without_torch(tmp_path, capsys, monkeypatch):
    write_samples(tmp_path / "s.jsonl", [[1, 2, 3]])
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    code, out, err = run(["samples", "--file", str(tmp_path / "s.jsonl")], capsys)
    assert code == 2 and "pip install md4-eqx[eval]" in err and len(err.strip().splitlines()) == 1


def test_samples_unknown_model(tmp_path, capsys):
    pytest.importorskip("torch")
    write_samples(tmp_path / "s.jsonl", [[1, 2, 3]])
    code, _, err = run(
        ["samples", "--file", str(tmp_path / "s.jsonl"), "--model", str(tmp_path / "none")], capsys
    )
    assert code == 2 and "cannot load the causal LM" in err and len(err.strip().splitlines()) == 1
