"""The WPE objective against a dense reference computation, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from lightning_modules.objectives import PlayColumns, wpe_loss


def _world(seed: int = 0, users: int = 40, tracks: int = 12, f: int = 5):
    rng = np.random.default_rng(seed)
    plays = sp.random(users, tracks, density=0.2, random_state=seed, format="csr",
                      data_rvs=lambda n: rng.integers(1, 20, n).astype(np.float64))
    keep = np.ones(tracks)
    keep[3] = 0.0  # a track nobody played
    plays = (plays @ sp.diags(keep)).tocsr()
    plays.eliminate_zeros()
    confidence = plays.copy()
    confidence.data = 1.0 + 2.0 * np.log1p(confidence.data / 1.0)
    user_factors = torch.from_numpy(rng.standard_normal((users, f)).astype(np.float32))
    return plays, confidence.tocsr(), user_factors


def _dense_wpe(predicted, user_factors, plays, confidence, tracks):
    p = torch.from_numpy((plays[:, tracks].toarray() > 0).astype(np.float32))  # (users, batch)
    c = torch.from_numpy(confidence[:, tracks].toarray().astype(np.float32))
    c = torch.where(p > 0, c, torch.ones_like(c))
    scores = user_factors @ predicted.T  # (users, batch)
    return (c * (p - scores) ** 2).sum(dim=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_wpe_equals_the_dense_sum_over_every_user_and_so_does_its_gradient(seed):
    plays, confidence, user_factors = _world(seed)
    columns = PlayColumns(confidence)
    tracks = torch.tensor([5, 3, 0, 11, 5])  # a repeat and a track without plays included
    predicted = torch.randn(len(tracks), user_factors.shape[1], generator=torch.Generator().manual_seed(seed),
                            requires_grad=True)
    fast = wpe_loss(predicted, user_factors, user_factors.T @ user_factors, *columns.batch(tracks))
    reference = _dense_wpe(predicted, user_factors, plays, confidence, tracks.numpy())
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-3)
    (grad_fast,) = torch.autograd.grad(fast.sum(), predicted)
    (grad_dense,) = torch.autograd.grad(reference.sum(), predicted)
    torch.testing.assert_close(grad_fast, grad_dense, rtol=1e-4, atol=1e-3)


def test_play_columns_cut_each_tracks_listeners():
    plays, confidence, _ = _world()
    columns = PlayColumns(confidence)
    position, users, conf = columns.batch(torch.tensor([2, 3]))
    expected = confidence[:, 2].tocoo()
    assert (position == 0).sum() == expected.nnz and not (position == 1).any()  # track 3 has no plays
    assert sorted(users[position == 0].tolist()) == sorted(expected.row.tolist())
    np.testing.assert_allclose(sorted(conf.tolist()), sorted(expected.data.tolist()), rtol=1e-6)
