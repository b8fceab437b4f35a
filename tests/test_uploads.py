"""Uploads: limits from the header, sniffing by decoding, and a decoder that hangs or crashes in its own process."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mirflow.web.decoding import DecoderPool
from tasks.uploads import UploadError, UploadLimits, check_upload, decode_upload

LIMITS = UploadLimits(max_bytes=2 * 2**20, max_seconds=60.0, min_seconds=1.0)


def _wav(path: Path, seconds: float, rate: int = 22050, *, value: float | None = None, subtype="PCM_16") -> Path:
    t = np.arange(int(seconds * rate)) / rate
    y = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    if value is not None:
        y[::100] = value
    sf.write(path, y, rate, subtype=subtype)
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _first_third(path: Path, fmt: str, subtype: str) -> Path:
    """A valid 4 s clip cut to its first third, as an interrupted upload leaves it."""
    sf.write(path, 0.3 * np.sin(np.arange(16000 * 4) / 5), 16000, format=fmt, subtype=subtype)
    return _bytes(path, path.read_bytes()[: path.stat().st_size // 3])


def test_a_good_clip_is_decoded_at_the_model_rate(tmp_path):
    y = decode_upload(_wav(tmp_path / "a.wav", 3.0), sample_rate=16000, limits=LIMITS)
    assert y.dtype == np.float32 and len(y) == 48000


@pytest.mark.parametrize(
    "make, status, reason",
    [
        (lambda d: _bytes(d / "empty.wav", b""), 422, "empty"),
        (lambda d: _bytes(d / "notes.mp3", b"just some text\n" * 50), 415, "not an audio file"),
        (lambda d: _wav(d / "short.wav", 0.1), 422, "shorter than"),
        (lambda d: _wav(d / "nan.wav", 2.0, value=np.nan, subtype="FLOAT"), 422, "non-finite"),
        (lambda d: _wav(d / "long.wav", 61.0, rate=8000), 413, "limit is 60 s"),
        (lambda d: _bytes(d / "big.wav", b"\0" * (3 * 2**20)), 413, "limit is 2 MB"),
        (lambda d: _first_third(d / "cut.ogg", "OGG", "OPUS"), 422, "truncated: the Ogg page"),
        (lambda d: _first_third(d / "cut.flac", "FLAC", "PCM_16"), 422, "truncated: the stream breaks off"),
    ],
)
def test_bad_uploads_get_a_status_and_a_reason(tmp_path, make, status, reason):
    path = make(tmp_path)
    with pytest.raises(UploadError, match=reason) as err:
        decode_upload(path, sample_rate=16000, limits=LIMITS)
    assert err.value.status == status


def test_a_zip_and_a_truncated_mp3_are_refused(tmp_path):
    archive = tmp_path / "clip.wav"  # the name lies: the content decides
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hello" * 100)
    with pytest.raises(UploadError) as err:
        check_upload(archive, LIMITS)
    assert err.value.status == 415
    mp3 = tmp_path / "full.mp3"
    sf.write(mp3, np.zeros(16000 * 3, np.float32) + 0.1 * np.sin(np.arange(48000) / 5), 16000, format="MP3")
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(mp3.read_bytes()[:200])
    with pytest.raises(UploadError) as err:
        decode_upload(cut, sample_rate=16000, limits=LIMITS)
    assert err.value.status in (415, 422)


def test_the_pool_returns_the_same_waveform_and_the_same_refusals(tmp_path):
    pool = DecoderPool(1)
    try:
        path = _wav(tmp_path / "a.wav", 2.0)
        for _ in range(2):  # the worker is reused
            assert np.array_equal(
                pool.decode(path, sample_rate=16000, limits=LIMITS),
                decode_upload(path, sample_rate=16000, limits=LIMITS),
            )
        with pytest.raises(UploadError, match="shorter than"):
            pool.decode(_wav(tmp_path / "s.wav", 0.2), sample_rate=16000, limits=LIMITS)
    finally:
        pool.close()


def fragile_decoder(connection) -> None:
    """The real worker loop, except that a file named hang* never returns and one named crash* kills it."""
    import os

    connection.send(("ready", os.getpid()))
    while True:
        path, sample_rate, limits = connection.recv()
        if Path(path).name.startswith("hang"):
            time.sleep(60)
        if Path(path).name.startswith("crash"):
            os._exit(3)
        connection.send(("ok", decode_upload(Path(path), sample_rate=sample_rate, limits=limits)))


@pytest.mark.parametrize("name, reason", [("hang.wav", "longer than 2 s"), ("crash.wav", "exit code 3")])
def test_a_decoder_that_hangs_or_crashes_costs_one_request(tmp_path, name, reason):
    pool = DecoderPool(1, timeout_s=2.0, target=fragile_decoder)
    try:
        start = time.perf_counter()
        with pytest.raises(UploadError, match=reason):
            pool.decode(_wav(tmp_path / name, 2.0), sample_rate=16000, limits=LIMITS)
        assert time.perf_counter() - start < 15
        good = pool.decode(_wav(tmp_path / "good.wav", 2.0), sample_rate=16000, limits=LIMITS)
        assert len(good) == 32000  # a fresh worker took the killed one's place
    finally:
        pool.close()


def test_a_header_that_understates_the_length_is_caught_after_decoding(tmp_path, monkeypatch):
    import tasks.uploads as uploads

    path = _wav(tmp_path / "long.wav", 8.0, rate=8000)
    monkeypatch.setattr(uploads, "audio_info", lambda p: {"duration_s": 2.0, "sample_rate": 8000, "channels": 1})
    with pytest.raises(UploadError, match="decodes to 8 s") as err:
        decode_upload(path, sample_rate=8000, limits=UploadLimits(max_seconds=5.0))
    assert err.value.status == 413


def test_a_request_that_finds_every_decoder_busy_gets_a_503(tmp_path):
    import threading

    pool = DecoderPool(1, timeout_s=3.0, wait_s=0.5, target=fragile_decoder)
    try:
        hung = threading.Thread(
            target=lambda: pytest.raises(
                UploadError, pool.decode, _wav(tmp_path / "hang.wav", 2.0), sample_rate=16000, limits=LIMITS
            )
        )
        hung.start()
        time.sleep(0.5)
        with pytest.raises(UploadError, match="busy") as err:
            pool.decode(_wav(tmp_path / "good.wav", 2.0), sample_rate=16000, limits=LIMITS)
        assert err.value.status == 503
        hung.join(20)
        assert len(pool.decode(tmp_path / "good.wav", sample_rate=16000, limits=LIMITS)) == 32000
    finally:
        pool.close()
    with pytest.raises(UploadError, match="shutting down"):
        pool.decode(tmp_path / "good.wav", sample_rate=16000, limits=LIMITS)


def test_the_catalogue_loads_in_the_background_and_a_failure_is_the_503_reason():
    from core.errors import DatasetError
    from mirflow.web.app import ApiError, Served

    def missing():
        raise DatasetError("no finished pipeline run")

    served = Served(None, missing, retry_s=60)
    deadline = time.monotonic() + 10
    while served._loading and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(ApiError, match="no models to serve yet: no finished pipeline run") as err:
        served.get()
    assert err.value.status == 503

    def slow():
        time.sleep(1.0)
        return "catalogue"

    served = Served(None, slow)
    with pytest.raises(ApiError, match="loading"):
        served.get()
    time.sleep(1.5)
    assert served.get() == "catalogue"


def never_ready(connection) -> None:
    """A worker stuck while starting (its imports hang): it never says it is ready."""
    time.sleep(60)


def dies_while_starting(connection) -> None:
    """A worker whose start fails (an import that crashes)."""
    import os

    os._exit(4)


@pytest.mark.parametrize("target", [never_ready, dies_while_starting])
def test_a_decoder_that_never_starts_is_a_503_and_its_start_is_not_the_decode_timeout(tmp_path, target):
    pool = DecoderPool(1, timeout_s=30.0, start_s=1.0, target=target)
    try:
        with pytest.raises(UploadError, match="did not start within 1 s") as refused:
            pool.decode(_wav(tmp_path / "a.wav", 1.0), sample_rate=16000, limits=LIMITS)
        assert refused.value.status == 503
    finally:
        pool.close()
