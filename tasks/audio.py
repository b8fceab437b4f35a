"""Audio decoding: any supported file to a mono float32 waveform at the model rate.

soundfile (libsndfile) reads mp3, wav, au, flac and ogg directly; formats it cannot
read (m4a/AAC, for example) fall back to audioread, which needs an ffmpeg or
GStreamer backend on the machine. Every failure is raised as a
:class:`~tasks.errors.DecodeError` whose ``stage`` says which step failed, so that the
caller can quarantine the file with a reason and go on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from tasks.errors import DecodeError, ParameterError

#: A waveform whose peak absolute value is below this is treated as digital silence.
SILENCE_PEAK = 1e-6


def decode(path: str | Path, *, sample_rate: int, min_seconds: float = 0.0) -> np.ndarray:
    """Read an audio file as a mono float32 waveform at ``sample_rate``.

    Parameters
    ----------
    path : str or Path
        Audio file (mp3, wav, au, flac, ogg; other formats through audioread).
    sample_rate : int > 0
        Rate of the returned waveform in Hz; the file is resampled with soxr (HQ)
        when its own rate differs.
    min_seconds : float >= 0
        Clips shorter than this (after resampling) are rejected.

    Returns
    -------
    y : np.ndarray [shape=(n,), dtype=float32]
        Mono waveform (channel mean), nominally in [-1, 1].

    Raises
    ------
    DecodeError
        ``stage="read"``: missing, unreadable or corrupt file.
        ``stage="resample"``: soxr failed.
        ``stage="check"``: no samples, shorter than ``min_seconds``, non-finite
        samples, or all silent (peak below 1e-6).
    """
    if sample_rate <= 0:
        # A programming error, not a bad file: fail loudly rather than quarantine.
        raise ParameterError(f"sample_rate must be a positive integer, got {sample_rate!r}")
    name = str(path)
    frames, file_rate = _read(Path(path))

    if frames.shape[0] == 0:
        raise DecodeError(name, "check", "file holds zero samples")
    y = frames.mean(axis=1, dtype=np.float32) if frames.shape[1] > 1 else frames[:, 0]
    y = np.ascontiguousarray(y, dtype=np.float32)

    # Check finiteness before resampling: soxr would smear one NaN over the whole clip.
    if not np.isfinite(y).all():
        bad = int(np.count_nonzero(~np.isfinite(y)))
        raise DecodeError(name, "check", f"{bad} non-finite samples (NaN or inf)")

    if file_rate != sample_rate:
        try:
            y = soxr.resample(y, file_rate, sample_rate, quality="HQ").astype(np.float32, copy=False)
        except Exception as exc:  # soxr raises plain RuntimeError/ValueError
            raise DecodeError(name, "resample", f"{file_rate} Hz -> {sample_rate} Hz: {exc}") from exc

    seconds = y.shape[0] / sample_rate
    if y.shape[0] == 0:
        raise DecodeError(name, "check", "zero samples after resampling")
    if seconds < min_seconds:
        raise DecodeError(name, "check", f"clip is {seconds:.3f} s, shorter than min_seconds={min_seconds}")
    peak = float(np.max(np.abs(y)))
    if peak < SILENCE_PEAK:
        raise DecodeError(name, "check", f"all silent (peak {peak:.3g} < {SILENCE_PEAK})")
    return y


def excerpt(path: str | Path, *, sample_rate: int, seconds: float) -> np.ndarray:
    """The first ``seconds`` of a file as :func:`decode` reads it ``[shape=(n,), dtype=float32]`` (an input example)."""
    y = decode(path, sample_rate=sample_rate)
    return y[: max(1, round(seconds * sample_rate))]


def audio_info(path: str | Path) -> dict:
    """Header information without decoding the samples.

    Returns
    -------
    info : dict
        ``duration_s`` (float, seconds), ``sample_rate`` (int, Hz), ``channels`` (int).

    Raises
    ------
    DecodeError
        ``stage="read"`` when neither soundfile nor audioread can open the file.
    """
    name = str(path)
    try:
        info = sf.info(name)
        return {
            "duration_s": float(info.frames) / info.samplerate,
            "sample_rate": int(info.samplerate),
            "channels": int(info.channels),
        }
    except Exception as sf_exc:
        try:
            import audioread

            with audioread.audio_open(name) as f:
                return {
                    "duration_s": float(f.duration),
                    "sample_rate": int(f.samplerate),
                    "channels": int(f.channels),
                }
        except Exception as ar_exc:
            raise DecodeError(name, "read", f"soundfile: {sf_exc}; audioread: {ar_exc!r}") from ar_exc


def _read(path: Path) -> tuple[np.ndarray, int]:
    """Return ``(frames [shape=(n, channels), float32], sample_rate)``."""
    name = str(path)
    if not path.is_file():
        raise DecodeError(name, "read", "no such file")
    if path.stat().st_size == 0:
        raise DecodeError(name, "read", "file is empty (0 bytes)")
    try:
        with sf.SoundFile(name) as handle:
            declared, rate = handle.frames, int(handle.samplerate)
            frames = handle.read(dtype="float32", always_2d=True)
    except Exception as sf_exc:
        try:
            return _read_audioread(name)
        except Exception as ar_exc:
            raise DecodeError(
                name, "read", f"soundfile: {sf_exc}; audioread fallback: {ar_exc!r}"
            ) from ar_exc
    _check_complete(path, frames.shape[0], declared)
    return frames, rate


# Decoders may round a stream's length to a frame of the codec; more missing than this
# (and at least a tenth of a second at 8 kHz) means the file was cut short.
TRUNCATION_TOLERANCE = 0.02


def _check_complete(path: Path, n_read: int, n_declared: int) -> None:
    """Raise for a file that holds less audio than its header declares.

    MP3 headers (Xing/Info) and libsndfile's count for compressed formats give the
    declared length; for WAV, libsndfile trims the count to the bytes present, so
    the RIFF ``data`` chunk size is compared with the file size instead.
    """
    missing = n_declared - n_read
    if n_declared > 0 and missing > max(800, TRUNCATION_TOLERANCE * n_declared):
        raise DecodeError(str(path), "check", f"truncated: {n_read} of {n_declared} declared frames decoded")
    if path.suffix.lower() in (".wav", ".wave"):
        declared_bytes, present_bytes = _riff_data_sizes(path)
        if declared_bytes is not None and declared_bytes > present_bytes + 1:
            raise DecodeError(str(path), "check",
                              f"truncated: WAV header declares {declared_bytes} data bytes, {present_bytes} present")


def _riff_data_sizes(path: Path) -> tuple[int | None, int]:
    """``(declared, present)`` byte sizes of a WAV file's ``data`` chunk; declared is None if not found."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        header = handle.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None, 0
        offset = 12
        while offset + 8 <= size:
            handle.seek(offset)
            chunk = handle.read(8)
            chunk_id, chunk_size = chunk[:4], int.from_bytes(chunk[4:8], "little")
            if chunk_id == b"data":
                # 0xFFFFFFFF marks a streamed WAV whose length was never written: not a truncation.
                declared = None if chunk_size in (0, 0xFFFFFFFF) else chunk_size
                return declared, size - offset - 8
            offset += 8 + chunk_size + (chunk_size & 1)
    return None, 0


def _read_audioread(name: str) -> tuple[np.ndarray, int]:
    """Fallback for formats libsndfile lacks (m4a/AAC); audioread yields int16 PCM."""
    import audioread  # imported lazily: only needed for the rare fallback

    with audioread.audio_open(name) as f:
        channels, rate = int(f.channels), int(f.samplerate)
        pcm = b"".join(f)
    if channels < 1:
        raise ValueError(f"audioread reports {channels} channels")
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    n = samples.shape[0] // channels
    return samples[: n * channels].reshape(n, channels), rate
