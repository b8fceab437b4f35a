"""The tracks table (tasks.catalogue) and the held-out tracks of the cold-start evaluation (tasks.heldout)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from core.errors import DatasetError
from core.settings import WMFSettings
from core.storage import parquet_file, write_frame, write_parquet
from tasks.catalogue import read_tracks, tracks_with_features, write_tracks
from tasks.heldout import factors_of, heldout_clips, heldout_relevance
from tasks.shards import MANIFEST, MANIFEST_SCHEMA, ROW_GROUP_SIZE
from tasks.wmf import confidence


def _tracks(n: int = 100) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "track_id": [f"t{i:03d}" for i in range(n)],
            "split": ["train", "valid", "test", "train"] * (n // 4),
            "tags": [["rock", "loud"] if i % 2 else [] for i in range(n)],
            "source_path": [f"/audio/{i}.mp3" for i in range(n)],
        }
    )


def _manifest(folder, track_ids):
    """A feature manifest naming ``track_ids`` (the other columns null)."""
    columns = {f.name: pa.nulls(len(track_ids), f.type) for f in MANIFEST_SCHEMA}
    columns["track_id"] = pa.array(track_ids, pa.string())
    write_parquet(folder / MANIFEST, pa.table(columns, schema=MANIFEST_SCHEMA))


def test_the_tracks_table_round_trips_in_row_groups_of_the_shards(tmp_path):
    path = tmp_path / "tracks" / "x.parquet"
    write_tracks(path, _tracks().set_index("track_id", drop=False))
    back = read_tracks(path)
    pd.testing.assert_frame_equal(back[["track_id", "split"]], _tracks()[["track_id", "split"]])
    assert list(back.columns) == ["track_id", "split", "tags", "source_path"]  # the index was not written
    assert list(back["tags"].iloc[1]) == ["rock", "loud"]
    assert parquet_file(path).metadata.num_row_groups == -(-100 // ROW_GROUP_SIZE)
    assert list(read_tracks(path, columns=["split"]).columns) == ["split"]


def test_tracks_with_features_keep_the_table_order(tmp_path):
    path = tmp_path / "tracks.parquet"
    write_tracks(path, _tracks())
    _manifest(tmp_path, ["t050", "t003", "t099"])
    kept = tracks_with_features(path, tmp_path)
    assert kept["track_id"].tolist() == ["t003", "t050", "t099"]
    assert kept.index.tolist() == [0, 1, 2]


def test_held_out_relevance_and_true_factors_follow_the_given_orders(tmp_path):
    plays = pd.DataFrame(
        {"user": ["u1", "u2", "u2", "u9"], "item": ["a", "a", "b", "b"], "plays": [3.0, 1.0, 2.0, 5.0]}
    )
    write_frame(tmp_path / "heldout_plays.parquet", plays)
    relevant = heldout_relevance(
        tmp_path / "heldout_plays.parquet", users=np.array(["u2", "u1"], dtype=object), track_ids=["b", "a"]
    )
    np.testing.assert_allclose(relevant.toarray(), [[2.0, 1.0], [0.0, 3.0]])  # u9 is no user of the factors
    keys = np.array(["a", "b", "c"], dtype=object)
    factors = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_allclose(factors_of(keys, factors, ["c", "a"]), [[4, 5], [0, 1]])
    with pytest.raises(DatasetError, match="1 tracks have no factors"):
        factors_of(keys, factors, ["a", "zz"])
    # The confidence a wpe training weighs is the WMF settings' (here on the held-out plays, by hand).
    weights = confidence(relevant, settings=WMFSettings(confidence="linear", alpha=2.0))
    np.testing.assert_allclose(weights.toarray(), [[5.0, 3.0], [0.0, 7.0]])


def test_no_held_out_track_with_features_is_a_dataset_error(tmp_path):
    write_frame(tmp_path / "p.parquet", pd.DataFrame({"user": ["u"], "item": ["a"], "plays": [1.0]}))
    _manifest(tmp_path, ["other"])
    with pytest.raises(DatasetError, match="no held-out track has features"):
        heldout_clips(tmp_path / "p.parquet", tmp_path, column="mel_1024")
