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

from core import storage
from core.errors import DatasetError, ParameterError
from core.settings import FeatureSettings, KMeansSettings
from tasks.features import peak_rss_mb
from tasks.kmeans import (
    Codebook,
    encode_clip,
    fit_codebook,
    pooled_size,
    sample_windows,
)
from tasks.shards import (
    content_sha1,
    read_features,
    read_manifest,
    remove_unreferenced,
    shard_records,
    tensor_bytes,
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
    """The checked settings and the codebook work; :func:`plan_encoding` adds the clips once codebooks exist."""

    timescales: tuple[str, ...]
    to_fit: tuple[str, ...]  # timescales whose codebook is missing or was fitted on clips no longer fit for it
    fit_track_ids: tuple[str, ...]  # training clips the codebooks are fitted on
    usable_track_ids: tuple[str, ...]  # clips long enough at every timescale
    quarantined: tuple[dict, ...]  # clips too short for the context at some timescale


@dataclass(frozen=True)
class EncodePlan:
    encoding_hash: str  # the K-means settings and the codebooks' content: what a manifest record must match
    batches: tuple[EncodeBatch, ...]
    done_records: tuple[dict, ...]
    n_skipped: int


@dataclass
class EncodeResult:
    shard: str | None
    records: list[dict] = field(default_factory=list)
    quarantined: list[dict] = field(default_factory=list)
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
            frames[column] = levels[int(column[len(base) + 2 :])]
    return frames


def kmeans_device(kmeans: KMeansSettings, cluster_device: str | None) -> str:
    """Where K-means and the encoding run: ``cuda`` when asked (or ``auto``) and the workers have a GPU.

    ``cluster_device`` is what the cluster's workers offer (``cuda`` or None).
    """
    if kmeans.device == "cuda" and cluster_device != "cuda":
        raise ParameterError(
            "kmeans device 'cuda' was asked for, but the cluster's workers have no GPU: "
            "run on a cluster of kind 'cuda' (workers with a GPU), or set the K-means device to 'auto' or 'cpu'"
        )
    return "cuda" if kmeans.device != "cpu" and cluster_device == "cuda" else "cpu"


def check_timescales(base_dir: Path, timescales: tuple[str, ...]) -> None:
    """Every timescale must be a column of the log-mel shards (a clear error, before any work)."""
    shards = sorted(Path(base_dir).glob("part-*.parquet"))
    if not shards:
        raise DatasetError(f"no log-mel shards in {base_dir}: run the feature flow first")
    present = [name for name in storage.parquet_schema(shards[0]).names if name.startswith("mel_")]
    missing = [t for t in timescales if t not in present]
    if missing:
        raise ParameterError(
            f"timescale(s) {missing} are not in the log-mel shards of {base_dir} "
            f"(they hold {present}); extract features with the pyramid or windows that make them"
        )


def plan_kmeans_features(
    tracks: pd.DataFrame,
    *,
    base_dir: Path,
    kmeans_dir: Path,
    features: FeatureSettings,
    kmeans: KMeansSettings,
    frozen: bool = False,
) -> KMeansPlan:
    """Check the settings against the shards and decide which codebooks to fit; raises before any work.

    ``tracks`` needs ``track_id`` and ``split`` (the codebooks are fitted on ``train``).
    Clips too short for ``kmeans.context`` frames at some timescale become quarantine
    records; when that is the median clip, the context is the problem and this raises.
    A codebook on disk is kept (new clips are encoded with it) as long as every clip it
    was fitted on is still in the train split with the same content; otherwise it is
    fitted again, so that a changed split never lets test clips into a codebook.

    ``frozen``: the codebooks in ``kmeans_dir`` came from elsewhere (a pre-trained model's,
    :func:`install_codebooks`): none is fitted, and the catalogue needs no training split.
    """
    timescales = tuple(kmeans.timescales) or tuple(features.columns)
    unknown = [t for t in timescales if t not in features.columns]
    if unknown:
        raise ParameterError(
            f"timescale(s) {unknown} are not made by the feature settings (columns {features.columns})"
        )
    check_timescales(base_dir, timescales)
    base = _base_manifest(base_dir)
    tracks = tracks[tracks["track_id"].isin(base.index)]
    if tracks.empty:
        raise DatasetError(f"none of the tracks has log-mel features in {base_dir}")
    short, quarantined = _too_short(
        base.loc[tracks["track_id"]], features=features, kmeans=kmeans, timescales=timescales
    )
    usable = tracks[~tracks["track_id"].isin(short)]
    train = usable.loc[usable["split"] == "train", "track_id"].astype(str).tolist()
    if frozen:
        missing = [t for t in timescales if not codebook_path(kmeans_dir, t).exists()]
        if missing:
            raise ParameterError(f"no codebook for timescale(s) {missing} in {kmeans_dir / CODEBOOKS}")
        return KMeansPlan(
            timescales=timescales,
            to_fit=(),
            fit_track_ids=(),
            usable_track_ids=tuple(usable["track_id"].astype(str)),
            quarantined=tuple(quarantined),
        )
    if len(train) < 2:
        raise DatasetError(f"{len(train)} usable clips in the train split: the codebooks need a training sample")
    rng = np.random.default_rng(kmeans.seed)
    n_fit = min(len(train), max(2, -(-kmeans.sample_windows // WINDOWS_PER_FIT_TRACK)))
    fit_ids = tuple(sorted(rng.choice(train, size=n_fit, replace=False).tolist()))
    train_content = {t: base.loc[t, "content_sha1"] for t in train}
    to_fit = tuple(t for t in timescales if not _codebook_still_valid(codebook_path(kmeans_dir, t), train_content))
    return KMeansPlan(
        timescales=timescales,
        to_fit=to_fit,
        fit_track_ids=fit_ids,
        usable_track_ids=tuple(usable["track_id"].astype(str)),
        quarantined=tuple(quarantined),
    )


def codebooks_digest(codebooks: Path, timescales: tuple[str, ...]) -> str:
    """Content hash of the codebooks of ``timescales`` in a folder of ``<column>.npz`` (names a frozen encoding)."""
    digest = hashlib.sha1()
    for column in timescales:
        path = Path(codebooks) / f"{column}.npz"
        if not path.exists():
            raise ParameterError(f"no codebook for timescale {column!r} in {codebooks}")
        digest.update(f"{column}:{content_sha1(path)}".encode())
    return digest.hexdigest()[:12]


def install_codebooks(codebooks: Path, kmeans_dir: Path, timescales: tuple[str, ...]) -> None:
    """Copy the codebooks of ``timescales`` from a folder of ``<column>.npz`` into ``kmeans_dir`` (atomically).

    Each is checked to load as a :class:`~tasks.kmeans.Codebook` (no pickle) before it is used.
    """
    for column in timescales:
        source, target = Path(codebooks) / f"{column}.npz", codebook_path(kmeans_dir, column)
        Codebook.load(source)  # raises DatasetError for a file that is no codebook
        if target.exists() and content_sha1(target) == content_sha1(source):
            continue
        storage.copy_file(source, target)


def _base_manifest(base_dir: Path) -> pd.DataFrame:
    base = read_manifest(base_dir).to_pandas().set_index("track_id")
    if base["duration_s"].isna().any() or base["content_sha1"].isna().any():
        raise DatasetError(
            f"the manifest of {base_dir} lacks durations or content hashes (an older release "
            "wrote it): run the feature flow again, it fills them in without recomputing features"
        )
    return base


def _codebook_still_valid(path: Path, train_content: dict[str, str]) -> bool:
    """A codebook may be reused when the clips it was fitted on are all still training clips, unchanged."""
    if not path.exists():
        return False
    try:
        fitted_on = Codebook.load(path).info.get("fit_tracks")
    except DatasetError:
        return False
    if not isinstance(fitted_on, dict):
        return False
    return all(train_content.get(track_id) == sha1 for track_id, sha1 in fitted_on.items())


def plan_encoding(plan: KMeansPlan, *, base_dir: Path, kmeans_dir: Path, kmeans: KMeansSettings) -> EncodePlan:
    """The clips to encode: every usable clip not already encoded from the same log-mel features by the same codebooks.

    Call once every codebook of ``plan.timescales`` is on disk: their content is part
    of what a clip's record must match, so refitting a codebook re-encodes every clip.
    """
    digest = hashlib.sha1(kmeans.settings_hash.encode())
    for column in plan.timescales:
        digest.update(content_sha1(codebook_path(kmeans_dir, column)).encode())
    encoding_hash = digest.hexdigest()[:12]
    base = _base_manifest(base_dir)
    done = _done_records(kmeans_dir, base, encoding_hash)
    usable = pd.DataFrame({"track_id": [t for t in plan.usable_track_ids if t not in done]})
    usable["base_shard"] = base.loc[usable["track_id"], "shard"].to_numpy()
    todo = usable.sort_values(["base_shard", "track_id"])  # a batch reads few log-mel shards
    batches = []
    size = kmeans.tracks_per_task
    for start in range(0, len(todo), size):
        ids = tuple(todo["track_id"].iloc[start : start + size].astype(str))
        name = hashlib.sha1(("\n".join(ids) + encoding_hash).encode()).hexdigest()[:16]
        batches.append(EncodeBatch(shard=f"part-{name}.parquet", track_ids=ids))
    usable_ids = set(plan.usable_track_ids)
    kept = [record for track_id, record in done.items() if track_id in usable_ids]
    return EncodePlan(
        encoding_hash=encoding_hash, batches=tuple(batches), done_records=tuple(kept), n_skipped=len(kept)
    )


def check_context(
    features: FeatureSettings,
    kmeans: KMeansSettings,
    *,
    seconds: float,
    timescales: tuple[str, ...],
    what: str = "the median clip",
) -> None:
    """A context longer than a typical clip of ``seconds`` at some timescale is a bad setting: raise, saying where."""
    frames = timescale_frames(features, n_samples=round(seconds * features.mel.sample_rate))
    for t in timescales:
        if frames[t] < kmeans.context:
            raise ParameterError(
                f"context={kmeans.context} frames is longer than {what} ({seconds:.1f} s) at "
                f"timescale {t} ({frames[t]} frames): lower the context or drop that timescale"
            )


def _too_short(
    base: pd.DataFrame, *, features: FeatureSettings, kmeans: KMeansSettings, timescales: tuple[str, ...]
) -> tuple[set[str], list[dict]]:
    check_context(features, kmeans, seconds=float(np.median(base["duration_s"].to_numpy())), timescales=timescales)
    # A catalogue has few distinct lengths (MTAT: nearly all 29.1 s): compute the frames once per length.
    samples = (base["duration_s"].to_numpy(dtype=np.float64) * features.mel.sample_rate).round().astype(np.int64)
    frames_of = {n: timescale_frames(features, n_samples=int(n)) for n in np.unique(samples)}
    short, records = set(), []
    for track_id, n in zip(base.index, samples):
        too_short = [t for t in timescales if frames_of[n][t] < kmeans.context]
        if too_short:
            short.add(track_id)
            records.append(
                {
                    "path": str(base.loc[track_id, "source_path"]),
                    "stage": "kmeans",
                    "track_id": track_id,
                    "reason": f"shorter than context={kmeans.context} frames at {', '.join(too_short)}",
                }
            )
    return short, records


def _done_records(kmeans_dir: Path, base: pd.DataFrame, encoding_hash: str) -> dict[str, dict]:
    """Clips already encoded by these codebooks from the same log-mel features (manifest, or shards after a kill)."""
    kmeans_dir = Path(kmeans_dir)
    manifest = read_manifest(kmeans_dir).to_pylist()
    on_disk = {path.name for path in kmeans_dir.glob("part-*.parquet")}
    known = {r["track_id"]: r for r in manifest if r["settings_hash"] == encoding_hash and r["shard"] in on_disk}
    skip = {r["shard"] for r in manifest}
    for name in on_disk - skip:  # written before an interruption: only if by these codebooks
        if (storage.parquet_schema(kmeans_dir / name).metadata or {}).get(b"encoding_hash") != encoding_hash.encode():
            skip.add(name)
    for record in shard_records(kmeans_dir, skip=skip):
        known.setdefault(record["track_id"], record)
    done = {}
    for track_id, record in known.items():
        if track_id in base.index and record["content_sha1"] == base.loc[track_id, "content_sha1"]:
            done[track_id] = {**_manifest_record(base, track_id, record["shard"]), "settings_hash": encoding_hash}
    return done


def _manifest_record(base: pd.DataFrame, track_id: str, shard: str) -> dict:
    row = base.loc[track_id]
    return {
        "track_id": track_id,
        "content_sha1": row["content_sha1"],
        "shard": shard,
        "n_frames": int(row["n_frames"]),
        "duration_s": float(row["duration_s"]),
        "sample_rate": int(row["sample_rate"]),
        "source_path": row["source_path"],
        "source_size": row["source_size"],
        "source_mtime_ns": row["source_mtime_ns"],
    }


def fit_timescale_codebook(
    column: str,
    *,
    base_dir: Path,
    kmeans_dir: Path,
    fit_track_ids: tuple[str, ...],
    kmeans: KMeansSettings,
    n_mels: int,
    device: str = "cpu",
) -> dict:
    """Fit and save one timescale's codebook from windows of the training clips; returns its summary."""
    import torch

    start = time.perf_counter()
    torch.manual_seed(kmeans.seed)
    content = read_manifest(base_dir).to_pandas().set_index("track_id")["content_sha1"]
    spectrograms = read_features(base_dir, column=column, track_ids=fit_track_ids)
    windows = sample_windows(
        [spectrograms[t] for t in fit_track_ids],
        context=kmeans.context,
        n_windows=kmeans.sample_windows,
        seed=kmeans.seed,
    )
    # Each timescale gets its own stream, so that fitting one alone gives the same codebook.
    seed = int.from_bytes(hashlib.sha1(f"{kmeans.seed}/{column}".encode()).digest()[:4], "little")
    codebook = fit_codebook(
        windows,
        k=kmeans.k,
        context=kmeans.context,
        n_mels=n_mels,
        epsilon=kmeans.epsilon,
        iterations=kmeans.iterations,
        batch_size=kmeans.batch_size,
        seed=seed,
        kind=kmeans.codebook,
        device=device,
        info={
            "column": column,
            # What the codebook saw: a later run refits it if any of these leaves the train split.
            "fit_tracks": {t: str(content[t]) for t in fit_track_ids},
        },
    )
    path = codebook.save(codebook_path(kmeans_dir, column))
    summary = {k: v for k, v in codebook.info.items() if k != "fit_tracks"}
    return {
        "column": column,
        "path": str(path),
        "seconds": time.perf_counter() - start,
        "fit_clips": len(fit_track_ids),
        **summary,
    }


def encode_batch(
    batch: EncodeBatch,
    *,
    base_dir: Path,
    kmeans_dir: Path,
    timescales: tuple[str, ...],
    kmeans: KMeansSettings,
    encoding_hash: str,
    device: str = "cpu",
) -> EncodeResult:
    """Encode and pool every timescale of a batch of clips; write one shard (atomically).

    A clip that cannot be encoded (shorter than the context at some timescale, though
    its duration said otherwise) becomes a quarantine record; the others go on.
    """
    start = time.perf_counter()
    base = read_manifest(base_dir).to_pandas().set_index("track_id")
    vectors: dict[str, dict[str, np.ndarray]] = {t: {} for t in batch.track_ids}
    quarantined = []
    for column in timescales:
        codebook = Codebook.load(codebook_path(kmeans_dir, column))
        spectrograms = read_features(base_dir, column=column, track_ids=batch.track_ids)
        for track_id in list(vectors):
            try:
                vectors[track_id][column] = encode_clip(
                    spectrograms[track_id],
                    codebook,
                    activation=kmeans.activation,
                    threshold=kmeans.threshold,
                    pooling=kmeans.pooling,
                    device=device,
                )
            except ParameterError as err:
                quarantined.append(
                    {
                        "path": str(base.loc[track_id, "source_path"]),
                        "stage": "kmeans",
                        "reason": f"{column}: {err}",
                        "track_id": track_id,
                    }
                )
                del vectors[track_id]
    ids = list(vectors)
    records = [{**_manifest_record(base, t, batch.shard), "settings_hash": encoding_hash} for t in ids]
    if not ids:
        return EncodeResult(
            shard=None, quarantined=quarantined, seconds=time.perf_counter() - start, peak_rss_mb=peak_rss_mb()
        )
    width = pooled_size(kmeans.k, kmeans.pooling)
    schema = pa.schema(
        [
            pa.field("track_id", pa.string()),
            pa.field("content_sha1", pa.string()),
            pa.field("n_frames", pa.int32()),
            *(tensor_field(column, dtype="float32", inner_shape=()) for column in timescales),
        ],
        metadata={b"vector_size": str(width).encode(), b"encoding_hash": encoding_hash.encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array(ids, pa.string()),
            pa.array([base.loc[t, "content_sha1"] for t in ids], pa.string()),
            pa.array([int(base.loc[t, "n_frames"]) for t in ids], pa.int32()),
            *(tensor_bytes([vectors[t][column] for t in ids], "float32") for column in timescales),
        ],
        schema=schema,
    )
    write_feature_shard(table, Path(kmeans_dir) / batch.shard)
    return EncodeResult(
        shard=batch.shard,
        records=records,
        quarantined=quarantined,
        seconds=time.perf_counter() - start,
        peak_rss_mb=peak_rss_mb(),
    )


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


def finish_kmeans_features(
    plan: KMeansPlan,
    encode: EncodePlan,
    results: list[EncodeResult],
    *,
    kmeans_dir: Path,
    kmeans: KMeansSettings,
    wall_seconds: float,
) -> tuple[KMeansSummary, list[dict]]:
    """Write the manifest and remove shards no longer referenced (call when no batch is still writing).

    Returns the summary and every quarantine record of the run (planning and encoding).
    """
    records = list(encode.done_records) + [r for result in results for r in result.records]
    write_manifest(kmeans_dir, records)
    remove_unreferenced(kmeans_dir, keep={r["shard"] for r in records})
    quarantined = list(plan.quarantined) + [q for result in results for q in result.quarantined]
    n_encoded = sum(len(r.records) for r in results)
    summary = KMeansSummary(
        feature_dir=str(kmeans_dir),
        timescales=plan.timescales,
        n_tracks=len({r["track_id"] for r in records}),
        n_encoded=n_encoded,
        n_skipped=encode.n_skipped,
        n_quarantined=len(quarantined),
        clips_per_s=n_encoded / wall_seconds if wall_seconds > 0 else 0.0,
        vector_size=pooled_size(kmeans.k, kmeans.pooling),
    )
    return summary, quarantined


def read_kmeans_features(
    kmeans_dir: Path, *, timescales: tuple[str, ...] | list[str], track_ids: list[str]
) -> np.ndarray:
    """The multiscale vectors of ``track_ids``: the timescales' pooled vectors concatenated, in that order.

    Returns
    -------
    np.ndarray [shape=(len(track_ids), len(timescales) * vector_size), dtype=float32]
    """
    if not timescales:
        raise ParameterError("no timescale selected")
    shards = sorted(Path(kmeans_dir).glob("part-*.parquet"))
    present = set(storage.parquet_schema(shards[0]).names) if shards else set()
    missing = [t for t in timescales if t not in present]
    if missing:
        raise ParameterError(f"timescale(s) {missing} are not in the K-means features at {kmeans_dir}")
    parts = []
    for column in timescales:
        vectors = read_features(kmeans_dir, column=column, track_ids=track_ids)
        parts.append(np.stack([vectors[t] for t in track_ids]))
    return np.concatenate(parts, axis=1).astype(np.float32, copy=False)
