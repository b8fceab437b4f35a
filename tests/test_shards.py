"""Feature shards: round trip, atomic writes, manifest, quarantine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from core.errors import DatasetError
from core.settings import FeatureSettings, MelSettings
from tasks.features import extract_shard, finish_features, plan_feature_batches
from tasks.shards import (
    append_quarantine,
    features_to_table,
    read_features,
    read_manifest,
    table_to_features,
    write_manifest,
    write_table_atomic,
)

SOURCE = {"source_path": "/x.wav", "source_size": 1, "source_mtime_ns": 2, "duration_s": 1.0}


def _mels(rng: np.random.Generator, lengths: list[int], n_mels: int = 16) -> list[np.ndarray]:
    return [rng.standard_normal((n, n_mels)).astype(np.float32) for n in lengths]


def test_shard_round_trip_keeps_shapes_and_float16_values(tmp_path):
    rng = np.random.default_rng(0)
    mels = _mels(rng, [5, 17, 1])
    table = features_to_table([(f"t{i}", "sha", {"mel_1024": m}, SOURCE) for i, m in enumerate(mels)], n_mels=16)
    path = write_table_atomic(table, tmp_path / "part-0.parquet")
    back = table_to_features(pq.read_table(path), column="mel_1024")
    assert list(back) == ["t0", "t1", "t2"]
    for i, m in enumerate(mels):
        assert back[f"t{i}"].dtype == np.float16
        np.testing.assert_array_equal(back[f"t{i}"], m.astype(np.float16))
    assert pq.read_schema(path).field("mel_1024").metadata == {b"dtype": b"float16", b"shape": b"n,16"}
    assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"


def test_several_resolutions_share_a_row_with_their_own_frame_counts(tmp_path):
    rng = np.random.default_rng(2)
    rows = [
        (
            f"t{i}",
            "sha",
            {"mel_1024": rng.standard_normal((n, 16)), "mel_8192": rng.standard_normal((n // 8 + 1, 16))},
            SOURCE,
        )
        for i, n in enumerate([40, 17])
    ]
    path = write_table_atomic(features_to_table(rows, n_mels=16), tmp_path / "part-0.parquet")
    assert pq.read_table(path, columns=["n_frames"]).column(0).to_pylist() == [40, 17]
    coarse = table_to_features(pq.read_table(path, columns=["track_id", "mel_8192"]), column="mel_8192")
    assert coarse["t0"].shape == (6, 16) and coarse["t1"].shape == (3, 16)


def test_wrong_mel_width_is_refused():
    with pytest.raises(ValueError, match="expected"):
        features_to_table([("t", "sha", {"mel_1024": np.zeros((3, 8))}, SOURCE)], n_mels=16)


def test_atomic_write_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    import pyarrow as pa

    def write_half_then_die(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1 half a shard")
        raise OSError("worker killed")

    monkeypatch.setattr(pq, "write_table", write_half_then_die)
    with pytest.raises(OSError, match="worker killed"):
        write_table_atomic(pa.table({"a": [1]}), tmp_path / "part-0.parquet")
    assert list(tmp_path.iterdir()) == []


def test_read_features_by_track_id_opens_only_what_is_asked(tmp_path):
    rng = np.random.default_rng(1)
    for shard, ids in (("part-a.parquet", ["a", "b"]), ("part-b.parquet", ["c"])):
        table = features_to_table(
            [(t, "sha", {"mel_1024": m}, SOURCE) for t, m in zip(ids, _mels(rng, [4] * len(ids)))], n_mels=16
        )
        write_table_atomic(table, tmp_path / shard)
    write_manifest(
        tmp_path,
        [
            {
                "track_id": t,
                "content_sha1": "sha",
                "shard": s,
                "n_frames": 4,
                "settings_hash": "h",
                "duration_s": 1.0,
                "sample_rate": 16000,
            }
            for s, ids in (("part-a.parquet", ["a", "b"]), ("part-b.parquet", ["c"]))
            for t in ids
        ],
    )
    assert set(read_features(tmp_path, column="mel_1024", track_ids=["c"])) == {"c"}
    assert set(read_features(tmp_path, column="mel_1024")) == {"a", "b", "c"}
    with pytest.raises(DatasetError, match="no features"):
        read_features(tmp_path, column="mel_1024", track_ids=["zzz"])


def test_quarantine_appends_and_keeps_earlier_records(tmp_path):
    path = tmp_path / "q.parquet"
    assert append_quarantine(path, [{"path": "a.mp3", "stage": "read", "reason": "corrupt"}]) == 1
    assert (
        append_quarantine(
            path,
            [
                {"path": "a.mp3", "stage": "read", "reason": "corrupt"},
                {"path": "b.mp3", "stage": "check", "reason": "silent"},
            ],
        )
        == 2
    )
    assert sorted(pq.read_table(path).column("path").to_pylist()) == ["a.mp3", "b.mp3"]


def _tone_files(tmp_path, n: int) -> pd.DataFrame:
    import soundfile as sf

    paths = []
    for i in range(n):
        t = np.arange(16000 * 2) / 16000
        path = tmp_path / f"tone{i}.wav"
        sf.write(path, 0.3 * np.sin(2 * np.pi * (200 + 100 * i) * t), 16000)
        paths.append(str(path))
    return pd.DataFrame({"track_id": [f"t{i}" for i in range(n)], "source_path": paths})


def test_extract_plan_and_resume_skip_finished_tracks(tmp_path):
    settings = FeatureSettings(mel=MelSettings(n_mels=32), files_per_task=2)
    tracks = _tone_files(tmp_path, 5)
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"not audio at all")
    tracks = pd.concat([tracks, pd.DataFrame({"track_id": ["bad"], "source_path": [str(bad)]})], ignore_index=True)
    out = tmp_path / "features"

    plan = plan_feature_batches(tracks, feature_dir=out, settings=settings)
    assert [len(b.track_ids) for b in plan.batches] == [2, 2, 2] and plan.n_skipped == 0
    # Only the first batch finishes before an "interruption": no manifest yet.
    first = extract_shard(plan.batches[0], feature_dir=out, settings=settings)
    assert first.shard is not None and len(first.records) == 2
    resumed = plan_feature_batches(tracks, feature_dir=out, settings=settings)
    assert resumed.n_skipped == 2 and sum(len(b.track_ids) for b in resumed.batches) == 4

    results = [extract_shard(b, feature_dir=out, settings=settings) for b in resumed.batches]
    summary = finish_features(
        resumed, results, feature_dir=out, quarantine_path=tmp_path / "q.parquet", wall_seconds=1.0
    )
    assert (summary.n_tracks, summary.n_extracted, summary.n_skipped, summary.n_quarantined) == (5, 3, 2, 1)
    manifest = read_manifest(out).to_pandas()
    assert sorted(manifest["track_id"]) == ["t0", "t1", "t2", "t3", "t4"]
    assert (manifest["settings_hash"] == settings.settings_hash).all()
    quarantine = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert quarantine[0]["path"] == str(bad) and quarantine[0]["stage"] == "read"
    features = read_features(out, column="mel_1024")
    assert features["t0"].shape == (1 + 32000 // 512, 32)
    # A complete run leaves nothing to do.
    assert plan_feature_batches(tracks.iloc[:5], feature_dir=out, settings=settings).batches == ()


def test_other_feature_settings_redo_the_work(tmp_path):
    tracks = _tone_files(tmp_path, 2)
    out = tmp_path / "features"
    settings = FeatureSettings(mel=MelSettings(n_mels=32))
    plan = plan_feature_batches(tracks, feature_dir=out, settings=settings)
    results = [extract_shard(b, feature_dir=out, settings=settings) for b in plan.batches]
    finish_features(plan, results, feature_dir=out, quarantine_path=tmp_path / "q.parquet", wall_seconds=1.0)
    other = FeatureSettings(mel=MelSettings(n_mels=40))
    assert other.settings_hash != settings.settings_hash
    assert plan_feature_batches(tracks, feature_dir=out, settings=other).n_skipped == 0


def _run(tracks, out, settings, tmp_path):
    plan = plan_feature_batches(tracks, feature_dir=out, settings=settings)
    results = [extract_shard(b, feature_dir=out, settings=settings) for b in plan.batches]
    return finish_features(plan, results, feature_dir=out, quarantine_path=tmp_path / "q.parquet", wall_seconds=1.0)


def test_changed_files_are_redone_and_touched_copies_are_not(tmp_path):
    import os

    import soundfile as sf

    settings = FeatureSettings(mel=MelSettings(n_mels=32))
    tracks = _tone_files(tmp_path, 3)
    out = tmp_path / "features"
    assert _run(tracks, out, settings, tmp_path).n_extracted == 3
    # t0: new content; t1: same bytes, new mtime (a copy); t2 untouched.
    sf.write(tracks.source_path[0], 0.1 * np.ones(32000), 16000)
    os.utime(tracks.source_path[1], ns=(1, 1))
    summary = _run(tracks, out, settings, tmp_path)
    assert (summary.n_extracted, summary.n_skipped) == (1, 2)
    manifest = read_manifest(out).to_pandas().set_index("track_id")
    assert manifest.loc["t1", "source_mtime_ns"] == 1
    assert len(manifest) == 3 and manifest["duration_s"].notna().all()


def test_missing_file_is_quarantined_not_fatal(tmp_path):
    settings = FeatureSettings(mel=MelSettings(n_mels=32))
    tracks = _tone_files(tmp_path, 2)
    tracks.loc[1, "source_path"] = str(tmp_path / "gone.mp3")
    summary = _run(tracks, tmp_path / "features", settings, tmp_path)
    assert (summary.n_extracted, summary.n_quarantined) == (1, 1)
    record = pq.read_table(tmp_path / "q.parquet").to_pylist()[0]
    assert record["path"].endswith("gone.mp3") and record["stage"] == "read"


def test_truncated_ogg_and_flac_files_are_quarantined_with_stage_and_reason(tmp_path):
    import soundfile as sf

    settings = FeatureSettings(mel=MelSettings(n_mels=32))
    tracks = _tone_files(tmp_path, 1)
    y = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16000 * 3) / 16000)
    codecs = [("vorbis.ogg", "OGG", "VORBIS"), ("opus.ogg", "OGG", "OPUS"), ("cut.flac", "FLAC", "PCM_16")]
    for name, fmt, subtype in codecs:
        path = tmp_path / name
        sf.write(path, y, 16000, format=fmt, subtype=subtype)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # the first third, as a broken download
        tracks.loc[len(tracks)] = [name, str(path)]
    summary = _run(tracks, tmp_path / "features", settings, tmp_path)
    assert (summary.n_extracted, summary.n_quarantined) == (1, 3)
    records = {Path(q["path"]).name: q for q in pq.read_table(tmp_path / "q.parquet").to_pylist()}
    assert sorted(records) == ["cut.flac", "opus.ogg", "vorbis.ogg"]
    for record in records.values():
        assert record["stage"] == "check" and record["reason"].startswith("truncated: ")
    assert "Ogg page" in records["vorbis.ogg"]["reason"] and "Ogg page" in records["opus.ogg"]["reason"]
    assert "48000 declared frames" in records["cut.flac"]["reason"]


def test_resume_from_orphan_shard_keeps_metadata(tmp_path):
    settings = FeatureSettings(mel=MelSettings(n_mels=32), files_per_task=1)
    tracks = _tone_files(tmp_path, 2)
    out = tmp_path / "features"
    plan = plan_feature_batches(tracks, feature_dir=out, settings=settings)
    extract_shard(plan.batches[0], feature_dir=out, settings=settings)  # then the run dies
    summary = _run(tracks, out, settings, tmp_path)
    assert (summary.n_extracted, summary.n_skipped) == (1, 1)
    manifest = read_manifest(out).to_pandas()
    assert manifest["duration_s"].tolist() == [2.0, 2.0] and (manifest["sample_rate"] == 16000).all()


def test_clip_too_short_for_the_pyramid_is_quarantined(tmp_path):
    settings = FeatureSettings(
        mel=MelSettings(n_mels=32), extra_windows=(), pyramid="gaussian", pyramid_levels=8, min_seconds=0.5
    )
    tracks = _tone_files(tmp_path, 2)  # 2 s: 63 frames, too few for 8 levels (129)
    summary = _run(tracks, tmp_path / "features", settings, tmp_path)
    assert (summary.n_extracted, summary.n_quarantined) == (0, 2)
    record = pq.read_table(tmp_path / "q.parquet").to_pylist()[0]
    assert record["stage"] == "check" and "pyramid levels" in record["reason"]
