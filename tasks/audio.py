"""Audio decoding: any supported file to a mono float32 waveform at the model rate.

soundfile (libsndfile) reads mp3, wav, au, flac and ogg directly; formats it cannot
read (m4a/AAC, for example) fall back to audioread, which needs an ffmpeg or
GStreamer backend on the machine. Every failure is raised as a
:class:`~core.errors.DecodeError` whose ``stage`` says which step failed, so that the
caller can quarantine the file with a reason and go on. A file cut short is refused
at ``check`` whatever its codec (:mod:`tasks.containers` reads the evidence), rather
than passed on as a short clip.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from core.errors import DecodeError, ParameterError
from tasks.containers import decoded_cut, header_cut, sniff_container

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
        ``stage="check"``: truncated (the file holds less than its container
        declares: MP3, WAV, Ogg Vorbis and Opus, FLAC), no samples, shorter than
        ``min_seconds``, non-finite samples, or all silent (peak below 1e-6).
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
    """Return ``(frames [shape=(n, channels), float32], sample_rate)`` of a complete file.

    A file cut short raises at ``check``: its container headers are read before any
    sample is decoded (a WAV ``data`` chunk, Ogg pages), and the decoded length is
    compared with the declared one afterwards (MP3, FLAC).
    """
    name = str(path)
    if not path.is_file():
        raise DecodeError(name, "read", "no such file")
    size = path.stat().st_size
    if size == 0:
        raise DecodeError(name, "read", "file is empty (0 bytes)")
    with path.open("rb") as handle:
        container = sniff_container(handle)
        cut = header_cut(handle, container=container, size=size)
    if cut is not None:
        raise DecodeError(name, "check", f"truncated: {cut}")
    try:
        frames, rate, declared = _read_soundfile(name)
    except DecodeError:
        raise
    except Exception as sf_exc:
        try:
            frames, rate = _read_audioread(name)
        except DecodeError:
            raise
        except Exception as ar_exc:
            raise DecodeError(name, "read", f"soundfile: {sf_exc}; audioread fallback: {ar_exc!r}") from ar_exc
        declared = 0  # audioread declares no length of its own
    _check_complete(path, frames.shape[0], declared, container=container)
    return frames, rate


# Decoders may round a stream's length to a frame of the codec; more missing than this
# (and at least a tenth of a second at 8 kHz) means the file was cut short.
TRUNCATION_TOLERANCE = 0.02

# libsndfile's frame count for a stream of unknown length (a FLAC whose STREAMINFO says 0).
_UNKNOWN_FRAMES = 2**63 - 1

# Frames per read: a decoder that fails midway has then delivered what came before the failure.
_READ_BLOCK = 1 << 16


def _read_soundfile(name: str) -> tuple[np.ndarray, int, int]:
    """``(frames [shape=(n, channels), float32], sample_rate, declared frames or 0)`` through libsndfile.

    A decoder that fails before the declared length (FLAC: "lost sync" at the cut)
    means the stream was cut short, and raises at ``check``.
    """
    with sf.SoundFile(name) as handle:
        declared = handle.frames if 0 < handle.frames < _UNKNOWN_FRAMES else 0
        rate, channels = int(handle.samplerate), int(handle.channels)
        blocks = []
        while True:
            try:
                block = handle.read(_READ_BLOCK, dtype="float32", always_2d=True)
            except Exception as exc:
                if 0 < declared and sum(b.shape[0] for b in blocks) < declared:
                    raise DecodeError(
                        name, "check", f"truncated: the stream breaks off before its {declared} declared frames ({exc})"
                    ) from exc
                raise
            if block.shape[0] == 0:
                break
            blocks.append(block)
    frames = np.concatenate(blocks) if blocks else np.zeros((0, channels), dtype=np.float32)
    return frames, rate, declared


def _check_complete(path: Path, n_read: int, n_declared: int, *, container: str | None) -> None:
    """Raise for a file that decoded to less audio than its header declares.

    FLAC declares an exact total (:func:`~tasks.containers.decoded_cut`); for the
    others (MP3's Xing/Info header, libsndfile's count) a small shortfall is rounding.
    """
    with path.open("rb") as handle:
        cut = decoded_cut(handle, container=container, n_decoded=n_read)
    if cut is not None:
        raise DecodeError(str(path), "check", f"truncated: {cut}")
    missing = n_declared - n_read
    if n_declared > 0 and missing > max(800, TRUNCATION_TOLERANCE * n_declared):
        raise DecodeError(str(path), "check", f"truncated: {n_read} of {n_declared} declared frames decoded")


def _read_audioread(name: str) -> tuple[np.ndarray, int]:
    """Fallback for formats libsndfile lacks (m4a/AAC); audioread yields int16 PCM."""
    import audioread  # imported lazily: only needed for the rare fallback

    with audioread.audio_open(name) as f:
        channels, rate = int(f.channels), int(f.samplerate)
        pcm = b"".join(f)
    if channels < 1:
        raise DecodeError(name, "read", f"no audio stream (audioread reports {channels} channels): give an audio file")
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    n = samples.shape[0] // channels
    return samples[: n * channels].reshape(n, channels), rate
