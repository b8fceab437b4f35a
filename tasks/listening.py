"""Play matrices from ingested listening events, and the two evaluation protocols.

Ingestion (validation, quarantine, stable id maps, one Parquet partition per batch) is in
:mod:`tasks.events`. Here the events of chosen batches become a users × items matrix of
raw play counts, split for evaluation:

- cold start (DESIGN.md §3 II): whole items are held out of the factorization;
- in-matrix: a fraction of each user's played items is held out; those items stay in
  the factorization through the other users' plays.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from core import storage
from core.errors import DatasetError, ParameterError
from tasks.events import read_batch_events, read_id_map
from tasks.shards import write_table_atomic


@dataclass(frozen=True)
class PlayMatrix:
    """Users × items play counts with the keys of each row and column."""

    plays: sp.csr_matrix  # (n_users, n_items) float32 raw counts
    users: np.ndarray  # (n_users,) keys
    items: np.ndarray  # (n_items,) keys


def select_columns(matrix: sp.csr_matrix, columns: np.ndarray) -> sp.csr_matrix:
    """``matrix[:, columns]`` in O(nnz): scipy's column fancy indexing is much slower at MSD scale."""
    matrix = sp.csr_matrix(matrix)
    columns = np.asarray(columns)
    if columns.dtype == bool:
        columns = np.flatnonzero(columns)
    remap = np.full(matrix.shape[1], -1, dtype=np.int64)
    remap[columns] = np.arange(len(columns))
    new = remap[matrix.indices]
    keep = new >= 0
    kept_before = np.concatenate([[0], np.cumsum(keep)])
    out = sp.csr_matrix(
        (matrix.data[keep], new[keep].astype(np.int32), kept_before[matrix.indptr].astype(np.int64)),
        shape=(matrix.shape[0], len(columns)),
    )
    if len(columns) > 1 and np.any(np.diff(columns) < 0):
        out.sort_indices()
    return out


def load_play_matrix(listening_dir: Path, *, batches: Sequence[str] | None = None) -> PlayMatrix:
    """The play matrix of the given ingested batches (all when None).

    Plays of the same (user, item) in several batches are summed. Rows and columns are
    the users and items with at least one play, in stable-id order; zero counts carry no play.
    """
    table = read_batch_events(listening_dir, batches, columns=("user", "item", "plays"))
    rows = table.column("user").to_numpy()
    cols = table.column("item").to_numpy()
    plays = table.column("plays").to_numpy().astype(np.float32)
    del table
    user_keys = read_id_map(Path(listening_dir) / "users.parquet")
    item_keys = read_id_map(Path(listening_dir) / "items.parquet")
    if rows.size and (rows.max() >= len(user_keys) or cols.max() >= len(item_keys)):
        raise DatasetError(f"events under {listening_dir} refer to ids missing from users/items.parquet")
    matrix = sp.csr_matrix((plays, (rows, cols)), shape=(len(user_keys), len(item_keys)), dtype=np.float32)
    del rows, cols, plays
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    active_users = np.flatnonzero(np.diff(matrix.indptr) > 0)
    active_items = np.flatnonzero(np.bincount(matrix.indices, minlength=matrix.shape[1]) > 0)
    if active_users.size == 0:
        raise DatasetError(
            f"the listening batches {list(batches) if batches else 'under ' + str(listening_dir)} hold no plays"
        )
    if active_users.size < matrix.shape[0]:
        matrix = matrix[active_users]
    if active_items.size < matrix.shape[1]:
        matrix = select_columns(matrix, active_items)
    return PlayMatrix(matrix, np.asarray(user_keys[active_users]), np.asarray(item_keys[active_items]))


def build_play_matrix(events: pd.DataFrame, *, items: np.ndarray | None = None) -> PlayMatrix:
    """Sparse play matrix; with ``items`` given, columns follow that order and other items are dropped."""
    users = np.asarray(sorted(events["user"].unique()), dtype=str)
    if items is None:
        items = np.asarray(sorted(events["item"].unique()), dtype=str)
    user_index = pd.Index(users)
    item_index = pd.Index(items)
    cols = item_index.get_indexer(events["item"])
    keep = cols >= 0
    rows = user_index.get_indexer(events["user"][keep])
    plays = sp.csr_matrix(
        (events["plays"].to_numpy()[keep].astype(np.float32), (rows, cols[keep])),
        shape=(len(users), len(items)),
    )
    plays.sum_duplicates()
    return PlayMatrix(plays=plays, users=users, items=np.asarray(items, dtype=str))


@dataclass(frozen=True)
class ColdStartSplit:
    """Held-out items are removed from the factorization; their plays are the test set."""

    train: PlayMatrix  # users × training items
    test: PlayMatrix  # same users × held-out items


@dataclass(frozen=True)
class InMatrixSplit:
    """A fraction of each user's plays held out; train and test share users and items."""

    train: PlayMatrix
    test: PlayMatrix


def in_matrix_split(
    matrix: PlayMatrix, *, fraction: float = 0.2, seed: int = 0, min_items: int = 2, keep_all_items: bool = False
) -> InMatrixSplit:
    """Hold out about ``fraction`` of each user's played items.

    A (user, item) pair is held out when a hash of (user key, item key, seed), read as a
    number in [0, 1), is below ``fraction``: the decision depends on the pair alone, not
    on the matrix. When a new listening batch arrives, every pair keeps its side, so a
    model warm-started from the previous factors is never scored on plays it trained on.
    Users with fewer than ``min_items`` items keep them all for training; a user whose
    every pair hashes below ``fraction`` keeps the highest-hash one for training (the
    only pairs that can change side, and only for such users). Users with no held-out
    pair have an empty test row and are not scored.

    Items left with no training play are dropped from both halves (no factor can be
    learned for them) unless ``keep_all_items``, as for an early-stopping split whose
    training half must keep the columns of the matrix it was cut from. Every user keeps
    a row.
    """
    if not 0.0 < fraction < 1.0:
        raise ParameterError(f"fraction={fraction} must be in (0, 1)")
    plays = matrix.plays.tocsr()
    plays.sort_indices()
    counts = np.diff(plays.indptr)
    row_of = np.repeat(np.arange(plays.shape[0]), counts)
    key = hashlib.sha1(f"mirflow-split-{seed}".encode()).hexdigest()[:16]
    user_hash = pd.util.hash_array(np.asarray(matrix.users, dtype=object), hash_key=key)
    item_hash = pd.util.hash_array(np.asarray(matrix.items, dtype=object), hash_key=key)
    with np.errstate(over="ignore"):
        pair = user_hash[row_of] * np.uint64(0x9E3779B97F4A7C15) ^ item_hash[plays.indices]
        pair ^= pair >> np.uint64(31)
        pair *= np.uint64(0xBF58476D1CE4E5B9)
        pair ^= pair >> np.uint64(29)
    uniform = (pair >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    test_mask = (uniform < fraction) & (counts[row_of] >= min_items)
    n_test = np.bincount(row_of[test_mask], minlength=plays.shape[0])
    everything = np.flatnonzero((n_test == counts) & (counts > 0))
    if everything.size:
        nonempty = counts > 0
        row_max = np.full(plays.shape[0], -1.0)
        row_max[nonempty] = np.maximum.reduceat(uniform, plays.indptr[:-1][nonempty])
        keep_for_training = np.isin(row_of, everything) & (uniform == row_max[row_of])
        test_mask &= ~keep_for_training

    def part(mask: np.ndarray) -> sp.csr_matrix:
        out = sp.csr_matrix((plays.data[mask], (row_of[mask], plays.indices[mask])), shape=plays.shape)
        out.sort_indices()
        return out

    train, test = part(~test_mask), part(test_mask)
    keep = np.bincount(train.indices, minlength=train.shape[1]) > 0
    if keep_all_items or keep.all():
        return InMatrixSplit(
            train=PlayMatrix(train, matrix.users, matrix.items), test=PlayMatrix(test, matrix.users, matrix.items)
        )
    return InMatrixSplit(
        train=PlayMatrix(select_columns(train, keep), matrix.users, matrix.items[keep]),
        test=PlayMatrix(select_columns(test, keep), matrix.users, matrix.items[keep]),
    )


def cold_start_split(matrix: PlayMatrix, *, heldout_items: np.ndarray) -> ColdStartSplit:
    """Split the columns of ``matrix`` into training items and the ``heldout_items`` (DESIGN.md §3 II).

    Users left with no training plays are dropped from both halves: no factor can
    be learned for them.
    """
    wanted = pd.Index(pd.unique(np.asarray(heldout_items, dtype=object)))
    heldout = wanted.get_indexer(np.asarray(matrix.items, dtype=object)) >= 0
    if not heldout.any():
        raise DatasetError("none of the held-out items appear in the listening data")
    if heldout.all():
        raise DatasetError("every item is held out: nothing left to factorize")
    train = select_columns(matrix.plays, ~heldout)
    test = select_columns(matrix.plays, heldout)
    active = np.diff(train.indptr) > 0
    if not active.all():
        train, test = train[active], test[active]
    return ColdStartSplit(
        train=PlayMatrix(train, matrix.users[active], matrix.items[~heldout]),
        test=PlayMatrix(test, matrix.users[active], matrix.items[heldout]),
    )


def save_factors(path: Path, keys: np.ndarray, factors: np.ndarray) -> Path:
    """Factors as Parquet: ``key`` and ``factors`` (fixed-size list of float32)."""
    values = pa.array(np.ascontiguousarray(factors, dtype=np.float32).reshape(-1))
    table = pa.table(
        {"key": pa.array(keys, pa.string()), "factors": pa.FixedSizeListArray.from_arrays(values, factors.shape[1])}
    )
    return write_table_atomic(table, path, row_group_size=1 << 16)


def load_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = storage.read_parquet(path)
    column = table.column("factors").combine_chunks()
    dim = column.type.list_size
    factors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.asarray(table.column("key").to_pylist(), dtype=str), factors


def plays_to_frame(matrix: PlayMatrix) -> pd.DataFrame:
    """Long form (``user, item, plays``) of a play matrix, for Parquet."""
    coo = matrix.plays.tocoo()
    return pd.DataFrame(
        {"user": matrix.users[coo.row], "item": matrix.items[coo.col], "plays": coo.data.astype(np.int64)}
    )


def play_matrix_for(frame: pd.DataFrame, *, users: np.ndarray, items: np.ndarray) -> sp.csr_matrix:
    """Plays of a long-form frame as a (users × items) matrix in exactly the given orders.

    Rows of users without plays are empty; plays of users or items not listed are ignored.
    """
    rows = pd.Index(np.asarray(users, dtype=str)).get_indexer(frame["user"].astype(str))
    cols = pd.Index(np.asarray(items, dtype=str)).get_indexer(frame["item"].astype(str))
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix(
        (frame["plays"].to_numpy()[keep].astype(np.float32), (rows[keep], cols[keep])), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()
    return matrix
