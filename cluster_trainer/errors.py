"""Errors a user can fix, each carrying the process exit code it maps to.

Every error the CLI prints is one line that says what is wrong and what to do.
Anything that is not a `ClusterTrainerError` is a bug or a training failure
and exits with `EXIT_FAILURE`.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
# A newer attempt of the same run took over; this process stopped without writing.
EXIT_SUPERSEDED = 3
# Reserved for "preempted, resume me" (sysexits' EX_TEMPFAIL): a supervisor
# should start the same command again.
EXIT_PREEMPTED = 75


class ClusterTrainerError(Exception):
    """A problem with the user's input or stored state; the message names the fix."""

    exit_code = EXIT_BAD_INPUT


class JobError(ClusterTrainerError):
    """The job file or its fields are wrong."""


class ConfigError(ClusterTrainerError):
    """A `--set key=value` override does not fit the job's config."""


class StorageError(ClusterTrainerError):
    """The storage URI cannot be used."""


class CheckpointError(ClusterTrainerError):
    """No usable committed checkpoint, or one that does not fit the job."""


class CheckpointWriteError(ClusterTrainerError):
    """The final checkpoint could not be written: the run's last state is not stored."""

    exit_code = EXIT_FAILURE


class StateMismatchError(CheckpointError):
    """The checkpoint was written by a different model or callback list."""


class RunError(ClusterTrainerError):
    """A run on Ray did not complete; `exit_code` is the last attempt's (1, 2, 3 or 75)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
