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
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from infra.settings import WMFSettings
from tasks.errors import ParameterError

# Largest float64 work array (elements) that fold-in and the objective build at once.
_CHUNK_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class WMFModel:
    """A fitted factorization: ``plays[u, i]`` is predicted by ``user_factors[u] @ item_factors[i]``."""

    user_factors: np.ndarray  # (n_users, factors) float32
    item_factors: np.ndarray  # (n_items, factors) float32


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
    on_iteration: Callable[[int, float], None] | None = None,
) -> WMFModel:
    """Factorize a play matrix with ALS (``implicit``; on the GPU when it was built with CUDA).

    Parameters
    ----------
    plays : sp.csr_matrix [shape=(n_users, n_items)]
        Raw play counts, finite and >= 0, with at least one play.
    settings : WMFSettings
        ``factors``, ``regularization`` (lambda), ``iterations``, the confidence
        function and ``seed`` (the random initial factors).
    num_threads : int >= 0
        CPU solver threads; 0 means one per core. BLAS is held to one thread during
        the fit, as ``implicit`` asks.
    on_iteration : callable, optional
        Called after each ALS sweep as ``on_iteration(iteration, loss)`` with
        ``iteration`` counted from 1 and ``loss`` ``implicit``'s training loss (the WMF
        objective divided by the total confidence weight, ``sum_ui c_ui``). Computing
        the loss costs about one extra half-sweep, so it is only done when asked.

    Returns
    -------
    WMFModel
        ``user_factors`` (n_users, factors) and ``item_factors`` (n_items, factors), float32.
    """
    if num_threads < 0:
        raise ParameterError(f"num_threads={num_threads} must be >= 0 (0 = one per core)")
    weights = confidence(plays, settings=settings)

    import implicit.als
    import implicit.gpu

    def callback(iteration: int, _elapsed: float, loss: float | None) -> None:
        on_iteration(iteration + 1, float("nan") if loss is None else float(loss))

    # The model's constructor checks the BLAS thread count, so it is built inside the limit too.
    with threadpool_limits(limits=1, user_api="blas"):
        model = implicit.als.AlternatingLeastSquares(
            factors=settings.factors,
            regularization=settings.regularization,
            alpha=1.0,
            iterations=settings.iterations,
            calculate_training_loss=on_iteration is not None,
            num_threads=num_threads,
            random_state=settings.seed,
            use_gpu=implicit.gpu.HAS_CUDA,
        )
        model.fit(weights, show_progress=False, callback=callback if on_iteration is not None else None)
    return WMFModel(user_factors=_factors_to_numpy(model.user_factors), item_factors=_factors_to_numpy(model.item_factors))


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
            segments = sp.csr_matrix((extra.data[lo:hi], np.arange(hi - lo), indptr[start : stop + 1] - lo), shape=(stop - start, hi - lo))
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


__all__ = ["WMFModel", "confidence", "fit_wmf", "fold_in_items", "wmf_objective"]

