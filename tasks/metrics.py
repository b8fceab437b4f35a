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
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from core.errors import ParameterError

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


def _relevance_matrix(relevant, shape: tuple[int, int], name: str) -> sp.csr_matrix:
    try:
        matrix = sp.csr_matrix(relevant, copy=True)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"{name} must be a (n_users, n_items) sparse matrix: {exc}") from exc
    if matrix.shape != shape:
        raise ParameterError(f"{name} has shape {matrix.shape}, expected (n_users, n_items) = {shape}")
    matrix.sum_duplicates()
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def _count_equal(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries equal ``value`` (one per row). On the CPU numpy's
    ``count_nonzero`` is several times faster than a torch sum of booleans."""
    if rows.is_cuda:
        return (rows == value).sum(dim=1)
    return torch.from_numpy(np.count_nonzero(rows.numpy() == value.numpy(), axis=1))


def _midranks_below(rows: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Per row: entries scored below ``value`` plus half of the others tied with it."""
    if rows.is_cuda:
        return (rows < value).sum(dim=1) + 0.5 * ((rows == value).sum(dim=1) - 1)
    r, v = rows.numpy(), value.numpy()
    below = np.count_nonzero(r < v, axis=1) + 0.5 * (np.count_nonzero(r == v, axis=1) - 1)
    return torch.from_numpy(below)


def _stable_top(scores: torch.Tensor, top: int) -> torch.Tensor:
    """Indices of the ``top`` best items per row, ordered by (score desc, item index asc).

    ``torch.topk`` is fast but orders tied scores arbitrarily. Rows where a tie touches
    the top ``top`` are redone exactly: every item scored above the k-th score, then the
    lowest-index items tied with it, then a stable sort of just those ``top`` items. The
    result equals a stable descending argsort cut at ``top`` for every row, without
    sorting whole rows (a popularity ranking ties every row).
    """
    values, index = torch.topk(scores, top, dim=1, largest=True, sorted=True)
    kth = values[:, -1:]
    tied_inside = (values[:, 1:] == values[:, :-1]).any(dim=1)
    tied_boundary = _count_equal(scores, kth) > _count_equal(values, kth)
    redo = torch.nonzero(tied_inside | tied_boundary).flatten()
    if redo.numel():
        rows, kth_r = scores[redo], kth[redo]
        above = rows > kth_r
        tied = rows == kth_r
        need = top - above.sum(dim=1, keepdim=True)
        chosen = above | (tied & (torch.cumsum(tied, dim=1) <= need))
        picked = torch.nonzero(chosen)[:, 1].reshape(len(redo), top)  # ascending item index per row
        order = torch.sort(torch.gather(rows, 1, picked), dim=1, descending=True, stable=True).indices
        index[redo] = torch.gather(picked, 1, order)
    return index


def ranking_metrics(
    user_factors: np.ndarray,
    item_factors: np.ndarray,
    relevant: sp.csr_matrix,
    *,
    k: int = 500,
    exclude: sp.csr_matrix | None = None,
    batch_users: int = 4096,
    device: str = "cpu",
) -> dict[str, float]:
    """mAP@k, AUC, precision@k and NDCG@k of the rankings ``user_factors @ item_factors.T``.

    Scores are computed block by block (a matrix product), the top k come from
    ``torch.topk``, and AUC counts, for each relevant item, the candidates scored below
    it, so no full sort of the catalogue is needed. Items are ranked by descending
    score with ties in the top k broken by item index (a stable sort); AUC counts tied
    (relevant, non-relevant) pairs as one half (Mann-Whitney).

    Parameters
    ----------
    user_factors : np.ndarray [shape=(n_users, dim)]
    item_factors : np.ndarray [shape=(n_items, dim)]
        The candidate items (e.g. the songs held out of the factorization).
    relevant : sp.csr_matrix [shape=(n_users, n_items)]
        Nonzero where the item is relevant to the user (played in the test data).
    k : int > 0
        Cut-off. ``AP@k = (1 / min(|R_u|, k)) sum_{j<=k} precision@j rel_j``;
        ``precision@k`` divides the hits in the top k by ``min(k, candidates)``;
        ``NDCG@k`` uses binary gains ``1 / log2(j + 1)`` and the ideal ranking of
        ``min(|R_u|, k)`` hits.
    exclude : sp.csr_matrix [shape=(n_users, n_items)], optional
        Nonzero where the item is not a candidate for the user: the in-matrix protocol
        excludes the items a user played in training. Excluded items must not be relevant.
    batch_users : int > 0
        Users scored at once; lowered further so that one block of scores holds at most
        about 16M entries.
    device : str
        Torch device of the score blocks ("cpu" or "cuda").

    Returns
    -------
    dict
        ``map_at_k``, ``auc``, ``precision_at_k``, ``ndcg_at_k`` (means over users with at
        least one relevant and one non-relevant candidate; NaN, with a warning, when there
        are none) and ``n_users``, the number of users averaged.
    """
    users = _check_factors(user_factors, "user_factors")
    items = _check_factors(item_factors, "item_factors")
    if users.shape[1] != items.shape[1]:
        raise ParameterError(f"user_factors dim {users.shape[1]} != item_factors dim {items.shape[1]}")
    if k < 1 or batch_users < 1:
        raise ParameterError(f"k={k} and batch_users={batch_users} must both be >= 1")
    n_users, n_items = users.shape[0], items.shape[0]
    relevance = _relevance_matrix(relevant, (n_users, n_items), "relevant")
    excluded = None if exclude is None else _relevance_matrix(exclude, (n_users, n_items), "exclude")
    if excluded is not None and relevance.multiply(excluded).nnz:
        raise ParameterError("some relevant items are also excluded: test and training plays overlap")

    n_relevant = np.diff(relevance.indptr)
    n_candidates = n_items - (np.diff(excluded.indptr) if excluded is not None else 0)
    eligible = np.flatnonzero((n_relevant > 0) & (n_relevant < n_candidates))
    if eligible.size == 0:
        warnings.warn(
            "ranking_metrics: no user has both relevant and non-relevant items; metrics are NaN",
            RuntimeWarning,
            stacklevel=2,
        )
        return {
            "map_at_k": float("nan"),
            "auc": float("nan"),
            "precision_at_k": float("nan"),
            "ndcg_at_k": float("nan"),
            "n_users": 0,
        }

    dev = torch.device(device)
    item_t = torch.tensor(
        np.asarray(items, dtype=np.float32), device=dev
    )  # a copy: factors read from Parquet are read-only
    top = min(k, n_items)
    discount = 1.0 / torch.log2(torch.arange(2, top + 2, dtype=torch.float64, device=dev))
    ideal = torch.cumsum(discount, 0)
    positions = torch.arange(1, top + 1, dtype=torch.float64, device=dev)
    batch = max(1, min(batch_users, _SCORE_BLOCK_ELEMENTS // max(n_items, 1)))
    sums = torch.zeros(4, dtype=torch.float64, device=dev)  # ap, precision, ndcg, auc
    for lo in range(0, eligible.size, batch):
        rows = eligible[lo : lo + batch]
        b = len(rows)
        scores = torch.as_tensor(np.ascontiguousarray(users[rows], dtype=np.float32), device=dev) @ item_t.T
        block = relevance[rows]
        rel_row = torch.as_tensor(np.repeat(np.arange(b), np.diff(block.indptr)), device=dev)
        rel_col = torch.as_tensor(block.indices.astype(np.int64), device=dev)
        if excluded is not None:
            ex = excluded[rows]
            ex_row = torch.as_tensor(np.repeat(np.arange(b), np.diff(ex.indptr)), device=dev)
            scores[ex_row, torch.as_tensor(ex.indices.astype(np.int64), device=dev)] = -torch.inf
        n_rel = torch.as_tensor(n_relevant[rows], dtype=torch.float64, device=dev)
        n_cand = torch.as_tensor(np.broadcast_to(n_candidates, (n_users,))[rows], dtype=torch.float64, device=dev)

        hit_matrix = torch.zeros((b, n_items), dtype=torch.bool, device=dev)
        hit_matrix[rel_row, rel_col] = True
        hits = torch.gather(hit_matrix, 1, _stable_top(scores, top)).to(torch.float64)
        del hit_matrix
        cut = torch.clamp(n_rel, max=k)
        precision_at_j = torch.cumsum(hits, dim=1) / positions
        sums[0] += ((precision_at_j * hits).sum(dim=1) / cut).sum()
        sums[1] += (hits.sum(dim=1) / torch.clamp(n_cand, max=top)).sum()
        sums[2] += ((hits * discount).sum(dim=1) / ideal[cut.long() - 1]).sum()

        # AUC: rank of each relevant item among the candidates (excluded items score -inf,
        # below every candidate, and are subtracted), ties counted as halves.
        rel_scores = scores[rel_row, rel_col]
        below = torch.zeros(rel_row.numel(), dtype=torch.float64, device=dev)
        step = max(1, _SCORE_BLOCK_ELEMENTS // max(n_items, 1))
        for s in range(0, rel_row.numel(), step):
            below[s : s + step] = _midranks_below(scores[rel_row[s : s + step]], rel_scores[s : s + step, None])
        n_excluded = n_items - n_cand
        rank_sum = torch.zeros(b, dtype=torch.float64, device=dev).index_add_(0, rel_row, below + 1.0)
        rank_sum -= n_rel * n_excluded
        sums[3] += ((rank_sum - n_rel * (n_rel + 1) / 2) / (n_rel * (n_cand - n_rel))).sum()

    n = eligible.size
    ap, precision, ndcg, auc = (float(v) / n for v in sums.cpu())
    return {"map_at_k": ap, "auc": auc, "precision_at_k": precision, "ndcg_at_k": ndcg, "n_users": int(n)}


def tag_metrics(
    y_true: np.ndarray, y_score: np.ndarray, *, tags: Sequence[str]
) -> tuple[dict[str, float], pd.DataFrame]:
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
