"""WMF: confidence values, recovery of a block-structured play matrix, exact fold-in, objective."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from core.errors import ParameterError
from core.settings import WMFSettings
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
    np.testing.assert_allclose(
        log.toarray(), [[0, 1 + 2 * np.log(7), 0], [1 + 2 * np.log(3), 0, 1 + 2 * np.log(15)]], rtol=1e-6
    )
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
        roc_auc_score(held_out[u][unseen[u]], scores[u][unseen[u]]) for u in range(plays.shape[0]) if held_out[u].any()
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


# ---------------------------------------------------------------- exact reference, warm starts, early stopping


def _exact_wmf(plays: sp.csr_matrix, settings: WMFSettings, init: WMFModel, sweeps: int) -> WMFModel:
    """Dense closed-form ALS, straight from Hu, Koren & Volinsky (2008): for each user
    ``x_u = (Y^T C_u Y + lambda I)^-1 Y^T C_u p_u``, then the same for each item."""
    counts = plays.toarray().astype(np.float64)
    played = counts > 0
    if settings.confidence == "log":
        c = np.where(played, 1 + settings.alpha * np.log1p(counts / settings.epsilon), 1.0)
    else:
        c = np.where(played, 1 + settings.alpha * counts, 1.0)
    p = played.astype(np.float64)
    x, y = init.user_factors.astype(np.float64).copy(), init.item_factors.astype(np.float64).copy()
    reg = settings.regularization * np.eye(settings.factors)
    for _ in range(sweeps):
        for u in range(x.shape[0]):
            x[u] = np.linalg.solve((y.T * c[u]) @ y + reg, (y.T * c[u]) @ p[u])
        for i in range(y.shape[0]):
            y[i] = np.linalg.solve((x.T * c[:, i]) @ x + reg, (x.T * c[:, i]) @ p[:, i])
    return WMFModel(x.astype(np.float32), y.astype(np.float32), iterations=sweeps)


def _init(plays: sp.csr_matrix, factors: int, seed: int = 1) -> WMFModel:
    rng = np.random.default_rng(seed)
    return WMFModel(
        rng.random((plays.shape[0], factors), dtype=np.float32) * 0.01,
        rng.random((plays.shape[1], factors), dtype=np.float32) * 0.01,
    )


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_implicit_exact_solver_matches_the_numpy_reference_sweep_by_sweep(kind: str) -> None:
    plays, _, _ = _block_plays(seed=3)
    settings = SETTINGS.model_copy(update={"solver": "cholesky", "confidence": kind, "alpha": 0.5})
    init = _init(plays, settings.factors)
    for sweeps in (1, 5):
        got = fit_wmf(plays, settings=settings, init=init, iterations=sweeps, num_threads=1)
        want = _exact_wmf(plays, settings, init, sweeps)
        assert got.iterations == sweeps
        # float32 (implicit) against float64 (reference): equal up to rounding, which the
        # near-degenerate directions of a 3-block matrix with 8 factors amplify over sweeps
        for a, b in ((got.user_factors, want.user_factors), (got.item_factors, want.item_factors)):
            np.testing.assert_allclose(a, b, atol=1e-3 * np.abs(b).max())
        assert wmf_objective(plays, got, settings=settings) == pytest.approx(
            wmf_objective(plays, want, settings=settings), rel=1e-5
        )


def test_default_conjugate_gradient_reaches_the_exact_objective() -> None:
    plays, _, _ = _block_plays(seed=4)
    init = _init(plays, SETTINGS.factors)
    # Three CG steps per solve converge more slowly per sweep than exact solves.
    cg = fit_wmf(plays, settings=SETTINGS, init=init, iterations=50)
    exact = _exact_wmf(plays, SETTINGS, init, 50)
    start = wmf_objective(plays, init, settings=SETTINGS)
    got, want = wmf_objective(plays, cg, settings=SETTINGS), wmf_objective(plays, exact, settings=SETTINGS)
    assert got < 0.2 * start
    assert got == pytest.approx(want, rel=0.01)


def test_warm_start_continues_where_the_fit_stopped() -> None:
    plays, _, _ = _block_plays(seed=5)
    settings = SETTINGS.model_copy(update={"solver": "cholesky"})
    init = _init(plays, settings.factors)
    at_once = fit_wmf(plays, settings=settings, init=init, iterations=8, num_threads=1)
    first = fit_wmf(plays, settings=settings, init=init, iterations=5, num_threads=1)
    then = fit_wmf(plays, settings=settings, init=first, iterations=3, num_threads=1)
    np.testing.assert_allclose(then.user_factors, at_once.user_factors, atol=1e-5)
    with pytest.raises(ParameterError, match="shapes"):
        fit_wmf(plays[:-1], settings=settings, init=first)


def test_early_stopping_returns_the_best_evaluated_factors() -> None:
    plays, _, _ = _block_plays(seed=6)
    settings = SETTINGS.model_copy(update={"iterations": 30, "early_stopping_patience": 2, "eval_every": 2})
    scores = iter([0.1, 0.3, 0.5, 0.4, 0.45, 0.9, 0.95])  # best at the 3rd evaluation (sweep 6)
    seen: list[WMFModel] = []

    def validate(model: WMFModel) -> float:
        seen.append(model)
        return next(scores)

    model = fit_wmf(plays, settings=settings, validate=validate)
    assert [s for s, _ in model.validation] == [2, 4, 6, 8, 10]  # stopped after two evaluations without gain
    assert model.iterations == 6
    np.testing.assert_array_equal(model.user_factors, seen[2].user_factors)


def test_incremental_update_from_previous_factors_is_close_to_a_full_refit() -> None:
    from tasks.wmf import warm_start

    plays, _, _ = _block_plays(seed=7)
    users = np.array([f"u{i}" for i in range(plays.shape[0])], dtype=object)
    items = np.array([f"i{i}" for i in range(plays.shape[1])], dtype=object)
    old_users, old_items = np.arange(0, plays.shape[0], 2), np.arange(0, plays.shape[1] - 6)
    old = fit_wmf(plays[old_users][:, old_items], settings=SETTINGS)

    init, counts = warm_start(
        old,
        previous_users=users[old_users],
        previous_items=items[old_items],
        plays=plays,
        users=users,
        items=items,
        settings=SETTINGS,
    )
    assert counts == {
        "known_users": len(old_users),
        "new_users": plays.shape[0] - len(old_users),
        "known_items": len(old_items),
        "new_items": 6,
    }
    np.testing.assert_array_equal(init.user_factors[old_users], old.user_factors)
    assert np.abs(init.item_factors[-6:]).sum() > 0 and np.abs(init.user_factors[1::2]).sum() > 0

    updated = fit_wmf(plays, settings=SETTINGS, init=init, iterations=3)
    full = fit_wmf(plays, settings=SETTINGS)
    cold = fit_wmf(plays, settings=SETTINGS, iterations=3)
    f_updated, f_full, f_cold = (wmf_objective(plays, m, settings=SETTINGS) for m in (updated, full, cold))
    assert f_updated <= 1.02 * f_full
    assert f_updated < f_cold
