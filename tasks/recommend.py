"""Cold-start evaluation of content-based recommendation (DESIGN.md §3 II).

Held-out tracks were removed from the factorization. For every user, they are
ranked by ``x_uᵀ ŷ_i`` with ŷ from a given source, and the ranking is scored
against the user's real plays of those tracks with mAP@k and AUC.
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
    rows = []
    for name, users, items in sources:
        metrics = ranking_metrics(users, items, heldout_plays, k=k)
        rows.append(RankingRow(name=name, map_at_k=metrics["map_at_k"], auc=metrics["auc"]))
    return rows
