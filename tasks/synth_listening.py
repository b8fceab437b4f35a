"""Synthetic listening data with the Taste Profile's shape, for tests and scale benchmarks.

Users belong to one of ``styles`` taste groups, and so do items; a user's rows come
mostly from items of their own style, the rest from the whole catalogue, each drawn in
proportion to a Zipf item popularity. Activity per user and play counts are
heavy-tailed. Rows are generated in chunks of users and written as triplet files
(``user<TAB>song<TAB>plays``) with Arrow's CSV writer, so 48M rows need neither the
memory nor the time of Python strings.

The real Taste Profile: 1,019,318 users, 384,546 songs, 48,373,586 triplets, on average
47 songs per user, play counts from 1 to a few thousand with a mean near 3.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core import storage
from core.errors import ParameterError


@dataclass(frozen=True)
class ListeningWorld:
    n_users: int
    n_items: int
    n_rows: int
    styles: int = 8
    own_style: float = 0.8  # share of a user's rows drawn from their own style
    popularity_exponent: float = 0.8  # Zipf exponent of item popularity
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.n_users, self.n_items, self.styles) < 1 or self.n_rows < self.n_users:
            raise ParameterError(f"need n_users, n_items, styles >= 1 and n_rows >= n_users, got {self}")


def user_keys(n: int) -> pa.Array:
    """Taste-Profile-like user ids: 40 hex digits."""
    return pa.array([f"{(u * 0x9E3779B97F4A7C15) & (2**160 - 1):040x}" for u in range(n)], pa.string())


def item_keys(n: int) -> pa.Array:
    """MSD-like song ids: ``SO`` and 16 upper-case letters and digits."""
    alphabet = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", dtype=np.uint8)
    rng = np.random.default_rng(12345)
    codes = alphabet[rng.integers(0, len(alphabet), size=(n, 16))]
    codes = np.concatenate([np.full((n, 2), [ord("S"), ord("O")], dtype=np.uint8), codes], axis=1)
    # index in the last 6 characters keeps them unique
    return pa.array([bytes(row[:12]).decode() + f"{i:06X}" for i, row in enumerate(codes)], pa.string())


def iter_rows(
    world: ListeningWorld, *, users_per_chunk: int = 100_000
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(user index, item index, plays) chunks, users in order."""
    rng = np.random.default_rng(world.seed)
    user_style = rng.integers(0, world.styles, size=world.n_users)
    item_style = rng.integers(0, world.styles, size=world.n_items)
    popularity = 1.0 / np.arange(1, world.n_items + 1) ** world.popularity_exponent
    popularity = popularity[rng.permutation(world.n_items)]
    # Heavy-tailed activity, at least one row per user, summing to n_rows.
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=world.n_users)
    rows_per_user = 1 + np.floor(activity / activity.sum() * (world.n_rows - world.n_users)).astype(np.int64)
    rows_per_user[: world.n_rows - int(rows_per_user.sum())] += 1
    all_cdf = np.cumsum(popularity) / popularity.sum()
    style_items = [np.flatnonzero(item_style == s) for s in range(world.styles)]
    style_cdf = [np.cumsum(popularity[i]) / popularity[i].sum() if len(i) else None for i in style_items]
    for lo in range(0, world.n_users, users_per_chunk):
        hi = min(lo + users_per_chunk, world.n_users)
        users = np.repeat(np.arange(lo, hi), rows_per_user[lo:hi])
        items = np.searchsorted(all_cdf, rng.random(users.size), side="right").clip(max=world.n_items - 1)
        own = rng.random(users.size) < world.own_style
        for s in range(world.styles):
            pick = own & (user_style[users] == s)
            if style_cdf[s] is not None and pick.any():
                pos = np.searchsorted(style_cdf[s], rng.random(int(pick.sum())), side="right").clip(
                    max=len(style_items[s]) - 1
                )
                items[pick] = style_items[s][pos]
        plays = np.minimum(rng.zipf(2.2, size=users.size), 10_000).astype(np.int64)
        yield users, items, plays


def write_triplets(world: ListeningWorld, path: Path, *, users_per_chunk: int = 100_000) -> Path:
    """Write the world's rows as one Taste Profile triplet file (no header, tab-separated)."""
    ukeys, ikeys = user_keys(world.n_users), item_keys(world.n_items)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    schema = pa.schema([("user", pa.string()), ("item", pa.string()), ("plays", pa.int64())])
    with storage.atomic_path(path) as tmp, pacsv.CSVWriter(tmp, schema, write_options=options) as writer:
        for users, items, plays in iter_rows(world, users_per_chunk=users_per_chunk):
            writer.write_table(
                pa.table(
                    {
                        "user": pc.take(ukeys, pa.array(users)),
                        "item": pc.take(ikeys, pa.array(items)),
                        "plays": pa.array(plays),
                    },
                    schema=schema,
                )
            )
    return Path(path)


__all__ = ["ListeningWorld", "item_keys", "iter_rows", "user_keys", "write_triplets"]
