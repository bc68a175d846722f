"""Prepare a dataset ahead of training: download, tokenise, pack and cache it, then summarise.

    python data.py                                  # pystdlib: offline, a few seconds
    python data.py --dataset text8                  # downloads text8.zip once
    python data.py --dataset owt --num-proc 16      # OpenWebText, GPT-2 tokens (hours, ~18 GB)
    python data.py --dataset cifar10
    python data.py --dataset file:input.txt --seq-len 128
    python data.py --dataset hf:roneneldan/TinyStories --tokenizer gpt2

Bad input prints one line on stderr and exits with status 2.
"""

import sys

from md4_eqx.cli import field_flag, run_command, script_parser
from md4_eqx.data import dataset_help, load


def build_parser():
    parser = script_parser(__doc__)
    parser.add_argument("--dataset", default="pystdlib", help=dataset_help())
    parser.add_argument("--seq-len", **field_flag(int), help="window length (default: per dataset)")
    parser.add_argument("--cache-dir", help="default: $MD4_CACHE or ~/.cache/md4_eqx")
    parser.add_argument("--tokenizer", help="'bytes' or a Hugging Face tokenizer name / directory")
    parser.add_argument(
        "--num-proc", **field_flag(int), help="tokeniser processes (default: all cores)"
    )
    parser.add_argument(
        "--data-path", help="text8's zip, or the hub name / directory owt and cifar10 read"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def prepare(args) -> int:
    ds = load(
        args.dataset,
        seq_len=args.seq_len,
        cache_dir=args.cache_dir,
        tokenizer=args.tokenizer,
        num_proc=args.num_proc,
        progress=not args.no_progress,
        data_path=args.data_path,
    )
    splits = {name: ds.split(name) for name in ds.splits}
    tokenizer = ds.meta["tokenizer"].get("name", ds.meta["tokenizer"]["kind"])
    stored = sum(stream["tokens"] for stream in ds.meta["streams"].values())
    print(f"dataset  {ds.name}")
    print(f"cache    {ds.path}")
    print(f"vocab    {ds.vocab_size} ({tokenizer})")
    print(f"tokens   {stored:,} stored")
    print(f"seq_len  {ds.seq_len}" + (f" (images {ds.image_shape})" if ds.image_shape else ""))
    for name, split in splits.items():
        print(
            f"{name:<8} {split.num_examples:,} examples, {split.num_examples * ds.seq_len:,} tokens"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
