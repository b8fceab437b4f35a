"""Feature extraction: audio files to log-mel Parquet shards.

:func:`plan_feature_batches` decides which tracks still need work (resuming an
interrupted run and skipping tracks already in the manifest with the same content
hash and settings); :func:`extract_shard` turns one batch into one shard. The
orchestrator maps the latter over batches on a Dask cluster and passes only
paths and small records around.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import DecodeError
from core.settings import FeatureSettings
from tasks.audio import decode
from tasks.shards import (
    append_quarantine,
    audio_to_table,
    content_sha1,
    features_to_table,
    read_manifest,
    remove_unreferenced,
    shard_records,
    write_feature_shard,
    write_manifest,
)


@dataclass(frozen=True)
class FeatureBatch:
    """One unit of work: the tracks that go into one shard."""

    shard: str
    track_ids: tuple[str, ...]
    paths: tuple[str, ...]


@dataclass
class ShardResult:
    """What a batch produced; small enough to pass between tasks."""

    shard: str | None
    records: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0  # of the worker process, when the batch ended


@dataclass(frozen=True)
class FeaturePlan:
    batches: tuple[FeatureBatch, ...]
    done_records: tuple[dict, ...]  # tracks already present, reused as they are
    n_skipped: int


def source_fingerprint(path: str | Path) -> tuple[int, int] | None:
    """``(size, mtime_ns)`` of a source file, or None when it cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def _still_valid(record: dict, path: str) -> dict | None:
    """The record if its source file is unchanged, refreshed if only its stat changed, else None.

    Size and modification time are the cheap check; when they differ the file is
    hashed, and the features are kept only if the content hash is the same.
    """
    fingerprint = source_fingerprint(path)
    if fingerprint is None:
        return None
    if record.get("source_path") == path and (record.get("source_size"), record.get("source_mtime_ns")) == fingerprint:
        return record
    try:
        same = content_sha1(path) == record["content_sha1"]
    except OSError:
        return None
    if not same:
        return None
    return {**record, "source_path": path, "source_size": fingerprint[0], "source_mtime_ns": fingerprint[1]}


def plan_feature_batches(
    tracks: pd.DataFrame, *, feature_dir: Path, settings: FeatureSettings, audio_dir: Path | None = None
) -> FeaturePlan:
    """Split the tracks that still need features into batches of ``settings.files_per_task``.

    A track is done when a complete shard holds it with the same settings hash and
    its source file is unchanged (same size and mtime, or else the same content
    hash). Shards are found through the manifest and, after an interruption that
    came before the manifest was written, by reading the shards' id columns. With
    ``audio_dir``, a track also needs its raw-audio shard to count as done.
    """
    feature_dir = Path(feature_dir)
    known: dict[str, dict] = {}
    manifest = read_manifest(feature_dir).to_pylist()
    for record in manifest:
        if record["settings_hash"] == settings.settings_hash and (feature_dir / record["shard"]).exists():
            known[record["track_id"]] = record
    in_manifest = {r["shard"] for r in manifest}
    for record in shard_records(feature_dir, skip=in_manifest):
        if record["track_id"] in known:
            continue
        known[record["track_id"]] = {
            **record,
            "settings_hash": settings.settings_hash,
            "sample_rate": settings.mel.sample_rate,
        }
    done: dict[str, dict] = {}
    for track_id, path in zip(tracks["track_id"].astype(str), tracks["source_path"].astype(str)):
        if track_id in known and (record := _still_valid(known[track_id], path)) is not None:
            if audio_dir is None or (Path(audio_dir) / record["shard"]).exists():
                done[track_id] = record
    todo = tracks[~tracks["track_id"].astype(str).isin(done)]
    batches = []
    size = settings.files_per_task
    for start in range(0, len(todo), size):
        chunk = todo.iloc[start : start + size]
        ids = tuple(chunk["track_id"].astype(str))
        paths = tuple(chunk["source_path"].astype(str))
        digest = hashlib.sha1("\n".join(ids + paths).encode() + settings.settings_hash.encode()).hexdigest()[:16]
        batches.append(FeatureBatch(shard=f"part-{digest}.parquet", track_ids=ids, paths=paths))
    return FeaturePlan(batches=tuple(batches), done_records=tuple(done.values()), n_skipped=len(done))


def extract_shard(
    batch: FeatureBatch,
    *,
    feature_dir: Path,
    settings: FeatureSettings,
    audio_dir: Path | None = None,
    device: str | None = None,
) -> ShardResult:
    """Decode, compute every feature column and write one shard; bad files become quarantine records.

    With ``audio_dir`` the decoded waveforms are also written there as int16 PCM, in
    a shard of the same name. Shards are written atomically, so a batch killed
    midway leaves nothing behind and is simply redone. ``device`` runs the
    spectrograms there (``cuda`` on a GPU worker); decoding stays on the CPU.
    """
    start = time.perf_counter()
    sample_rate = settings.mel.sample_rate
    decoded, quarantined = [], []
    for track_id, path in zip(batch.track_ids, batch.paths):
        try:
            y = decode(path, sample_rate=sample_rate, min_seconds=settings.min_seconds)
            _check_long_enough(path, len(y), settings)
            sha1 = _hash_or_raise(path)
        except DecodeError as err:
            quarantined.append({"path": path, "stage": err.stage, "reason": err.reason, "track_id": track_id})
            continue
        fingerprint = source_fingerprint(path) or (-1, -1)
        source = {
            "source_path": path,
            "source_size": fingerprint[0],
            "source_mtime_ns": fingerprint[1],
            "duration_s": float(len(y) / sample_rate),
        }
        decoded.append((track_id, sha1, y, source))
    rows, records, audio_rows = [], [], []
    for (track_id, sha1, y, source), features in zip(
        decoded, _spectrograms([y for _, _, y, _ in decoded], settings=settings, device=device)
    ):
        rows.append((track_id, sha1, features, source))
        if audio_dir is not None:
            audio_rows.append((track_id, y))
        records.append(
            {
                "track_id": track_id,
                "content_sha1": sha1,
                "shard": batch.shard,
                "n_frames": int(features[settings.mel.column].shape[0]),
                "settings_hash": settings.settings_hash,
                "sample_rate": int(sample_rate),
                **source,
            }
        )
    shard = None
    if rows:
        if audio_rows:
            write_feature_shard(audio_to_table(audio_rows, sample_rate=sample_rate), Path(audio_dir) / batch.shard)
        write_feature_shard(features_to_table(rows, n_mels=settings.mel.n_mels), Path(feature_dir) / batch.shard)
        shard = batch.shard
    return ShardResult(
        shard=shard,
        records=records,
        quarantined=quarantined,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _spectrograms(
    waveforms: list[np.ndarray], *, settings: FeatureSettings, device: str | None
) -> Iterator[dict[str, np.ndarray]]:
    """Every feature column of each clip, as float16 numpy.

    On a GPU the shard's clips go through one zero-padded batch per resolution,
    which keeps it busy; on the CPU clip by clip is as fast (the arrays stay in
    cache) and holds one clip's float32 columns at a time. Both give the same
    values (tests/test_pyramids.py).
    """
    # torch is imported where spectrograms are computed (the workers), not where a run is
    # planned: the process of every deployment run would otherwise pay for it.
    import torch

    from tasks.spectrogram import feature_columns, feature_columns_batch

    # float16 on the device: half the transfer from a GPU, and torch converts faster than numpy.
    if device is not None and torch.device(device).type == "cuda":
        for columns in feature_columns_batch(waveforms, settings=settings, device=device):
            yield {name: values.to(torch.float16).cpu().numpy() for name, values in columns.items()}
    else:
        for y in waveforms:
            yield {
                name: values.to(torch.float16).numpy() for name, values in feature_columns(y, settings=settings).items()
            }


def _check_long_enough(path: str, n_samples: int, settings: FeatureSettings) -> None:
    """A clip must give the pyramid's top level at least two frames."""
    from tasks.pyramids import min_frames
    from tasks.spectrogram import n_frames

    if settings.pyramid == "none":
        return
    hop = settings.resolutions()[0].hop_length
    frames = n_frames(n_samples, hop_length=hop)
    needed = min_frames(levels=settings.pyramid_levels)
    if frames < needed:
        raise DecodeError(
            path,
            "check",
            f"{frames} frames at hop {hop} are too few for {settings.pyramid_levels} pyramid levels (needs {needed})",
        )


def _hash_or_raise(path: str) -> str:
    try:
        return content_sha1(path)
    except OSError as err:  # vanished or unreadable between decoding and hashing
        raise DecodeError(path, "read", f"cannot hash file: {err}") from err


@dataclass(frozen=True)
class FeatureSummary:
    feature_dir: str
    n_tracks: int  # tracks with features after this run
    n_extracted: int
    n_skipped: int
    n_quarantined: int  # in this run
    clips_per_s: float  # extracted clips per second of wall time
    peak_worker_rss_mb: float  # largest peak resident memory of a worker process


def finish_features(
    plan: FeaturePlan,
    results: list[ShardResult],
    *,
    feature_dir: Path,
    quarantine_path: Path,
    wall_seconds: float,
    audio_dir: Path | None = None,
) -> FeatureSummary:
    """Write the manifest and the quarantine records of a feature run, then tidy the folder.

    Call when no batch of the run is still writing: shards no longer referenced by
    the manifest (every track in them was redone) and temporary files left by
    killed workers are removed.
    """
    records = list(plan.done_records) + [r for result in results for r in result.records]
    quarantined = [q for result in results for q in result.quarantined]
    write_manifest(feature_dir, records)
    append_quarantine(quarantine_path, quarantined)
    shards = {r["shard"] for r in records}
    remove_unreferenced(feature_dir, keep=shards)
    if audio_dir is not None and Path(audio_dir).exists():
        remove_unreferenced(audio_dir, keep=shards)
    n_extracted = sum(len(result.records) for result in results)
    return FeatureSummary(
        feature_dir=str(feature_dir),
        n_tracks=len({r["track_id"] for r in records}),
        n_extracted=n_extracted,
        n_skipped=plan.n_skipped,
        n_quarantined=len(quarantined),
        clips_per_s=n_extracted / wall_seconds if wall_seconds > 0 else 0.0,
        peak_worker_rss_mb=max((result.peak_rss_mb for result in results), default=0.0),
    )


def annotate_tracks(tracks: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Add ``content_sha1``, ``duration_s`` and ``sample_rate`` from the manifest (null where absent)."""
    columns = ["track_id", "content_sha1", "duration_s", "sample_rate"]
    base = tracks.drop(columns=[c for c in columns[1:] if c in tracks.columns])
    return base.merge(manifest[columns], on="track_id", how="left")
