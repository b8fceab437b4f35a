"""The project's exceptions.

Every error a user can cause (a bad setting, an unreadable file, a malformed row)
is raised as a subclass of :class:`MirflowError`, with a message that names the
offending value and says what to do about it.
"""

from __future__ import annotations


class MirflowError(Exception):
    """Root of all mirflow errors."""


class ParameterError(MirflowError, ValueError):
    """A setting or argument is outside its valid range."""


class DecodeError(MirflowError):
    """An audio file could not be turned into a usable waveform.

    ``stage`` says which step failed (``read``, ``resample``, ``check``) so that
    quarantine records can be grouped by cause.
    """

    def __init__(self, path: str, stage: str, reason: str) -> None:
        super().__init__(f"{path}: {stage} failed: {reason}")
        self.path = path
        self.stage = stage
        self.reason = reason


class DatasetError(MirflowError):
    """A dataset on disk does not have the layout its adapter expects."""
