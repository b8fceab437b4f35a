"""Feature flow throughput, scaling, overhead and memory, each against a named baseline.

Every subcommand runs the project's path (``flows.features.extract_features`` on a
Dask cluster, through the Prefect ephemeral server) and a baseline side by side in
this one process, on the same 30 s 22,050 Hz MP3 clips and the same settings
(128 mels, hop 512, windows 1024/2048/4096/8192), and prints medians over the
repeats and their ratio:

``vs-librosa``  the flow (one single-threaded worker per core) against a one-core
                per-file loop: ``librosa.load`` + ``melspectrogram`` per window +
                ``np.save``; clips/s and clips/s per core (target >= 1.5x per core).
``scaling``     the flow with 2 workers against 1 worker (target >= 1.8x).
``overhead``    the flow with 1 worker against the bare kernel (``decode`` +
                ``feature_columns``) in this process (target <= 15 % on a pre-started
                cluster; the figure with cluster start-up is printed too).
``memory``      2,000 clips through a pre-started 2-worker cluster, every worker's RSS
                sampled every 0.5 s (flat: the highest RSS in 70-90 % of the clips <= 1.15 x the
                highest in 10-30 %).

    python benchmarks/bench_features.py vs-librosa --clips 200 --repeats 3

Clips are rendered once with the synthetic world into ``--cache`` and reused; each
flow run gets a fresh data folder under it (so nothing is skipped as already done),
removed after the run. One MLflow store under the cache serves every run, so that
creating its database is not timed. A small warm-up flow run first starts the
Prefect server and imports torch on the workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

# Flow-run and cluster log lines would bury the progress lines and the table; PREFECT_LOGGING_LEVEL and
# DASK_LOGGING__DISTRIBUTED override.
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")  # inherited by the worker processes too

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.layout import Layout
from core.settings import ClusterSettings, FeatureSettings, MelSettings, WorldSettings
from flows.features import extract_features
from infra.cluster import _cuda_cluster, _local_cluster, usable_cores
from infra.tracking import tracking_for
from tasks.audio import decode
from tasks.spectrogram import feature_columns
from tasks.synth import plan_world, render_clip

SAMPLE_RATE = 22050
CLIP_SECONDS = 30.0
HOP = 512
N_MELS = 128
FEATURES = FeatureSettings(
    mel=MelSettings(sample_rate=SAMPLE_RATE, n_fft=1024, hop_length=HOP, n_mels=N_MELS),
    extra_windows=(2048, 4096, 8192),
)
DATASET = "bench"
WARMUP_CLIPS = 4


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- clips


def _render_one(task: tuple) -> None:
    track, path = task
    y = render_clip(track, sample_rate=SAMPLE_RATE, seconds=CLIP_SECONDS)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    sf.write(tmp, y, SAMPLE_RATE, format="MP3", subtype="MPEG_LAYER_III")
    os.replace(tmp, path)


def ensure_clips(cache: Path, n_clips: int) -> list[str]:
    """``n_clips`` 30 s 22,050 Hz MP3s of the synthetic world under ``cache/clips``, rendered once."""
    # One world of at least 200 tracks, so that --clips 8 reuses the first 8 of the default set.
    n_world = max(200, n_clips)
    folder = cache / f"clips-world{n_world}"
    folder.mkdir(parents=True, exist_ok=True)
    plans = plan_world(WorldSettings(n_tracks=n_world, clip_seconds=CLIP_SECONDS, sample_rate=SAMPLE_RATE))
    paths = [folder / f"clip{track.clip_id:05d}.mp3" for track in plans[:n_clips]]
    todo = [(track, path) for track, path in zip(plans, paths) if not path.exists()]
    if todo:
        progress(f"rendering {len(todo)} clips into {folder} (once; reused later)")
        with ProcessPoolExecutor(max_workers=usable_cores()) as pool:
            for i, _ in enumerate(pool.map(_render_one, todo, chunksize=4), 1):
                if i % 25 == 0 or i == len(todo):
                    progress(f"  rendered {i}/{len(todo)}")
    return [str(p) for p in paths]


def linked_clips(cache: Path, sources: Sequence[str], n_clips: int) -> list[str]:
    """``n_clips`` distinct names for the ``sources`` (hard links, copies where linking fails)."""
    folder = cache / f"clips-x{n_clips}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_clips):
        source = Path(sources[i % len(sources)])
        path = folder / f"{source.stem}-{i:05d}.mp3"
        if not path.exists():
            try:
                os.link(source, path)
            except OSError:
                shutil.copy2(source, path)
        paths.append(str(path))
    return paths


# ----------------------------------------------------------------------------- the flow


class FlowRunner:
    """Runs the feature flow on a list of files, each time in a fresh data folder."""

    def __init__(self, cache: Path) -> None:
        self.runs = cache / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        self.tracking = tracking_for(cache / "tracking")

    def __call__(
        self,
        paths: Sequence[str],
        cluster: ClusterSettings,
        *,
        keep: bool = False,
        on_data_dir: Callable[[Path], None] | None = None,
    ) -> tuple[float, object]:
        """``(wall seconds of the flow call, FeatureSummary)``."""
        data_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self.runs))
        try:
            tracks = pd.DataFrame(
                {
                    "track_id": [f"t{i:05d}" for i in range(len(paths))],
                    "source_path": list(paths),
                    "split": "train",
                    "tags": [["bench"]] * len(paths),
                }
            )
            tracks_path = Layout(data_dir).tracks(DATASET)
            tracks_path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pandas(tracks, preserve_index=False), tracks_path)
            if on_data_dir is not None:
                on_data_dir(data_dir)
            start = time.perf_counter()
            summary = extract_features(data_dir, DATASET, FEATURES, cluster, self.tracking)
            seconds = time.perf_counter() - start
        finally:
            if not keep:
                shutil.rmtree(data_dir, ignore_errors=True)
        if summary.n_extracted != len(paths):
            raise RuntimeError(
                f"flow extracted {summary.n_extracted} of {len(paths)} clips "
                f"({summary.n_quarantined} quarantined): the benchmark would compare unequal work"
            )
        return seconds, summary


def feature_dir(data_dir: Path) -> Path:
    return Layout(data_dir).features(DATASET, FEATURES.feature_set)


@contextmanager
def prestarted_cluster(n_workers: int, device: str) -> Iterator[ClusterSettings]:
    """A cluster built by the project's own factory, kept up; yields settings of kind ``address``."""
    if device == "cuda":
        cluster = _cuda_cluster(ClusterSettings(kind="cuda"))
    else:
        cluster = _local_cluster(ClusterSettings(n_workers=n_workers))
    with cluster:
        cluster.wait_for_workers(len(cluster.workers))
        yield ClusterSettings(
            kind="address", address=cluster.scheduler_address, spectrogram_device="cuda" if device == "cuda" else "cpu"
        )


def flow_cluster(n_workers: int, device: str) -> ClusterSettings:
    if device == "cuda":
        return ClusterSettings(kind="cuda", spectrogram_device="cuda")
    return ClusterSettings(kind="local", n_workers=n_workers)


def n_flow_workers(n_workers: int, device: str) -> int:
    return torch.cuda.device_count() if device == "cuda" else n_workers


def require_device(device: str) -> None:
    if device == "cpu":
        return
    if device != "cuda":
        raise SystemExit(f"--device must be 'cpu' or 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        raise SystemExit(
            f"--device cuda: torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False; "
            f"built with CUDA {torch.version.cuda or 'none'}). Run on a machine with a GPU and a CUDA build of "
            "torch plus dask-cuda, or use --device cpu."
        )
    try:
        import dask_cuda  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"--device cuda needs dask-cuda for the GPU cluster ({err}); pip install dask-cuda") from err


# ----------------------------------------------------------------------------- baselines


def librosa_loop(paths: Sequence[str], out_dir: Path) -> None:
    """The plain per-file loop a user would write with librosa, one ``.npy`` per clip."""
    import librosa

    out_dir.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        y, _ = librosa.load(path, sr=SAMPLE_RATE, mono=True)
        mels = [
            np.log1p(
                10000.0 * librosa.feature.melspectrogram(y=y, sr=SAMPLE_RATE, n_fft=w, hop_length=HOP, n_mels=N_MELS)
            )
            for w in FEATURES.windows
        ]
        np.save(out_dir / f"clip{i:05d}.npy", np.stack(mels))


def bare_kernel(paths: Sequence[str], device: str) -> None:
    """The flow's per-file work without orchestration or writing: ``decode`` + ``feature_columns``."""
    target = "cuda" if device == "cuda" else None
    for path in paths:
        y = decode(path, sample_rate=SAMPLE_RATE, min_seconds=FEATURES.min_seconds)
        columns = feature_columns(y, settings=FEATURES, device=target)
        for values in columns.values():
            values.cpu()  # as extract_shard does; also waits for the GPU


@contextmanager
def one_core() -> Iterator[None]:
    """BLAS and torch intra-op threads pinned to 1 in this process, as on a single-threaded worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- timing


def timed(label: str, run: Callable[[], object], repeat: int, repeats: int, n_clips: int) -> float:
    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    progress(f"  {label:<34} repeat {repeat + 1}/{repeats}: {seconds:7.2f} s, {n_clips / seconds:6.2f} clips/s")
    return seconds


def interleaved(runs: dict[str, Callable[[], object]], repeats: int, n_clips: int) -> dict[str, float]:
    """Median seconds of each run; the runs alternate within every repeat so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for repeat in range(repeats):
        for name, run in runs.items():
            times[name].append(timed(name, run, repeat, repeats, n_clips))
    return {name: statistics.median(values) for name, values in times.items()}


def warm_up(flow: FlowRunner, paths: Sequence[str], cluster: ClusterSettings) -> None:
    progress(f"warm-up: {len(paths)} clips through the flow (starts the Prefect server, imports on workers)")
    flow(paths, cluster)


# ----------------------------------------------------------------------------- benchmarks


def bench_vs_librosa(args: argparse.Namespace, paths: list[str], flow: FlowRunner) -> None:
    import librosa

    workers = n_flow_workers(args.workers, args.device)
    cluster = flow_cluster(args.workers, args.device)
    warm_up(flow, paths[:WARMUP_CLIPS], cluster)
    out_dir = Path(tempfile.mkdtemp(prefix="librosa-", dir=flow.runs))
    try:
        with prestarted_cluster(args.workers, args.device) as warm, one_core():
            flow(paths[: WARMUP_CLIPS * 2], warm)
            librosa_loop(paths[:2], out_dir)  # warm-up: imports, filterbank and FFT caches
            medians = interleaved(
                {
                    f"flow ({workers} workers, {args.device})": lambda: flow(paths, cluster),
                    f"flow ({workers} workers, {args.device}, pre-started)": lambda: flow(paths, warm),
                    "librosa loop (1 core)": lambda: librosa_loop(paths, out_dir),
                },
                args.repeats,
                len(paths),
            )
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    flow_s, warm_s, librosa_s = medians.values()
    n = len(paths)
    print(
        f"\nfeature flow vs librosa loop: {n} clips x {CLIP_SECONDS:.0f} s MP3 at {SAMPLE_RATE} Hz, {N_MELS} mels, "
        f"hop {HOP}, windows {'/'.join(map(str, FEATURES.windows))}, median of {args.repeats}; "
        f"librosa {librosa.__version__}, torch {torch.__version__}"
    )
    print(f"{'path':<34} {'cores':>5} {'median s':>9} {'clips/s':>8} {'clips/s/core':>13} {'per core vs librosa':>20}")
    print(
        f"{'librosa loop + np.save':<34} {1:>5} {librosa_s:9.2f} {n / librosa_s:8.2f} {n / librosa_s:13.2f} {1:20.2f}"
    )
    for label, seconds in (
        (f"flow ({args.device}, cluster start incl.)", flow_s),
        (f"flow ({args.device}, pre-started cluster)", warm_s),
    ):
        per_core = (n / seconds / workers) / (n / librosa_s)
        print(
            f"{label:<34} {workers:>5} {seconds:9.2f} {n / seconds:8.2f} {n / seconds / workers:13.2f} {per_core:20.2f}"
        )
    per_core = (n / warm_s / workers) / (n / librosa_s)
    print(
        f"target >= 1.5x clips/s per core (steady state, pre-started cluster): "
        f"{'met' if per_core >= 1.5 else 'MISSED'} at {per_core:.2f}x; with cluster start-up in the run: "
        f"{(n / flow_s / workers) / (n / librosa_s):.2f}x"
    )


def bench_scaling(args: argparse.Namespace, paths: list[str], flow: FlowRunner) -> None:
    warm_up(flow, paths[:WARMUP_CLIPS], flow_cluster(1, "cpu"))
    with prestarted_cluster(1, "cpu") as one, prestarted_cluster(2, "cpu") as two:
        flow(paths[: WARMUP_CLIPS * 2], one)
        flow(paths[: WARMUP_CLIPS * 2], two)
        medians = interleaved(
            {
                "flow, 1 worker (local)": lambda: flow(paths, flow_cluster(1, "cpu")),
                "flow, 2 workers (local)": lambda: flow(paths, flow_cluster(2, "cpu")),
                "flow, 1 worker (pre-started)": lambda: flow(paths, one),
                "flow, 2 workers (pre-started)": lambda: flow(paths, two),
            },
            args.repeats,
            len(paths),
        )
    n = len(paths)
    s1, s2, p1, p2 = medians.values()
    print(f"\nfeature flow scaling: {n} clips, median of {args.repeats}, {usable_cores()} usable cores")
    print(f"{'cluster':<36} {'1 worker clips/s':>17} {'2 workers clips/s':>18} {'2w/1w':>7}")
    print(f"{'local (start-up in each run)':<36} {n / s1:17.2f} {n / s2:18.2f} {s1 / s2:7.2f}")
    print(f"{'address (pre-started, warm)':<36} {n / p1:17.2f} {n / p2:18.2f} {p1 / p2:7.2f}")
    print(
        f"target >= 1.8x (flow as called, local): {'met' if s1 / s2 >= 1.8 else 'MISSED'}; "
        f"pre-started: {'met' if p1 / p2 >= 1.8 else 'MISSED'}"
    )


def bench_overhead(args: argparse.Namespace, paths: list[str], flow: FlowRunner) -> None:
    warm_up(flow, paths[:WARMUP_CLIPS], flow_cluster(1, args.device))
    with prestarted_cluster(1, args.device) as warm:
        flow(paths[: WARMUP_CLIPS * 2], warm)
        with one_core():
            bare_kernel(paths[:2], args.device)  # warm-up: filterbanks, FFT plans, CUDA context
            medians = interleaved(
                {
                    f"bare kernel (1 core, {args.device})": lambda: bare_kernel(paths, args.device),
                    "flow, 1 worker, start-up incl.": lambda: flow(paths, flow_cluster(1, args.device)),
                    "flow, 1 worker, pre-started": lambda: flow(paths, warm),
                },
                args.repeats,
                len(paths),
            )
    n = len(paths)
    kernel_s, cold_s, warm_s = medians.values()
    print(
        f"\nfeature flow overhead: {n} clips, 1 worker vs decode + feature_columns in one process "
        f"({args.device}), median of {args.repeats}"
    )
    print(f"{'path':<36} {'median s':>9} {'clips/s':>8} {'overhead':>9}")
    print(f"{'bare kernel (nothing written)':<36} {kernel_s:9.2f} {n / kernel_s:8.2f} {'-':>9}")
    print(f"{'flow, cluster start-up included':<36} {cold_s:9.2f} {n / cold_s:8.2f} {cold_s / kernel_s - 1:9.1%}")
    print(f"{'flow, pre-started cluster':<36} {warm_s:9.2f} {n / warm_s:8.2f} {warm_s / kernel_s - 1:9.1%}")
    over = warm_s / kernel_s - 1
    print(f"target <= 15 % applies to the pre-started cluster: {over:.1%} ({'met' if over <= 0.15 else 'MISSED'})")


class RssSampler(threading.Thread):
    """Every worker's RSS every ``every_s`` seconds, with the clips finished so far."""

    def __init__(self, client, progress_of: Callable[[], int], every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.client, self.progress_of, self.every_s = client, progress_of, every_s
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        start = time.perf_counter()
        while not self.stopped.is_set():
            rss = self.client.run(_worker_rss_mib)
            self.samples.append((time.perf_counter() - start, self.progress_of(), rss))
            self.stopped.wait(self.every_s)


def _worker_rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def bench_memory(args: argparse.Namespace, sources: list[str], flow: FlowRunner) -> None:
    from distributed import Client

    paths = linked_clips(Path(args.cache), sources, args.memory_clips)
    n = len(paths)
    current: dict[str, Path] = {}

    def clips_done() -> int:
        folder = current.get("dir")
        shards = len(list(folder.glob("part-*.parquet"))) if folder is not None and folder.exists() else 0
        return min(n, shards * FEATURES.files_per_task)

    with prestarted_cluster(2, "cpu") as cluster, Client(cluster.address) as client:
        warm_up(flow, sources[:WARMUP_CLIPS], cluster)
        baseline = client.run(_worker_rss_mib)
        progress(f"memory: {n} clips through the flow on 2 pre-started workers, RSS every 0.5 s")
        sampler = RssSampler(client, clips_done)
        sampler.start()
        try:
            seconds, _ = flow(paths, cluster, on_data_dir=lambda d: current.update(dir=feature_dir(d)))
        finally:
            sampler.stopped.set()
            sampler.join()
    workers = sorted(baseline)
    names = {w: f"worker {i}" for i, w in enumerate(workers)}
    print(
        f"\nfeature flow memory: {n} clips ({len(sources)} distinct, linked under distinct names), 2 pre-started "
        f"workers, {len(sampler.samples)} samples in {seconds:.0f} s ({n / seconds:.1f} clips/s)"
    )
    print(f"{'progress':<18} " + " ".join(f"{names[w] + ' RSS MiB':>16}" for w in workers))
    print(f"{'before (idle, warm)':<18} " + " ".join(f"{baseline[w]:16.0f}" for w in workers))
    # RSS saws up and down with every batch; compare the highest value in a window of
    # progress after warm-up with the highest in the last window, per worker.
    windows = {"10-30 %": (0.10, 0.30), "40-60 %": (0.40, 0.60), "70-90 %": (0.70, 0.90)}
    highest = {}
    for label, (lo, hi) in windows.items():
        inside = [s for s in sampler.samples if lo * n <= s[1] <= hi * n] or sampler.samples[-1:]
        highest[label] = {w: max(s[2].get(w, 0.0) for s in inside) for w in workers}
        print(f"{'max ' + label:<18} " + " ".join(f"{highest[label][w]:16.0f}" for w in workers))
    peak = {w: max(s[2].get(w, 0.0) for s in sampler.samples) for w in workers}
    print(f"{'peak':<18} " + " ".join(f"{peak[w]:16.0f}" for w in workers))
    growth = max(highest["70-90 %"][w] / highest["10-30 %"][w] for w in workers)
    print(
        f"late/early (max RSS in 70-90 % / in 10-30 % of the clips, worst worker): {growth:.2f} "
        f"(flat = <= 1.15: {'met' if growth <= 1.15 else 'MISSED'})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmark", choices=["vs-librosa", "scaling", "overhead", "memory"])
    parser.add_argument("--clips", type=int, default=200, help="distinct 30 s clips")
    parser.add_argument("--repeats", type=int, default=3, help="repeats for vs-librosa, scaling, overhead")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="flow workers for vs-librosa")
    parser.add_argument("--memory-clips", type=int, default=2000, help="files for the memory benchmark")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where spectrograms run (vs-librosa, overhead); librosa stays on the CPU",
    )
    parser.add_argument("--cache", default="/tmp/mirflow-bench", help="rendered clips and run folders")
    args = parser.parse_args()
    if args.device == "cuda" and args.benchmark not in ("vs-librosa", "overhead"):
        raise SystemExit(f"--device cuda applies to vs-librosa and overhead, not {args.benchmark}")
    require_device(args.device)

    cache = Path(args.cache)
    paths = ensure_clips(cache, args.clips)
    flow = FlowRunner(cache)
    progress(f"{args.benchmark}: {len(paths)} clips, {args.repeats} repeats, {usable_cores()} usable cores")
    {"vs-librosa": bench_vs_librosa, "scaling": bench_scaling, "overhead": bench_overhead, "memory": bench_memory}[
        args.benchmark
    ](args, paths, flow)


if __name__ == "__main__":
    main()
