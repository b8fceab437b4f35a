"""The cold-start protocol: which tracks train, validate and test the latent-factor CNN, and the table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from tasks.recommend import cold_start_rows, cold_start_track_splits


def test_track_splits_keep_heldout_tracks_out_of_training():
    tracks = pd.DataFrame({"track_id": ["a", "b", "c", "d", "e"], "split": ["train", "train", "valid", "test", "test"]})
    splits = cold_start_track_splits(tracks, factorized={"a", "c"}, heldout={"d", "b"})
    assert splits == {"train": ["a"], "valid": ["c"], "test": ["b", "d"]}


def test_table_orders_sources_as_expected_on_a_planted_structure():
    rng = np.random.default_rng(0)
    users = rng.standard_normal((300, 4)).astype(np.float32)
    items = rng.standard_normal((60, 4)).astype(np.float32)
    # Users play the items they like most: the true factors rank perfectly.
    scores = users @ items.T
    plays = sp.csr_matrix((scores > np.quantile(scores, 0.8, axis=1, keepdims=True)).astype(np.float32))
    noisy = items + 0.7 * rng.standard_normal(items.shape).astype(np.float32)
    rows = {
        r.name: r
        for r in cold_start_rows(
            heldout_plays=plays,
            k=500,
            seed=0,
            models={"CNN-predicted factors": (users, noisy), "WMF factors (upper bound)": (users, items)},
        )
    }
    assert abs(rows["random"].auc - 0.5) < 0.05
    assert rows["WMF factors (upper bound)"].auc == 1.0
    assert rows["random"].auc < rows["CNN-predicted factors"].auc < rows["WMF factors (upper bound)"].auc
