"""Training objectives that need more than a prediction and a target.

The weighted prediction error (WPE) of van den Oord, Dieleman & Schrauwen (NIPS 2013):
the WMF objective with the item factors replaced by the network's prediction and the
user factors held fixed,

    WPE(ŷ_i) = Σ_u c_ui (p_ui − x_uᵀ ŷ_i)²,

``p_ui = 1`` when user u played track i, ``c_ui`` the confidence of that play (``c = 1, p = 0``
for every user who did not). Summing over every user would cost O(users) per track; as in
the ALS derivation it splits into a dense part that is the same for every user,
``Σ_u (x_uᵀ ŷ)² = ŷᵀ (XᵀX) ŷ``, and a correction over the track's listeners only,
``Σ_{u played i} c_ui (1 − x_uᵀ ŷ)² − (x_uᵀ ŷ)²``: O(nnz + f²) per track.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch


class PlayColumns:
    """Each track's listeners and their confidences, cut into per-batch triplets for :func:`wpe_loss`.

    Parameters
    ----------
    confidence : sp.csr_matrix [shape=(n_users, n_tracks)]
        ``c_ui`` of every play (:func:`tasks.wmf.confidence`); unstored entries are ``c = 1, p = 0``.
    """

    def __init__(self, confidence: sp.spmatrix) -> None:
        columns = sp.csc_matrix(confidence, dtype=np.float32)
        columns.sort_indices()
        self.n_users, self.n_tracks = columns.shape
        self.indptr = torch.from_numpy(columns.indptr.astype(np.int64))
        self.users = torch.from_numpy(columns.indices.astype(np.int64))
        self.confidence = torch.from_numpy(columns.data.astype(np.float32))

    def batch(self, tracks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(position in the batch, user, confidence)`` of every play of ``tracks`` (column indices), on the CPU."""
        tracks = tracks.cpu().long()
        starts, stops = self.indptr[tracks], self.indptr[tracks + 1]
        counts = stops - starts
        position = torch.repeat_interleave(torch.arange(len(tracks)), counts)
        # The k-th play of a track sits at starts[track] + k: offsets within each column, flattened.
        within = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        where = torch.repeat_interleave(starts, counts) + within
        return position, self.users[where], self.confidence[where]


def wpe_loss(
    predicted: torch.Tensor,
    user_factors: torch.Tensor,
    gram: torch.Tensor,
    position: torch.Tensor,
    users: torch.Tensor,
    confidence: torch.Tensor,
) -> torch.Tensor:
    """The WPE of each predicted track ``[shape=(batch,)]``, from its listeners only.

    Parameters
    ----------
    predicted : [shape=(batch, f)]
        The network's item factors ŷ for the batch's tracks.
    user_factors : [shape=(n_users, f)]
        X, fixed (no gradient flows into it).
    gram : [shape=(f, f)]
        XᵀX, computed once.
    position, users, confidence : [shape=(nnz,)]
        The batch's plays (:meth:`PlayColumns.batch`): the track's place in the batch, the user, c_ui.
    """
    dense = torch.einsum("bf,fg,bg->b", predicted, gram, predicted)  # every user as if c = 1, p = 0
    scores = (user_factors[users] * predicted[position]).sum(dim=1)  # x_uᵀ ŷ_i for the plays
    correction = confidence * (1.0 - scores) ** 2 - scores**2
    return dense + torch.zeros_like(dense).index_add_(0, position, correction)
