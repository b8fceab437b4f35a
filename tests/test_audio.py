"""tasks.audio on tiny files written in every supported format."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import soundfile as sf

from core.errors import DecodeError
from tasks.audio import audio_info, decode
from tasks.shards import content_sha1

FILE_SR = 22050
MODEL_SR = 16000
TONE_HZ = 440.0
SECONDS = 2.0

# (extension, soundfile format, subtype, tolerance on the decoded length)
FORMATS = [
    ("wav", "WAV", "PCM_16", 0.0),
    ("flac", "FLAC", "PCM_16", 0.0),
    ("ogg", "OGG", "VORBIS", 0.0),
    ("mp3", "MP3", "MPEG_LAYER_III", 0.02),  # encoder delay and padding
]


def _stereo_tone(seconds: float = SECONDS, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * FILE_SR)) / FILE_SR
    tone = amplitude * np.sin(2 * np.pi * TONE_HZ * t)
    return np.stack([tone, 0.5 * tone], axis=1).astype(np.float32)  # right channel quieter


def _peak_hz(y: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    return float(np.fft.rfftfreq(y.size, d=1.0 / sample_rate)[np.argmax(spectrum)])


@pytest.mark.parametrize(("ext", "fmt", "subtype", "length_tol"), FORMATS, ids=[f[0] for f in FORMATS])
def test_decode_formats(tmp_path, ext, fmt, subtype, length_tol):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, _stereo_tone(), FILE_SR, format=fmt, subtype=subtype)

    y = decode(path, sample_rate=MODEL_SR)

    assert y.dtype == np.float32 and y.ndim == 1
    expected_len = int(SECONDS * MODEL_SR)
    assert abs(y.size - expected_len) <= length_tol * expected_len
    assert abs(_peak_hz(y, MODEL_SR) - TONE_HZ) < 2.0
    # Mono is the channel mean: (0.5 + 0.25) / 2 peak amplitude, give or take the codec.
    assert np.max(np.abs(y)) == pytest.approx(0.375, rel=0.1)


def test_decode_same_rate_is_not_resampled(tmp_path):
    path = tmp_path / "tone.wav"
    stereo = _stereo_tone()
    sf.write(path, stereo, FILE_SR, subtype="FLOAT")
    y = decode(path, sample_rate=FILE_SR)
    np.testing.assert_array_equal(y, stereo.mean(axis=1))


def test_missing_file(tmp_path):
    with pytest.raises(DecodeError) as err:
        decode(tmp_path / "nope.wav", sample_rate=MODEL_SR)
    assert err.value.stage == "read"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.mp3"
    path.touch()
    with pytest.raises(DecodeError) as err:
        decode(path, sample_rate=MODEL_SR)
    assert err.value.stage == "read"
    assert err.value.path == str(path)


def test_garbage_mp3(tmp_path):
    path = tmp_path / "garbage.mp3"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError) as err:
        decode(path, sample_rate=MODEL_SR)
    assert err.value.stage == "read"


def test_zero_length_wav(tmp_path):
    path = tmp_path / "zero.wav"
    sf.write(path, np.zeros((0, 2), dtype=np.float32), FILE_SR)
    with pytest.raises(DecodeError, match="zero samples") as err:
        decode(path, sample_rate=MODEL_SR)
    assert err.value.stage == "check"


def test_silent_wav(tmp_path):
    path = tmp_path / "silent.wav"
    sf.write(path, np.zeros((FILE_SR, 2), dtype=np.float32), FILE_SR)
    with pytest.raises(DecodeError, match="silent") as err:
        decode(path, sample_rate=MODEL_SR)
    assert err.value.stage == "check"


def test_too_short(tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, _stereo_tone(seconds=0.5), FILE_SR)
    with pytest.raises(DecodeError, match="shorter than min_seconds") as err:
        decode(path, sample_rate=MODEL_SR, min_seconds=1.0)
    assert err.value.stage == "check"
    assert decode(path, sample_rate=MODEL_SR, min_seconds=0.4).size == MODEL_SR // 2


def test_nan_samples(tmp_path):
    path = tmp_path / "nan.wav"
    stereo = _stereo_tone()
    stereo[100, 0] = np.nan
    sf.write(path, stereo, FILE_SR, subtype="FLOAT")
    with pytest.raises(DecodeError, match="non-finite") as err:
        decode(path, sample_rate=MODEL_SR)
    assert err.value.stage == "check"


def test_audio_info_and_sha1(tmp_path):
    path = tmp_path / "tone.flac"
    sf.write(path, _stereo_tone(), FILE_SR, format="FLAC")
    info = audio_info(path)
    assert info == {"duration_s": pytest.approx(SECONDS), "sample_rate": FILE_SR, "channels": 2}
    assert content_sha1(path) == hashlib.sha1(path.read_bytes()).hexdigest()

    garbage = tmp_path / "garbage.mp3"
    garbage.write_bytes(b"\x00not audio" * 100)
    with pytest.raises(DecodeError) as err:
        audio_info(garbage)
    assert err.value.stage == "read"


# (name, soundfile format, subtype): every codec whose truncation must be caught
TRUNCATABLE = [
    ("wav", "WAV", "PCM_16"),
    ("mp3", "MP3", "MPEG_LAYER_III"),
    ("vorbis", "OGG", "VORBIS"),
    ("opus", "OGG", "OPUS"),
    ("flac", "FLAC", "PCM_16"),
]
# The share of the bytes kept. A cut near the end is caught wherever the container is exact;
# an MP3 is judged against its Xing header, with 2% of slack for the encoder's rounding.
CUTS = [
    pytest.param(fmt, subtype, kept, id=f"{name}-{label}")
    for name, fmt, subtype in TRUNCATABLE
    for label, kept in [("third", 1 / 3), ("half", 1 / 2), ("near-end", 0.99)]
    if not (name == "mp3" and label == "near-end")
]


@pytest.mark.parametrize(("fmt", "subtype", "kept"), CUTS)
def test_truncated_files_are_caught_at_check(tmp_path, fmt, subtype, kept):
    y = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 6) / 16000)).astype(np.float32)
    full = tmp_path / f"full.{fmt.lower()}"
    sf.write(full, y, 16000, format=fmt, subtype=subtype)
    assert len(decode(full, sample_rate=16000)) > 0.95 * len(y)  # the whole file passes
    cut = tmp_path / f"cut.{fmt.lower()}"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * kept)])
    with pytest.raises(DecodeError) as info:
        decode(cut, sample_rate=16000)
    assert info.value.stage == "check" and info.value.reason.startswith("truncated: ")


# (soundfile format, subtype, file rate, seconds, channels): valid files, short ones included
VALID = [
    ("OGG", "VORBIS", 8000, 0.3, 1),
    ("OGG", "VORBIS", 44100, 2.5, 2),
    ("OGG", "OPUS", 16000, 0.3, 2),
    ("OGG", "OPUS", 48000, 2.5, 1),
    ("FLAC", "PCM_16", 8000, 0.3, 2),
    ("FLAC", "PCM_24", 44100, 2.5, 1),
]


@pytest.mark.parametrize(
    ("fmt", "subtype", "rate", "seconds", "channels"),
    VALID,
    ids=[f"{v[1].lower()}-{v[2]}-{v[3]}s-{v[4]}ch" for v in VALID],
)
def test_valid_short_and_long_files_decode_to_their_whole_length(tmp_path, fmt, subtype, rate, seconds, channels):
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / f"tone.{fmt.lower()}"
    sf.write(path, np.stack([tone] * channels, axis=1), rate, format=fmt, subtype=subtype)
    assert len(decode(path, sample_rate=rate)) == t.size


def test_a_flac_of_unknown_length_is_not_called_truncated(tmp_path):
    path = tmp_path / "unknown.flac"
    rate = 22050
    sf.write(path, _stereo_tone(), rate, format="FLAC")
    data = bytearray(path.read_bytes())
    # STREAMINFO's total (the low 36 bits of bytes 18-25 of the file) may be 0: unknown, as a streaming encoder writes.
    data[18:26] = (int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))
    try:
        y = decode(path, sample_rate=rate)
    except DecodeError as err:  # libsndfile cannot read such a stream to its end; audioread (ffmpeg) can
        assert err.stage == "read" and "truncated" not in err.reason
    else:
        assert len(y) == int(SECONDS * FILE_SR)
