"""tasks.containers: Ogg pages and FLAC STREAMINFO, on valid files and on copies cut short."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from tasks.containers import decoded_cut, flac_total_frames, header_cut, ogg_cut, sniff_container

OGG_CODECS = [("VORBIS", 22050), ("OPUS", 48000)]


def _noisy_tone(sample_rate: int, seconds: float, channels: int, seed: int = 0) -> np.ndarray:
    """A tone with a little noise, so that the codecs fill several pages [shape=(n, channels)]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sample_rate * seconds)) / sample_rate
    y = 0.2 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([y * (0.5**c) for c in range(channels)], axis=1).astype(np.float32)


def _encoded(tmp_path, fmt: str, subtype: str, *, sample_rate: int, seconds: float, channels: int) -> bytes:
    path = tmp_path / f"{subtype.lower()}_{sample_rate}_{channels}.{fmt.lower()}"
    sf.write(path, _noisy_tone(sample_rate, seconds, channels), sample_rate, format=fmt, subtype=subtype)
    return path.read_bytes()


def _page_starts(data: bytes) -> list[int]:
    """Offsets of the pages of a valid Ogg file, by walking their headers."""
    starts, offset = [], 0
    while offset < len(data):
        assert data[offset : offset + 4] == b"OggS"
        n_segments = data[offset + 26]
        starts.append(offset)
        offset += 27 + n_segments + sum(data[offset + 27 : offset + 27 + n_segments])
    assert offset == len(data)
    return starts


def _ogg_cut(data: bytes) -> str | None:
    return ogg_cut(io.BytesIO(data), len(data))


@pytest.mark.parametrize(("subtype", "sample_rate"), OGG_CODECS, ids=[c[0].lower() for c in OGG_CODECS])
@pytest.mark.parametrize("channels", [1, 2])
def test_every_cut_of_an_ogg_file_is_found_and_the_whole_file_passes(tmp_path, subtype, sample_rate, channels):
    data = _encoded(tmp_path, "OGG", subtype, sample_rate=sample_rate, seconds=3.0, channels=channels)
    assert sniff_container(io.BytesIO(data)) == "ogg"
    assert _ogg_cut(data) is None
    starts = _page_starts(data)
    assert len(starts) >= 4  # identification, comments, then audio pages
    for start, end in zip(starts, starts[1:] + [len(data)]):
        # On the page boundary (the pages before are whole), inside the header, mid-page, one byte short.
        for cut in sorted({start, start + 2, start + 10, (start + end) // 2, end - 1} - {0}):
            reason = _ogg_cut(data[:cut])
            assert reason is not None, f"a cut at byte {cut} of {len(data)} passed"
    assert "end-of-stream" in _ogg_cut(data[: starts[-1]])
    assert "holds" in _ogg_cut(data[: (starts[-2] + starts[-1]) // 2])


def test_a_short_valid_ogg_file_passes_and_its_cut_does_not(tmp_path):
    for subtype, sample_rate in OGG_CODECS:
        data = _encoded(tmp_path, "OGG", subtype, sample_rate=sample_rate, seconds=0.05, channels=1)
        assert _ogg_cut(data) is None
        assert _ogg_cut(data[: len(data) * 2 // 3]) is not None


def test_chained_ogg_streams_are_checked_one_by_one(tmp_path):
    first = _encoded(tmp_path, "OGG", "VORBIS", sample_rate=22050, seconds=1.0, channels=1)
    second = _encoded(tmp_path, "OGG", "OPUS", sample_rate=16000, seconds=1.0, channels=2)
    assert _ogg_cut(first + second) is None
    assert _ogg_cut(first + first) is None  # a chain may reuse a serial number
    assert _ogg_cut(first + second[: _page_starts(second)[-1]]) is not None
    assert _ogg_cut(first + first[: _page_starts(first)[-1]]) is not None


def test_bytes_after_the_last_page_are_not_a_cut(tmp_path):
    data = _encoded(tmp_path, "OGG", "VORBIS", sample_rate=22050, seconds=1.0, channels=2)
    tag = b"TAG" + b"\0" * 125  # an ID3v1 tag, as some taggers append to any file
    assert _ogg_cut(data + tag) is None
    cut = data[: _page_starts(data)[-1]]
    assert _ogg_cut(cut + tag) is not None


def test_flac_streaminfo_total_and_unknown_total(tmp_path):
    data = _encoded(tmp_path, "FLAC", "PCM_16", sample_rate=44100, seconds=1.5, channels=2)
    assert sniff_container(io.BytesIO(data)) == "flac"
    assert flac_total_frames(io.BytesIO(data)) == int(44100 * 1.5)
    assert header_cut(io.BytesIO(data[:1000]), container="flac", size=1000) is None  # FLAC needs the decoded length
    # Any decoder (libsndfile, or ffmpeg through audioread) that stops one frame short is caught.
    assert decoded_cut(io.BytesIO(data), container="flac", n_decoded=66150) is None
    assert "declares 66150 frames, 66149 decoded" in decoded_cut(io.BytesIO(data), container="flac", n_decoded=66149)
    # STREAMINFO starts at byte 8; its total (the low 36 bits of bytes 10-17) may be 0: unknown.
    unknown = bytearray(data)
    unknown[18:26] = (int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)).to_bytes(8, "big")
    assert flac_total_frames(io.BytesIO(bytes(unknown))) is None
    assert decoded_cut(io.BytesIO(bytes(unknown)), container="flac", n_decoded=1000) is None
    # An ID3v2 tag before the marker (10-byte header, syncsafe size 0x81 = 129 bytes) is skipped.
    tagged = b"ID3\x04\x00\x00\x00\x00\x01\x01" + b"\0" * 129 + data
    assert sniff_container(io.BytesIO(tagged)) == "flac"
    assert flac_total_frames(io.BytesIO(tagged)) == int(44100 * 1.5)


def test_a_cut_wav_is_found_from_its_header_whatever_its_name(tmp_path):
    data = _encoded(tmp_path, "WAV", "PCM_16", sample_rate=8000, seconds=1.0, channels=1)
    assert header_cut(io.BytesIO(data), container="wav", size=len(data)) is None
    cut = data[: len(data) // 3]
    assert sniff_container(io.BytesIO(cut)) == "wav"
    assert "WAV header declares 16000 data bytes" in header_cut(io.BytesIO(cut), container="wav", size=len(cut))
