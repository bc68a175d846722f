"""An OpenWebText-shaped dataset cache of random tokens, for a training run with no network.

    python bench/owt_cache.py CACHE_DIR [--tokens 4000000]
    python train.py --preset md4-s --cache-dir CACHE_DIR ...     # then reads it as `--dataset owt`

Writes the cache entry `md4_eqx.data.load("owt", cache_dir=CACHE_DIR)` looks up, in the format
`md4_eqx.data.prepare` writes (meta.json, all.bin as uint16, the 2% hold-out layout), so the
real loader, splits and batching run; only the tokenisation is skipped. The tokens are uniform
over GPT-2's 50257 ids with EOS (50256) every 1000 tokens or so; the speed of a training step
does not depend on them. A word-level tokenizer over 50257 made-up words is saved beside them
(GPT-2's own files need the network), so samples decode offline.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from md4_eqx.data.cache import FORMAT, EntryWriter, entry_dir, read_meta
from md4_eqx.data.sources import parse

VOCAB = 50257  # GPT-2's vocabulary; its EOS is the last id


def save_tokenizer(directory: Path) -> None:
    """A word-level tokenizer whose id i is the word `w{i}`, EOS the last."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<|endoftext|>": VOCAB - 1}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(directory)


def write(cache_dir: Path, num_tokens: int) -> Path:
    """The entry's directory, written unless it already exists."""
    source = parse("owt", tokenizer=None, data_path=None, cache_dir=cache_dir)
    parts = source.fingerprint()
    entry = entry_dir(cache_dir, source.name, parts)
    if read_meta(entry) is not None:
        return entry
    cache_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.min_scalar_type(VOCAB - 1)  # uint16, as prepare stores GPT-2's ids
    tokens = np.random.default_rng(0).integers(0, VOCAB - 1, num_tokens).astype(dtype)
    tokens[999::1000] = VOCAB - 1  # documents of ~1000 tokens, EOS after each
    with EntryWriter(entry) as writer:
        tokens.tofile(writer.tmp / "all.bin")
        save_tokenizer(writer.tmp / "tokenizer")
        writer.commit(
            {
                "format": FORMAT,
                "name": source.name,
                "fingerprint": parts,
                "tokenizer": {"kind": "hf", "name": source.tokenizer},
                "vocab_size": VOCAB,
                "eos_id": VOCAB - 1,
                "dtype": dtype.name,
                "image_shape": None,
                "num_classes": 0,
                "default_seq_len": source.default_seq_len,
                "streams": {"all": {"tokens": num_tokens, "labels": 0}},
                "splits": {name: vars(layout) for name, layout in source.layouts.items()},
            }
        )
    return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("cache_dir", type=Path)
    parser.add_argument(
        "--tokens", type=int, default=4_000_000, help="stream length (~3900 chunks of 1024)"
    )
    args = parser.parse_args(argv)
    if args.tokens < 100 * 1024:
        parser.exit(
            2, f"{parser.prog}: error: --tokens must be >= {100 * 1024} (two hold-out chunks)\n"
        )
    print(json.dumps({"entry": str(write(args.cache_dir, args.tokens))}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
