"""The transfer's inputs (ISMIR 2014): a labelled target catalogue and one vector per track for each feature set.

Feature sets: the embeddings of pre-trained source models (one set per model, and all of them side by side
when there are several), the target's own K-means features, and two baselines computed from its log-mel
shards (mean and standard deviation of the log-mel bands; of 20 MFCCs). A track is classified only if every
feature set has its vector: :func:`tracks_without_features` names the others, :func:`target_with_features`
keeps the rest, in a fixed order, with their labels cleaned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.layout import Layout
from core.settings import FeatureSettings
from core.storage import read_frame
from tasks.embedding import embedding_model, read_embeddings
from tasks.kmeans_features import read_kmeans_features
from tasks.shards import read_features, read_manifest
from tasks.transfer import TargetCheck, check_target, clean_labels, log_mel_statistics, mfcc_statistics

#: How each computed feature set is named in the transfer table.
FEATURE_SET_NAMES = {"kmeans": "K-means (target audio)", "logmel-stats": "log-mel mean/std", "mfcc": "MFCC-20 mean/std"}

Vectors = dict[str, np.ndarray]  # track_id -> one feature vector


@dataclass(frozen=True)
class TransferTarget:
    """The target's tracks that every feature set covers, in ``track_ids`` order."""

    track_ids: tuple[str, ...]
    labels: tuple[tuple[str, ...], ...]  # cleaned, one tuple per track
    splits: np.ndarray  # (n,) str: train / valid / test (ignored under cross-validation)
    check: TargetCheck

    def matrix(self, vectors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One feature set's vectors stacked in track order: (n_tracks, dims)."""
        return np.stack([vectors[t] for t in self.track_ids])


def read_target_tracks(tracks_path: Path) -> pd.DataFrame:
    """A target catalogue's tracks table as :func:`tasks.transfer.check_target` reads it: ``track_id, split, labels``."""
    return read_frame(tracks_path, columns=["track_id", "split", "tags"]).rename(columns={"tags": "labels"})


def feature_vectors(
    layout: Layout,
    dataset: str,
    sets: Mapping[str, Path | None],
    *,
    features: FeatureSettings,
    timescales: tuple[str, ...],
    embeddings: Sequence[Path],
) -> dict[str, Vectors]:
    """``{feature set name: {track_id: vector}}`` for every feature set, in table order (pretrained first).

    ``sets`` names the computed feature sets (``kmeans``: its features' folder; ``logmel-stats`` and ``mfcc``:
    None, from the log-mel shards of ``features``); ``embeddings`` are files of :mod:`tasks.embedding`.
    """
    out: dict[str, Vectors] = {}
    for path in embeddings:
        model, run_id = embedding_model(path)
        name = f"pretrained: {model}"
        if name in out:  # two runs of the same task and architecture: tell them apart by run
            name = f"{name} ({run_id[:8]})"
        out[name] = read_embeddings(path)
    if len(out) > 1:  # one more feature set: every embedding side by side (tags and listening together)
        parts = list(out.values())
        common = set.intersection(*(set(p) for p in parts))
        out[f"pretrained: all {len(parts)} (concatenated)"] = {
            t: np.concatenate([p[t] for p in parts]) for t in sorted(common)
        }
    if "kmeans" in sets:
        kmeans_dir = sets["kmeans"]
        ids = read_manifest(kmeans_dir).column("track_id").to_pylist()
        out[FEATURE_SET_NAMES["kmeans"]] = dict(
            zip(ids, read_kmeans_features(kmeans_dir, timescales=timescales, track_ids=ids))
        )
    wanted = [s for s in ("logmel-stats", "mfcc") if s in sets]
    if wanted:
        mels = read_features(layout.features(dataset, features.feature_set), column=features.mel.column)
        for name, fn in (("logmel-stats", log_mel_statistics), ("mfcc", mfcc_statistics)):
            if name in wanted:
                out[FEATURE_SET_NAMES[name]] = {t: fn(m.astype(np.float32)) for t, m in mels.items()}
    return out


def _usable(tracks: pd.DataFrame, vectors: Mapping[str, Vectors]) -> set[str]:
    usable = set(tracks["track_id"])
    for table in vectors.values():
        usable &= set(table)
    return usable


def tracks_without_features(tracks: pd.DataFrame, vectors: Mapping[str, Vectors]) -> list[str]:
    """Track ids of ``tracks`` (in table order) that some feature set has no vector for (failed to decode)."""
    usable = _usable(tracks, vectors)
    return [t for t in tracks["track_id"] if t not in usable]


def target_with_features(tracks: pd.DataFrame, vectors: Mapping[str, Vectors], *, cv: int | None) -> TransferTarget:
    """The tracks every feature set covers, checked again as a target (failed decodes may have emptied a class
    or a split: :func:`tasks.transfer.check_target` raises then), with their labels cleaned."""
    usable = _usable(tracks, vectors)
    kept = tracks[tracks["track_id"].isin(usable)].sort_values("track_id").reset_index(drop=True)
    check = check_target(kept, cv=cv)
    ids = list(check.track_ids)
    kept = kept.set_index("track_id").loc[ids].reset_index()
    labels = tuple(clean_labels(raw, t) for t, raw in zip(kept["track_id"], kept["labels"]))
    return TransferTarget(track_ids=tuple(ids), labels=labels, splits=kept["split"].to_numpy(), check=check)


def rows_frame(rows: Sequence[Mapping]) -> pd.DataFrame:
    """A table's rows (one dict each) as the frame MLflow logs."""
    return pd.DataFrame(list(rows))
