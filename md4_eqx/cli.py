"""What the scripts (train.py, sample.py, evaluate.py, data.py) share on the command line: a
parser whose errors are one line, a flag for every config field (`--section.field VALUE`, or
`--field` where the name is unique), the mesh and multi-process flags, and `run_command`.
"""

import argparse
import dataclasses
import enum
import sys

from jax.sharding import Mesh

from md4_eqx.config import AUTO, AUTO_FIELDS, PRESETS, Config, Impl, preset
from md4_eqx.distributed import initialize
from md4_eqx.errors import ConfigError, Md4Error, UsageError
from md4_eqx.kernels.attention import platform_of, resolve
from md4_eqx.parallel import make_mesh
from md4_eqx.targets import keep_jax_off_absent_tpus


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
    """command(parsed argv); an `Md4Error` (md4_eqx/errors.py) is one line on stderr, never a
    traceback, and its status (2: bad input, 1: a diverged run). A `ConfigError`'s field is shown
    as the program's flag for it, where it has one."""
    args = parser.parse_args(argv)
    keep_jax_off_absent_tpus()  # before JAX starts a backend: see its docstring
    try:
        return command(args)
    except Md4Error as e:
        flag = flag_of(parser, e.field) if isinstance(e, ConfigError) else None
        print(f"{parser.prog}: error: {flag + ': ' if flag else ''}{e}", file=sys.stderr)
        return e.status


def flag_of(parser: argparse.ArgumentParser, field: str) -> str | None:
    """The flag of `parser` (or of one of its subcommands) that sets the config field `field`,
    or None where the program has none (a field of a saved run's config that it does not set)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            flags = (flag_of(sub, field) for sub in action.choices.values())
            if flag := next((f for f in flags if f), None):
                return flag
        elif action.option_strings and action.dest.rpartition(".")[2] == field:
            return action.option_strings[-1]  # the short form, --field, where there is one
    return None


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
    """--preset, then the flags of every config field (`add_field_flags`)."""
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    add_field_flags(
        parser,
        [s.name for s in dataclasses.fields(Config)],
        "config fields (default: the preset's)",
    )


def add_field_flags(parser: argparse.ArgumentParser, sections: list[str], title: str) -> None:
    """--section.field for every field of the named sections of `Config`, plus --field where no
    earlier section (train first) took the name. Field defaults are left out, so `args` holds
    only what was given."""
    group = parser.add_argument_group(title)
    taken = set()
    for section in sorted(
        (s for s in dataclasses.fields(Config) if s.name in sections),
        key=lambda s: s.name != "train",
    ):
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


def add_execution_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every `ExecutionConfig` field, for the programs that run a saved model
    (sample.py, evaluate.py): how the network is computed may change from run to run."""
    add_field_flags(
        parser, ["execution"], "how the network runs (default: the run's, if it runs here)"
    )


def execution_here(config: Config, args: argparse.Namespace, mesh: Mesh) -> Config:
    """A saved run's `config` with the execution flags given, for the machine `mesh` is on.

    A checkpoint samples and evaluates anywhere: a saved attention kernel that does not run here
    (a run trained with `pallas` on a TPU, read on a CPU) gives way to the one `auto` picks here,
    said in one line on stderr. A kernel given with --attention is kept; `validate` refuses it
    where it cannot run."""
    execution = replace_given(config.execution, "execution", args)
    dtype, head_dim, platform = execution.precision.dtype, config.model.head_dim, platform_of(mesh)
    if "execution.attention" not in vars(args):
        try:
            resolve(execution.attention, dtype, head_dim, platform)
        except ConfigError as e:
            here = resolve(Impl.AUTO, dtype, head_dim, platform).impl
            print(
                f"the run's attention does not run here ({e}): using '{here.value}' "
                "(--attention chooses)",
                file=sys.stderr,
            )
            execution = dataclasses.replace(execution, attention=here)
    return dataclasses.replace(config, execution=execution)


def make_config(args: argparse.Namespace) -> tuple[Config, set[str]]:
    """The preset with the given fields replaced, and the names ("model.width") given."""
    base = preset(args.preset)
    sections = {
        s.name: replace_given(getattr(base, s.name), s.name, args)
        for s in dataclasses.fields(Config)
    }
    return Config(**sections), {name for name in vars(args) if "." in name}


def replace_given(value, section: str, args: argparse.Namespace):
    """`value`, the config section named `section`, with the fields given as flags replaced; an
    invalid value names its flag."""
    prefix = section + "."
    changes = {n.removeprefix(prefix): v for n, v in vars(args).items() if n.startswith(prefix)}
    try:
        return dataclasses.replace(value, **changes)
    except ConfigError as e:
        raise UsageError(f"--{section}.{e.field.replace('_', '-')}: {e}") from e


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
