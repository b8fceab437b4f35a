"""Recommendation evaluation under the two protocols.

Cold start (DESIGN.md §3 II): held-out tracks were removed from the factorization. For
every user, they are ranked by ``x_uᵀ ŷ_i`` with ŷ from a given source, and the ranking
is scored against the user's real plays of those tracks.

In-matrix: a share of each user's plays was held out; every item the user did not play
in training is a candidate, ranked by ``x_uᵀ y_i``.

Both report mAP@k, AUC, precision@k and NDCG@k (:func:`tasks.metrics.ranking_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.errors import ParameterError
from tasks.listening import play_matrix_for
from tasks.metrics import random_factors, ranking_metrics
from tasks.report import RankingRow, metric_slug


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


def _baselines(
    n_users: int, n_items: int, popularity: np.ndarray, *, seed: int
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``random`` (seeded random scores) and ``popularity`` (one ranking for every user) as factors."""
    return [
        ("random", random_factors(n_users, seed=seed), random_factors(n_items, seed=seed + 1)),
        ("popularity", np.ones((n_users, 1), np.float32), np.asarray(popularity, np.float32).reshape(-1, 1)),
    ]


def cold_start_rows(
    *,
    heldout_plays: sp.csr_matrix,
    models: dict[str, tuple[np.ndarray, np.ndarray]],
    k: int,
    seed: int,
) -> list[RankingRow]:
    """The comparison table for held-out tracks.

    Parameters
    ----------
    heldout_plays : sp.csr_matrix [shape=(n_users, n_heldout)]
        Real plays of the held-out tracks: the relevance judgements.
    models : dict
        name -> (user_factors (n_users, F), item factors of the held-out tracks
        (n_heldout, F)): e.g. factors predicted from audio, or the WMF factors folded
        in from the held-out plays themselves (the upper bound).

    Rows: ``random`` (seeded random scores), ``popularity`` (the held-out tracks'
    total plays, an oracle popularity that ignores the user), then ``models`` in order.
    """
    n_users, n_items = heldout_plays.shape
    sources = [
        *_baselines(n_users, n_items, heldout_plays.sum(axis=0), seed=seed),
        *((name, users, items) for name, (users, items) in models.items()),
    ]
    return [ranking_row(name, users, items, heldout_plays, k=k) for name, users, items in sources]


def rows_as_metrics(rows: list[RankingRow], *, prefix: str = "", k: int | None = None) -> dict[str, float]:
    """MLflow metrics of a ranking table, ``<prefix><ranking>/<metric>``; with ``k`` the
    cut-off metrics are named ``map_at_<k>``, ``precision_at_<k>``, ``ndcg_at_<k>``.
    Undefined (NaN) values are left out."""
    suffix = "k" if k is None else str(k)
    metrics = {}
    for row in rows:
        for name, value in (
            ("map_at_" + suffix, row.map_at_k),
            ("auc", row.auc),
            ("precision_at_" + suffix, row.precision_at_k),
            ("ndcg_at_" + suffix, row.ndcg_at_k),
        ):
            if np.isfinite(value):
                metrics[f"{prefix}{metric_slug(row.name)}/{name}"] = value
    return metrics


def ranking_row(
    name: str,
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    relevant: sp.csr_matrix,
    *,
    k: int,
    exclude: sp.csr_matrix | None = None,
) -> RankingRow:
    metrics = ranking_metrics(user_factors, item_factors, relevant, k=k, exclude=exclude)
    return RankingRow(
        name=name,
        map_at_k=metrics["map_at_k"],
        auc=metrics["auc"],
        precision_at_k=metrics["precision_at_k"],
        ndcg_at_k=metrics["ndcg_at_k"],
        n_users=metrics["n_users"],
    )


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
    listeners = np.diff(sp.csc_matrix(train).indptr)
    sources = [
        *_baselines(len(rows_idx), train.shape[1], listeners, seed=seed),
        *((name, users[rows_idx], items) for name, (users, items) in models.items()),
    ]
    return [ranking_row(name, users, items, test_s, k=k, exclude=train_s) for name, users, items in sources]


def compare_recommenders(
    *,
    heldout_plays: pd.DataFrame,
    track_ids: np.ndarray,
    recommenders: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
    k: int,
    seed: int,
) -> list[RankingRow]:
    """Cold-start table of several recommenders on the same held-out tracks and the same users.

    Parameters
    ----------
    heldout_plays : pd.DataFrame
        Long-form ``user, item, plays`` of the held-out tracks: the relevance judgements.
    track_ids : np.ndarray [shape=(n_tracks,)]
        The held-out tracks to rank, the order of every ``item_factors``.
    recommenders : dict
        name -> (user ids ``(n_u,)``, their factors ``(n_u, F)``, predicted factors of
        ``track_ids`` ``(n_tracks, F)``). Each may know different users (factorizations
        of different listening data): only users every recommender knows are scored.

    Returns
    -------
    list of RankingRow
        ``random``, ``popularity`` (oracle), then the recommenders in order.
    """
    known = None
    for users, _, _ in recommenders.values():
        ids = pd.Index(np.asarray(users, dtype=str))
        known = ids if known is None else known.intersection(ids)
    users = np.asarray(sorted(known), dtype=str)
    relevant = play_matrix_for(heldout_plays, users=users, items=track_ids)
    models = {}
    for name, (ids, user_factors, item_factors) in recommenders.items():
        rows = pd.Index(np.asarray(ids, dtype=str)).get_indexer(users)
        models[name] = (user_factors[rows], item_factors)
    return cold_start_rows(heldout_plays=relevant, models=models, k=k, seed=seed)


ORACLE = "popularity (oracle)"


def recommendation_table(rows: list[RankingRow], *, k: int) -> pd.DataFrame:
    """The paper's table: one row per recommender, mAP@k, AUC and NDCG@k; popularity marked as the oracle it is."""
    return pd.DataFrame(
        [
            {
                "model": ORACLE if row.name == "popularity" else row.name,
                f"mAP@{k}": row.map_at_k,
                "AUC": row.auc,
                f"NDCG@{k}": row.ndcg_at_k,
                "users": row.n_users,
            }
            for row in rows
        ]
    )


def choose_queries(track_ids: Sequence[str], *, n: int, seed: int, asked: Sequence[str] = ()) -> list[str]:
    """``asked`` (each must be one of ``track_ids``), or ``n`` of ``track_ids`` drawn with ``seed``."""
    ids = [str(t) for t in track_ids]
    if asked:
        unknown = [q for q in asked if q not in set(ids)]
        if unknown:
            raise ParameterError(
                f"query track(s) {unknown} are not among the {len(ids)} held-out tracks that have "
                f"both factor sets (e.g. {ids[:3]})"
            )
        return list(asked)
    rng = np.random.default_rng(seed)
    return [ids[i] for i in sorted(rng.choice(len(ids), size=min(n, len(ids)), replace=False))]


def nearest_by_cosine(factors: np.ndarray, query: int, *, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the ``n`` nearest rows to row ``query`` by cosine (itself excluded), and their similarities."""
    unit = factors / np.maximum(np.linalg.norm(factors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit[query]
    similarity[query] = -np.inf
    order = np.argsort(-similarity, kind="stable")[: min(n, len(factors) - 1)]
    return order, similarity[order]


def query_table(
    track_ids: Sequence[str],
    *,
    wmf_factors: np.ndarray,
    predicted: np.ndarray,
    tags: Mapping[str, Sequence[str]],
    queries: Sequence[str],
    n: int,
) -> pd.DataFrame:
    """The seed's query tables: for each query, its ``n`` nearest tracks by WMF factors and by predicted factors.

    One row per query and rank: ``query``, ``query_tags``, ``rank``, ``wmf_track``,
    ``wmf_tags``, ``wmf_cosine``, ``predicted_track``, ``predicted_tags``, ``predicted_cosine``.
    Tags are joined with ``, ``.
    """
    ids = [str(t) for t in track_ids]
    position = {t: i for i, t in enumerate(ids)}
    rows = []
    columns = [
        "query",
        "query_tags",
        "rank",
        "wmf_track",
        "wmf_tags",
        "wmf_cosine",
        "predicted_track",
        "predicted_tags",
        "predicted_cosine",
    ]
    for query in queries:
        by_wmf, wmf_sim = nearest_by_cosine(wmf_factors, position[query], n=n)
        by_audio, audio_sim = nearest_by_cosine(predicted, position[query], n=n)
        for rank in range(len(by_wmf)):
            rows.append(
                {
                    "query": query,
                    "query_tags": ", ".join(tags.get(query, ())),
                    "rank": rank + 1,
                    "wmf_track": ids[by_wmf[rank]],
                    "wmf_tags": ", ".join(tags.get(ids[by_wmf[rank]], ())),
                    "wmf_cosine": float(wmf_sim[rank]),
                    "predicted_track": ids[by_audio[rank]],
                    "predicted_tags": ", ".join(tags.get(ids[by_audio[rank]], ())),
                    "predicted_cosine": float(audio_sim[rank]),
                }
            )
    return pd.DataFrame(rows, columns=columns)


def neighbour_tag_agreement(table: pd.DataFrame) -> dict[str, float]:
    """Mean Jaccard overlap of a neighbour's tags with its query's, for the WMF and the predicted neighbours."""

    def overlap(a: str, b: str) -> float:
        x, y = {t for t in a.split(", ") if t}, {t for t in b.split(", ") if t}
        return len(x & y) / len(x | y) if x | y else 0.0

    return {
        side: float(np.mean([overlap(q, t) for q, t in zip(table["query_tags"], table[f"{side}_tags"])]))
        if len(table)
        else float("nan")
        for side in ("wmf", "predicted")
    }
