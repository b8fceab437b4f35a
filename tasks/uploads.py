"""Uploaded audio for the web service: limits checked from the header, then decoded as the shards are.

Nothing about an upload is trusted: not its name, not its extension, not its declared
type. Its size is checked first, then its header (the duration, before any sample is
decoded), then the decoding itself (:func:`tasks.audio.decode`, the function that
builds the shards) says whether it is audio at all. Every refusal is an
:class:`UploadError` with an HTTP status and a reason a person can read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import DecodeError, MirflowError
from tasks.audio import audio_info, decode


class UploadError(MirflowError):
    """An upload the service refuses: ``status`` (413 too large, 415 not audio, 422 unusable) and ``reason``."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_seconds: float = 600.0
    min_seconds: float = 1.0


def check_upload(path: Path, limits: UploadLimits) -> float:
    """The upload's duration in seconds from its header; raises :class:`UploadError` past a limit or for non-audio."""
    size = Path(path).stat().st_size
    if size == 0:
        raise UploadError(422, "the file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise UploadError(413, f"the file is {size / 2**20:.1f} MB; the limit is {limits.max_bytes / 2**20:.0f} MB")
    try:
        info = audio_info(path)
    except DecodeError:
        raise UploadError(415, "not an audio file this service can read (wav, mp3, au, flac, ogg)") from None
    if not np.isfinite(info["duration_s"]) or info["duration_s"] > limits.max_seconds:
        raise UploadError(413, f"the clip is {info['duration_s']:.0f} s long; the limit is {limits.max_seconds:.0f} s")
    return float(info["duration_s"])


def decode_upload(path: Path, *, sample_rate: int, limits: UploadLimits) -> np.ndarray:
    """Check, then decode an upload to a mono float32 waveform at ``sample_rate`` (the model's rate)."""
    check_upload(path, limits)
    try:
        y = decode(path, sample_rate=sample_rate, min_seconds=limits.min_seconds)
    except DecodeError as err:
        raise UploadError(422, f"the audio cannot be used: {err.reason}") from None
    seconds = len(y) / sample_rate
    if seconds > limits.max_seconds * 1.05:  # a header that under-states the length (e.g. a VBR MP3 without one)
        raise UploadError(413, f"the clip decodes to {seconds:.0f} s; the limit is {limits.max_seconds:.0f} s")
    return y
