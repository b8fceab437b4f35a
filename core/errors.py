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


def settings_message(err) -> str:
    """A pydantic ``ValidationError`` as one line: each bad field, the rule it broke and the value given.

    ``"invalid settings (WorldSettings): n_tracks: Input should be greater than or equal to 16 (got 3)"``;
    several errors are joined by ``"; "``. pydantic's own text spans lines and ends in a URL.
    """
    parts = []
    for error in err.errors():
        where = ".".join(str(part) for part in error["loc"])
        rule = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value = error.get("input")
        given = f" (got {value!r})" if where and isinstance(value, (str, int, float, bool)) else ""
        parts.append(f"{where}: {rule}{given}" if where else rule)
    return f"invalid settings ({err.title}): " + "; ".join(parts)
