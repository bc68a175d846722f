"""Prepare a dataset ahead of training: download, tokenise, pack and cache it, then summarise.

    python data.py                                  # pystdlib: offline, a few seconds
    python data.py --dataset text8                  # downloads text8.zip once
    python data.py --dataset owt --num-proc 16      # OpenWebText, GPT-2 tokens (hours, ~18 GB)
    python data.py --dataset cifar10
    python data.py --dataset file:input.txt --seq-len 128
    python data.py --dataset hf:roneneldan/TinyStories --tokenizer gpt2

Bad input prints one line on stderr and exits with status 2.
"""

import argparse
import sys

from md4_eqx.data import DataError, dataset_help, load


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")  # one line, no usage block


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="pystdlib", help=dataset_help())
    parser.add_argument("--seq-len", type=_positive, help="window length (default: per dataset)")
    parser.add_argument("--cache-dir", help="default: $MD4_CACHE or ~/.cache/md4_eqx")
    parser.add_argument("--tokenizer", help="'bytes' or a Hugging Face tokenizer name / directory")
    parser.add_argument("--num-proc", type=_positive, help="tokeniser processes (default: all cores)")
    parser.add_argument("--data-path", help="text8's zip, or the hub name / directory owt and cifar10 read")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        ds = load(args.dataset, seq_len=args.seq_len, cache_dir=args.cache_dir,
                  tokenizer=args.tokenizer, num_proc=args.num_proc,
                  progress=not args.no_progress, data_path=args.data_path)
        splits = {name: ds.split(name) for name in ds.splits}
    except DataError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    tokenizer = ds.meta["tokenizer"].get("name", ds.meta["tokenizer"]["kind"])
    stored = sum(stream["tokens"] for stream in ds.meta["streams"].values())
    print(f"dataset  {ds.name}")
    print(f"cache    {ds.path}")
    print(f"vocab    {ds.vocab_size} ({tokenizer})")
    print(f"tokens   {stored:,} stored")
    print(f"seq_len  {ds.seq_len}" + (f" (images {ds.image_shape})" if ds.image_shape else ""))
    for name, split in splits.items():
        print(f"{name:<8} {split.num_examples:,} examples, {split.num_examples * ds.seq_len:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
