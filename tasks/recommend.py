"""Recommendation evaluation under the two protocols.

Cold start (DESIGN.md §3 II): held-out tracks were removed from the factorization. For
every user, they are ranked by ``x_uᵀ ŷ_i`` with ŷ from a given source, and the ranking
is scored against the user's real plays of those tracks.

In-matrix: a share of each user's plays was held out; every item the user did not play
in training is a candidate, ranked by ``x_uᵀ y_i``.

Both report mAP@k, AUC, precision@k and NDCG@k (:func:`tasks.metrics.ranking_metrics`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tasks.metrics import random_factors, ranking_metrics
from tasks.report import RankingRow


def cold_start_track_splits(tracks: pd.DataFrame, *, factorized: set[str], heldout: set[str]) -> dict[str, list[str]]:
    """Track ids for the latent-factor CNN: train/valid from the factorized tracks of
    those splits, test = the held-out tracks (whatever their split), in table order.
    """
    ids = tracks["track_id"].astype(str)
    in_matrix = ids.isin(factorized) & ~ids.isin(heldout)
    return {
        "train": list(ids[in_matrix & (tracks["split"] == "train")]),
        "valid": list(ids[in_matrix & (tracks["split"] == "valid")]),
        "test": list(ids[ids.isin(heldout)]),
    }


def cold_start_rows(
    *,
    user_factors: np.ndarray,
    heldout_plays: sp.csr_matrix,
    predicted_factors: np.ndarray,
    wmf_factors: np.ndarray,
    k: int,
    seed: int,
) -> list[RankingRow]:
    """The comparison table for held-out tracks.

    Parameters
    ----------
    user_factors : np.ndarray [shape=(n_users, F)]
        WMF user factors, fitted without the held-out tracks.
    heldout_plays : sp.csr_matrix [shape=(n_users, n_heldout)]
        Real plays of the held-out tracks: the relevance judgements.
    predicted_factors : np.ndarray [shape=(n_heldout, F)]
        Item factors predicted from audio.
    wmf_factors : np.ndarray [shape=(n_heldout, F)]
        Item factors folded in from the held-out plays themselves: the upper bound.

    Rows: ``random`` (seeded random scores), ``popularity`` (the held-out tracks'
    total plays, an oracle popularity that ignores the user), the CNN's predicted
    factors, and the true WMF factors.
    """
    n_users, n_items = heldout_plays.shape
    popularity = np.asarray(heldout_plays.sum(axis=0), dtype=np.float32).reshape(-1, 1)
    sources = [
        ("random", random_factors(n_users, seed=seed), random_factors(n_items, seed=seed + 1)),
        ("popularity", np.ones((n_users, 1), np.float32), popularity),
        ("CNN-predicted factors", user_factors, predicted_factors),
        ("WMF factors (upper bound)", user_factors, wmf_factors),
    ]
    return [ranking_row(name, users, items, heldout_plays, k=k) for name, users, items in sources]


def ranking_row(name: str, user_factors: np.ndarray, item_factors: np.ndarray, relevant: sp.csr_matrix, *,
                k: int, exclude: sp.csr_matrix | None = None) -> RankingRow:
    metrics = ranking_metrics(user_factors, item_factors, relevant, k=k, exclude=exclude)
    return RankingRow(name=name, map_at_k=metrics["map_at_k"], auc=metrics["auc"],
                      precision_at_k=metrics["precision_at_k"], ndcg_at_k=metrics["ndcg_at_k"],
                      n_users=metrics["n_users"])


def sample_users(n_users: int, max_users: int, *, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_users`` users (all when ``max_users`` is 0 or larger)."""
    if max_users <= 0 or max_users >= n_users:
        return np.arange(n_users)
    return np.sort(np.random.default_rng(seed).choice(n_users, size=max_users, replace=False))


def in_matrix_rows(
    *,
    models: dict[str, tuple[np.ndarray, np.ndarray]],
    train: sp.csr_matrix,
    test: sp.csr_matrix,
    k: int,
    max_users: int = 0,
    seed: int = 0,
) -> list[RankingRow]:
    """In-matrix table: ``random``, ``popularity`` (training listeners per item) and each of
    ``models`` (name -> (user_factors, item_factors)), on the same sample of at most
    ``max_users`` users with a held-out play (all of them when ``max_users`` is 0).

    ``train`` and ``test`` are users × items plays; training items are no candidates.
    """
    scoreable = np.flatnonzero(np.diff(sp.csr_matrix(test).indptr) > 0)  # users with a held-out play
    rows_idx = scoreable[sample_users(len(scoreable), max_users, seed=seed)]
    train_s, test_s = train[rows_idx], test[rows_idx]
    n_items = train.shape[1]
    listeners = np.diff(sp.csc_matrix(train).indptr).astype(np.float32).reshape(-1, 1)
    sources = [
        ("random", random_factors(len(rows_idx), seed=seed), random_factors(n_items, seed=seed + 1)),
        ("popularity", np.ones((len(rows_idx), 1), np.float32), listeners),
        *((name, users[rows_idx], items) for name, (users, items) in models.items()),
    ]
    return [ranking_row(name, users, items, test_s, k=k, exclude=train_s) for name, users, items in sources]
