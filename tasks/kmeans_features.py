"""K-means features of a catalogue: log-mel shards in, one pooled vector per clip and timescale out.

Planning (:func:`plan_kmeans_features`) checks the settings against the log-mel
shards before any work: every timescale must be a column of them and the context
must fit the clips. Then an orchestrator maps :func:`fit_timescale_codebook` over the
timescales that have no codebook yet (one task each: sample windows of the training
split, whiten, K-means) and :func:`encode_batch` over batches of clips (one shard
each), and ends with :func:`finish_kmeans_features`.

Layout of ``features/<dataset>/kmeans-<hash>/``::

    codebooks/<column>.npz      one Codebook per timescale (no pickle)
    part-*.parquet              track_id, content_sha1, n_frames, one float32 vector per timescale
    _manifest.parquet           as for log-mel shards; settings_hash = the K-means settings' hash

Like the log-mel shards, a re-run encodes only clips whose log-mel features are new
or changed; the codebooks, once fitted, are kept (new clips are encoded with them).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from infra.settings import FeatureSettings, KMeansSettings
from tasks.errors import DatasetError, ParameterError
from tasks.features import peak_rss_mb
from tasks.kmeans import Codebook, encode_clip, fit_codebook, pooled_size, sample_windows
from tasks.shards import (
    tensor_bytes,
    read_features,
    read_manifest,
    remove_unreferenced,
    shard_records,
    tensor_field,
    write_feature_shard,
    write_manifest,
)

CODEBOOKS = "codebooks"
WINDOWS_PER_FIT_TRACK = 64  # windows drawn per clip when sampling: bounds the clips read to fit a codebook


@dataclass(frozen=True)
class EncodeBatch:
    shard: str
    track_ids: tuple[str, ...]


@dataclass(frozen=True)
class KMeansPlan:
    timescales: tuple[str, ...]
    to_fit: tuple[str, ...]  # timescales without a codebook on disk
    fit_track_ids: tuple[str, ...]  # training clips the codebooks are fitted on
    batches: tuple[EncodeBatch, ...]
    done_records: tuple[dict, ...]
    quarantined: tuple[dict, ...]  # clips too short for the context at some timescale
    n_skipped: int


@dataclass
class EncodeResult:
    shard: str | None
    records: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def codebook_path(kmeans_dir: Path, column: str) -> Path:
    return Path(kmeans_dir) / CODEBOOKS / f"{column}.npz"


def timescale_frames(features: FeatureSettings, *, n_samples: int) -> dict[str, int]:
    """Frames of every column of a clip of ``n_samples`` samples (resolutions and pyramid levels)."""
    from tasks.pyramids import pyramid_frames
    from tasks.spectrogram import n_frames

    frames = {r.column: n_frames(n_samples, hop_length=r.hop_length) for r in features.resolutions()}
    base = features.mel.column
    levels = pyramid_frames(frames[base], levels=features.pyramid_levels)
    for column in features.columns:
        if column.startswith(f"{base}_g") or column.startswith(f"{base}_l"):
            frames[column] = levels[int(column[len(base) + 2:])]
    return frames


def check_timescales(base_dir: Path, timescales: tuple[str, ...]) -> None:
    """Every timescale must be a column of the log-mel shards (a clear error, before any work)."""
    shards = sorted(Path(base_dir).glob("part-*.parquet"))
    if not shards:
        raise DatasetError(f"no log-mel shards in {base_dir}: run the feature flow first")
    present = [name for name in pq.read_schema(shards[0]).names if name.startswith("mel_")]
    missing = [t for t in timescales if t not in present]
    if missing:
        raise ParameterError(f"timescale(s) {missing} are not in the log-mel shards of {base_dir} "
                             f"(they hold {present}); extract features with the pyramid or windows that make them")


def plan_kmeans_features(tracks: pd.DataFrame, *, base_dir: Path, kmeans_dir: Path, features: FeatureSettings,
                         kmeans: KMeansSettings) -> KMeansPlan:
    """What a K-means feature run must do; raises ``ParameterError`` for settings that cannot work.

    ``tracks`` needs ``track_id`` and ``split`` (the codebooks are fitted on ``train``).
    Clips too short for ``kmeans.context`` frames at some timescale become quarantine
    records; when that is the median clip, the context is the problem and this raises.
    """
    timescales = tuple(kmeans.timescales) or tuple(features.columns)
    unknown = [t for t in timescales if t not in features.columns]
    if unknown:
        raise ParameterError(f"timescale(s) {unknown} are not made by the feature settings (columns {features.columns})")
    check_timescales(base_dir, timescales)
    base = read_manifest(base_dir).to_pandas().set_index("track_id")
    tracks = tracks[tracks["track_id"].isin(base.index)]
    if tracks.empty:
        raise DatasetError(f"none of the tracks has log-mel features in {base_dir}")
    short, quarantined = _too_short(base.loc[tracks["track_id"]], features=features, kmeans=kmeans,
                                    timescales=timescales)
    usable = tracks[~tracks["track_id"].isin(short)]
    train = usable.loc[usable["split"] == "train", "track_id"].astype(str).tolist()
    if len(train) < 2:
        raise DatasetError(f"{len(train)} usable clips in the train split: the codebooks need a training sample")
    rng = np.random.default_rng(kmeans.seed)
    n_fit = min(len(train), max(2, -(-kmeans.sample_windows // WINDOWS_PER_FIT_TRACK)))
    fit_ids = tuple(sorted(rng.choice(train, size=n_fit, replace=False).tolist()))
    to_fit = tuple(t for t in timescales if not codebook_path(kmeans_dir, t).exists())

    done = _done_records(kmeans_dir, base, kmeans)
    todo = usable[~usable["track_id"].isin(done)].copy()
    todo["base_shard"] = base.loc[todo["track_id"], "shard"].to_numpy()
    todo = todo.sort_values(["base_shard", "track_id"])  # a batch reads few log-mel shards
    batches = []
    size = kmeans.tracks_per_task
    for start in range(0, len(todo), size):
        ids = tuple(todo["track_id"].iloc[start : start + size].astype(str))
        digest = hashlib.sha1(("\n".join(ids) + kmeans.settings_hash).encode()).hexdigest()[:16]
        batches.append(EncodeBatch(shard=f"part-{digest}.parquet", track_ids=ids))
    return KMeansPlan(timescales=timescales, to_fit=to_fit, fit_track_ids=fit_ids, batches=tuple(batches),
                      done_records=tuple(done.values()), quarantined=tuple(quarantined), n_skipped=len(done))


def check_context(features: FeatureSettings, kmeans: KMeansSettings, *, seconds: float,
                  timescales: tuple[str, ...], what: str = "the median clip") -> None:
    """A context longer than a typical clip of ``seconds`` at some timescale is a bad setting: raise, saying where."""
    frames = timescale_frames(features, n_samples=round(seconds * features.mel.sample_rate))
    for t in timescales:
        if frames[t] < kmeans.context:
            raise ParameterError(f"context={kmeans.context} frames is longer than {what} ({seconds:.1f} s) at "
                                 f"timescale {t} ({frames[t]} frames): lower the context or drop that timescale")


def _too_short(base: pd.DataFrame, *, features: FeatureSettings, kmeans: KMeansSettings,
               timescales: tuple[str, ...]) -> tuple[set[str], list[dict]]:
    check_context(features, kmeans, seconds=float(np.median(base["duration_s"].to_numpy())), timescales=timescales)
    frames = {track_id: timescale_frames(features, n_samples=round(float(duration) * features.mel.sample_rate))
              for track_id, duration in zip(base.index, base["duration_s"])}
    short, records = set(), []
    for track_id, counts in frames.items():
        too_short = [t for t in timescales if counts[t] < kmeans.context]
        if too_short:
            short.add(track_id)
            records.append({"path": str(base.loc[track_id, "source_path"]), "stage": "kmeans", "track_id": track_id,
                            "reason": f"shorter than context={kmeans.context} frames at {', '.join(too_short)}"})
    return short, records


def _done_records(kmeans_dir: Path, base: pd.DataFrame, kmeans: KMeansSettings) -> dict[str, dict]:
    """Clips already encoded with these settings from the same log-mel features (manifest, or shards after a kill)."""
    kmeans_dir = Path(kmeans_dir)
    manifest = read_manifest(kmeans_dir).to_pylist()
    known = {r["track_id"]: r for r in manifest
             if r["settings_hash"] == kmeans.settings_hash and (kmeans_dir / r["shard"]).exists()}
    for record in shard_records(kmeans_dir, skip={r["shard"] for r in manifest}):
        known.setdefault(record["track_id"], record)
    done = {}
    for track_id, record in known.items():
        if track_id in base.index and record["content_sha1"] == base.loc[track_id, "content_sha1"]:
            done[track_id] = {**_manifest_record(base, track_id, record["shard"]), "settings_hash": kmeans.settings_hash}
    return done


def _manifest_record(base: pd.DataFrame, track_id: str, shard: str) -> dict:
    row = base.loc[track_id]
    return {"track_id": track_id, "content_sha1": row["content_sha1"], "shard": shard, "n_frames": int(row["n_frames"]),
            "duration_s": float(row["duration_s"]), "sample_rate": int(row["sample_rate"]),
            "source_path": row["source_path"], "source_size": row["source_size"],
            "source_mtime_ns": row["source_mtime_ns"]}


def fit_timescale_codebook(column: str, *, base_dir: Path, kmeans_dir: Path, fit_track_ids: tuple[str, ...],
                           kmeans: KMeansSettings, n_mels: int, device: str = "cpu") -> dict:
    """Fit and save one timescale's codebook from windows of the training clips; returns its summary."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(kmeans.seed)
    spectrograms = read_features(base_dir, column=column, track_ids=fit_track_ids)
    windows = sample_windows([spectrograms[t] for t in fit_track_ids], context=kmeans.context,
                             n_windows=kmeans.sample_windows, seed=kmeans.seed)
    # Each timescale gets its own stream, so that fitting one alone gives the same codebook.
    seed = int.from_bytes(hashlib.sha1(f"{kmeans.seed}/{column}".encode()).digest()[:4], "little")
    codebook = fit_codebook(windows, k=kmeans.k, context=kmeans.context, n_mels=n_mels, epsilon=kmeans.epsilon,
                            iterations=kmeans.iterations, batch_size=kmeans.batch_size, seed=seed,
                            kind=kmeans.codebook, device=device,
                            info={"column": column, "fit_tracks": len(fit_track_ids)})
    path = codebook.save(codebook_path(kmeans_dir, column))
    return {"column": column, "path": str(path), "seconds": time.perf_counter() - start, **codebook.info}


def encode_batch(batch: EncodeBatch, *, base_dir: Path, kmeans_dir: Path, timescales: tuple[str, ...],
                 kmeans: KMeansSettings) -> EncodeResult:
    """Encode and pool every timescale of a batch of clips; write one shard (atomically)."""
    start = time.perf_counter()
    base = read_manifest(base_dir).to_pandas().set_index("track_id")
    vectors: dict[str, list[np.ndarray]] = {}
    for column in timescales:
        codebook = Codebook.load(codebook_path(kmeans_dir, column))
        spectrograms = read_features(base_dir, column=column, track_ids=batch.track_ids)
        vectors[column] = [encode_clip(spectrograms[t], codebook, activation=kmeans.activation,
                                       threshold=kmeans.threshold, pooling=kmeans.pooling) for t in batch.track_ids]
    width = pooled_size(kmeans.k, kmeans.pooling)
    schema = pa.schema([pa.field("track_id", pa.string()), pa.field("content_sha1", pa.string()),
                        pa.field("n_frames", pa.int32()),
                        *(tensor_field(column, dtype="float32", inner_shape=()) for column in timescales)],
                       metadata={b"vector_size": str(width).encode()})
    table = pa.Table.from_arrays(
        [pa.array(batch.track_ids, pa.string()),
         pa.array([base.loc[t, "content_sha1"] for t in batch.track_ids], pa.string()),
         pa.array([int(base.loc[t, "n_frames"]) for t in batch.track_ids], pa.int32()),
         *(tensor_bytes(vectors[column], "float32") for column in timescales)], schema=schema)
    write_feature_shard(table, Path(kmeans_dir) / batch.shard)
    records = [{**_manifest_record(base, t, batch.shard), "settings_hash": kmeans.settings_hash}
               for t in batch.track_ids]
    return EncodeResult(shard=batch.shard, records=records, seconds=time.perf_counter() - start,
                        peak_rss_mb=peak_rss_mb())


@dataclass(frozen=True)
class KMeansSummary:
    feature_dir: str
    timescales: tuple[str, ...]
    n_tracks: int
    n_encoded: int
    n_skipped: int
    n_quarantined: int
    clips_per_s: float
    vector_size: int  # per timescale


def finish_kmeans_features(plan: KMeansPlan, results: list[EncodeResult], *, kmeans_dir: Path, kmeans: KMeansSettings,
                           wall_seconds: float) -> KMeansSummary:
    """Write the manifest and remove shards no longer referenced (call when no batch is still writing)."""
    records = list(plan.done_records) + [r for result in results for r in result.records]
    write_manifest(kmeans_dir, records)
    remove_unreferenced(kmeans_dir, keep={r["shard"] for r in records})
    n_encoded = sum(len(r.records) for r in results)
    return KMeansSummary(feature_dir=str(kmeans_dir), timescales=plan.timescales,
                         n_tracks=len({r["track_id"] for r in records}), n_encoded=n_encoded,
                         n_skipped=plan.n_skipped, n_quarantined=len(plan.quarantined),
                         clips_per_s=n_encoded / wall_seconds if wall_seconds > 0 else 0.0,
                         vector_size=pooled_size(kmeans.k, kmeans.pooling))


def read_kmeans_features(kmeans_dir: Path, *, timescales: tuple[str, ...] | list[str],
                         track_ids: list[str]) -> np.ndarray:
    """The multiscale vectors of ``track_ids``: the timescales' pooled vectors concatenated, in that order.

    Returns
    -------
    np.ndarray [shape=(len(track_ids), len(timescales) * vector_size), dtype=float32]
    """
    if not timescales:
        raise ParameterError("no timescale selected")
    shards = sorted(Path(kmeans_dir).glob("part-*.parquet"))
    present = set(pq.read_schema(shards[0]).names) if shards else set()
    missing = [t for t in timescales if t not in present]
    if missing:
        raise ParameterError(f"timescale(s) {missing} are not in the K-means features at {kmeans_dir}")
    parts = []
    for column in timescales:
        vectors = read_features(kmeans_dir, column=column, track_ids=track_ids)
        parts.append(np.stack([vectors[t] for t in track_ids]))
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)
