"""Weighted matrix factorization for implicit feedback (Hu, Koren & Volinsky, ICDM 2008).

Preference ``p_ui = 1`` where the user played the item, else 0; confidence
``c_ui = 1 + alpha * log(1 + plays / epsilon)`` (or ``1 + alpha * plays``); the model
minimises ``sum_ui c_ui (p_ui - x_u . y_i)^2 + lambda (|X|^2 + |Y|^2)`` by alternating
least squares, here through ``implicit``.

``implicit`` reads the stored value of its ``user_items`` matrix as the full confidence
``c_ui`` (its solver adds ``(c_ui - 1) y_i y_i^T`` to ``Y^T Y`` and ``c_ui y_i`` to the
right-hand side), so the confidences are computed here and the model runs with
``alpha=1.0``. Passing raw counts with ``implicit``'s own ``alpha`` would give
``c = alpha * plays`` on the CPU, and the GPU ``fit`` ignores ``alpha`` altogether.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from core.errors import ParameterError
from core.settings import WMFSettings

# Largest float64 work array (elements) that fold-in and the objective build at once.
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class WMFModel:
    """A fitted factorization: ``plays[u, i]`` is predicted by ``user_factors[u] @ item_factors[i]``."""

    user_factors: np.ndarray  # (n_users, factors) float32
    item_factors: np.ndarray  # (n_items, factors) float32
    iterations: int = 0  # ALS sweeps behind these factors (counting from the initial factors)
    # (sweep, validation score) after each evaluation when early stopping was on
    validation: tuple[tuple[int, float], ...] = ()


def _checked_plays(plays: sp.spmatrix | sp.sparray | np.ndarray, name: str = "plays") -> sp.csr_matrix:
    """CSR float64 copy with explicit zeros removed, after validating the counts."""
    try:
        matrix = sp.csr_matrix(plays, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise ParameterError(f"{name} must be a 2-D sparse or dense matrix of play counts: {exc}") from exc
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ParameterError(f"{name} is empty (shape {matrix.shape}): it needs at least one user and one item")
    matrix.sum_duplicates()
    bad = ~np.isfinite(matrix.data) | (matrix.data < 0)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(matrix.indptr, k, side="right") - 1)
        raise ParameterError(
            f"{name} holds an invalid play count {matrix.data[k]!r} at (row {row}, column {int(matrix.indices[k])}) "
            f"({int(bad.sum())} invalid in all): counts must be finite and >= 0"
        )
    # A stored zero would otherwise read as a play (p = 1) to implicit.
    matrix.eliminate_zeros()
    if matrix.nnz == 0:
        raise ParameterError(f"{name} has no plays (shape {matrix.shape}, all counts zero): nothing to factorize")
    return matrix


def _confidence_values(counts: np.ndarray, settings: WMFSettings) -> np.ndarray:
    if settings.confidence == "log":
        return 1.0 + settings.alpha * np.log1p(counts / settings.epsilon)
    if settings.confidence == "linear":
        return 1.0 + settings.alpha * counts
    raise ParameterError(f"confidence={settings.confidence!r} is unknown: use 'log' or 'linear'")


def confidence(plays: sp.csr_matrix, *, settings: WMFSettings) -> sp.csr_matrix:
    """Confidence ``c_ui`` for every play.

    Parameters
    ----------
    plays : sp.csr_matrix [shape=(n_users, n_items)]
        Raw play counts, finite and >= 0. Stored zeros are dropped.
    settings : WMFSettings
        ``confidence`` ("log" or "linear"), ``alpha`` and ``epsilon``.

    Returns
    -------
    sp.csr_matrix [shape=(n_users, n_items), dtype=float32]
        Same sparsity as the nonzero plays; values ``1 + alpha log(1 + plays / epsilon)``
        or ``1 + alpha plays``, all >= 1. Unstored entries have ``c = 1, p = 0``.
    """
    matrix = _checked_plays(plays)
    matrix.data = _confidence_values(matrix.data, settings)
    return matrix.astype(np.float32)


def _factors_to_numpy(factors) -> np.ndarray:
    # The GPU model keeps implicit.gpu.Matrix objects; the CPU model numpy arrays.
    array = factors.to_numpy() if hasattr(factors, "to_numpy") else factors
    return np.ascontiguousarray(array, dtype=np.float32)


def fit_wmf(
    plays: sp.csr_matrix,
    *,
    settings: WMFSettings,
    num_threads: int = 0,
    init: WMFModel | None = None,
    iterations: int | None = None,
    validate: Callable[[WMFModel], float] | None = None,
    on_iteration: Callable[[int, float], None] | None = None,
) -> WMFModel:
    """Factorize a play matrix with ALS (``implicit``; on the GPU when it was built with CUDA).

    Parameters
    ----------
    plays : sp.csr_matrix [shape=(n_users, n_items)]
        Raw play counts, finite and >= 0, with at least one play.
    settings : WMFSettings
        ``factors``, ``regularization`` (lambda), ``iterations``, the confidence
        function, ``solver`` and ``seed`` (the random initial factors); with
        ``validate``, ``eval_every`` and ``early_stopping_patience``.
    num_threads : int >= 0
        CPU solver threads; 0 means one per core. BLAS is held to one thread during
        the fit, as ``implicit`` asks.
    init : WMFModel, optional
        Start from these factors (a warm start) instead of random ones; shapes must
        match ``plays``.
    iterations : int, optional
        ALS sweeps to run; ``settings.iterations`` when None.
    validate : callable, optional
        ``validate(model) -> score`` (higher is better), called every ``eval_every``
        sweeps. With ``early_stopping_patience > 0`` the fit stops after that many
        evaluations without a better score, and the best factors are returned.
    on_iteration : callable, optional
        Called after each ALS sweep as ``on_iteration(iteration, loss)`` with
        ``iteration`` counted from 1 and ``loss`` ``implicit``'s training loss (the WMF
        objective divided by the total confidence weight, ``sum_ui c_ui``). Computing
        the loss costs about one extra half-sweep, so it is only done when asked.

    Returns
    -------
    WMFModel
        ``user_factors`` (n_users, factors) and ``item_factors`` (n_items, factors),
        float32, the sweeps run and the validation history.
    """
    if num_threads < 0:
        raise ParameterError(f"num_threads={num_threads} must be >= 0 (0 = one per core)")
    total = settings.iterations if iterations is None else iterations
    if total < 1:
        raise ParameterError(f"iterations={total} must be >= 1")
    weights = confidence(plays, settings=settings)
    if init is not None:
        expected = [(weights.shape[0], settings.factors), (weights.shape[1], settings.factors)]
        got = [np.shape(init.user_factors), np.shape(init.item_factors)]
        if got != expected:
            raise ParameterError(f"initial factors have shapes {got}, the play matrix needs {expected}")

    import implicit.als
    import implicit.gpu

    use_gpu = bool(implicit.gpu.HAS_CUDA)
    done = 0

    def callback(iteration: int, _elapsed: float, loss: float | None) -> None:
        on_iteration(done + iteration + 1, float("nan") if loss is None else float(loss))

    def to_model(array: np.ndarray):
        array = np.ascontiguousarray(array, dtype=np.float32).copy()
        return implicit.gpu.Matrix(array) if use_gpu else array

    step = settings.eval_every if validate is not None else total
    history: list[tuple[int, float]] = []
    best: WMFModel | None = None
    stale = 0
    # The model's constructor checks the BLAS thread count, so it is built inside the limit too.
    with threadpool_limits(limits=1, user_api="blas"):
        model = implicit.als.AlternatingLeastSquares(
            factors=settings.factors,
            regularization=settings.regularization,
            alpha=1.0,
            iterations=step,
            calculate_training_loss=on_iteration is not None,
            use_cg=settings.solver == "cg",
            num_threads=num_threads,
            random_state=settings.seed,
            use_gpu=use_gpu,
        )
        if init is not None:
            model.user_factors = to_model(init.user_factors)
            model.item_factors = to_model(init.item_factors)
        while done < total:
            model.iterations = min(step, total - done)
            model.fit(weights, show_progress=False, callback=callback if on_iteration is not None else None)
            done += model.iterations
            current = WMFModel(
                _factors_to_numpy(model.user_factors), _factors_to_numpy(model.item_factors), iterations=done
            )
            if validate is None:
                continue
            score = float(validate(current))
            if not np.isfinite(score):
                raise ParameterError(
                    f"the validation score after {done} sweeps is {score}: the validation split "
                    "has no user to score (more plays, or a larger validation_fraction)"
                )
            history.append((done, score))
            if best is None or score > max(s for _, s in history[:-1]):
                best, stale = current, 0
            else:
                stale += 1
                if settings.early_stopping_patience and stale >= settings.early_stopping_patience:
                    break
    final = best if (validate is not None and settings.early_stopping_patience) else current
    return WMFModel(final.user_factors, final.item_factors, iterations=final.iterations, validation=tuple(history))


def _check_factors(factors: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(factors)
    if array.ndim != 2 or array.shape[1] == 0:
        raise ParameterError(f"{name} must be a 2-D array (n, factors), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ParameterError(f"{name} holds non-finite values: refit or check the factor source")
    return array.astype(np.float64, copy=False)


def fold_in_items(user_factors: np.ndarray, item_user_plays: sp.csr_matrix, *, settings: WMFSettings) -> np.ndarray:
    """Exact least-squares item factors for fixed user factors (one ALS half-step).

    ``y_i = (X^T X + X^T (C_i - I) X + lambda I)^-1 X^T C_i p_i`` for each item, with
    ``X^T X`` computed once and the per-item correction summed over that item's
    listeners only. Used for the true-WMF-factor upper bound on held-out items and for
    cold-start items.

    Parameters
    ----------
    user_factors : np.ndarray [shape=(n_users, factors)]
    item_user_plays : sp.csr_matrix [shape=(n_items, n_users)]
        Raw play counts of the items to fold in (items are rows). An item without
        plays gets zero factors.
    settings : WMFSettings
        ``regularization`` and the confidence function (those of the fit that made
        ``user_factors``).

    Returns
    -------
    np.ndarray [shape=(n_items, factors), dtype=float32]
    """
    users = _check_factors(user_factors, "user_factors")
    weights = confidence(item_user_plays, settings=settings).astype(np.float64)
    n_items, n_users = weights.shape
    if n_users != users.shape[0]:
        raise ParameterError(
            f"item_user_plays has {n_users} user columns but user_factors has {users.shape[0]} rows: "
            "pass the plays as items x users, in the user order of the factors"
        )
    n_factors = users.shape[1]
    gram = users.T @ users + settings.regularization * np.eye(n_factors)
    # b_i = X^T C_i p_i = sum over listeners of c_ui x_u (p = 0 elsewhere).
    rhs = np.asarray(weights @ users)
    extra = weights.copy()
    extra.data -= 1.0  # c_ui - 1: only the played entries differ from X^T X

    item_factors = np.zeros((n_items, n_factors), dtype=np.float64)
    max_nnz = max(1, _CHUNK_ELEMENTS // (n_factors * n_factors))
    indptr = extra.indptr
    start = 0
    while start < n_items:
        stop = int(np.searchsorted(indptr, indptr[start] + max_nnz, side="right")) - 1
        stop = min(max(stop, start + 1), start + max_nnz, n_items)
        lo, hi = int(indptr[start]), int(indptr[stop])
        listeners = users[extra.indices[lo:hi]]
        if stop - start == 1:
            # One item (possibly a very popular one): a weighted Gram matrix, no outer products.
            corrections = (listeners.T @ (extra.data[lo:hi, None] * listeners))[None]
        else:
            outer = (listeners[:, :, None] * listeners[:, None, :]).reshape(hi - lo, n_factors * n_factors)
            segments = sp.csr_matrix(
                (extra.data[lo:hi], np.arange(hi - lo), indptr[start : stop + 1] - lo), shape=(stop - start, hi - lo)
            )
            corrections = np.asarray(segments @ outer).reshape(stop - start, n_factors, n_factors)
        try:
            item_factors[start:stop] = np.linalg.solve(gram + corrections, rhs[start:stop, :, None])[..., 0]
        except np.linalg.LinAlgError as exc:
            raise ParameterError(
                f"fold-in system is singular (regularization={settings.regularization}): "
                "use regularization > 0 or user factors of full rank"
            ) from exc
        start = stop
    return item_factors.astype(np.float32)


def fold_in_users(item_factors: np.ndarray, user_item_plays: sp.csr_matrix, *, settings: WMFSettings) -> np.ndarray:
    """Exact user factors for fixed item factors: :func:`fold_in_items` with the roles swapped.

    ``user_item_plays`` is (n_users, n_items); returns (n_users, factors) float32.
    """
    return fold_in_items(item_factors, user_item_plays, settings=settings)


def warm_start(
    previous: WMFModel,
    *,
    previous_users: np.ndarray,
    previous_items: np.ndarray,
    plays: sp.csr_matrix,
    users: np.ndarray,
    items: np.ndarray,
    settings: WMFSettings,
) -> tuple[WMFModel, dict[str, int]]:
    """Initial factors for ``plays`` from a previous factorization, matched by key.

    Known users and items keep their factors; new items are folded in from the known
    users' factors (exact half-step), then new users from all item factors. Running a
    few ALS sweeps from here (``fit_wmf(init=...)``) is the incremental update.

    Returns the model and counts ``known_users, new_users, known_items, new_items``.
    """
    if previous.user_factors.shape[1] != settings.factors:
        raise ParameterError(
            f"previous factors have {previous.user_factors.shape[1]} dimensions, "
            f"settings ask for {settings.factors}: refit from scratch"
        )
    user_pos = pd.Index(np.asarray(previous_users, dtype=object)).get_indexer(np.asarray(users, dtype=object))
    item_pos = pd.Index(np.asarray(previous_items, dtype=object)).get_indexer(np.asarray(items, dtype=object))
    known_u, known_i = user_pos >= 0, item_pos >= 0
    x = np.zeros((len(users), settings.factors), dtype=np.float32)
    y = np.zeros((len(items), settings.factors), dtype=np.float32)
    x[known_u] = previous.user_factors[user_pos[known_u]]
    y[known_i] = previous.item_factors[item_pos[known_i]]
    matrix = sp.csr_matrix(plays)
    if (~known_i).any():
        # New users still have zero factors here, so only known listeners shape the new items.
        y[~known_i] = fold_in_items(x, matrix[:, ~known_i].T.tocsr(), settings=settings)
    if (~known_u).any():
        x[~known_u] = fold_in_users(y, matrix[~known_u].tocsr(), settings=settings)
    counts = {
        "known_users": int(known_u.sum()),
        "new_users": int((~known_u).sum()),
        "known_items": int(known_i.sum()),
        "new_items": int((~known_i).sum()),
    }
    return WMFModel(x, y, iterations=previous.iterations), counts


def wmf_objective(plays: sp.csr_matrix, model: WMFModel, *, settings: WMFSettings) -> float:
    """The WMF objective ``sum_ui c_ui (p_ui - x_u . y_i)^2 + lambda (|X|^2 + |Y|^2)``.

    Computed without the dense score matrix: the sum over all entries with ``c = 1, p = 0``
    is ``trace(X^T X Y^T Y)``; each played entry then adds ``c (1 - s)^2 - s^2`` with
    ``s = x_u . y_i``. Exact (float64) at any size.

    Parameters
    ----------
    plays : sp.csr_matrix [shape=(n_users, n_items)]
        Raw play counts, as passed to :func:`fit_wmf`.
    model : WMFModel
    settings : WMFSettings
        ``regularization`` and the confidence function.

    Returns
    -------
    float
    """
    weights = confidence(plays, settings=settings).tocoo()
    users = _check_factors(model.user_factors, "user_factors")
    items = _check_factors(model.item_factors, "item_factors")
    if weights.shape != (users.shape[0], items.shape[0]) or users.shape[1] != items.shape[1]:
        raise ParameterError(
            f"plays shape {weights.shape} does not match the model "
            f"(user_factors {users.shape}, item_factors {items.shape})"
        )
    total = float(np.sum((users.T @ users) * (items.T @ items)))  # trace(XtX YtY), both symmetric
    rows, cols, conf = weights.row, weights.col, weights.data.astype(np.float64)
    step = max(1, _CHUNK_ELEMENTS // users.shape[1])
    for lo in range(0, conf.size, step):
        hi = lo + step
        scores = np.einsum("ij,ij->i", users[rows[lo:hi]], items[cols[lo:hi]])
        total += float(np.sum(conf[lo:hi] * (1.0 - scores) ** 2 - scores**2))
    total += settings.regularization * (float(np.sum(users**2)) + float(np.sum(items**2)))
    return total


__all__ = ["WMFModel", "confidence", "fit_wmf", "fold_in_items", "fold_in_users", "warm_start", "wmf_objective"]
