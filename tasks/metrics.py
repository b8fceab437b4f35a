"""Evaluation metrics shared by WMF, the latent-factor CNN and the taggers.

Recommendation (van den Oord et al. 2013): for each user, rank the candidate items by
``x_u . y_i`` and score the ranking against the items the user really played, with
mAP@k and AUC averaged over users. Baselines are expressed as factors too: popularity is
``user_factors = ones((n_users, 1))``, ``item_factors = counts[:, None]``; random is
:func:`random_factors`.

Tagging: per-tag ROC-AUC and PR-AUC (average precision), macro-averaged.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.metrics import average_precision_score, roc_auc_score

from tasks.errors import ParameterError

# Largest users x items block of scores (and its sort order) held at once.
_SCORE_BLOCK_ELEMENTS = 1 << 24


def random_factors(n: int, dim: int = 16, *, seed: int) -> np.ndarray:
    """Gaussian factors for the random baseline.

    Returns
    -------
    np.ndarray [shape=(n, dim), dtype=float32]
    """
    if n < 0 or dim < 1:
        raise ParameterError(f"random_factors needs n >= 0 and dim >= 1, got n={n}, dim={dim}")
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


def _check_factors(factors: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(factors)
    if array.ndim != 2:
        raise ParameterError(f"{name} must be 2-D (n, factors), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} holds non-finite values: scores would be undefined")
    return array


def _average_ranks_descending(sorted_scores: np.ndarray) -> np.ndarray:
    """Ascending 1-based average ranks (ties share their mean rank) of rows sorted in descending order."""
    n_rows, n_items = sorted_scores.shape
    position = np.arange(n_items)
    new_group = np.ones((n_rows, n_items), dtype=bool)
    new_group[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    # first position of each tie group, and one past its last
    group_start = np.maximum.accumulate(np.where(new_group, position, 0), axis=1)
    group_end_flag = np.ones((n_rows, n_items), dtype=bool)
    group_end_flag[:, :-1] = new_group[:, 1:]
    group_stop = np.minimum.accumulate(np.where(group_end_flag, position + 1, n_items)[:, ::-1], axis=1)[:, ::-1]
    # items scored strictly lower: n_items - group_stop; the group's ascending ranks run
    # from (n_items - group_stop + 1) to (n_items - group_start).
    return n_items - (group_start + group_stop - 1) / 2.0


def ranking_metrics(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    relevant: sp.csr_matrix,
    *,
    k: int = 500,
    batch_users: int = 4096,
) -> dict[str, float]:
    """mAP@k, AUC and precision@k of the rankings ``user_factors @ item_factors.T``.

    Items are ranked by descending score; ties in the top k are broken by item index
    (stable sort), and AUC counts tied (relevant, non-relevant) pairs as one half
    (Mann-Whitney with average ranks).

    Parameters
    ----------
    user_factors : np.ndarray [shape=(n_users, dim)]
    item_factors : np.ndarray [shape=(n_items, dim)]
        The candidate items (e.g. the songs held out of the factorization).
    relevant : sp.csr_matrix [shape=(n_users, n_items)]
        Nonzero where the item is relevant to the user (played in the test data).
    k : int > 0
        Cut-off of AP@k and precision@k. ``AP@k = (1 / min(|R_u|, k)) sum_{j<=k}
        precision@j rel_j``; precision@k divides by ``min(k, n_items)``.
    batch_users : int > 0
        Users scored at once; lowered further so that one block of scores holds at most
        about 16M entries.

    Returns
    -------
    dict
        ``map_at_k``, ``auc``, ``precision_at_k`` (means over users with at least one
        relevant and one non-relevant item; NaN, with a warning, when there are none)
        and ``n_users``, the number of users averaged.
    """
    users = _check_factors(user_factors, "user_factors")
    items = _check_factors(item_factors, "item_factors")
    if users.shape[1] != items.shape[1]:
        raise ParameterError(f"user_factors dim {users.shape[1]} != item_factors dim {items.shape[1]}")
    if k < 1 or batch_users < 1:
        raise ParameterError(f"k={k} and batch_users={batch_users} must both be >= 1")
    n_users, n_items = users.shape[0], items.shape[0]
    try:
        relevance = sp.csr_matrix(relevant, copy=True)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"relevant must be a (n_users, n_items) sparse matrix: {exc}") from exc
    if relevance.shape != (n_users, n_items):
        raise ParameterError(f"relevant has shape {relevance.shape}, expected (n_users, n_items) = {(n_users, n_items)}")
    relevance.sum_duplicates()
    relevance.eliminate_zeros()

    n_relevant = np.diff(relevance.indptr)
    eligible = np.flatnonzero((n_relevant > 0) & (n_relevant < n_items))
    if eligible.size == 0:
        warnings.warn(
            "ranking_metrics: no user has both relevant and non-relevant items; metrics are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return {"map_at_k": float("nan"), "auc": float("nan"), "precision_at_k": float("nan"), "n_users": 0}

    top = min(k, n_items)
    batch = max(1, min(batch_users, _SCORE_BLOCK_ELEMENTS // max(n_items, 1)))
    ap_sum = auc_sum = precision_sum = 0.0
    for lo in range(0, eligible.size, batch):
        rows = eligible[lo : lo + batch]
        scores = users[rows] @ items.T
        order = np.argsort(-scores, axis=1, kind="stable")
        hits = np.take_along_axis(relevance[rows].toarray() != 0, order, axis=1)
        n_rel = n_relevant[rows].astype(np.float64)

        top_hits = hits[:, :top]
        precision_at_j = np.cumsum(top_hits, axis=1) / np.arange(1, top + 1)
        ap_sum += float(np.sum((precision_at_j * top_hits).sum(axis=1) / np.minimum(n_rel, k)))
        precision_sum += float(np.sum(top_hits.sum(axis=1) / top))

        ranks = _average_ranks_descending(np.take_along_axis(scores, order, axis=1))
        rank_sum = (ranks * hits).sum(axis=1)
        auc_sum += float(np.sum((rank_sum - n_rel * (n_rel + 1) / 2) / (n_rel * (n_items - n_rel))))

    n = eligible.size
    return {"map_at_k": ap_sum / n, "auc": auc_sum / n, "precision_at_k": precision_sum / n, "n_users": int(n)}


def tag_metrics(y_true: np.ndarray, y_score: np.ndarray, *, tags: Sequence[str]) -> tuple[dict[str, float], pd.DataFrame]:
    """Per-tag ROC-AUC and PR-AUC (average precision), and their macro averages.

    Parameters
    ----------
    y_true : np.ndarray [shape=(n_clips, n_tags)]
        Binary labels (0/1 or bool).
    y_score : np.ndarray [shape=(n_clips, n_tags)]
        Scores, probabilities or logits (only their order matters).
    tags : sequence of str [length n_tags]

    Returns
    -------
    summary : dict
        ``roc_auc_macro`` and ``pr_auc_macro``, means over the tags with both classes
        present, ``n_tags_scored``, how many those were, and ``pr_auc_chance``, the
        macro PR-AUC of a random scorer over the same tags (their mean positive rate).
    per_tag : pd.DataFrame
        Columns ``tag, positives, roc_auc, pr_auc``, best ROC-AUC first; tags with a
        single class have NaN scores and come last.
    """
    truth = np.asarray(y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    tags = list(tags)
    if truth.ndim != 2 or truth.shape != scores.shape or truth.shape[1] != len(tags):
        raise ParameterError(
            f"y_true {truth.shape}, y_score {scores.shape} and {len(tags)} tags disagree: "
            "both arrays must be (n_clips, n_tags) with one name per tag"
        )
    if not np.isin(truth, (0, 1)).all():
        raise ParameterError("y_true must be binary (0/1 or bool)")
    if not np.isfinite(scores).all():
        raise ParameterError("y_score holds non-finite values")
    truth = truth.astype(bool)

    positives = truth.sum(axis=0)
    roc = np.full(len(tags), np.nan)
    pr = np.full(len(tags), np.nan)
    for t in np.flatnonzero((positives > 0) & (positives < truth.shape[0])):
        roc[t] = roc_auc_score(truth[:, t], scores[:, t])
        pr[t] = average_precision_score(truth[:, t], scores[:, t])

    scored = ~np.isnan(roc)
    n_scored = int(scored.sum())
    summary = {
        "roc_auc_macro": float(roc[scored].mean()) if n_scored else float("nan"),
        "pr_auc_macro": float(pr[scored].mean()) if n_scored else float("nan"),
        "n_tags_scored": n_scored,
        # A random scorer's expected PR-AUC is the tag's positive rate.
        "pr_auc_chance": float(truth[:, scored].mean(axis=0).mean()) if n_scored else float("nan"),
    }
    per_tag = pd.DataFrame({"tag": tags, "positives": positives.astype(np.int64), "roc_auc": roc, "pr_auc": pr})
    per_tag = per_tag.sort_values("roc_auc", ascending=False, na_position="last", kind="stable").reset_index(drop=True)
    return summary, per_tag


__all__ = ["random_factors", "ranking_metrics", "tag_metrics"]
