"""A catalogue's tracks table (``tracks/<dataset>.parquet``): read, written, and narrowed to the tracks with features.

One row per track: ``track_id``, ``source_path``, ``split``, ``tags`` and what the feature flow adds
(:func:`tasks.features.annotate_tracks`). Written atomically through :mod:`core.storage`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa

from core.storage import read_frame, write_parquet
from tasks.shards import ROW_GROUP_SIZE, read_manifest


def read_tracks(tracks_path: Path, *, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The tracks table, or only ``columns`` of it."""
    return read_frame(tracks_path, columns=columns)


def write_tracks(tracks_path: Path, tracks: pd.DataFrame) -> Path:
    """The tracks table, atomically (its index dropped; row groups as the feature shards')."""
    return write_parquet(tracks_path, pa.Table.from_pandas(tracks, preserve_index=False), row_group_size=ROW_GROUP_SIZE)


def tracks_with_features(
    tracks_path: Path,
    feature_dir: Path,
    *,
    columns: Sequence[str] = ("track_id", "split", "tags", "source_path"),
) -> pd.DataFrame:
    """``columns`` of the tracks whose features are in ``feature_dir``'s manifest, in table order (index reset)."""
    tracks = read_frame(tracks_path, columns=list(columns))
    present = set(read_manifest(feature_dir).column("track_id").to_pylist())
    return tracks[tracks["track_id"].isin(present)].reset_index(drop=True)
