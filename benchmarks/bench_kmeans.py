"""Spherical K-means, encoding and K-means feature extraction, each against a named baseline.

``fit``      ``tasks.kmeans.spherical_kmeans`` against scikit-learn's ``MiniBatchKMeans`` on the
             same L2-normalized whitened log-mel windows, with the same K, batch size and
             passes (``max_iter``), one thread each: time ratio and the final mean cosine of
             each (every window against its nearest mean, means normalized).
``encode``   ``tasks.kmeans.encode_windows`` (whitening + dot products as one 1-D convolution)
             against a plain numpy matmul of the same shapes (windows unfolded, whitened,
             times the means), one thread each: windows/s.
``extract``  K-means feature extraction of ``--clips`` clips (default 1,000) through
             ``tasks.kmeans_features.encode_batch`` on a Dask LocalCluster, one single-threaded
             worker per core, against the same batches in a single-process loop: clips/s,
             and the per-core ratio.

    python benchmarks/bench_kmeans.py fit --repeats 3            # --device cuda on a GPU machine
    python benchmarks/bench_kmeans.py encode --repeats 5
    python benchmarks/bench_kmeans.py extract --clips 1000 --repeats 3

Windows come from synthetic-world clips (``tasks.synth``) through ``tasks.spectrogram.log_mel``
(16 kHz, 128 mels, hop 512, 15 s clips). ``extract`` writes 15 s log-mel shards of four
resolutions for ``--clips`` clips once into ``--cache`` (clips repeat the rendered ones) and
fits the codebooks once; only the encoding is timed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")

import numpy as np
import torch
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import (
    ClusterSettings,
    FeatureSettings,
    KMeansSettings,
    MelSettings,
    WorldSettings,
)
from infra.cluster import _local_cluster, map_batches, usable_cores
from tasks.kmeans import (
    encode_windows,
    fit_codebook,
    fit_whitening,
    frame_windows,
    sample_windows,
    spherical_kmeans,
)
from tasks.kmeans_features import EncodeBatch, codebook_path, encode_batch
from tasks.shards import features_to_table, write_feature_shard, write_manifest
from tasks.spectrogram import feature_columns
from tasks.synth import plan_world, render_clip

SAMPLE_RATE, SECONDS = 16000, 15.0
FEATURES = FeatureSettings(
    mel=MelSettings(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=512, n_mels=128), extra_windows=(2048, 4096, 8192)
)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spectrograms(n_clips: int, *, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feature columns (float16, ``(n_frames, n_mels)``) of ``n_clips`` rendered synthetic clips."""
    plans = plan_world(WorldSettings(n_tracks=max(16, n_clips), seed=seed))[:n_clips]
    out = []
    with threadpool_limits(1):
        for plan in plans:
            y = render_clip(plan, sample_rate=SAMPLE_RATE, seconds=SECONDS)
            out.append({k: v.to(torch.float16).numpy() for k, v in feature_columns(y, settings=FEATURES).items()})
    return out


def median_time(run: Callable[[], object], repeats: int, label: str) -> float:
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        progress(f"{label} repeat {r + 1}/{repeats}: {times[-1]:.2f} s")
    return statistics.median(times)


def nearest_cosine(x: np.ndarray, centres: np.ndarray) -> float:
    unit = centres / np.maximum(np.linalg.norm(centres, axis=1, keepdims=True), 1e-12)
    return float((x @ unit.T).max(axis=1).mean())


def bench_fit(args: argparse.Namespace) -> None:
    from sklearn.cluster import MiniBatchKMeans

    progress(f"rendering {args.fit_clips} clips for windows")
    clips = [c["mel_1024"] for c in spectrograms(args.fit_clips)]
    windows = sample_windows(clips, context=4, n_windows=args.windows, seed=0)
    whitened = fit_whitening(windows, epsilon=0.01).apply(windows).numpy()
    data = whitened / np.linalg.norm(whitened, axis=1, keepdims=True)
    k, batch, passes = args.k, args.batch_size, args.iterations
    results: dict[str, tuple[float, float]] = {}

    def ours() -> None:
        fit = spherical_kmeans(data, k=k, iterations=passes, batch_size=batch, seed=0, device=args.device)
        if args.device == "cuda":
            torch.cuda.synchronize()
        results["ours"] = (0.0, fit.mean_cosine)

    def sklearn() -> None:
        model = MiniBatchKMeans(
            n_clusters=k,
            batch_size=batch,
            max_iter=passes,
            n_init=1,
            random_state=0,
            max_no_improvement=None,
            tol=0.0,
            compute_labels=False,
        ).fit(data)
        results["sklearn"] = (0.0, nearest_cosine(data, model.cluster_centers_))

    with threadpool_limits(1):
        torch.set_num_threads(1)
        ours_s = median_time(ours, args.repeats, "spherical_kmeans")
        sk_s = median_time(sklearn, args.repeats, "MiniBatchKMeans")
    print(
        f"\nK-means fit: {data.shape[0]} whitened, L2-normalized windows of {data.shape[1]} values, K={k}, "
        f"batch {batch}, {passes} passes, 1 thread, mirflow on {args.device}, median of {args.repeats}"
    )
    print(f"{'':28s}{'seconds':>10s}{'mean cosine':>14s}")
    print(f"{'mirflow spherical_kmeans':28s}{ours_s:10.2f}{results['ours'][1]:14.4f}")
    print(f"{'sklearn MiniBatchKMeans':28s}{sk_s:10.2f}{results['sklearn'][1]:14.4f}")
    print(
        f"time ratio mirflow/sklearn: {ours_s / sk_s:.2f}x; mean cosine difference: "
        f"{results['ours'][1] - results['sklearn'][1]:+.4f}"
    )


def bench_encode(args: argparse.Namespace) -> None:
    progress(f"rendering {args.encode_clips} clips")
    clips = [c["mel_1024"] for c in spectrograms(args.encode_clips)]
    windows = sample_windows(clips, context=4, n_windows=20_000, seed=0)
    codebook = fit_codebook(
        windows, k=args.k, context=4, n_mels=128, epsilon=0.01, iterations=2, batch_size=1000, seed=0
    )
    n_windows = sum(c.shape[0] - 3 for c in clips)
    mean, matrix, means = codebook.whitening.mean, codebook.whitening.matrix, codebook.means

    def ours() -> None:
        for clip in clips:
            encode_windows(clip, codebook)

    weight, bias = (t.numpy() for t in codebook.linear_map())

    def unfold(clip: np.ndarray) -> np.ndarray:
        x = clip.astype(np.float32)
        return np.lib.stride_tricks.sliding_window_view(x, 4, axis=0).transpose(0, 2, 1).reshape(-1, 512)

    def numpy_matmul() -> None:  # the textbook path: whiten, then dot products
        for clip in clips:
            ((unfold(clip) - mean) @ matrix.T) @ means.T

    def numpy_folded() -> None:  # the same shapes as the convolution: (n_windows, 512) @ (512, K)
        for clip in clips:
            unfold(clip) @ weight - bias

    check = encode_windows(clips[0], codebook).numpy()
    explicit = codebook.whitening.apply(frame_windows(clips[0], context=4)).numpy() @ means.T
    assert np.allclose(check, explicit, atol=1e-3), "the two paths disagree"
    with threadpool_limits(1):
        torch.set_num_threads(1)
        ours_s = median_time(ours, args.repeats, "encode_windows")
        np_s = median_time(numpy_matmul, args.repeats, "numpy whiten + dot products")
        folded_s = median_time(numpy_folded, args.repeats, "numpy one folded matmul")
    print(
        f"\nencoding: {len(clips)} clips, {n_windows} windows of 4 x 128, K={args.k}, 1 thread, "
        f"median of {args.repeats}"
    )
    print(f"{'mirflow encode_windows (conv1d)':36s}{n_windows / ours_s:12.0f} windows/s")
    print(
        f"{'numpy unfold, whiten, dot products':36s}{n_windows / np_s:12.0f} windows/s"
        f"   mirflow/numpy {np_s / ours_s:.2f}x"
    )
    print(
        f"{'numpy unfold, one (512 x K) matmul':36s}{n_windows / folded_s:12.0f} windows/s"
        f"   mirflow/numpy {folded_s / ours_s:.2f}x"
    )


def bench_extract(args: argparse.Namespace) -> None:
    cache = Path(args.cache)
    base_dir, kmeans_dir = cache / "logmel", cache / "kmeans-codebooks"
    kmeans = KMeansSettings(k=args.k, context=4, sample_windows=20_000, iterations=3, tracks_per_task=32)
    columns = tuple(r.column for r in FEATURES.resolutions())
    if not (base_dir / "_manifest.parquet").exists():
        shutil.rmtree(base_dir, ignore_errors=True)
        progress(f"rendering 64 clips, writing {args.clips} clips of log-mel shards to {base_dir}")
        source = spectrograms(64)
        records, shard_rows = [], 64
        for start in range(0, args.clips, shard_rows):
            ids = [f"clip{i:05d}" for i in range(start, min(args.clips, start + shard_rows))]
            name = f"part-{start // shard_rows:05d}.parquet"
            rows = [
                (
                    t,
                    t,
                    source[i % len(source)],
                    {"source_path": t, "source_size": 0, "source_mtime_ns": 0, "duration_s": SECONDS},
                )
                for i, t in enumerate(ids)
            ]
            write_feature_shard(features_to_table(rows, n_mels=128), base_dir / name)
            records += [
                {
                    "track_id": t,
                    "content_sha1": t,
                    "shard": name,
                    "n_frames": source[0]["mel_1024"].shape[0],
                    "settings_hash": FEATURES.settings_hash,
                    "duration_s": SECONDS,
                    "sample_rate": SAMPLE_RATE,
                    "source_path": t,
                    "source_size": 0,
                    "source_mtime_ns": 0,
                }
                for t in ids
            ]
        write_manifest(base_dir, records)
    from tasks.shards import read_features

    ids = [f"clip{i:05d}" for i in range(args.clips)]
    if not all(codebook_path(kmeans_dir, c).exists() for c in columns):
        progress("fitting one codebook per resolution")
        for column in columns:
            spectra = read_features(base_dir, column=column, track_ids=ids[:64])
            windows = sample_windows(list(spectra.values()), context=4, n_windows=20_000, seed=0)
            fit_codebook(
                windows, k=args.k, context=4, n_mels=128, epsilon=0.01, iterations=3, batch_size=1000, seed=0
            ).save(codebook_path(kmeans_dir, column))
    batches = [
        EncodeBatch(shard=f"part-{i:05d}.parquet", track_ids=tuple(ids[i : i + 32])) for i in range(0, len(ids), 32)
    ]
    workers = args.workers or usable_cores()

    def loop() -> None:
        out = cache / "out-loop"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(kmeans_dir, out)
        for batch in batches:
            encode_batch(batch, base_dir=base_dir, kmeans_dir=out, timescales=columns, kmeans=kmeans)

    cluster = _local_cluster(ClusterSettings(kind="local", n_workers=workers))
    from distributed import Client

    with cluster, Client(cluster) as client:

        def on_cluster() -> None:
            out = cache / "out-dask"
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(kmeans_dir, out)
            map_batches(
                client,
                encode_batch,
                batches,
                description="K-means encoding",
                unit="clips",
                size=lambda b: len(b.track_ids),
                base_dir=base_dir,
                kmeans_dir=out,
                timescales=columns,
                kmeans=kmeans,
            )

        on_cluster()  # warm-up: torch imported on the workers
        with threadpool_limits(1):
            torch.set_num_threads(1)
            loop_s, dask_s = [], []
            for r in range(args.repeats):
                loop_s.append(median_time(loop, 1, f"single-process loop {r + 1}"))
                dask_s.append(median_time(on_cluster, 1, f"dask, {workers} workers {r + 1}"))
    loop_rate, dask_rate = args.clips / statistics.median(loop_s), args.clips / statistics.median(dask_s)
    print(
        f"\nK-means feature extraction: {args.clips} clips x 4 resolutions, K={args.k}, context 4, pooled, "
        f"shards written; median of {args.repeats}"
    )
    print(f"{'single-process loop, 1 core':34s}{loop_rate:10.1f} clips/s")
    print(
        f"{f'Dask, {workers} workers x 1 thread':34s}{dask_rate:10.1f} clips/s"
        f"{dask_rate / workers:10.1f} clips/s per core"
    )
    print(f"speed-up {dask_rate / loop_rate:.2f}x; per-core ratio {dask_rate / workers / loop_rate:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["fit", "encode", "extract"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--windows", type=int, default=50_000, help="fit: windows clustered")
    parser.add_argument("--fit-clips", type=int, default=120, help="fit: clips the windows come from")
    parser.add_argument("--batch-size", type=int, default=1000, help="fit: windows per mini-batch")
    parser.add_argument("--iterations", type=int, default=10, help="fit: passes over the windows")
    parser.add_argument("--device", default="cpu", help="fit: where mirflow's K-means runs (cuda on a GPU)")
    parser.add_argument("--encode-clips", type=int, default=40, help="encode: clips encoded per repeat")
    parser.add_argument("--clips", type=int, default=1000, help="extract: clips encoded per repeat")
    parser.add_argument("--workers", type=int, default=None, help="extract: Dask workers (default: one per core)")
    parser.add_argument("--cache", default="/tmp/mirflow-bench-kmeans")
    args = parser.parse_args()
    {"fit": bench_fit, "encode": bench_encode, "extract": bench_extract}[args.what](args)


if __name__ == "__main__":
    main()
