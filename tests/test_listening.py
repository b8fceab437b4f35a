"""Play matrices, the cold-start and in-matrix splits, factor files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from core.errors import DatasetError
from tasks.listening import (
    PlayMatrix,
    build_play_matrix,
    cold_start_split,
    in_matrix_split,
    load_factors,
    play_matrix_for,
    save_factors,
)


def test_cold_start_split_holds_out_columns_and_drops_users_without_training_plays():
    events = pd.DataFrame(
        {
            "user": ["a", "a", "b", "c"],
            "item": ["x", "y", "y", "z"],
            "plays": [1, 2, 3, 4],
        }
    )
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


def _random_plays(n_users: int = 300, n_items: int = 200, density: float = 0.05, seed: int = 0) -> PlayMatrix:
    rng = np.random.default_rng(seed)
    dense = np.where(rng.random((n_users, n_items)) < density, rng.integers(1, 50, (n_users, n_items)), 0)
    dense[0, :3] = [4, 5, 6]
    dense[0, 3:] = 0
    dense[1, :] = 0
    dense[1, 7] = 2  # a single play: never held out
    return PlayMatrix(
        sp.csr_matrix(dense.astype(np.float32)),
        np.array([f"u{i}" for i in range(n_users)]),
        np.array([f"i{i}" for i in range(n_items)]),
    )


def test_in_matrix_split_holds_out_a_fraction_of_each_users_items():
    matrix = _random_plays()
    split = in_matrix_split(matrix, fraction=0.2, seed=1)
    train, test = split.train.plays, split.test.plays
    assert train.multiply(test).nnz == 0  # disjoint
    # every play is in exactly one half (no item lost its last training play here)
    kept = pd.Index(matrix.items).get_indexer(split.train.items)
    np.testing.assert_array_equal((train + test).toarray(), matrix.plays[:, kept].toarray())
    per_user = np.diff(matrix.plays.indptr)
    n_test = np.diff(test.indptr)
    assert n_test[1] == 0 and np.diff(train.indptr)[1] == 1  # one item: nothing held out
    assert test.nnz / matrix.plays.nnz == pytest.approx(0.2, abs=0.02)
    assert (np.diff(train.indptr)[per_user > 0] >= 1).all()  # nobody loses all training plays
    again = in_matrix_split(matrix, fraction=0.2, seed=1)
    assert (again.test.plays != test).nnz == 0  # seeded
    assert (in_matrix_split(matrix, fraction=0.2, seed=2).test.plays != test).nnz > 0
    with pytest.raises(Exception, match="fraction"):
        in_matrix_split(matrix, fraction=1.0)


def test_in_matrix_split_keeps_every_pair_on_its_side_when_users_gain_items():
    """The incremental update's guarantee: a pair trained on before is never a test pair after."""
    before = _random_plays(n_users=300, n_items=200, density=0.05, seed=7)
    dense = before.plays.toarray()
    rng = np.random.default_rng(8)
    grown = np.where((dense == 0) & (rng.random(dense.shape) < 0.05), 3, dense)  # known users, more items
    after = PlayMatrix(sp.csr_matrix(grown.astype(np.float32)), before.users, before.items)
    old = in_matrix_split(before, fraction=0.2, seed=0, keep_all_items=True)
    new = in_matrix_split(after, fraction=0.2, seed=0, keep_all_items=True)
    old_train, new_test = old.train.plays.toarray() > 0, new.test.plays.toarray() > 0
    old_test, new_train = old.test.plays.toarray() > 0, new.train.plays.toarray() > 0
    # Only a user whose every pair hashed low kept one pair for training; that pair alone may move.
    moved_users = np.flatnonzero((old_train & new_test).any(axis=1))
    assert (old_train[moved_users].sum(axis=1) == 1).all()
    assert (old_train & new_test).sum() <= 2
    assert not (old_test & new_train).any()


def test_select_columns_matches_scipy_fancy_indexing():
    from tasks.listening import select_columns

    matrix = _random_plays(seed=5).plays
    for columns in (np.array([5, 0, 199, 3]), np.arange(0, 200, 3), np.arange(200) % 2 == 0, np.array([], dtype=int)):
        got = select_columns(matrix, columns)
        want = matrix[:, columns]
        assert got.shape == want.shape and (got != want).nnz == 0 and got.has_sorted_indices
