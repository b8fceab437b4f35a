"""Source tasks of supervised pre-training (van den Oord, Dieleman & Schrauwen, ISMIR 2014; DESIGN.md §3 IV).

Two tasks on the source catalogue, both regressions of a low-dimensional target from
audio features:

- ``tags``: the track × tag matrix is factorized by WMF (tracks as the "users", tags
  as the "items"): each track's tag factors are the target, and a track's tag scores
  are its predicted factors times the tag factors. Held-out tracks are folded in from
  their tags (for their NMSE only).
- ``listening``: the WMF item factors of the play matrix (NIPS 2013's target).

The source table reports, per task and model, the NMSE of the predicted factors and
the AUC and mAP of what they rank: tags per track (macro over tags) for ``tags``,
held-out tracks per user (cold start) for ``listening``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.errors import DatasetError
from core.settings import WMFSettings
from tasks.datasets import multi_hot
from tasks.metrics import tag_metrics
from tasks.wmf import fit_wmf, fold_in_users


@dataclass(frozen=True)
class TagFactors:
    tags: list[str]
    tag_factors: np.ndarray  # (n_tags, f): the "item" side
    track_factors: dict[str, np.ndarray]  # every track's (f,): fitted for the fit tracks, folded in for the others


def tag_matrix(tracks: pd.DataFrame, track_ids: Sequence[str], tags: Sequence[str]) -> sp.csr_matrix:
    """Binary ``(len(track_ids), len(tags))`` matrix of ``tracks``' tags (``track_id``, ``tags``)."""
    vectors = multi_hot(tracks[tracks["track_id"].isin(set(track_ids))], list(tags))
    return sp.csr_matrix(np.stack([vectors[t] for t in track_ids]).astype(np.float32))


def factorize_tags(
    tracks: pd.DataFrame, *, tags: Sequence[str], fit_ids: Sequence[str], fold_ids: Sequence[str], settings: WMFSettings
) -> TagFactors:
    """WMF of the tag matrix of ``fit_ids`` (the training tracks); ``fold_ids`` folded in from their tags.

    ``settings`` are the factorization's (``factors`` is the reduced tag space's size).
    """
    fit = tag_matrix(tracks, fit_ids, tags)
    if fit.nnz == 0:
        raise DatasetError("the training tracks carry none of the tags: nothing to factorize")
    model = fit_wmf(fit, settings=settings)
    folded = fold_in_users(model.item_factors, tag_matrix(tracks, fold_ids, tags), settings=settings)
    factors = {**dict(zip(fit_ids, model.user_factors)), **dict(zip(fold_ids, folded))}
    return TagFactors(tags=list(tags), tag_factors=model.item_factors, track_factors=factors)


def nmse(predicted: np.ndarray, true: np.ndarray) -> float:
    """Mean squared error over the targets' variance around their mean (0: perfect; 1: predicting the mean)."""
    true = np.asarray(true, dtype=np.float64)
    spread = float(((true - true.mean(axis=0)) ** 2).mean())
    return float(((np.asarray(predicted, dtype=np.float64) - true) ** 2).mean() / spread) if spread > 0 else np.nan


def tag_task_scores(predicted: np.ndarray, truth: np.ndarray, factors: TagFactors) -> dict[str, float]:
    """Macro ROC-AUC and mAP (mean average precision over tags) of the tag scores ``predicted @ tag_factorsᵀ``."""
    summary, _ = tag_metrics(truth, predicted @ factors.tag_factors.T, tags=factors.tags)
    return {"auc": summary["roc_auc_macro"], "map": summary["pr_auc_macro"]}
