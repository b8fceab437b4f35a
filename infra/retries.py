"""The retry policy for steps that touch shared storage: retry what a second try may not meet, nothing else."""

from __future__ import annotations

# Errors of the file system or the network that a second try may not meet; a missing
# file or a refused permission will be the same next time.
_PERMANENT_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)


def is_transient(error: BaseException | None) -> bool:
    """True for I/O errors worth retrying (a flaky disk or network), False for the rest."""
    return isinstance(error, OSError) and not isinstance(error, _PERMANENT_OS_ERRORS)


def retry_on_transient_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry a task only when it failed with a transient I/O error."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as exc:  # the task's own exception, re-raised by Prefect
            error = exc
    return is_transient(error)


#: Keyword arguments of ``@task`` for steps that read or write shared storage.
TRANSIENT_IO_RETRIES = {"retries": 2, "retry_delay_seconds": [1, 5], "retry_condition_fn": retry_on_transient_io}
