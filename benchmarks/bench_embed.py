"""Embedding throughput: ``mirflow embed`` on the Dask cluster against a single-process loop.

The project's path is :func:`flows.transfer.embed_catalogue` as a user calls it: the
log-mel feature flow and the K-means flow (the model's codebooks) fanned out over a
LocalCluster, then the model's hidden layers, timed from the call to the Parquet file
(cluster start-up included). The baseline is the plain loop in this process, one clip
after another: ``tasks.audio.decode``, ``tasks.spectrogram.feature_columns`` (the same
columns), rounded through float16 as the shards are, ``tasks.kmeans.encode_clip`` per
timescale with the same codebooks, then ``FactorRegressorModule.embed``. Both compute the
same embeddings (checked). Prints clips/s, medians over the repeats, and their ratio.

    python benchmarks/bench_embed.py --clips 1000 --small 100 --workers 2 --repeats 2

With ``--small n`` each repeat also embeds the first n clips alone (a manifest of them),
and the table adds the flow's marginal rate, ``(clips - n) / (t_clips - t_n)``: its
throughput once the fixed cost of a run (cluster start-up, the Prefect flow runs, three
MLflow runs, the model's download) is paid.

The pre-trained model comes from a ``ismir2014-smoke`` study on a small synthetic world
in ``--cache`` (made once, then reused); the clips are the synthetic target catalogue
(``--clips`` genre clips of ``--seconds`` s at 16 kHz WAV), rendered once. Each embed run
gets a fresh data folder (nothing is reused as already done), removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
from mirflow.offline import apply_quiet_offline

apply_quiet_offline()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import ClusterSettings, SourceSettings, WorldSettings  # noqa: E402
from flows.transfer import embed_catalogue, transfer_study  # noqa: E402
from infra.pretrained import PRETRAINED, resolve_pretrained  # noqa: E402
from infra.registry import CHAMPION  # noqa: E402
from infra.tracking import tracking_for  # noqa: E402
from tasks import synth  # noqa: E402
from tasks.audio import decode  # noqa: E402
from tasks.datasets import gtzan_tracks  # noqa: E402
from tasks.embedding import read_embeddings  # noqa: E402
from tasks.kmeans import Codebook, encode_clip  # noqa: E402
from tasks.spectrogram import feature_columns  # noqa: E402
from tasks.studies import load_preset  # noqa: E402


def source_model(cache: Path, workers: int) -> tuple[str, Path]:
    """A pre-trained model (registry URI) and the data folder whose MLflow store holds it."""
    data_dir = cache / "source"
    tracking = tracking_for(data_dir)
    ref = f"models:/{PRETRAINED}-tags-mlp-1@{CHAMPION}"
    marker = data_dir / "ready"
    if not marker.exists():
        print("pre-training a source model (ismir2014-smoke) ...", file=sys.stderr)
        transfer_study(
            data_dir,
            "synthetic",
            load_preset("ismir2014-smoke"),
            ClusterSettings(kind="local", n_workers=workers),
            tracking,
            world=WorldSettings(n_tracks=160, n_users=300, clip_seconds=4.0),
        )
        marker.write_text("ok")
    return ref, data_dir


def target_clips(cache: Path, n: int, seconds: float) -> Path:
    root = cache / f"target-{n}-{seconds:g}"
    world = WorldSettings(clip_seconds=seconds)
    if not synth.target_is_complete(root, world, n_tracks=n, seed=7):
        print(f"rendering {n} target clips of {seconds:g} s ...", file=sys.stderr)
        synth.generate_target(root, world, n_tracks=n, seed=7)
    return root


def loop_embed(paths: list[str], model) -> np.ndarray:
    """The single-process baseline: one clip after another, every step in this process, one thread."""
    module = model.module()
    codebooks = {t: Codebook.load(model.codebooks / f"{t}.npz") for t in model.timescales}
    k = model.kmeans
    out = []
    with threadpool_limits(1), torch.inference_mode():
        torch.set_num_threads(1)
        for path in paths:
            y = decode(path, sample_rate=model.features.mel.sample_rate)
            columns = feature_columns(y, settings=model.features)
            vector = np.concatenate(
                [
                    encode_clip(
                        columns[t].to(torch.float16).float().numpy(),
                        codebooks[t],
                        activation=k.activation,
                        threshold=k.threshold,
                        pooling=k.pooling,
                    )
                    for t in model.timescales
                ]
            )
            out.append(module.embed(torch.from_numpy(vector[None].astype(np.float32))).numpy()[0])
    return np.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", type=int, default=0, help="also time the first N clips alone (marginal rate)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mirflow-bench-embed")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    ref, source_dir = source_model(args.cache, args.workers)
    tracking = tracking_for(source_dir)
    root = target_clips(args.cache, args.clips, args.seconds)
    source = SourceSettings(adapter="gtzan", path=root, split="random")
    paths = gtzan_tracks(root, split="random")["source_path"].tolist()
    model = resolve_pretrained(ref, tracking, cache=args.cache / "models")
    cluster = ClusterSettings(kind="local", n_workers=args.workers)
    embed_catalogue(
        args.cache / "warm",
        "warm",
        ref,
        cluster,
        tracking,
        source=SourceSettings(adapter="gtzan", path=target_clips(args.cache, 6, 3.0), split="random"),
    )  # Prefect server, imports
    small = None
    if args.small:
        small = args.cache / f"small-{args.small}.csv"
        pd.DataFrame({"track_id": [Path(p).stem for p in paths[: args.small]], "path": paths[: args.small]}).to_csv(
            small, index=False
        )
    flow_rates, loop_rates, marginal_rates = [], [], []
    for repeat in range(1, args.repeats + 1):
        data_dir = Path(tempfile.mkdtemp(dir=args.cache))
        start = time.perf_counter()
        out = embed_catalogue(data_dir, "bench", ref, cluster, tracking, source=source)
        seconds = time.perf_counter() - start
        flow_rates.append(out.n_tracks / seconds)
        flowed = read_embeddings(Path(out.path))
        shutil.rmtree(data_dir)
        if small is not None:
            data_dir = Path(tempfile.mkdtemp(dir=args.cache))
            start = time.perf_counter()
            embed_catalogue(
                data_dir, "bench", ref, cluster, tracking, source=SourceSettings(adapter="manifest", path=small)
            )
            marginal_rates.append((out.n_tracks - args.small) / (seconds - (time.perf_counter() - start)))
            shutil.rmtree(data_dir)
        start = time.perf_counter()
        looped = loop_embed(paths, model)
        loop_rates.append(len(paths) / (time.perf_counter() - start))
        ids = [Path(p).stem for p in paths]
        gap = float(np.abs(np.stack([flowed[t] for t in ids]) - looped).max())
        print(
            f"repeat {repeat}: flow {flow_rates[-1]:.1f} clips/s, loop {loop_rates[-1]:.1f} clips/s, "
            f"max |difference| {gap:.2e}",
            file=sys.stderr,
        )
    flow_rate, loop_rate = statistics.median(flow_rates), statistics.median(loop_rates)
    print(
        f"\n{args.clips} clips of {args.seconds:g} s, {len(model.timescales)} timescales, "
        f"{args.workers} workers, median of {args.repeats}"
    )
    print(f"{'path':<44} {'clips/s':>8}")
    print(f"{'mirflow embed (cluster, start-up included)':<44} {flow_rate:>8.1f}")
    print(f"{'single-process loop (one thread)':<44} {loop_rate:>8.1f}")
    print(f"{'ratio (cluster / loop)':<44} {flow_rate / loop_rate:>8.2f}x")
    if marginal_rates:
        marginal = statistics.median(marginal_rates)
        print(f"{f'mirflow embed, marginal ({args.small} -> {args.clips} clips)':<44} {marginal:>8.1f}")
        print(f"{'ratio (marginal / loop)':<44} {marginal / loop_rate:>8.2f}x")


if __name__ == "__main__":
    main()
