"""The one family of errors a user sees: every program (`md4_eqx.cli.run_command`) catches
`Md4Error` alone and prints its message as one line on stderr, exit status `status` (2: bad
input, 1: a run that failed on its own). Anything else is a bug and keeps its traceback."""


class Md4Error(Exception):
    """Bad input, or a run that cannot go on; the message is one line meant for the user."""

    status = 2


class UsageError(Md4Error):
    """Bad command-line input (a flag's value, flags that do not go together)."""


class ConfigError(Md4Error):
    """An invalid config field: `field` names it ("width"), the message says why."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class MeshError(Md4Error):
    """A mesh that does not fit the devices, the model or the batch (the scripts name the flag)."""


class PlanError(Md4Error):
    """Bad input to the memory planner (a size that does not parse, a batch that fits no way)."""


class TargetError(Md4Error):
    """An unknown compile target, or one whose compiler is not installed."""


class DataError(Md4Error):
    """Bad input to the data pipeline (unknown dataset, missing file, bad value)."""


class CheckpointError(Md4Error):
    """A checkpoint that is missing, unreadable, corrupt or does not fit the run."""


class WorkdirError(Md4Error):
    """The workdir cannot be used: unwritable, too full, or another run's."""


class SamplingError(Md4Error):
    """A sampling request that cannot be met (template, block, length, guidance)."""


class ScoringError(Md4Error):
    """The scoring model of generative perplexity cannot be used as asked."""


class Diverged(Md4Error):
    """The run stopped after too many non-finite steps in a row: not bad input, a failed run."""

    status = 1


def first_line(e: BaseException) -> str:
    """The first line of `e`'s message (at most 300 characters), or its type's name if empty."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
