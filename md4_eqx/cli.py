"""What the scripts (train.py, sample.py, evaluate.py, data.py) share on the command line: a
parser whose errors are one line, a flag for every config field (`--section.field VALUE`, or
`--field` where the name is unique), the mesh and multi-process flags, and `run_command`.
"""

import argparse
import dataclasses
import enum
import sys

from jax.sharding import Mesh

from md4_eqx.config import AUTO, AUTO_FIELDS, PRESETS, Config, preset
from md4_eqx.distributed import initialize
from md4_eqx.errors import ConfigError, Md4Error, UsageError
from md4_eqx.parallel import make_mesh
from md4_eqx.targets import quiet_libtpu


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def script_parser(doc: str, **kwargs) -> ArgumentParser:
    """The parser of a script whose docstring is `doc`: its first line describes the script, the
    rest (the example commands) is shown under --help as written."""
    lines = doc.splitlines()
    return ArgumentParser(
        description=lines[0],
        epilog="\n".join(lines[2:]),
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        **kwargs,
    )


def run_command(parser: argparse.ArgumentParser, command, argv: list[str] | None) -> int:
    """command(parsed argv); an `Md4Error` (md4_eqx/errors.py) is one line on stderr, never a traceback,
    and its status (2: bad input, 1: a diverged run). A `ConfigError`'s field is shown as its flag."""
    args = parser.parse_args(argv)
    quiet_libtpu()  # before JAX starts a backend: the [tpu] extra on a host without TPUs is silent
    try:
        return command(args)
    except Md4Error as e:
        flag = f"--{e.field.replace('_', '-')}: " if isinstance(e, ConfigError) else ""
        print(f"{parser.prog}: error: {flag}{e}", file=sys.stderr)
        return e.status


def check_positive(args: argparse.Namespace, *names: str) -> None:
    """Each named option, when given, is at least 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {value}")


def field_flag(kind: type, auto: str | None = None) -> dict:
    """add_argument's `type` and `metavar` for a value of type `kind` (an Enum by value, bool as
    true/false); for a field that md4_eqx.plan can choose (`auto`: its name), the word `auto`
    gives AUTO and a number must be positive."""
    is_enum = issubclass(kind, enum.Enum)
    words = [m.value for m in kind] if is_enum else ["true", "false"] if kind is bool else None

    def parse(text: str):
        if auto and text == "auto":
            return AUTO
        if words:
            word = text.lower() if kind is bool else text
            if word not in words:
                raise argparse.ArgumentTypeError(
                    f"expected {', '.join(words[:-1])} or {words[-1]}; got {text!r}"
                )
            return word == "true" if kind is bool else kind(word)
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}; got {text!r}") from None
        if auto and value < 1:
            raise argparse.ArgumentTypeError(f"{auto}={value} must be positive (or auto)")
        return value

    metavar = (
        "{" + ",".join(words) + "}" if words else "{INT,auto}" if auto else kind.__name__.upper()
    )
    return {"type": parse, "metavar": metavar}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--preset, then --section.field for every field of every section, plus --field where no
    earlier section (train first) took the name. Field defaults are left out, so `args` holds
    only what was given."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    group = parser.add_argument_group("config fields (default: the preset's)")
    taken = set()
    for section in sorted(dataclasses.fields(Config), key=lambda s: s.name != "train"):
        for f in dataclasses.fields(section.type):
            flag = f.name.replace("_", "-")
            names = [f"--{section.name}.{flag}"] + ([f"--{flag}"] if flag not in taken else [])
            taken.add(flag)
            group.add_argument(
                *names,
                dest=f"{section.name}.{f.name}",
                default=argparse.SUPPRESS,
                **field_flag(
                    f.type, f.name if section.name == "train" and f.name in AUTO_FIELDS else None
                ),
            )


def make_config(args: argparse.Namespace) -> tuple[Config, set[str]]:
    """The preset with the given fields replaced, and the names ("model.width") given."""
    given = {name: value for name, value in vars(args).items() if "." in name}
    base = preset(args.preset)
    sections = {}
    for section in dataclasses.fields(Config):
        prefix = section.name + "."
        changes = {
            name.removeprefix(prefix): v for name, v in given.items() if name.startswith(prefix)
        }
        try:
            sections[section.name] = dataclasses.replace(getattr(base, section.name), **changes)
        except ConfigError as e:
            raise UsageError(f"--{section.name}.{e.field.replace('_', '-')}: {e}") from e
    return Config(**sections), set(given)


def parse_mesh(text: str | None, devices=None) -> Mesh:
    """--mesh `data=D,model=M` over all devices (or `devices`: a --target's); each part optional
    (data defaults to the rest)."""
    sizes = {}
    for part in text.split(",") if text else []:
        name, _, value = part.partition("=")
        if name not in ("data", "model") or not value.isdigit() or int(value) < 1 or name in sizes:
            raise UsageError(f"--mesh {text!r}: expected data=D,model=M with positive integers")
        sizes[name] = int(value)
    return make_mesh(sizes.get("data"), sizes.get("model", 1), devices)


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    multi = parser.add_argument_group("several processes")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    multi.add_argument("--distributed", action="store_true", help="let JAX detect the processes")


def start_processes(args: argparse.Namespace) -> None:
    """jax.distributed.initialize for a multi-process run (before any other JAX call)."""
    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if not 0 <= args.process_id < args.num_processes:
            raise UsageError(
                f"--process-id {args.process_id} must lie in [0, {args.num_processes})"
            )
        initialize(*explicit)
    elif args.distributed:
        initialize()
