"""Listening data: batches on disk, stable ids, play matrices, the cold-start split."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tasks.errors import DatasetError
from tasks.listening import (
    build_play_matrix,
    cold_start_split,
    ingest_triplet_files,
    load_factors,
    play_matrix_for,
    read_events,
    save_factors,
    update_id_map,
)


def test_id_maps_append_and_never_renumber(tmp_path):
    path = tmp_path / "users.parquet"
    first = update_id_map(path, np.array(["b", "a", "b"]))
    assert dict(zip(first["key"], first["id"])) == {"b": 0, "a": 1}
    second = update_id_map(path, np.array(["c", "a"]))
    assert dict(zip(second["key"], second["id"])) == {"b": 0, "a": 1, "c": 2}
    assert pq.read_table(path).num_rows == 3


def test_ingest_batches_once_and_sum_across_batches(tmp_path):
    files = []
    for i, text in enumerate(["u1\ts1\t2\nu2\ts2\t1\n", "u1\ts1\t3\nu3\ts1\tbad\n"]):
        path = tmp_path / f"train_triplets.batch-{i:03d}.txt"
        path.write_text(text)
        files.append(path)
    listening = tmp_path / "listening"
    batches, bad = ingest_triplet_files(files, listening_dir=listening)
    assert batches == ["train_triplets.batch-000", "train_triplets.batch-001"] and len(bad) == 1
    events = read_events(listening)
    assert dict(zip(zip(events["user"], events["item"]), events["plays"])) == {("u1", "s1"): 5, ("u2", "s2"): 1}
    # A second ingestion of the same files reads nothing again; a changed file replaces its batch.
    assert ingest_triplet_files(files, listening_dir=listening)[1] == []
    files[0].write_text("u1\ts1\t10\nnot a row\n")
    _, bad = ingest_triplet_files(files, listening_dir=listening)
    assert len(bad) == 1 and bad[0]["path"].endswith("batch-000.txt:2")
    events = read_events(listening)
    assert dict(zip(zip(events["user"], events["item"]), events["plays"])) == {("u1", "s1"): 13}
    with pytest.raises(DatasetError, match="no listening batches"):
        read_events(tmp_path / "nothing")


def test_cold_start_split_holds_out_columns_and_drops_users_without_training_plays():
    events = pd.DataFrame({
        "user": ["a", "a", "b", "c"],
        "item": ["x", "y", "y", "z"],
        "plays": [1, 2, 3, 4],
    })
    matrix = build_play_matrix(events)
    split = cold_start_split(matrix, heldout_items=np.array(["y"]))
    assert list(split.train.items) == ["x", "z"] and list(split.test.items) == ["y"]
    assert list(split.train.users) == ["a", "c"]  # b only played the held-out item
    assert split.test.plays.toarray().ravel().tolist() == [2.0, 0.0]
    with pytest.raises(DatasetError):
        cold_start_split(matrix, heldout_items=np.array(["nope"]))


def test_play_matrix_for_follows_given_orders():
    frame = pd.DataFrame({"user": ["u2", "u1", "u9"], "item": ["i1", "i2", "i1"], "plays": [5, 1, 3]})
    matrix = play_matrix_for(frame, users=np.array(["u1", "u2", "u3"]), items=np.array(["i2", "i1"]))
    assert matrix.toarray().tolist() == [[1, 0], [0, 5], [0, 0]]


def test_factors_round_trip(tmp_path):
    factors = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    keys, back = load_factors(save_factors(tmp_path / "f.parquet", np.array(["a", "b", "c", "d"]), factors))
    assert list(keys) == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(back, factors)
