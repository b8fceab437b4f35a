"""mirflow as a service, each figure against a named baseline in one run.

``features``  the feature flow as a deployment run (``mirflow/features``) on the long-running
              service of ``make serve`` (Prefect server and process worker, MLflow server, a
              Dask cluster started by Dask's CLI), timed from the moment the run is asked for
              to the moment Prefect records it finished: everything a deployment run pays
              (the worker noticing it, the flow-run process starting and importing, MLflow
              over HTTP, the Dask fan-out, the writes). Against the per-file librosa loop of
              ``bench_features.py`` on one core: clips/s per core (target >= 1.5x), and the
              service with 2 Dask workers against one with 1 (target >= 1.8x). It also prints
              where a run's fixed cost goes (asked -> running -> finished, and the features
              flow's own time).
``retrain``   ``retrain-on-new-listening`` with a new batch of 10 % of the plays against a
              full pipeline re-run on all batches (features reused, WMF refitted from
              scratch, both networks trained again): wall-time ratio (target <= 0.35), and
              both resulting champions scored on the same held-out plays (mAP@500 within 2 %).

    python benchmarks/bench_service.py features --clips 200 --repeats 3
    python benchmarks/bench_service.py retrain --tracks 600 --users 2000

Run it on an otherwise idle machine (it starts its own service on free ports).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mirflow.offline import apply_quiet_offline

apply_quiet_offline()

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
from bench_features import FEATURES, N_MELS, SAMPLE_RATE, ensure_clips, librosa_loop, one_core, progress  # noqa: E402

# ----------------------------------------------------------------------------- features


class Service:
    """A started stack (the code of `make serve`) and a Prefect client pointed at it."""

    def __init__(self, data_dir: Path, n_workers: int) -> None:
        from mirflow.stack import Ports, Stack, free_ports

        prefect, mlflow_port, dask, dashboard, web = free_ports(5)
        self.stack = Stack(
            data_dir=data_dir,
            ports=Ports(prefect=prefect, mlflow=mlflow_port, dask=dask, dashboard=dashboard, web=web),
            n_workers=n_workers,
            paused_schedules=True,
        )

    def __enter__(self) -> Service:
        progress(f"starting the service with {self.stack.n_workers} Dask worker(s)")
        self.info = self.stack.start(on_step=lambda m: progress(f"  {m}"))
        return self

    def __exit__(self, *exc) -> None:
        self.stack.stop()

    def run(self, deployment: str, parameters: dict) -> dict[str, float]:
        """Ask for a deployment run and wait for it; seconds from asking to running and to finished."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.info.prefect_api}), get_client(sync_client=True) as client:
            target = client.read_deployment_by_name(deployment)
            asked = time.time()
            run = client.create_flow_run_from_deployment(target.id, parameters=parameters)
            while True:
                run = client.read_flow_run(run.id)
                if run.state and run.state.is_final():
                    break
                time.sleep(0.2)
        if not run.state.is_completed():
            raise RuntimeError(f"{deployment} ended {run.state.name}: see {self.stack.logs / 'prefect-worker.log'}")
        return {
            "total": run.end_time.timestamp() - asked,
            "to_running": run.start_time.timestamp() - asked,
            "running": run.end_time.timestamp() - run.start_time.timestamp(),
        }


def features_parameters(manifest: Path, dataset: str) -> dict:
    return {
        "adapter": "manifest",
        "source": str(manifest),
        "dataset": dataset,
        "windows": ",".join(str(w) for w in FEATURES.windows),
        "hop": FEATURES.mel.hop_length,
        "hop_policy": "fixed",
        "sample_rate": SAMPLE_RATE,
        "n_mels": N_MELS,
    }


def inner_flow_seconds(service: Service, dataset: str) -> float:
    """The features flow's own wall time (its MLflow run), without what the deployment run adds around it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(service.info.mlflow_ui)
    experiment = client.get_experiment_by_name("mirflow-features")
    run = client.search_runs([experiment.experiment_id], filter_string=f"params.dataset = '{dataset}'")[0]
    return (run.info.end_time - run.info.start_time) / 1000


def bench_features(args: argparse.Namespace) -> None:
    paths = ensure_clips(Path(args.cache), args.clips)
    work = Path(tempfile.mkdtemp(prefix="mirflow-bench-service-"))
    manifest = work / "clips.csv"
    pd.DataFrame({"track_id": [Path(p).stem for p in paths], "path": paths, "split": "train"}).to_csv(
        manifest, index=False
    )
    times: dict[str, list[dict]] = {"service, 2 workers": [], "service, 1 worker": []}
    inner: dict[str, list[float]] = {name: [] for name in times}
    baseline: list[float] = []
    try:
        for name, n_workers in (("service, 2 workers", 2), ("service, 1 worker", 1)):
            data_dir = work / f"data-{n_workers}"
            with Service(data_dir, n_workers) as service:
                progress("  warm-up run (4 clips): imports, MLflow experiment, first contact with the workers")
                warm = work / "warm.csv"
                pd.read_csv(manifest).head(4).to_csv(warm, index=False)
                service.run("mirflow/features", features_parameters(warm, "warm-up"))
                for repeat in range(args.repeats):
                    dataset = f"bench-{n_workers}w-{repeat}"
                    seconds = service.run("mirflow/features", features_parameters(manifest, dataset))
                    times[name].append(seconds)
                    inner[name].append(inner_flow_seconds(service, dataset))
                    progress(
                        f"  {name} repeat {repeat + 1}/{args.repeats}: {seconds['total']:.2f} s "
                        f"({len(paths) / seconds['total']:.2f} clips/s); asked->running "
                        f"{seconds['to_running']:.2f} s, features flow {inner[name][-1]:.2f} s"
                    )
                    shutil.rmtree(data_dir / "features" / dataset, ignore_errors=True)
                    if n_workers == 2 and repeat < args.repeats:  # the baseline alternates with the runs
                        with one_core():
                            start = time.perf_counter()
                            librosa_loop(paths, work / "librosa")
                            baseline.append(time.perf_counter() - start)
                        shutil.rmtree(work / "librosa", ignore_errors=True)
                        progress(f"  librosa loop, 1 core repeat {repeat + 1}/{args.repeats}: {baseline[-1]:.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = len(paths)
    med = {
        name: {k: statistics.median(t[k] for t in runs) for k in ("total", "to_running", "running")}
        for name, runs in times.items()
    }
    librosa_rate = n / statistics.median(baseline)
    print(
        f"\nfeature flow as a deployment run on the long-running service, {n} clips of 30 s at {SAMPLE_RATE} Hz, "
        f"4 windows, medians of {args.repeats}"
    )
    print(f"{'':34s}{'seconds':>9s}{'clips/s':>9s}{'per core':>10s}{'asked->running':>16s}{'flow itself':>13s}")
    print(f"{'librosa loop, 1 core':34s}{statistics.median(baseline):9.2f}{librosa_rate:9.2f}{librosa_rate:10.2f}")
    for name, workers in (("service, 2 workers", 2), ("service, 1 worker", 1)):
        rate = n / med[name]["total"]
        print(
            f"{name:34s}{med[name]['total']:9.2f}{rate:9.2f}{rate / workers:10.2f}{med[name]['to_running']:16.2f}"
            f"{statistics.median(inner[name]):13.2f}"
        )
    two, one = n / med["service, 2 workers"]["total"], n / med["service, 1 worker"]["total"]
    print(f"\nper core, 2 workers vs librosa: {two / 2 / librosa_rate:.2f}x (target >= 1.5)")
    print(f"2 workers vs 1 worker:          {two / one:.2f}x (target >= 1.8)")
    fixed = med["service, 2 workers"]["total"] - statistics.median(inner["service, 2 workers"])
    print(
        f"fixed cost of a deployment run around the features flow: {fixed:.2f} s "
        f"({med['service, 2 workers']['to_running']:.2f} s until it runs)"
    )


# ----------------------------------------------------------------------------- retraining


def champion_scores(data_dirs: dict[str, Path], *, heldout_from: Path, k: int) -> dict[str, float]:
    """mAP@k of each data folder's champion recommender on the same held-out plays and users."""
    from core.settings import PipelineSettings
    from flows.retrain import score_recommenders
    from infra.registry import LATENT_FACTOR_CNN, champion, download_recommender
    from infra.tracking import tracking_for

    settings = PipelineSettings.model_validate_json((heldout_from / "models" / "pipeline-settings.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            name: download_recommender(
                tracking_for(data_dir),
                into=Path(tmp) / name,
                cnn_version=str(champion(tracking_for(data_dir), LATENT_FACTOR_CNN).version),
            )
            for name, data_dir in data_dirs.items()
        }
        config = next(iter(models.values())).config
        rows = score_recommenders(
            feature_dir=heldout_from / "features" / settings.dataset / settings.features.feature_set,
            column=settings.features.mel.column,
            heldout_plays=heldout_from / "models" / "wmf" / "heldout_plays.parquet",
            recommenders={name: (model.checkpoint, model.user_factors) for name, model in models.items()},
            crop=config["crop_frames"],
            hop=config["hop_frames"],
            k=k,
            seed=0,
        )
    return {r.name: r.map_at_k for r in rows}


def bench_retrain(args: argparse.Namespace) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from core.layout import Layout
    from core.settings import ClusterSettings, PipelineSettings, WorldSettings
    from flows.pipeline import pipeline
    from flows.retrain import retrain_on_new_listening
    from infra.tracking import tracking_for
    from mirflow.cli import _quiet_lightning, _setup

    _setup(False)
    _quiet_lightning()
    work = Path(tempfile.mkdtemp(prefix="mirflow-bench-retrain-"))
    world = WorldSettings(n_tracks=args.tracks, n_users=args.users, clip_seconds=args.clip_seconds, n_batches=10)
    incremental, full = work / "incremental", work / "full"
    try:
        with prefect_test_harness(server_startup_timeout=60):

            def settings(data_dir: Path, initial_batches: int | None) -> PipelineSettings:
                out = PipelineSettings(
                    data_dir=data_dir,
                    world=world,
                    initial_batches=initial_batches,
                    cluster=ClusterSettings(n_workers=2),
                    tracking=tracking_for(data_dir),
                )
                return out.with_max_epochs(args.epochs) if args.epochs else out

            progress(
                f"setting up: the pipeline on the first 9 of 10 listening batches ({args.tracks} tracks, "
                f"{args.users} users); not timed"
            )
            pipeline(settings(incremental, 9))
            # The full re-run starts from the world and the feature shards alone (reused, as the retrain reuses
            # them): listening ingestion, WMF from scratch, both networks, a registry of its own.
            shutil.copytree(
                incremental,
                full,
                symlinks=True,
                ignore=lambda folder, names: [
                    n
                    for n in names
                    if Path(folder) == incremental
                    and n in {"mlflow.db", "mlartifacts", "models", "listening", "reports", "quarantine", "inbox"}
                ],
            )

            progress("full pipeline re-run on all 10 batches")
            start = time.perf_counter()
            pipeline(settings(full, None))
            full_seconds = time.perf_counter() - start

            progress("retrain-on-new-listening with the 10th batch")
            inbox = Layout(incremental).inbox()
            inbox.mkdir(parents=True)
            shutil.copy(Layout(incremental).world() / "taste_profile" / "train_triplets.batch-009.txt", inbox)
            start = time.perf_counter()
            outcome = retrain_on_new_listening(incremental, tracking_for(incremental))
            retrain_seconds = time.perf_counter() - start
        scores = champion_scores({"full re-run": full, "retrain": incremental}, heldout_from=full, k=500)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nretraining on a new batch of 10 % of the plays ({args.tracks} tracks, {args.users} users, 2 cores)")
    print(f"  full pipeline re-run on all batches   {full_seconds:8.1f} s")
    print(f"  retrain-on-new-listening              {retrain_seconds:8.1f} s   ({outcome.status}: {outcome.message})")
    print(f"  wall-time ratio retrain / full        {retrain_seconds / full_seconds:8.2f}   (target <= 0.35)")
    print(
        f"  champion mAP@500, same held-out plays: full re-run {scores['full re-run']:.4f}, "
        f"after retraining {scores['retrain']:.4f} "
        f"({100 * (scores['retrain'] / scores['full re-run'] - 1):+.1f} %; target within 2 %)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    features = sub.add_parser("features")
    features.add_argument("--clips", type=int, default=200)
    features.add_argument("--repeats", type=int, default=3)
    features.add_argument("--cache", default="/tmp/mirflow-bench")
    retrain = sub.add_parser("retrain")
    retrain.add_argument("--tracks", type=int, default=600)
    retrain.add_argument("--users", type=int, default=2000)
    retrain.add_argument("--clip-seconds", type=float, default=15.0)
    retrain.add_argument("--epochs", type=int, default=None, help="cap on training epochs (default: the pipeline's)")
    retrain.add_argument("--keep", action="store_true", help="keep the data folders")
    args = parser.parse_args()
    bench_features(args) if args.command == "features" else bench_retrain(args)


if __name__ == "__main__":
    main()
