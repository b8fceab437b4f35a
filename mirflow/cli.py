"""The ``mirflow`` command line: parses the flags into a job's options, runs the job (mirflow/jobs.py), prints.

    mirflow demo                       the whole pipeline on the synthetic world
    mirflow pipeline --dataset mtat …  the same pipeline on MTAT-layout data and Taste Profile triplets
    mirflow features --adapter …       log-mel features of a catalogue into Parquet shards
    mirflow wmf --listening FILE …     ingest listening data, factorize it (WMF) and evaluate
    mirflow train-tagger               train the tagger again on an earlier run's shards, register it
    mirflow train-recommender          train the latent-factor CNN again on the current WMF factors
    mirflow retrain                    retrain the recommender on new listening files, promote if better
    mirflow study tagging              a study (e.g. --preset ismir2013) under one MLflow parent run
    mirflow study recommendation       the NIPS 2013 table (--preset nips2013) and nearest-neighbour queries
    mirflow study transfer             pre-training on tags and listening, transfer to a target (--preset ismir2014)
    mirflow embed --model …            embeddings of a catalogue by a pre-trained model, as Parquet
    mirflow transfer --adapter …       a simple classifier per feature set on a labelled target catalogue
    mirflow up                         run it as a service (make serve): Prefect, MLflow, Dask, deployments
    mirflow serve                      the web demo and its API (127.0.0.1:8000): tags and recommendations from audio
    mirflow world                      only write the synthetic world

A user error (a bad option, setting or input file) ends a command with one line on stderr, ``mirflow: ...``,
and exit status 2; any other failure with status 1. ``--verbose`` adds debug logging and the tracebacks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from mirflow import jobs
from mirflow.offline import apply_quiet_offline

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mirflow: ML on music audio, as a pipeline.")
console = Console()
err_console = Console(stderr=True)

#: Exit status of a user error: a bad option, setting or input file, or a step run before the one it needs.
#: Click's usage errors (a missing option, a path that does not exist) exit with 2 too.
USER_ERROR = 2
#: Exit status of a run that failed otherwise: a service that could not start or stopped, a store in a state
#: nobody planned for. A crash (a bug) ends with Python's traceback and status 1 as well.
FAILED = 1

# Libraries whose INFO lines drown the pipeline's own progress.
CHATTY_LOGGERS = (
    "distributed",
    "lightning.pytorch",
    "lightning.fabric",
    "mlflow.store.db.utils",
    "alembic",
    "mlflow.pyfunc",
    "mlflow.models",
)


def _setup(verbose: bool) -> None:
    apply_quiet_offline()
    logger = logging.getLogger("mirflow")
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not logger.handlers:
        logger.addHandler(RichHandler(console=Console(stderr=True), show_path=False, markup=False))
    logger.propagate = False
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per fit; harmless.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)


def _quiet_lightning() -> None:
    """Import Lightning (a few seconds), which sets its loggers to INFO, then quiet them again.

    Commands that train call it once their options are valid, so that a bad option is answered at once.
    """
    import lightning  # noqa: F401

    for name in CHATTY_LOGGERS:
        if name.startswith("lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _fail(message: str, code: int = USER_ERROR) -> typer.Exit:
    """Say what went wrong on one line of stderr (``mirflow: ...``); ``raise _fail(...)`` ends the command."""
    err_console.print(f"[red]mirflow: {escape(message)}[/red]", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _user_error_types() -> tuple[type[Exception], ...]:
    from pydantic import ValidationError

    from core.errors import MirflowError

    return MirflowError, ValidationError


def _error_message(err: Exception) -> str:
    from pydantic import ValidationError

    from core.errors import settings_message

    return settings_message(err) if isinstance(err, ValidationError) else str(err)


# How Prefect's task engine ends a task run that raised: ``Finished in state Failed('Task run encountered an
# exception DatasetError: ...')``, at ERROR level, without the exception itself.
_FAILED_TASK = re.compile(r"Finished in state Failed\(['\"]Task run encountered an exception (\w+): ")


class UserErrorConsoleFilter(logging.Filter):
    """Keeps Prefect's report of a user error off the console: the traceback it logs when a flow or task run
    raises one, and the failed task run's last line. The command then says it in one line.

    It sits on the console handler only: the Prefect server (API log handler) still records all of it, and any
    other exception (a bug) keeps its traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        user_errors = _user_error_types()
        if record.exc_info and record.exc_info[1] is not None:
            return not isinstance(record.exc_info[1], user_errors)
        if record.levelno >= logging.ERROR:
            failed = _FAILED_TASK.search(record.getMessage())
            return not (failed and failed.group(1) in _class_names(user_errors))
        return True


def _class_names(classes: tuple[type, ...]) -> set[str]:
    names: set[str] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


@contextmanager
def _command(verbose: bool, *, flows: bool = True) -> Iterator[None]:
    """The frame of every command: logging set up; a user error (``MirflowError``, an invalid setting) ends it
    with its message alone on stderr and status :data:`USER_ERROR`, its traceback first only with ``verbose``.

    With ``flows`` (the command runs Prefect flows in this process), Prefect's console handler leaves such
    errors to that one line (:class:`UserErrorConsoleFilter`) unless ``verbose``.
    """
    _setup(verbose)
    handlers: list[logging.Handler] = []
    quiet = UserErrorConsoleFilter()
    if flows and not verbose:
        import prefect.main  # noqa: F401  (configures Prefect's logging: its console handler is on the root logger)
        from prefect.logging.handlers import PrefectConsoleHandler

        handlers = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
        for handler in handlers:
            handler.addFilter(quiet)
    try:
        yield
    except _user_error_types() as err:
        if verbose:
            traceback.print_exception(err)
        raise _fail(_error_message(err)) from None
    finally:
        for handler in handlers:
            handler.removeFilter(quiet)


DataDir = Annotated[Path, typer.Option(help="storage root: world, shards, listening, models, MLflow store")]
Workers = Annotated[int | None, typer.Option(help="Dask workers (default: one per core)")]
Cluster = Annotated[str, typer.Option(help="local | address | cuda")]
Address = Annotated[str | None, typer.Option(help="scheduler address for --cluster address")]
Tracks = Annotated[int, typer.Option(help="clips in the synthetic world")]
Users = Annotated[int, typer.Option(help="listeners in the synthetic world")]
ClipSeconds = Annotated[float, typer.Option(help="length of each synthetic clip")]
WorldSeed = Annotated[int, typer.Option(help="synthetic world's seed")]
Devices = Annotated[int, typer.Option(help="train each model under DDP on N devices (GPUs, or CPU processes)")]
Precision = Annotated[str, typer.Option(help="32-true | bf16-mixed (on a GPU) | 16-mixed")]
Compile = Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile each network")]
Objective = Annotated[
    str,
    typer.Option(
        help="latent-factor CNN: mse on the WMF factors | wpe, the weighted "
        "prediction error of the plays (van den Oord et al. 2013)"
    ),
]
Model = Annotated[
    str, typer.Option(help="tagger: convnet2014 (Dieleman & Schrauwen 2014) | short-chunk-resnet (Won et al. 2020)")
]
Verbose = Annotated[bool, typer.Option(help="debug logging; a failed run shows its traceback")]

# The defaults are the job options' own (mirflow/jobs.py), shared with the deployments.
P, F, W, T = jobs.PipelineOptions, jobs.FeaturesOptions, jobs.WMFOptions, jobs.TrainOptions
ST, SR, SX = jobs.TaggingStudyOptions, jobs.RecommendationStudyOptions, jobs.TransferStudyOptions
X, S = jobs.TransferOptions, jobs.ServeOptions


def cluster_options(command: Callable[..., None]) -> Callable[..., None]:
    """Declares ``--workers``, ``--cluster`` and ``--address`` once for every command whose job runs on the Dask
    cluster: the command receives them as one ``cluster: jobs.ClusterOptions`` (and lists them before --verbose).

    Put it under ``@app.command()``, so that typer reads the signature this makes.
    """
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [p.replace(kind=keyword) for p in inspect.signature(command, eval_str=True).parameters.values()]
    own = [p for p in own if p.name != "cluster"]
    at = next((i for i, p in enumerate(own) if p.name == "verbose"), len(own))
    shared = [
        inspect.Parameter("workers", keyword, annotation=Workers, default=jobs.ClusterOptions.workers),
        inspect.Parameter("cluster", keyword, annotation=Cluster, default=jobs.ClusterOptions.kind),
        inspect.Parameter("address", keyword, annotation=Address, default=jobs.ClusterOptions.address),
    ]

    @functools.wraps(command)
    def with_cluster(*, workers: int | None, cluster: str, address: str | None, **options) -> None:
        command(cluster=jobs.ClusterOptions(kind=cluster, workers=workers, address=address), **options)

    params = [*own[:at], *shared, *own[at:]]
    with_cluster.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    with_cluster.__annotations__ = {p.name: p.annotation for p in params}
    return with_cluster


def _pipeline(cluster: jobs.ClusterOptions, data_dir: Path, options: jobs.PipelineOptions) -> None:
    """Run the pipeline job and print its summary."""
    plan = jobs.plan_pipeline(jobs.command_runtime(data_dir, cluster), options)
    _quiet_lightning()
    from tasks.report import summary_text

    start = time.perf_counter()
    summary = jobs.run_pipeline(plan)
    console.print(f"\n[bold]mirflow pipeline finished in {time.perf_counter() - start:.0f} s[/bold]")
    console.print(summary_text(summary), highlight=False, soft_wrap=True)


@app.command()
@cluster_options
def demo(
    cluster: jobs.ClusterOptions,
    data_dir: DataDir = Path("data"),
    tracks: Tracks = P.tracks,
    users: Users = P.users,
    clip_seconds: ClipSeconds = P.clip_seconds,
    epochs: Annotated[int | None, typer.Option(help="cap on training epochs of each model")] = None,
    seed: WorldSeed = P.seed,
    initial_batches: Annotated[
        int | None,
        typer.Option(
            help="use only the first N of the world's 3 listening batches; copy a later one into "
            "<data-dir>/inbox/listening to try `mirflow retrain`"
        ),
    ] = None,
    model: Model = P.model,
    objective: Objective = P.objective,
    devices: Devices = P.devices,
    precision: Precision = P.precision,
    compile_: Compile = P.compile,
    verbose: Verbose = False,
) -> None:
    """Run the whole pipeline on the embedded synthetic world (built on first use)."""
    with _command(verbose):
        options = jobs.PipelineOptions(
            dataset="synthetic",
            tracks=tracks,
            users=users,
            clip_seconds=clip_seconds,
            seed=seed,
            initial_batches=initial_batches,
            epochs=epochs,
            model=model,
            objective=objective,
            devices=devices,
            precision=precision,
            compile=compile_,
        )
        _pipeline(cluster, data_dir, options)


@app.command()
@cluster_options
def pipeline(
    cluster: jobs.ClusterOptions,
    annotations: Annotated[
        Path, typer.Option(exists=True, dir_okay=False, help="MTAT annotations_final.csv (or the same format)")
    ],
    audio_root: Annotated[
        Path,
        typer.Option(
            exists=True, file_okay=False, help="root of the mp3 tree the annotations' mp3_path is relative to"
        ),
    ],
    triplets: Annotated[
        list[Path],
        typer.Option(exists=True, dir_okay=False, help="Taste Profile triplet files, oldest first; song = clip id"),
    ],
    dataset: Annotated[str, typer.Option(help="name of the dataset under the storage root")] = "mtat",
    data_dir: DataDir = Path("data"),
    epochs: Annotated[int | None, typer.Option(help="cap on training epochs of each model")] = None,
    model: Model = P.model,
    objective: Objective = P.objective,
    devices: Devices = P.devices,
    precision: Precision = P.precision,
    compile_: Compile = P.compile,
    verbose: Verbose = False,
) -> None:
    """Run the whole pipeline on MTAT-layout audio and annotations with Taste Profile listening data."""
    with _command(verbose):
        options = jobs.PipelineOptions(
            dataset=dataset,
            annotations=annotations,
            audio_root=audio_root,
            triplets=tuple(triplets),
            epochs=epochs,
            model=model,
            objective=objective,
            devices=devices,
            precision=precision,
            compile=compile_,
        )
        _pipeline(cluster, data_dir, options)


@app.command()
@cluster_options
def features(
    cluster: jobs.ClusterOptions,
    adapter: Annotated[str, typer.Option(help="mtat | gtzan | manifest")],
    source: Annotated[
        Path, typer.Option(exists=True, help="mtat: annotations_final.csv; gtzan: root folder; manifest: CSV/Parquet")
    ],
    dataset: Annotated[str, typer.Option(help="name of the dataset under the storage root")],
    audio_root: Annotated[Path | None, typer.Option(help="mtat: root of the mp3 tree")] = None,
    split: Annotated[str | None, typer.Option(help="mtat: folder|lists; gtzan: filtered|random")] = None,
    split_dir: Annotated[Path | None, typer.Option(help="folder of the split lists")] = None,
    windows: Annotated[str, typer.Option(help="FFT windows, comma-separated; the first is the finest")] = F.windows,
    hop: Annotated[int, typer.Option(help="hop in samples for hop-policy fixed")] = F.hop,
    hop_policy: Annotated[str, typer.Option(help="fixed | half (window/2)")] = F.hop_policy,
    sample_rate: Annotated[int, typer.Option(help="model rate the audio is resampled to")] = F.sample_rate,
    n_mels: int = F.n_mels,
    pyramid: Annotated[str, typer.Option(help="none | gaussian | laplacian | both")] = F.pyramid,
    pyramid_levels: int = F.pyramid_levels,
    audio_shards: Annotated[
        bool, typer.Option(help="also keep int16 PCM shards for raw-audio models")
    ] = F.audio_shards,
    files_per_task: Annotated[int, typer.Option(help="files decoded per Dask task (and per shard)")] = F.files_per_task,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """Extract multiresolution log-mel features (and pyramids) for a catalogue; re-runs do only new files."""
    with _command(verbose):
        options = jobs.FeaturesOptions(
            adapter=adapter,
            source=source,
            dataset=dataset,
            audio_root=audio_root,
            split=split,
            split_dir=split_dir,
            windows=windows,
            hop=hop,
            hop_policy=hop_policy,
            sample_rate=sample_rate,
            n_mels=n_mels,
            pyramid=pyramid,
            pyramid_levels=pyramid_levels,
            audio_shards=audio_shards,
            files_per_task=files_per_task,
        )
        summary = jobs.run_features(jobs.plan_features(jobs.command_runtime(data_dir, cluster), options))
    console.print(
        f"features of {dataset}: {summary.n_tracks} tracks ({summary.n_extracted} extracted, "
        f"{summary.n_skipped} already present, {summary.n_quarantined} quarantined), "
        f"{summary.clips_per_s:.1f} clips/s, peak worker memory {summary.peak_worker_rss_mb:.0f} MiB\n"
        f"shards: {summary.feature_dir}"
    )


@app.command()
@cluster_options
def wmf(
    cluster: jobs.ClusterOptions,
    listening: Annotated[
        list[Path], typer.Option(exists=True, dir_okay=False, help="listening files, oldest first (one batch each)")
    ],
    listening_format: Annotated[
        str, typer.Option("--format", help="auto | triplets | hetrec | events")
    ] = W.listening_format,
    heldout_items: Annotated[
        Path | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="text file of item ids to hold out (cold start); without it, each user's plays are split (in-matrix)",
        ),
    ] = None,
    factors: int = W.factors,
    regularization: float = W.regularization,
    iterations: int = W.iterations,
    confidence: Annotated[str, typer.Option(help="log | linear")] = W.confidence,
    alpha: float = W.alpha,
    epsilon: float = W.epsilon,
    test_fraction: Annotated[
        float, typer.Option(help="in-matrix: share of each user's items held out")
    ] = W.test_fraction,
    early_stopping: Annotated[int, typer.Option(help="patience in evaluations; 0 = off")] = W.early_stopping,
    eval_max_users: Annotated[
        int, typer.Option(help="users sampled for in-matrix evaluation; 0 = all")
    ] = W.eval_max_users,
    k: Annotated[int, typer.Option(help="cut-off of mAP@k, precision@k, NDCG@k")] = W.k,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """Ingest listening data (validated, quarantined, stable ids), factorize it with WMF and evaluate.

    Listening files of 1 GiB and more (together) are ingested on the Dask cluster
    (``--cluster``, ``--workers``, ``--address``), in chunks; smaller ones in this process.

    Running again with new files updates the factors from the previous ones and records
    that update against a full refit; with the same files, nothing is redone.
    """
    with _command(verbose):
        options = jobs.WMFOptions(
            listening=tuple(listening),
            listening_format=listening_format,
            heldout_items=jobs.read_item_ids(heldout_items) if heldout_items is not None else None,
            factors=factors,
            regularization=regularization,
            iterations=iterations,
            confidence=confidence,
            alpha=alpha,
            epsilon=epsilon,
            test_fraction=test_fraction,
            early_stopping=early_stopping,
            eval_max_users=eval_max_users,
            k=k,
        )
        out = jobs.run_wmf(jobs.plan_wmf(jobs.command_runtime(data_dir, cluster), options))
    console.print(
        f"WMF ({out.mode}) on batches {', '.join(out.batches)}: {out.n_users} users, {out.n_items} items"
        + (f", {out.n_heldout} held out" if out.n_heldout else "")
        + f"\nfactors: {out.user_factors}"
    )
    if out.rows:
        console.print(f"{'':30s}{'mAP@' + str(k):>10s}{'AUC':>8s}{'P@' + str(k):>10s}{'NDCG@' + str(k):>11s}")
        for row in out.rows:
            console.print(
                f"  {row.name:28s}{row.map_at_k:10.4f}{row.auc:8.3f}{row.precision_at_k:10.4f}{row.ndcg_at_k:11.4f}",
                highlight=False,
            )


TrainDataset = Annotated[str, typer.Option(help="the dataset an earlier pipeline run made shards (and factors) of")]
TrainEpochs = Annotated[int | None, typer.Option(help="cap on training epochs")]


@app.command("train-tagger")
def train_tagger(
    dataset: TrainDataset = T.dataset,
    epochs: TrainEpochs = None,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """Train the tagger again on the dataset's feature shards (the last pipeline run's settings); register it as
    challenger."""
    with _command(verbose):
        plan = jobs.plan_train(jobs.command_runtime(data_dir), jobs.TrainOptions(dataset=dataset, epochs=epochs))
        _quiet_lightning()
        out = jobs.run_train_tagger(plan)
    console.print(
        f"tagger of {dataset}: test ROC-AUC {out.roc_auc:.3f}, PR-AUC {out.pr_auc:.3f} (chance {out.pr_auc_chance:.3f})"
        f"\n  {out.model_uri} (MLflow run {out.run_id}), registered as challenger",
        highlight=False,
    )


@app.command("train-recommender")
def train_recommender(
    dataset: TrainDataset = T.dataset,
    epochs: TrainEpochs = None,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """Train the latent-factor CNN again on the current WMF factors (reused, not refitted); register it as
    challenger."""
    with _command(verbose):
        plan = jobs.plan_train(jobs.command_runtime(data_dir), jobs.TrainOptions(dataset=dataset, epochs=epochs))
        _quiet_lightning()
        out = jobs.run_train_recommender(plan)
    console.print(f"recommender of {dataset} (held-out tracks, cut-off {out.k}):", highlight=False)
    for row in out.rows:
        console.print(f"  {row.name:28s} mAP@k {row.map_at_k:.4f}  AUC {row.auc:.3f}", highlight=False)
    console.print(f"  {out.model_uri} (MLflow run {out.run_id}), registered as challenger", highlight=False)


@app.command()
def retrain(
    data_dir: DataDir = Path("data"),
    metric: Annotated[
        str | None,
        typer.Option(
            help="promotion metric: map_at_k | auc | ndcg_at_k | precision_at_k (default: the pipeline's, map_at_k)"
        ),
    ] = None,
    margin: Annotated[
        float | None, typer.Option(help="absolute gain on the metric the challenger needs (default: the pipeline's, 0)")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="cap on fine-tuning epochs")] = None,
    verbose: Verbose = False,
) -> None:
    """Retrain the recommender on new listening files in <data-dir>/inbox/listening; promote it only if better."""
    with _command(verbose):
        options = jobs.RetrainOptions(metric=metric, margin=margin, epochs=epochs)
        plan = jobs.plan_retrain(jobs.command_runtime(data_dir), options)
        _quiet_lightning()
        from mlflow.exceptions import MlflowException

        try:
            outcome = jobs.run_retrain(plan)
        except MlflowException as err:  # the registry refused: its reason, the traceback only with --verbose
            if verbose:
                traceback.print_exception(err)
            raise _fail(str(err), FAILED) from None
    if outcome.status == "no-champion":  # nothing to retrain yet: run the pipeline first
        raise _fail(f"retrain: {outcome.status}: {outcome.message}")
    if outcome.status == "busy":
        raise _fail(f"retrain: {outcome.status}: {outcome.message}", FAILED)
    console.print(f"retrain: {outcome.status}: {outcome.message}", highlight=False)


@app.command()
def up(
    data_dir: DataDir = Path("data"),
    prefect_port: Annotated[int, typer.Option(help="Prefect server and UI")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server and UI")] = 5000,
    dask_port: Annotated[int, typer.Option(help="Dask scheduler")] = 8786,
    dashboard_port: Annotated[int, typer.Option(help="Dask dashboard")] = 8787,
    web_port: Annotated[int, typer.Option(help="the web demo (mirflow serve)")] = 8000,
    workers: Workers = None,
    work_pool: Annotated[str, typer.Option(help="Prefect work pool the deployments run on")] = "mirflow",
    concurrency: Annotated[int, typer.Option(help="deployment runs at a time (they share the storage root)")] = 1,
    paused_schedules: Annotated[bool, typer.Option(help="register the schedules paused")] = False,
    verbose: Verbose = False,
) -> None:
    """Run mirflow as a service (what `make serve` does): Prefect server and worker, MLflow server, Dask cluster.

    Binds 127.0.0.1 only, registers the deployments of prefect.yaml, prints the URLs and
    runs until Ctrl-C, which stops everything it started.
    """
    with _command(verbose, flows=False):
        _serve_stack(
            data_dir,
            ports=(prefect_port, mlflow_port, dask_port, dashboard_port, web_port),
            workers=workers,
            work_pool=work_pool,
            concurrency=concurrency,
            paused_schedules=paused_schedules,
        )


def _serve_stack(
    data_dir: Path,
    *,
    ports: tuple[int, int, int, int, int],
    workers: int | None,
    work_pool: str,
    concurrency: int,
    paused_schedules: bool,
) -> None:
    import signal

    from infra.cluster import usable_cores
    from mirflow.stack import Ports, Stack, StackError

    stopping: list[int] = []
    prefect_port, mlflow_port, dask_port, dashboard_port, web_port = ports
    stack = Stack(
        data_dir=data_dir,
        ports=Ports(prefect=prefect_port, mlflow=mlflow_port, dask=dask_port, dashboard=dashboard_port, web=web_port),
        n_workers=workers or usable_cores(),
        work_pool=work_pool,
        concurrency=concurrency,
        paused_schedules=paused_schedules,
        stop_requested=lambda: bool(stopping),
    )

    def request_stop(signum, frame) -> None:
        stopping.append(signum)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # Ctrl-C, kill, a closed terminal
        signal.signal(signum, request_stop)
    logger = logging.getLogger("mirflow")
    try:
        try:
            info = stack.start(on_step=logger.info)
        except StackError as err:  # the reason and the failing log's tail: a service that could not start
            raise _fail(str(err), FAILED) from None
        if stopping:
            return
        console.print("\n[bold]mirflow is serving[/bold] (Ctrl-C stops everything)", highlight=False)
        for line in info.lines():
            console.print(f"  {line}", highlight=False)
        console.print(
            f"\n  export PREFECT_API_URL={info.prefect_api}\n"
            "  prefect deployment run 'mirflow/pipeline' --param epochs=5\n"
            f"  new listening files go to {stack.data_dir / 'inbox' / 'listening'}; "
            "'mirflow/retrain-on-new-listening' runs "
            + ("when asked (its schedule is paused)" if paused_schedules else "every hour"),
            highlight=False,
        )
        died = stack.watch()
        if died is not None:
            raise _fail(
                f"{died} stopped unexpectedly (log: {stack.logs / (died + '.log')}); stopping the service", FAILED
            )
    finally:
        if stack.owned:  # a second `mirflow up` that found one running touches nothing of it
            console.print("stopping the service ...", highlight=False)
            stack.stop()
            console.print("stopped", highlight=False)


study_app = typer.Typer(no_args_is_help=True, help="Studies: many configurations under one MLflow parent run.")
app.add_typer(study_app, name="study")

StudyK = Annotated[int | None, typer.Option(help="K-means means per timescale (default: the preset's)")]
StudyEpochs = Annotated[int | None, typer.Option(help="cap on each model's training epochs")]
StudyTriplets = Annotated[
    list[Path],
    typer.Option(exists=True, dir_okay=False, help="Taste Profile triplet files of a real catalogue, oldest first"),
]


def _mlflow_ui(data_dir: Path) -> str:
    from infra.tracking import tracking_for

    return f"  mlflow ui --backend-store-uri {tracking_for(data_dir.resolve()).tracking_uri}"


@study_app.command("tagging")
@cluster_options
def study_tagging(
    cluster: jobs.ClusterOptions,
    preset: Annotated[
        str,
        typer.Option(
            help="ismir2013 | icassp2014 | modern | smoke | icassp2014-smoke, or a JSON file of the same shape"
        ),
    ] = ST.preset,
    k: StudyK = None,
    dataset: Annotated[
        str, typer.Option(help="synthetic (built if absent), or a catalogue made by `mirflow features`")
    ] = ST.dataset,
    data_dir: DataDir = Path("data"),
    tracks: Tracks = ST.tracks,
    users: Users = ST.users,
    clip_seconds: ClipSeconds = ST.clip_seconds,
    seed: WorldSeed = ST.seed,
    epochs: StudyEpochs = None,
    devices: Devices = ST.devices,
    precision: Precision = ST.precision,
    compile_: Compile = ST.compile,
    verbose: Verbose = False,
) -> None:
    """A tagging study under one MLflow parent run: multiscale K-means features (ismir2013), or raw audio
    against spectrograms (icassp2014), or the short-chunk ResNet beside the 2014 convnet (modern)."""
    with _command(verbose):
        options = jobs.TaggingStudyOptions(
            preset=preset,
            k=k,
            dataset=dataset,
            tracks=tracks,
            users=users,
            clip_seconds=clip_seconds,
            seed=seed,
            epochs=epochs,
            devices=devices,
            precision=precision,
            compile=compile_,
        )
        plan = jobs.plan_tagging_study(jobs.command_runtime(data_dir, cluster), options)
        _quiet_lightning()
        out = jobs.run_tagging_study(plan)
    console.print(
        f"\n[bold]study {plan.study.preset} on {dataset}[/bold]: {out.n_runs + out.n_reused} configurations "
        f"({out.n_reused} reused) in {out.seconds:.0f} s; test ROC-AUC and PR-AUC, macro over tags\n",
        highlight=False,
    )
    console.print(out.table, highlight=False, soft_wrap=True)
    if out.importance:
        console.print("\nROC-AUC lost when one timescale is left out (mean per tag type):\n", highlight=False)
        console.print(out.importance, highlight=False, soft_wrap=True)
    console.print(
        f"\nMLflow parent run {out.parent_run_id} (experiment mirflow-study); report: {out.report_path}\n"
        + _mlflow_ui(data_dir),
        highlight=False,
    )


@study_app.command("recommendation")
@cluster_options
def study_recommendation(
    cluster: jobs.ClusterOptions,
    preset: Annotated[
        str, typer.Option(help="nips2013 | nips2013-smoke, or a JSON file of the same shape")
    ] = SR.preset,
    query: Annotated[
        list[str],
        typer.Option(help="a held-out track to query (repeatable); default: a seeded draw of --queries tracks"),
    ] = [],  # noqa: B006
    queries: Annotated[int | None, typer.Option(help="seeded query tracks (default: the preset's)")] = None,
    k: Annotated[int | None, typer.Option(help="K-means means of the baselines' features")] = None,
    dataset: Annotated[
        str,
        typer.Option(help="synthetic (built if absent), or a catalogue made by `mirflow features` (with --triplets)"),
    ] = SR.dataset,
    triplets: StudyTriplets = [],  # noqa: B006
    data_dir: DataDir = Path("data"),
    tracks: Tracks = SR.tracks,
    users: Users = SR.users,
    clip_seconds: ClipSeconds = SR.clip_seconds,
    seed: WorldSeed = SR.seed,
    epochs: StudyEpochs = None,
    devices: Devices = SR.devices,
    precision: Precision = SR.precision,
    compile_: Compile = SR.compile,
    verbose: Verbose = False,
) -> None:
    """The recommendation study (NIPS 2013): cold start on held-out tracks for random, popularity (oracle),
    linear regression, MLP, CNN-MSE, CNN-WPE and the WMF upper bound, with nearest-neighbour queries."""
    with _command(verbose):
        options = jobs.RecommendationStudyOptions(
            preset=preset,
            query=tuple(query),
            queries=queries,
            k=k,
            dataset=dataset,
            triplets=tuple(triplets),
            tracks=tracks,
            users=users,
            clip_seconds=clip_seconds,
            seed=seed,
            epochs=epochs,
            devices=devices,
            precision=precision,
            compile=compile_,
        )
        plan = jobs.plan_recommendation_study(jobs.command_runtime(data_dir, cluster), options)
        _quiet_lightning()
        out = jobs.run_recommendation_study(plan)
    console.print(
        f"\n[bold]study {plan.study.preset} on {dataset}[/bold]: {out.n_runs + out.n_reused} trained models "
        f"({out.n_reused} reused) in {out.seconds:.0f} s; cold start on the held-out tracks\n",
        highlight=False,
    )
    console.print(out.table, highlight=False, soft_wrap=True)
    console.print(
        "\nqueries: nearest held-out tracks by WMF factors and by predicted factors (cosine)\n", highlight=False
    )
    console.print(out.queries, highlight=False, soft_wrap=True)
    console.print(
        f"MLflow parent run {out.parent_run_id} (experiment mirflow-study); report: {out.report_path}\n"
        + _mlflow_ui(data_dir),
        highlight=False,
    )


@study_app.command("transfer")
@cluster_options
def study_transfer(
    cluster: jobs.ClusterOptions,
    preset: Annotated[
        str, typer.Option(help="ismir2014 | ismir2014-smoke, or a JSON file of the same shape")
    ] = SX.preset,
    k: Annotated[int | None, typer.Option(help="K-means means per timescale")] = None,
    cv: Annotated[
        int | None, typer.Option(help="score the target by k-fold cross-validation instead of its split")
    ] = None,
    classifier: Annotated[str | None, typer.Option(help="logreg | svm (default: the preset's)")] = None,
    dataset: Annotated[
        str,
        typer.Option(
            help="the source catalogue: synthetic (built if absent), or one made by "
            "`mirflow features` (with --triplets)"
        ),
    ] = SX.dataset,
    triplets: StudyTriplets = [],  # noqa: B006
    data_dir: DataDir = Path("data"),
    tracks: Tracks = SX.tracks,
    users: Users = SX.users,
    clip_seconds: ClipSeconds = SX.clip_seconds,
    seed: WorldSeed = SX.seed,
    epochs: Annotated[int | None, typer.Option(help="cap on each source model's training epochs")] = None,
    devices: Devices = SX.devices,
    precision: Precision = SX.precision,
    compile_: Compile = SX.compile,
    verbose: Verbose = False,
) -> None:
    """Supervised pre-training (ISMIR 2014): linear regression and MLPs learn tag factors and listening factors
    from K-means features; their embeddings, and the target's own features, transfer to a genre catalogue."""
    with _command(verbose):
        options = jobs.TransferStudyOptions(
            preset=preset,
            k=k,
            cv=cv,
            classifier=classifier,
            dataset=dataset,
            triplets=tuple(triplets),
            tracks=tracks,
            users=users,
            clip_seconds=clip_seconds,
            seed=seed,
            epochs=epochs,
            devices=devices,
            precision=precision,
            compile=compile_,
        )
        plan = jobs.plan_transfer_study(jobs.command_runtime(data_dir, cluster), options)
        _quiet_lightning()
        out = jobs.run_transfer_study(plan)
    console.print(
        f"\n[bold]study {plan.study.preset} on {dataset}[/bold]: {out.n_runs + out.n_reused} source models "
        f"({out.n_reused} reused) in {out.seconds:.0f} s\n\nsource tasks (test split)\n",
        highlight=False,
    )
    console.print(out.source_table, highlight=False, soft_wrap=True)
    console.print("\ntransfer to the synthetic genre catalogue\n", highlight=False)
    console.print(out.transfer_table, highlight=False, soft_wrap=True)
    console.print(
        f"\nMLflow parent run {out.parent_run_id} (experiment mirflow-study); report: {out.report_path}",
        highlight=False,
    )


ModelRef = Annotated[
    str,
    typer.Option(
        "--model", help="a pre-trained source model: its run id, or models:/mirflow-pretrained-<task>-<model>@champion"
    ),
]
Adapter = Annotated[
    str | None,
    typer.Option(
        help="manifest | gtzan | mtat: read the catalogue from --source "
        "(default: the dataset's tracks table from an earlier run)"
    ),
]
Source = Annotated[
    Path | None,
    typer.Option(help="gtzan: the genre folders' root; manifest: the CSV/Parquet file; mtat: annotations_final.csv"),
]
Split = Annotated[str | None, typer.Option(help="gtzan: filtered | random; mtat: folder | lists")]
SplitDir = Annotated[Path | None, typer.Option(help="folder of the split lists")]


@app.command()
@cluster_options
def embed(
    cluster: jobs.ClusterOptions,
    model: ModelRef,
    dataset: Annotated[str, typer.Option(help="name of the catalogue under the storage root")],
    adapter: Adapter = None,
    source: Source = None,
    split: Split = None,
    split_dir: SplitDir = None,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """One embedding per track of a catalogue by a pre-trained model, as Parquet: the features it needs are
    computed on the cluster, incrementally (a second run computes nothing again)."""
    with _command(verbose):
        options = jobs.EmbedOptions(
            model=model, dataset=dataset, adapter=adapter, source=source, split=split, split_dir=split_dir
        )
        plan = jobs.plan_embed(jobs.command_runtime(data_dir, cluster), options)
        _quiet_lightning()
        out = jobs.run_embed(plan)
    console.print(
        f"embeddings of {out.n_tracks} tracks ({out.dims} dims, {out.n_quarantined} quarantined) in "
        f"{out.seconds:.0f} s, {out.clips_per_s:.1f} clips/s\n  {out.path}\n  model {out.model_uri}; "
        f"MLflow run {out.run_id} (experiment mirflow-embed)",
        highlight=False,
    )


@app.command("transfer")
@cluster_options
def transfer_command(
    cluster: jobs.ClusterOptions,
    dataset: Annotated[str, typer.Option(help="name of the target catalogue under the storage root")],
    adapter: Adapter = None,
    source: Source = None,
    models: Annotated[
        list[str],
        typer.Option("--model", help="pre-trained source model(s) for the 'pretrained' feature set (repeatable)"),
    ] = [],  # noqa: B006
    feature_sets: Annotated[
        list[str],
        typer.Option(
            "--feature-set",
            help="pretrained | kmeans | logmel-stats | mfcc (repeatable; default: all, pretrained only with --model)",
        ),
    ] = [],  # noqa: B006
    cv: Annotated[
        int | None,
        typer.Option(help="k-fold cross-validation (C chosen by inner folds) instead of the catalogue's split"),
    ] = None,
    classifier: Annotated[str, typer.Option(help="logreg | svm")] = X.classifier,
    k: Annotated[int, typer.Option(help="means per timescale of the target's own K-means features")] = X.k,
    split: Split = None,
    split_dir: SplitDir = None,
    seed: Annotated[int, typer.Option(help="seed of the folds (and of a random GTZAN split)")] = X.seed,
    data_dir: DataDir = Path("data"),
    verbose: Verbose = False,
) -> None:
    """Transfer to a labelled target: a logistic regression (or linear SVM) per feature set, its regularization
    chosen on the validation split or by inner cross-validation; accuracy, or macro ROC-AUC for tags."""
    with _command(verbose):
        options = jobs.TransferOptions(
            dataset=dataset,
            adapter=adapter,
            source=source,
            models=tuple(models),
            feature_sets=tuple(feature_sets),
            cv=cv,
            classifier=classifier,
            k=k,
            split=split,
            split_dir=split_dir,
            seed=seed,
        )
        plan = jobs.plan_transfer(jobs.command_runtime(data_dir, cluster), options)
        _quiet_lightning()
        out = jobs.run_transfer(plan)
    console.print(
        f"\ntransfer to {dataset}: {out.n_tracks} tracks ({out.n_dropped} left out), {out.metric}, "
        f"{out.seconds:.0f} s\n",
        highlight=False,
    )
    console.print(out.table, highlight=False, soft_wrap=True)
    console.print(f"\nMLflow run {out.run_id} (experiment mirflow-transfer)", highlight=False)


@app.command()
def serve(
    data_dir: DataDir = Path("data"),
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes it to the network")] = S.host,
    port: int = S.port,
    dataset: Annotated[str, typer.Option(help="the catalogue to serve (its pipeline run's models)")] = S.dataset,
    max_upload_mb: Annotated[float, typer.Option(help="largest upload accepted")] = S.max_upload_mb,
    max_minutes: Annotated[float, typer.Option(help="longest clip accepted (checked from the header)")] = S.max_minutes,
    decode_timeout: Annotated[
        float, typer.Option(help="seconds a decoder may take before the upload is refused")
    ] = S.decode_timeout,
    decoders: Annotated[int, typer.Option(help="decoding processes (uploads decoded at once)")] = S.decoders,
    wait: Annotated[
        bool,
        typer.Option(help="start without models (503 with the reason) and load them once a pipeline run has made them"),
    ] = S.wait,
    verbose: Verbose = False,
) -> None:
    """The web demo and its API: upload a track for its tags and cold-start recommendations, browse the catalogue
    map (http://HOST:PORT/, API docs at /docs)."""
    with _command(verbose, flows=False):
        options = jobs.ServeOptions(
            dataset=dataset,
            host=host,
            port=port,
            max_upload_mb=max_upload_mb,
            max_minutes=max_minutes,
            decode_timeout=decode_timeout,
            decoders=decoders,
            wait=wait,
        )
        plan = jobs.plan_serve(jobs.command_runtime(data_dir), options)
        _quiet_lightning()
        loader = jobs.serve_loader(plan)
        if wait:  # loaded in the background: the server answers (503 with the reason) from the start
            catalogue, what = None, f"{dataset} once its models can be loaded (503 with the reason until then)"
        else:
            try:
                catalogue = loader()  # a MirflowError (no models yet, ...) is a user error: its message
            except Exception as err:
                if isinstance(err, _user_error_types()):
                    raise
                # a store or files in a state nobody planned for: the reason, the traceback only with --verbose
                if verbose:
                    traceback.print_exception(err)
                raise _fail(
                    f"the models or the catalogue could not be loaded ({type(err).__name__}: {err}); "
                    "`mirflow serve --wait` keeps trying",
                    FAILED,
                ) from None
            what = f"{len(catalogue.track_ids)} tracks of {dataset} ({catalogue.source})"
    console.print(f"serving {what}\n  http://{host}:{port}/   (API docs: http://{host}:{port}/docs)", highlight=False)
    jobs.run_serve(plan, catalogue, loader, log_level="info" if verbose else "warning")


@app.command()
def world(
    data_dir: DataDir = Path("data"),
    tracks: Tracks = jobs.WorldOptions.tracks,
    users: Users = jobs.WorldOptions.users,
    clip_seconds: ClipSeconds = jobs.WorldOptions.clip_seconds,
    seed: WorldSeed = jobs.WorldOptions.seed,
    verbose: Verbose = False,
) -> None:
    """Only write the synthetic world (MTAT-style mp3 tree + Taste Profile triplets)."""
    with _command(verbose, flows=False):
        options = jobs.WorldOptions(tracks=tracks, users=users, clip_seconds=clip_seconds, seed=seed)
        root = jobs.write_world(jobs.command_runtime(data_dir), options)
    console.print(f"synthetic world written to {root}")


if __name__ == "__main__":
    app()
