"""WMF: confidence values, recovery of a block-structured play matrix, exact fold-in, objective."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from infra.settings import WMFSettings
from tasks.errors import ParameterError
from tasks.wmf import WMFModel, confidence, fit_wmf, fold_in_items, wmf_objective

N_BLOCKS, BLOCK_USERS, BLOCK_ITEMS = 3, 40, 30


def _block_plays(seed: int = 0, held_out_fraction: float = 0.2) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Users of block b play (nearly) every item of block b, plus sparse noise elsewhere.

    Returns the training plays, a mask of held-out in-block entries, and the block mask.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items = N_BLOCKS * BLOCK_USERS, N_BLOCKS * BLOCK_ITEMS
    in_block = np.zeros((n_users, n_items), dtype=bool)
    for b in range(N_BLOCKS):
        in_block[b * BLOCK_USERS : (b + 1) * BLOCK_USERS, b * BLOCK_ITEMS : (b + 1) * BLOCK_ITEMS] = True
    counts = rng.integers(1, 30, size=(n_users, n_items))
    noise = ~in_block & (rng.random((n_users, n_items)) < 0.03)
    held_out = in_block & (rng.random((n_users, n_items)) < held_out_fraction)
    plays = np.where((in_block & ~held_out) | noise, counts, 0)
    return sp.csr_matrix(plays), held_out, in_block


SETTINGS = WMFSettings(factors=8, regularization=0.1, iterations=10, seed=0)


def test_confidence_log_and_linear_by_hand() -> None:
    plays = sp.csr_matrix(np.array([[0, 3, 0], [1, 0, 7]]))
    log = confidence(plays, settings=WMFSettings(confidence="log", alpha=2.0, epsilon=0.5))
    linear = confidence(plays, settings=WMFSettings(confidence="linear", alpha=0.5))
    assert log.dtype == linear.dtype == np.float32
    np.testing.assert_array_equal(log.indices, plays.indices)
    np.testing.assert_allclose(log.toarray(), [[0, 1 + 2 * np.log(7), 0], [1 + 2 * np.log(3), 0, 1 + 2 * np.log(15)]], rtol=1e-6)
    np.testing.assert_allclose(linear.toarray(), [[0, 2.5, 0], [1.5, 0, 4.5]])


def test_confidence_drops_stored_zeros_and_rejects_bad_counts() -> None:
    stored_zero = sp.csr_matrix((np.array([0.0, 2.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 2))
    assert confidence(stored_zero, settings=SETTINGS).nnz == 1
    with pytest.raises(ParameterError, match="-3"):
        confidence(sp.csr_matrix(np.array([[1.0, -3.0]])), settings=SETTINGS)
    with pytest.raises(ParameterError, match="nan"):
        confidence(sp.csr_matrix(np.array([[np.nan, 1.0]])), settings=SETTINGS)
    with pytest.raises(ParameterError, match="empty"):
        confidence(sp.csr_matrix((0, 5)), settings=SETTINGS)
    with pytest.raises(ParameterError, match="no plays"):
        confidence(sp.csr_matrix((4, 5)), settings=SETTINGS)


def test_fit_wmf_recovers_block_structure() -> None:
    plays, held_out, in_block = _block_plays()
    reports: list[tuple[int, float]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # implicit's BLAS-threads warning must not fire
        model = fit_wmf(plays, settings=SETTINGS, on_iteration=lambda i, loss: reports.append((i, loss)))

    assert model.user_factors.shape == (plays.shape[0], 8) and model.item_factors.shape == (plays.shape[1], 8)
    assert model.user_factors.dtype == model.item_factors.dtype == np.float32
    assert [i for i, _ in reports] == list(range(1, SETTINGS.iterations + 1))
    assert reports[-1][1] < reports[0][1]

    scores = model.user_factors @ model.item_factors.T
    in_mean = np.where(in_block, scores, 0).sum(1) / in_block.sum(1)
    out_mean = np.where(~in_block, scores, 0).sum(1) / (~in_block).sum(1)
    assert (in_mean > out_mean).all()

    # held-out in-block entries against the out-of-block items the user never played
    unseen = plays.toarray() == 0
    aucs = [
        roc_auc_score(held_out[u][unseen[u]], scores[u][unseen[u]])
        for u in range(plays.shape[0])
        if held_out[u].any()
    ]
    assert np.mean(aucs) > 0.9


def test_fold_in_matches_an_exact_als_half_step() -> None:
    import implicit.cpu.als

    plays, _, _ = _block_plays(seed=1)
    settings = WMFSettings(factors=6, regularization=0.3, iterations=4, confidence="log", alpha=3.0, seed=2)
    with threadpool_limits(limits=1, user_api="blas"):
        # Exact solver (no conjugate gradient): the last half-step of each sweep solves for the items.
        als = implicit.cpu.als.AlternatingLeastSquares(
            factors=6, regularization=0.3, alpha=1.0, use_cg=False, iterations=4, random_state=2, num_threads=1
        )
        als.fit(confidence(plays, settings=settings), show_progress=False)

    folded = fold_in_items(als.user_factors, plays.T.tocsr(), settings=settings)
    assert folded.dtype == np.float32
    assert np.linalg.norm(folded - als.item_factors) <= 1e-3 * np.linalg.norm(als.item_factors)


def test_fold_in_chunking_and_items_without_plays(monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.wmf

    rng = np.random.default_rng(5)
    users = rng.standard_normal((25, 4)).astype(np.float32)
    dense = np.where(rng.random((30, 25)) < 0.3, rng.integers(1, 10, size=(30, 25)), 0)
    dense[7] = 0  # an item nobody played folds in to zero factors
    plays = sp.csr_matrix(dense)
    whole = fold_in_items(users, plays, settings=SETTINGS)
    monkeypatch.setattr(tasks.wmf, "_CHUNK_ELEMENTS", 5 * 16)  # chunks of <= 5 plays, single items too
    chunked = fold_in_items(users, plays, settings=SETTINGS)
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(whole[7], 0)
    # each folded item minimises the objective with the users fixed: nudging it only raises it
    model = WMFModel(user_factors=users, item_factors=whole)
    base = wmf_objective(plays.T.tocsr(), model, settings=SETTINGS)
    nudged = whole.copy()
    nudged[3] += 0.01
    assert wmf_objective(plays.T.tocsr(), WMFModel(users, nudged), settings=SETTINGS) > base
    with pytest.raises(ParameterError, match="user columns"):
        fold_in_items(users[:10], plays, settings=SETTINGS)


def test_wmf_objective_matches_dense_and_falls_with_fitting() -> None:
    plays, _, _ = _block_plays(seed=2)
    rng = np.random.default_rng(0)
    start = WMFModel(
        user_factors=rng.random((plays.shape[0], 8), dtype=np.float32) * 0.01,
        item_factors=rng.random((plays.shape[1], 8), dtype=np.float32) * 0.01,
    )
    fitted = fit_wmf(plays, settings=SETTINGS)

    c = np.ones(plays.shape)
    weights = confidence(plays, settings=SETTINGS)
    c[weights.nonzero()] = weights.data
    p = (plays.toarray() > 0).astype(float)
    x, y = fitted.user_factors.astype(float), fitted.item_factors.astype(float)
    dense = np.sum(c * (p - x @ y.T) ** 2) + SETTINGS.regularization * (np.sum(x**2) + np.sum(y**2))
    assert wmf_objective(plays, fitted, settings=SETTINGS) == pytest.approx(dense, rel=1e-9)

    one_sweep = fit_wmf(plays, settings=SETTINGS.model_copy(update={"iterations": 1}))
    objectives = [wmf_objective(plays, m, settings=SETTINGS) for m in (start, one_sweep, fitted)]
    assert objectives[0] > objectives[1] > objectives[2]


def test_fit_wmf_validation() -> None:
    with pytest.raises(ParameterError, match="num_threads"):
        fit_wmf(sp.csr_matrix(np.eye(3)), settings=SETTINGS, num_threads=-1)
    with pytest.raises(ParameterError, match="-1"):
        fit_wmf(sp.csr_matrix(np.array([[1, -1]])), settings=SETTINGS)
