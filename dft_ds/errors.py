"""Errors that mean "the user's input is wrong", as opposed to a runtime failure.

Every entry point catches `UserError`, prints its message (which names the file, line or key and
what was expected) and exits with `EXIT_BAD_INPUT`, so a user never needs a traceback to learn
that a field is missing.
"""

EXIT_BAD_INPUT = 2
# Stopped on request (SIGUSR1/SIGTERM, e.g. Slurm preemption) after saving a checkpoint: run again to resume.
# 75 is EX_TEMPFAIL, "try again later".
EXIT_PREEMPTED = 75
# Stopped because the loss or the gradient was not finite (train.nonfinite=stop, or a bad gradient):
# the last checkpoint holds the last good state. Not retried by the Slurm template.
EXIT_NONFINITE = 3
# A training step ran out of (accelerator or host) memory; the message names the settings that shrink a step.
EXIT_OUT_OF_MEMORY = 4
# Writing a checkpoint failed (disk full, quota, permissions); `latest` still names the previous one.
# 74 is EX_IOERR.
EXIT_SAVE_FAILED = 74


class NonFiniteStop(Exception):
    """Training stopped on a non-finite loss or gradient; `save` says whether the current state is good."""

    def __init__(self, message: str, save: bool = True):
        super().__init__(message)
        self.save = save


class SaveFailed(Exception):
    """A checkpoint could not be written; the message names it and the checkpoint `latest` still names."""


class UserError(Exception):
    """Bad input or configuration: reported without a traceback, exit code 2."""


class ConfigError(UserError):
    """The run configuration (YAML file, overrides or their combination) is invalid."""


class DataError(UserError):
    """A data file or dataset does not have the expected shape or content."""


class ModelError(UserError):
    """The model or tokenizer cannot be used as configured."""


def report_exit_code(code: int, message: str) -> None:
    """Called by a training rank about to exit with `code` != 0: under torchrun, leave a note so
    that dft-launch can exit with the same code (torchrun turns every failure into 1).

    Writes torchelastic's error-file format to TORCHELASTIC_ERROR_FILE, which torchrun sets per rank;
    elsewhere (deepspeed, srun, a plain process) it does nothing: those pass exit codes on.
    `dft_ds.launch.torchrun_error_code` reads it back.
    """
    import json
    import os
    import time

    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or code == 0:
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time())), "exit_code": code}}}
    try:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
    except OSError:
        pass


def counted(n: int, word: str, plural: str | None = None) -> str:
    """'1 step', '3 steps': a count with its noun in agreement, for messages."""
    return f"{n} {word if n == 1 else (plural or word + 's')}"
