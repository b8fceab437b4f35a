"""The held-out tracks of the cold-start evaluation (DESIGN.md §3 II): their relevance judgements, their
true factors, their clips, and the confidence of the training plays the ``wpe`` objective weighs.

``heldout_plays`` is the factorization's long-form table (``user, item, plays``) of the users' plays of
the held-out items (:func:`tasks.refit.save_heldout_plays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.errors import DatasetError
from core.settings import WMFSettings
from core.storage import read_frame
from tasks.listening import load_play_matrix, play_matrix_for, plays_to_frame
from tasks.shards import read_features, read_manifest
from tasks.wmf import confidence


def heldout_relevance(heldout_plays: Path, *, users: np.ndarray, track_ids: Sequence[str]) -> sp.csr_matrix:
    """Plays of the held-out ``track_ids`` by ``users``: (len(users), len(track_ids)), in those orders."""
    return play_matrix_for(read_frame(heldout_plays), users=users, items=np.asarray(track_ids, dtype=str))


def factors_of(keys: np.ndarray, factors: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
    """The rows of ``factors`` (keyed by ``keys``) for ``wanted``, in its order: (len(wanted), n_factors)."""
    positions = pd.Index(keys).get_indexer(np.asarray(wanted, dtype=str))
    if (positions < 0).any():
        unknown = [w for w, p in zip(wanted, positions) if p < 0]
        raise DatasetError(f"{len(unknown)} tracks have no factors, e.g. {unknown[:3]}: refit the factorization")
    return factors[positions]


def play_confidence(
    listening_dir: Path, batches: Sequence[str], *, users: np.ndarray, tracks: Sequence[str], settings: WMFSettings
) -> sp.csr_matrix:
    """WMF confidence of every play of ``tracks`` in ``batches``: ``(len(users), len(tracks))``, csr."""
    matrix = load_play_matrix(listening_dir, batches=list(batches))
    plays = play_matrix_for(plays_to_frame(matrix), users=users, items=np.asarray(tracks, dtype=str))
    return confidence(plays, settings=settings)


@dataclass(frozen=True)
class HeldoutClips:
    """The held-out tracks that have features, with their plays and log-mel clips."""

    plays: pd.DataFrame  # long form, every held-out play (user, item, plays)
    track_ids: np.ndarray  # (n,) str, sorted
    clips: list[np.ndarray]  # (n_frames, n_mels) log-mel of each, in track_ids order


def heldout_clips(heldout_plays: Path, feature_dir: Path, *, column: str) -> HeldoutClips:
    """The held-out tracks of ``heldout_plays`` with features in ``feature_dir`` (``column``: the log-mel)."""
    plays = read_frame(heldout_plays)
    present = set(read_manifest(feature_dir).column("track_id").to_pylist())
    track_ids = np.asarray(sorted(set(plays["item"].astype(str)) & present), dtype=str)
    if len(track_ids) == 0:
        raise DatasetError("no held-out track has features: nothing to compare the recommenders on")
    mels = read_features(feature_dir, column=column, track_ids=list(track_ids))
    return HeldoutClips(plays=plays, track_ids=track_ids, clips=[mels[t] for t in track_ids])
