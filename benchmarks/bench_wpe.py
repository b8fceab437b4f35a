"""The WPE objective's cost: one training step of the latent-factor CNN with WPE against one with MSE.

Both steps run on the same batch of log-mel crops (forward, loss, backward, Adam) with
the default network; WPE adds, per track, a Gram-matrix term (f²) and one dot product per
listener (:mod:`lightning_modules.objectives`). The listening data is random, at the demo's
shape by default (3,000 users, 1,200 tracks, 2 % of the pairs played), or ``--users`` /
``--density`` for Taste-Profile-like sizes. Prints the median step time of each and the
ratio; a dense reference (every user of every track, O(users) per track) is timed too.

    python benchmarks/bench_wpe.py                               # demo shape
    python benchmarks/bench_wpe.py --users 1000000 --density 0.0001 --repeats 5
    python benchmarks/bench_wpe.py --users 1000000 --density 0.0001 --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.objectives import wpe_loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3000)
    parser.add_argument("--tracks", type=int, default=1200)
    parser.add_argument("--density", type=float, default=0.02)
    parser.add_argument("--factors", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu | cuda: where the network and the objective run")
    args = parser.parse_args()
    device = torch.device(args.device)

    def sync() -> None:  # a GPU step is timed when it has finished, not when it was queued
        if device.type == "cuda":
            torch.cuda.synchronize()

    rng = np.random.default_rng(0)
    plays = sp.random(
        args.users,
        args.tracks,
        density=args.density,
        random_state=0,
        format="csr",
        data_rvs=lambda n: rng.integers(1, 30, n).astype(np.float64),
    )
    confidence = plays.copy()
    confidence.data = 1.0 + np.log1p(confidence.data)
    user_factors = rng.standard_normal((args.users, args.factors)).astype(np.float32) * 0.1
    torch.manual_seed(0)
    crops = torch.randn(args.batch_size, 128, 94, device=device)
    tracks = torch.from_numpy(rng.integers(0, args.tracks, args.batch_size))
    batch = (crops, torch.randn(args.batch_size, args.factors, device=device), tracks.to(device))

    def module(objective: str) -> tuple[LatentFactorModule, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = LatentFactorModule(n_mels=128, n_factors=args.factors, objective=objective).to(device)
        if objective == "wpe":
            m.use_plays(user_factors, confidence)
        m.log = lambda *a, **k: None  # outside a Trainer
        return m, torch.optim.Adam(m.parameters(), lr=1e-4)

    def step_time(m: LatentFactorModule, optimizer: torch.optim.Optimizer) -> float:
        m.training_step(batch, 0).backward()  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = m.training_step(batch, 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync()
        return (time.perf_counter() - start) / args.steps

    models = {name: module(name) for name in ("mse", "wpe")}
    times = {name: [] for name in models}
    for _ in range(args.repeats):
        for name, (m, optimizer) in models.items():
            times[name].append(step_time(m, optimizer))
    med = {k: statistics.median(v) for k, v in times.items()}

    # The objective alone, fast against dense (every user of the batch's tracks).
    predicted = torch.randn(args.batch_size, args.factors, device=device, requires_grad=True)
    x = torch.from_numpy(user_factors).to(device)
    gram = x.T @ x
    columns = models["wpe"][0]._plays
    dense_p = torch.from_numpy((plays[:, tracks.numpy()].toarray() > 0).astype(np.float32))
    dense_c = torch.from_numpy(
        np.where(dense_p.numpy() > 0, confidence[:, tracks.numpy()].toarray(), 1.0).astype(np.float32)
    ).to(device)
    dense_p = dense_p.to(device)

    def fast() -> None:
        wpe_loss(predicted, x, gram, *(t.to(device) for t in columns.batch(tracks))).sum().backward()

    def dense() -> None:
        (dense_c * (dense_p - x @ predicted.T) ** 2).sum().backward()

    def timed(run) -> float:
        run()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            run()
        sync()
        return (time.perf_counter() - start) / args.steps

    objective = {
        "fast": statistics.median(timed(fast) for _ in range(args.repeats)),
        "dense": statistics.median(timed(dense) for _ in range(args.repeats)),
    }
    nnz = int(sum(plays[:, t].nnz for t in tracks.tolist()))
    print(
        f"latent-factor CNN step, batch {args.batch_size} crops (128 x 94), {args.users} users, {args.tracks} "
        f"tracks, {plays.nnz} plays ({nnz} in the batch's columns), f={args.factors}, "
        f"{args.device} ({torch.get_num_threads()} threads), median of {args.repeats} x {args.steps} steps"
    )
    print(
        f"  MSE step {med['mse'] * 1e3:8.2f} ms   WPE step {med['wpe'] * 1e3:8.2f} ms   "
        f"ratio WPE/MSE {med['wpe'] / med['mse']:.2f}"
    )
    print(
        f"  objective + backward alone: listeners + Gram {objective['fast'] * 1e3:.3f} ms, dense over every "
        f"user {objective['dense'] * 1e3:.3f} ms, ratio dense/fast {objective['dense'] / objective['fast']:.1f}"
    )


if __name__ == "__main__":
    main()
