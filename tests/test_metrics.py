"""Ranking and tagging metrics against naive per-user definitions and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import average_precision_score, roc_auc_score

from core.errors import ParameterError
from tasks.metrics import random_factors, ranking_metrics, tag_metrics


def _naive_ranking(
    scores: np.ndarray, relevant: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> dict[str, float]:
    """One user at a time, straight from the definitions."""
    aps, aucs, precisions, ndcgs = [], [], [], []
    exclude = np.zeros_like(relevant) if exclude is None else exclude
    for s, r, x in zip(scores, relevant, exclude, strict=True):
        candidates = np.flatnonzero(~x)
        s, r = s[candidates], r[candidates]
        if r.sum() == 0 or r.all():
            continue
        order = sorted(range(len(s)), key=lambda i: (-s[i], i))[:k]
        hits, ap, dcg = 0, 0.0, 0.0
        for j, item in enumerate(order, start=1):
            if r[item]:
                hits += 1
                ap += hits / j
                dcg += 1 / np.log2(j + 1)
        aps.append(ap / min(r.sum(), k))
        precisions.append(hits / min(k, len(s)))
        ndcgs.append(dcg / sum(1 / np.log2(j + 1) for j in range(1, min(r.sum(), k) + 1)))
        aucs.append(roc_auc_score(r, s))
    return {
        "map_at_k": np.mean(aps),
        "auc": np.mean(aucs),
        "precision_at_k": np.mean(precisions),
        "ndcg_at_k": np.mean(ndcgs),
        "n_users": len(aps),
    }


@pytest.mark.parametrize("k", [1, 5, 37, 500])
def test_ranking_metrics_match_naive_definitions_with_ties(k: int) -> None:
    rng = np.random.default_rng(0)
    n_users, n_items = 50, 37
    # integer factors give many exactly tied scores
    users = rng.integers(-2, 3, size=(n_users, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n_items, 3)).astype(np.float32)
    relevant = rng.random((n_users, n_items)) < 0.15
    relevant[0] = False  # no relevant item: excluded
    relevant[1] = True  # no non-relevant item: excluded
    scores = users @ items.T
    assert len(np.unique(scores[2])) < n_items  # ties are present

    got = ranking_metrics(users, items, sp.csr_matrix(relevant), k=k, batch_users=7)
    want = _naive_ranking(scores, relevant, k)

    assert got["n_users"] == want["n_users"] == n_users - 2
    for key in ("map_at_k", "auc", "precision_at_k", "ndcg_at_k"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("k", [3, 20, 500])
def test_in_matrix_protocol_excludes_training_items(k: int) -> None:
    """With ``exclude``, a user's training items are no candidates: naive per-user reference."""
    rng = np.random.default_rng(3)
    n_users, n_items = 60, 45
    users = rng.integers(-2, 3, size=(n_users, 4)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n_items, 4)).astype(np.float32)
    played = rng.random((n_users, n_items)) < 0.3
    test = played & (rng.random((n_users, n_items)) < 0.3)
    train = played & ~test
    train[5] = True  # all items excluded but the relevant ones: no non-relevant candidate
    train[5, test[5]] = False

    got = ranking_metrics(users, items, sp.csr_matrix(test), exclude=sp.csr_matrix(train), k=k, batch_users=11)
    want = _naive_ranking(users @ items.T, test, k, exclude=train)
    assert got["n_users"] == want["n_users"]
    for key in ("map_at_k", "auc", "precision_at_k", "ndcg_at_k"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    with pytest.raises(ParameterError, match="overlap"):
        ranking_metrics(users, items, sp.csr_matrix(test), exclude=sp.csr_matrix(played))


def test_ranking_metrics_random_float_factors_match_naive() -> None:
    rng = np.random.default_rng(4)
    users, items = rng.standard_normal((200, 8)).astype(np.float32), rng.standard_normal((300, 8)).astype(np.float32)
    relevant = rng.random((200, 300)) < 0.02
    got = ranking_metrics(users, items, sp.csr_matrix(relevant), k=50, batch_users=64)
    want = _naive_ranking(users @ items.T, relevant, 50)
    for key in ("map_at_k", "auc", "precision_at_k", "ndcg_at_k"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key


def test_ranking_metrics_perfect_and_reversed_scores() -> None:
    rng = np.random.default_rng(1)
    relevant = rng.random((20, 30)) < 0.2
    relevant[:, 0], relevant[:, 1] = True, False
    truth = sp.csr_matrix(relevant)
    # identity user factors make score[u, i] = item_factors[i, u], here the relevance itself
    users = np.eye(20, dtype=np.float32)
    perfect = relevant.T.astype(np.float32)
    best = ranking_metrics(users, perfect, truth, k=10)
    worst = ranking_metrics(users, -perfect, truth, k=10)
    assert best["map_at_k"] == pytest.approx(1.0)
    assert best["auc"] == pytest.approx(1.0)
    assert worst["auc"] == pytest.approx(0.0)
    assert worst["map_at_k"] < 0.5


def test_ranking_metrics_random_baseline_near_half() -> None:
    n_users, n_items = 300, 200
    relevant = sp.random(n_users, n_items, density=0.05, random_state=3, format="csr")
    got = ranking_metrics(random_factors(n_users, seed=0), random_factors(n_items, seed=1), relevant, k=50)
    assert got["auc"] == pytest.approx(0.5, abs=0.03)
    assert random_factors(5, 4, seed=2).dtype == np.float32
    np.testing.assert_array_equal(random_factors(5, seed=9), random_factors(5, seed=9))


def test_ranking_metrics_validation() -> None:
    users, items = np.ones((3, 2)), np.ones((4, 2))
    with pytest.raises(ParameterError, match="shape"):
        ranking_metrics(users, items, sp.csr_matrix((4, 3)))
    with pytest.raises(ParameterError, match="k=0"):
        ranking_metrics(users, items, sp.csr_matrix((3, 4)), k=0)
    with pytest.warns(RuntimeWarning, match="no user"):
        got = ranking_metrics(users, items, sp.csr_matrix((3, 4)))
    assert got["n_users"] == 0 and np.isnan(got["auc"])


def test_tag_metrics_match_sklearn_and_skip_single_class_tags() -> None:
    rng = np.random.default_rng(4)
    y_true = (rng.random((60, 4)) < 0.3).astype(int)
    y_true[:, 2] = 0  # only negatives: not scored
    y_score = rng.random((60, 4)) + 0.5 * y_true
    tags = ["rock", "piano", "never", "female"]

    summary, per_tag = tag_metrics(y_true, y_score, tags=tags)

    scored = [0, 1, 3]
    rocs = {tags[t]: roc_auc_score(y_true[:, t], y_score[:, t]) for t in scored}
    prs = {tags[t]: average_precision_score(y_true[:, t], y_score[:, t]) for t in scored}
    assert summary["n_tags_scored"] == 3
    assert summary["roc_auc_macro"] == pytest.approx(np.mean(list(rocs.values())))
    assert summary["pr_auc_macro"] == pytest.approx(np.mean(list(prs.values())))
    assert list(per_tag.columns) == ["tag", "positives", "roc_auc", "pr_auc"]
    assert per_tag["tag"].iloc[-1] == "never" and np.isnan(per_tag["roc_auc"].iloc[-1])
    assert per_tag["roc_auc"].iloc[:3].is_monotonic_decreasing
    row = per_tag.set_index("tag").loc["rock"]
    assert row["roc_auc"] == pytest.approx(rocs["rock"]) and row["pr_auc"] == pytest.approx(prs["rock"])
    assert row["positives"] == y_true[:, 0].sum()


def test_tag_metrics_validation() -> None:
    with pytest.raises(ParameterError, match="disagree"):
        tag_metrics(np.zeros((3, 2)), np.zeros((3, 2)), tags=["a"])
    with pytest.raises(ParameterError, match="binary"):
        tag_metrics(np.full((3, 1), 2), np.zeros((3, 1)), tags=["a"])
