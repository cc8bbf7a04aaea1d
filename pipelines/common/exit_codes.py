"""The exit codes of every `pifuhd` command, one meaning each (the README lists them)."""

OK = 0
INTERNAL = 1  # an unexpected error, a bug: its traceback (credentials redacted) is on stderr
USAGE = 2  # bad arguments or option values: nothing was done
INPUTS_FAILED = 3  # the job ran to the end, but some inputs failed and --fail-on-error was given
UNUSABLE = 4  # something the command itself needs (a checkpoint, a dataset, an input list) is missing or unusable
CLUSTER = 5  # the Ray cluster could not be reached, or a submitted job failed on it
TERMINATED = 128 + 15  # stopped by SIGTERM (or a submitted job stopped), the shell's convention
INTERRUPTED = 128 + 2  # stopped by SIGINT (Ctrl-C), after writing the rows received so far


class UsageError(Exception):
    """A command-line value its config rejected; reported in one line (exit USAGE) before any work."""


def build_config(factory, **fields):
    """`factory(**fields)`, its ValueError (the config's own validation) turned into a UsageError."""
    try:
        return factory(**fields)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
