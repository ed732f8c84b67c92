"""Errors that mean "the user's input is wrong", as opposed to a runtime failure.

Every entry point catches `UserError`, prints its message (which names the file, line or key and
what was expected) and exits with `EXIT_BAD_INPUT`, so a user never needs a traceback to learn
that a field is missing.
"""

EXIT_BAD_INPUT = 2
# Stopped on request (SIGUSR1/SIGTERM, e.g. Slurm preemption) after saving a checkpoint: run again to resume.
# 75 is EX_TEMPFAIL, "try again later".
EXIT_PREEMPTED = 75


class UserError(Exception):
    """Bad input or configuration: reported without a traceback, exit code 2."""


class ConfigError(UserError):
    """The run configuration (YAML file, overrides or their combination) is invalid."""


class DataError(UserError):
    """A data file or dataset does not have the expected shape or content."""


class ModelError(UserError):
    """The model or tokenizer cannot be used as configured."""
