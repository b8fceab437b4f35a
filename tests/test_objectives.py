"""The WPE objective against a dense reference computation, values and gradients."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from core.errors import ParameterError
from lightning_modules.objectives import PlayColumns, wpe_loss

# Training steps are called outside a Trainer: their self.log calls have nowhere to go.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _world(seed: int = 0, users: int = 40, tracks: int = 12, f: int = 5):
    rng = np.random.default_rng(seed)
    plays = sp.random(
        users,
        tracks,
        density=0.2,
        random_state=seed,
        format="csr",
        data_rvs=lambda n: rng.integers(1, 20, n).astype(np.float64),
    )
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
    predicted = torch.randn(
        len(tracks), user_factors.shape[1], generator=torch.Generator().manual_seed(seed), requires_grad=True
    )
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


def test_the_latent_factor_cnn_lowers_its_wpe_on_the_training_plays():
    from lightning_modules.latent_factors import LatentFactorModule

    plays, confidence, user_factors = _world(seed=2, users=30, tracks=8, f=5)
    torch.manual_seed(0)
    module = LatentFactorModule(
        n_mels=16, n_factors=5, channels=(8, 8, 16), hidden=16, dropout=0.0, learning_rate=1e-2, objective="wpe"
    )
    crops = torch.randn(8, 16, 94)  # one fixed crop per track, the track's position in the split as its id
    batch = (crops, torch.zeros(8, 5), torch.arange(8))
    with pytest.raises(ParameterError, match="use_plays"):
        module.training_step(batch, 0)
    module.use_plays(user_factors.numpy(), confidence)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = module.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    with torch.no_grad():  # the loss is the per-user mean of the dense WPE
        dense = _dense_wpe(module(crops) * module.hparams.target_scale, user_factors, plays, confidence, np.arange(8))
        torch.testing.assert_close(module.training_step(batch, 0), dense.mean() / 30, rtol=1e-4, atol=1e-5)
