"""Listening data: events on disk, stable id maps, the play matrix and the cold-start split.

Layout under the storage root::

    listening/events/batch=<id>/part-0.parquet   user, item, plays
    listening/users.parquet, items.parquet       key -> stable integer id (appended, never renumbered)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from tasks.datasets import read_triplets
from tasks.errors import DatasetError
from tasks.shards import content_sha1, write_table_atomic


def write_events(events: pd.DataFrame, *, listening_dir: Path, batch: str) -> Path:
    """Store one ingested batch as its own partition (rewriting it if the batch is ingested again)."""
    table = pa.Table.from_pandas(events[["user", "item", "plays"]], preserve_index=False)
    return write_table_atomic(table, Path(listening_dir) / "events" / f"batch={batch}" / "part-0.parquet")


def ingested_batches(listening_dir: Path) -> list[str]:
    root = Path(listening_dir) / "events"
    return sorted(p.name.split("=", 1)[1] for p in root.glob("batch=*") if (p / "part-0.parquet").exists())


def read_events(listening_dir: Path, *, batches: list[str] | None = None) -> pd.DataFrame:
    """All events of the given batches (all when None), duplicates across batches summed."""
    names = ingested_batches(listening_dir) if batches is None else batches
    if not names:
        raise DatasetError(f"no listening batches under {listening_dir}/events: ingest some first")
    frames = [pq.read_table(Path(listening_dir) / "events" / f"batch={b}" / "part-0.parquet").to_pandas() for b in names]
    events = pd.concat(frames, ignore_index=True)
    return events.groupby(["user", "item"], as_index=False, sort=False)["plays"].sum()


def update_id_map(path: Path, keys: np.ndarray | pd.Series) -> pd.DataFrame:
    """Append unseen ``keys`` to the id map at ``path``; existing ids never change.

    Returns the full map (columns ``key``, ``id``), ids 0..n-1 in order of first sight.
    """
    path = Path(path)
    existing = pq.read_table(path).to_pandas() if path.exists() else pd.DataFrame({"key": pd.Series(dtype=str), "id": pd.Series(dtype=np.int64)})
    known = set(existing["key"])
    new = pd.unique(pd.Series(keys, dtype=str))
    new = [k for k in new if k not in known]
    if new:
        start = len(existing)
        added = pd.DataFrame({"key": new, "id": np.arange(start, start + len(new), dtype=np.int64)})
        existing = pd.concat([existing, added], ignore_index=True)
        write_table_atomic(pa.Table.from_pandas(existing, preserve_index=False), path)
    return existing


@dataclass(frozen=True)
class PlayMatrix:
    """Users × items play counts with the keys of each row and column."""

    plays: sp.csr_matrix  # (n_users, n_items) float32 raw counts
    users: np.ndarray  # (n_users,) str
    items: np.ndarray  # (n_items,) str


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


def cold_start_split(matrix: PlayMatrix, *, heldout_items: np.ndarray) -> ColdStartSplit:
    """Split the columns of ``matrix`` into training items and the ``heldout_items`` (DESIGN.md §3 II).

    Users left with no training plays are dropped from both halves: no factor can
    be learned for them.
    """
    heldout = np.isin(matrix.items, np.asarray(heldout_items, dtype=str))
    if not heldout.any():
        raise DatasetError("none of the held-out items appear in the listening data")
    if heldout.all():
        raise DatasetError("every item is held out: nothing left to factorize")
    train = matrix.plays[:, ~heldout].tocsr()
    test = matrix.plays[:, heldout].tocsr()
    active = np.diff(train.indptr) > 0
    return ColdStartSplit(
        train=PlayMatrix(train[active], matrix.users[active], matrix.items[~heldout]),
        test=PlayMatrix(test[active], matrix.users[active], matrix.items[heldout]),
    )


def save_factors(path: Path, keys: np.ndarray, factors: np.ndarray) -> Path:
    """Factors as Parquet: ``key`` and ``factors`` (fixed-size list of float32)."""
    values = pa.array(np.ascontiguousarray(factors, dtype=np.float32).reshape(-1))
    table = pa.table({"key": pa.array(keys, pa.string()), "factors": pa.FixedSizeListArray.from_arrays(values, factors.shape[1])})
    return write_table_atomic(table, path, row_group_size=1 << 16)


def load_factors(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(path)
    column = table.column("factors").combine_chunks()
    dim = column.type.list_size
    factors = column.values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    return np.asarray(table.column("key").to_pylist(), dtype=str), factors


def ingest_triplet_files(paths: list[Path], *, listening_dir: Path) -> tuple[list[str], list[dict]]:
    """Ingest Taste Profile triplet files, one batch each (batch id = file stem).

    A batch already on disk from a file with the same content hash is not read
    again; a file whose content changed replaces its batch. Returns the batch ids
    and the quarantine records of malformed rows. User and item id maps are extended.
    """
    listening_dir = Path(listening_dir)
    batches, quarantined = [], []
    for path in paths:
        batch = Path(path).stem.replace("=", "-")
        if batch in batches:
            raise DatasetError(f"two listening files map to batch {batch!r}; give them distinct names")
        batches.append(batch)
        marker = listening_dir / "events" / f"batch={batch}" / "_source.json"
        sha1 = content_sha1(path)
        try:
            if json.loads(marker.read_text())["sha1"] == sha1:
                continue
        except (OSError, ValueError, KeyError):
            pass
        events, bad = read_triplets(path, batch=batch)
        quarantined.extend(bad)
        update_id_map(listening_dir / "users.parquet", events["user"])
        update_id_map(listening_dir / "items.parquet", events["item"])
        write_events(events, listening_dir=listening_dir, batch=batch)
        marker.write_text(json.dumps({"path": str(path), "sha1": sha1, "rows": len(events), "malformed": len(bad)}))
    return batches, quarantined


def plays_to_frame(matrix: PlayMatrix) -> pd.DataFrame:
    """Long form (``user, item, plays``) of a play matrix, for Parquet."""
    coo = matrix.plays.tocoo()
    return pd.DataFrame({"user": matrix.users[coo.row], "item": matrix.items[coo.col], "plays": coo.data.astype(np.int64)})


def play_matrix_for(frame: pd.DataFrame, *, users: np.ndarray, items: np.ndarray) -> sp.csr_matrix:
    """Plays of a long-form frame as a (users × items) matrix in exactly the given orders.

    Rows of users without plays are empty; plays of users or items not listed are ignored.
    """
    rows = pd.Index(np.asarray(users, dtype=str)).get_indexer(frame["user"].astype(str))
    cols = pd.Index(np.asarray(items, dtype=str)).get_indexer(frame["item"].astype(str))
    keep = (rows >= 0) & (cols >= 0)
    matrix = sp.csr_matrix((frame["plays"].to_numpy()[keep].astype(np.float32), (rows[keep], cols[keep])),
                           shape=(len(users), len(items)))
    matrix.sum_duplicates()
    return matrix
