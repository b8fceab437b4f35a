"""Feature extraction: audio files to log-mel Parquet shards.

:func:`plan_feature_batches` decides which tracks still need work (resuming an
interrupted run and skipping tracks already in the manifest with the same content
hash and settings); :func:`extract_shard` turns one batch into one shard. The
orchestrator maps the latter over batches on a Dask cluster and passes only
paths and small records around.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from infra.settings import FeatureSettings
from tasks.audio import content_sha1, decode
from tasks.errors import DecodeError
from tasks.shards import (
    append_quarantine,
    features_to_table,
    read_manifest,
    shard_records,
    write_manifest,
    write_table_atomic,
)
from tasks.spectrogram import log_mel


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


@dataclass(frozen=True)
class FeaturePlan:
    batches: tuple[FeatureBatch, ...]
    done_records: tuple[dict, ...]  # tracks already present, reused as they are
    n_skipped: int


def plan_feature_batches(
    tracks: pd.DataFrame, *, feature_dir: Path, settings: FeatureSettings
) -> FeaturePlan:
    """Split the tracks that still need features into batches of ``settings.files_per_task``.

    A track is done when a complete shard on disk holds it with the same settings
    hash (the manifest's records) or when a shard finished before an interruption
    holds it (found by reading the shards' id columns). Content changes are caught
    in :func:`extract_shard`, which always hashes the file it decodes.
    """
    feature_dir = Path(feature_dir)
    done: dict[str, dict] = {}
    manifest = read_manifest(feature_dir).to_pylist()
    for record in manifest:
        if record["settings_hash"] == settings.settings_hash and (feature_dir / record["shard"]).exists():
            done[record["track_id"]] = record
    in_manifest = {r["shard"] for r in manifest}
    for record in shard_records(feature_dir):
        if record["shard"] not in in_manifest and record["track_id"] not in done:
            done[record["track_id"]] = {**record, "settings_hash": settings.settings_hash, "duration_s": None, "sample_rate": None}
    wanted = set(tracks["track_id"])
    todo = tracks[~tracks["track_id"].isin(done)]
    batches = []
    size = settings.files_per_task
    for start in range(0, len(todo), size):
        chunk = todo.iloc[start : start + size]
        ids = tuple(chunk["track_id"].astype(str))
        digest = hashlib.sha1("\n".join(ids).encode() + settings.settings_hash.encode()).hexdigest()[:16]
        batches.append(FeatureBatch(shard=f"part-{digest}.parquet", track_ids=ids, paths=tuple(chunk["source_path"].astype(str))))
    kept = tuple(r for t, r in done.items() if t in wanted)
    return FeaturePlan(batches=tuple(batches), done_records=kept, n_skipped=len(kept))


def extract_shard(batch: FeatureBatch, *, feature_dir: Path, settings: FeatureSettings) -> ShardResult:
    """Decode, compute log-mel and write one shard; bad files become quarantine records.

    Returns the per-track manifest records. The shard is written atomically, so a
    batch killed midway leaves nothing behind and is simply redone.
    """
    start = time.perf_counter()
    mel_settings = settings.mel
    rows, records, quarantined = [], [], []
    for track_id, path in zip(batch.track_ids, batch.paths):
        try:
            sha1 = content_sha1(path)
            y = decode(path, sample_rate=mel_settings.sample_rate, min_seconds=settings.min_seconds)
            mel = log_mel(y, settings=mel_settings).numpy()
        except DecodeError as err:
            quarantined.append({"path": path, "stage": err.stage, "reason": err.reason, "track_id": track_id})
            continue
        rows.append((track_id, sha1, mel))
        records.append(
            {
                "track_id": track_id,
                "content_sha1": sha1,
                "shard": batch.shard,
                "n_frames": int(mel.shape[0]),
                "settings_hash": settings.settings_hash,
                "duration_s": float(len(y) / mel_settings.sample_rate),
                "sample_rate": int(mel_settings.sample_rate),
            }
        )
    shard = None
    if rows:
        table = features_to_table(rows, column=mel_settings.column, n_mels=mel_settings.n_mels)
        write_table_atomic(table, Path(feature_dir) / batch.shard)
        shard = batch.shard
    return ShardResult(shard=shard, records=records, quarantined=quarantined, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class FeatureSummary:
    feature_dir: str
    n_tracks: int  # tracks with features after this run
    n_extracted: int
    n_skipped: int
    n_quarantined: int  # in this run
    clips_per_s: float  # extracted clips per second of batch work, summed over workers


def finish_features(
    plan: FeaturePlan,
    results: list[ShardResult],
    *,
    feature_dir: Path,
    quarantine_path: Path,
    wall_seconds: float,
) -> FeatureSummary:
    """Write the manifest and the quarantine records of a feature run."""
    records = list(plan.done_records) + [r for result in results for r in result.records]
    quarantined = [q for result in results for q in result.quarantined]
    write_manifest(feature_dir, records)
    append_quarantine(quarantine_path, quarantined)
    n_extracted = sum(len(result.records) for result in results)
    return FeatureSummary(
        feature_dir=str(feature_dir),
        n_tracks=len({r["track_id"] for r in records}),
        n_extracted=n_extracted,
        n_skipped=plan.n_skipped,
        n_quarantined=len(quarantined),
        clips_per_s=n_extracted / wall_seconds if wall_seconds > 0 else 0.0,
    )


def annotate_tracks(tracks: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    """Add ``content_sha1``, ``duration_s`` and ``sample_rate`` from the manifest (null where absent)."""
    columns = ["track_id", "content_sha1", "duration_s", "sample_rate"]
    base = tracks.drop(columns=[c for c in columns[1:] if c in tracks.columns])
    return base.merge(manifest[columns], on="track_id", how="left")
