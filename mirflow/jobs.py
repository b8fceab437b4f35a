"""The job layer: every job mirflow runs, written once, from plain options to settings to the flow.

The two front doors only parse: the ``mirflow`` command (:mod:`mirflow.cli`) and the Prefect
deployments (:mod:`mirflow.deployments`) turn their flags or parameters into a job's options
object and say where it runs (:class:`Runtime`); the job does the rest. Each job is two functions:

* ``plan_<job>(runtime, options)`` builds and validates every settings object the flow takes,
  and nothing else: no flow runs, nothing is written, so a bad option is refused before any
  work (a :class:`~core.errors.MirflowError` or pydantic's ``ValidationError``). Both doors
  build equal plans from equal options (tests/test_jobs.py);
* ``run_<job>(plan)`` calls the flow.

Adding an option is a field of its options class, its use in the plan, and one line in each parser.
The options classes hold the defaults both doors use.

Paths in options follow one rule, :meth:`Runtime.path`: an absolute path is taken as it is
(resolved); a relative one is relative to the caller's working directory on the command line,
and refused by a deployment, whose worker runs in a directory the caller never sees.

Every import of a flow (and of MLflow, Lightning, Dask) happens inside ``run_*``, so that the
command line answers a bad option at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from core.errors import ParameterError
from core.settings import (
    ClusterSettings,
    FeatureSettings,
    KMeansSettings,
    PipelineSettings,
    PromotionSettings,
    SourceSettings,
    TrackingSettings,
    TrainSettings,
    TransferSettings,
    WMFSettings,
    WorldSettings,
    feature_settings_from_options,
)

if TYPE_CHECKING:
    from flows.listening import WMFOutput
    from flows.recommendation import RecommendationStudyOutput
    from flows.retrain import RetrainOutcome
    from flows.study_runner import StudyOutput
    from flows.training import RecommenderOutput, TaggerOutput
    from flows.transfer import EmbedOutput, TransferOutput, TransferStudyOutput
    from tasks.events import ListeningSource
    from tasks.features import FeatureSummary
    from tasks.report import PipelineSummary
    from tasks.studies import AnyStudySettings
    from tasks.uploads import UploadLimits

PathLike = str | Path


# --------------------------------------------------------------------------------------------- where a job runs


@dataclass(frozen=True, kw_only=True)
class ClusterOptions:
    """The Dask cluster a job's fan-out steps run on: ``local`` (a LocalCluster for the job), ``address``
    (a running scheduler) or ``cuda`` (a LocalCUDACluster)."""

    kind: str = "local"
    workers: int | None = None
    address: str | None = None

    def settings(self) -> ClusterSettings:
        """The one place ``ClusterSettings`` is built from options."""
        return ClusterSettings(kind=self.kind, n_workers=self.workers, address=self.address)


@dataclass(frozen=True, kw_only=True)
class Runtime:
    """Where a job runs: the storage root, the MLflow store, the Dask cluster, and how relative paths read."""

    data_dir: Path  # absolute
    tracking: TrackingSettings
    cluster: ClusterSettings
    #: The directory a relative path option is relative to; None: relative paths are refused (a deployment).
    #: Not part of a plan's identity: equal options make equal settings through either door.
    relative_to: Path | None = field(default=None, compare=False)

    def path(self, value: PathLike, option: str) -> Path:
        """An option's path, absolute and resolved; a relative one without a directory to read it from is refused."""
        path = Path(value).expanduser()
        if path.is_absolute():
            return path.resolve()
        if self.relative_to is None:
            raise ParameterError(
                f"{option} {str(value)!r} is a relative path, and a deployment runs in the worker's directory, "
                "not the caller's: pass an absolute path (as the workers' machines see it)"
            )
        return (self.relative_to / path).resolve()

    def optional_path(self, value: PathLike | None, option: str) -> Path | None:
        return None if value is None else self.path(value, option)


def command_runtime(data_dir: PathLike, cluster: ClusterOptions | None = None) -> Runtime:
    """A job started on the command line: the MLflow store under ``data_dir``, relative paths from here."""
    from infra.tracking import tracking_for

    root = Path(data_dir).expanduser().resolve()
    return Runtime(
        data_dir=root,
        tracking=tracking_for(root),
        cluster=(cluster or ClusterOptions()).settings(),
        relative_to=Path.cwd(),
    )


def service_runtime(data_dir: Path, tracking: TrackingSettings, dask_address: str | None) -> Runtime:
    """A deployment run (:mod:`mirflow.environment`): the service's storage root, MLflow server and Dask
    scheduler (a LocalCluster per run when none is configured); relative paths are refused."""
    cluster = ClusterOptions(kind="address", address=dask_address) if dask_address else ClusterOptions()
    return Runtime(data_dir=Path(data_dir).resolve(), tracking=tracking, cluster=cluster.settings())


# ------------------------------------------------------------------------------------- options shared by jobs


@dataclass(frozen=True, kw_only=True)
class WorldOptions:
    """The synthetic world's size (built on first use by the jobs that need it)."""

    tracks: int = 1200
    users: int = 3000
    clip_seconds: float = 15.0
    seed: int = 0

    def world(self) -> WorldSettings:
        """The one place ``WorldSettings`` is built from options."""
        return WorldSettings(n_tracks=self.tracks, n_users=self.users, clip_seconds=self.clip_seconds, seed=self.seed)


@dataclass(frozen=True, kw_only=True)
class TrainingOptions:
    """How every model a job trains is trained: a cap on epochs, DDP devices, precision, torch.compile."""

    epochs: int | None = None
    devices: int = 1
    precision: str = "32-true"
    compile: bool = False

    def training(self) -> dict[str, Any]:
        """The fields of ``TrainSettings`` these options set."""
        train: dict[str, Any] = {"devices": self.devices, "precision": self.precision, "compile": self.compile}
        if self.epochs is not None:
            train["max_epochs"] = self.epochs
        return train


def _catalogue(
    runtime: Runtime,
    adapter: str | None,
    source: PathLike | None,
    *,
    audio_root: PathLike | None = None,
    split: str | None = None,
    split_dir: PathLike | None = None,
    seed: int = 0,
) -> SourceSettings | None:
    """The catalogue to (re)read through ``adapter``, or None: the dataset's tracks table from an earlier run."""
    if adapter is None:
        if source is not None:
            raise ParameterError("source needs an adapter (manifest, gtzan or mtat) to read it")
        return None
    if source is None:
        raise ParameterError(
            f"adapter {adapter!r} needs a source (gtzan: the genre folders' root; manifest: the CSV/Parquet file; "
            "mtat: annotations_final.csv)"
        )
    return SourceSettings(
        adapter=adapter,
        path=runtime.path(source, "source"),
        audio_root=runtime.optional_path(audio_root, "audio_root"),
        split=split,
        split_dir=runtime.optional_path(split_dir, "split_dir"),
        seed=seed,
    )


# ------------------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True, kw_only=True)
class PipelineOptions(WorldOptions, TrainingOptions):
    """The whole pipeline: the synthetic world (``dataset="synthetic"``), or MTAT-layout audio and
    annotations with Taste Profile triplets."""

    dataset: str = "synthetic"
    annotations: PathLike | None = None
    audio_root: PathLike | None = None
    triplets: Sequence[PathLike] = ()
    initial_batches: int | None = None
    model: str = "convnet2014"
    objective: str = "mse"


@dataclass(frozen=True)
class PipelinePlan:
    settings: PipelineSettings


def plan_pipeline(runtime: Runtime, options: PipelineOptions) -> PipelinePlan:
    evaluation: dict[str, Any] = {}
    if options.dataset == "synthetic":
        from tasks.synth import STYLES

        evaluation["map_tags"] = STYLES  # the world's styles colour the maps
    settings = PipelineSettings(
        data_dir=runtime.data_dir,
        dataset=options.dataset,
        annotations=runtime.optional_path(options.annotations, "annotations"),
        audio_root=runtime.optional_path(options.audio_root, "audio_root"),
        triplets=tuple(runtime.path(p, "triplets") for p in options.triplets),
        initial_batches=options.initial_batches,
        world=options.world(),
        tagger={"model": options.model},
        recommender={"objective": options.objective},
        evaluation=evaluation,
        cluster=runtime.cluster,
        tracking=runtime.tracking,
    )
    return PipelinePlan(settings.with_training(**options.training()))


def run_pipeline(plan: PipelinePlan) -> PipelineSummary:
    from flows.pipeline import pipeline

    return pipeline(plan.settings)


# ------------------------------------------------------------------------------------------------- features


@dataclass(frozen=True, kw_only=True)
class FeaturesOptions:
    """Feature shards of a catalogue read by an adapter (mtat, gtzan, manifest)."""

    adapter: str
    source: PathLike
    dataset: str
    audio_root: PathLike | None = None
    split: str | None = None
    split_dir: PathLike | None = None
    windows: str = "1024,2048,4096,8192"
    hop: int = 512
    hop_policy: str = "fixed"
    sample_rate: int = 16000
    n_mels: int = 128
    pyramid: str = "none"
    pyramid_levels: int = 4
    audio_shards: bool = False
    files_per_task: int = 32


@dataclass(frozen=True)
class FeaturesPlan:
    runtime: Runtime
    dataset: str
    source: SourceSettings
    features: FeatureSettings


def plan_features(runtime: Runtime, options: FeaturesOptions) -> FeaturesPlan:
    features = feature_settings_from_options(
        windows=options.windows,
        hop=options.hop,
        hop_policy=options.hop_policy,
        sample_rate=options.sample_rate,
        n_mels=options.n_mels,
        pyramid=options.pyramid,
        pyramid_levels=options.pyramid_levels,
        audio_shards=options.audio_shards,
        files_per_task=options.files_per_task,
    )
    source = _catalogue(
        runtime,
        options.adapter,
        options.source,
        audio_root=options.audio_root,
        split=options.split,
        split_dir=options.split_dir,
    )
    assert source is not None  # the adapter is required
    return FeaturesPlan(runtime, options.dataset, source, features)


def run_features(plan: FeaturesPlan) -> FeatureSummary:
    from flows.features import catalogue_features

    r = plan.runtime
    return catalogue_features(r.data_dir, plan.dataset, plan.source, plan.features, r.cluster, r.tracking)


# ------------------------------------------------------------------------------------------------------ wmf


@dataclass(frozen=True, kw_only=True)
class WMFOptions:
    """Listening files ingested and factorized with WMF; in-matrix evaluation, or cold start on ``heldout_items``."""

    listening: Sequence[PathLike]
    listening_format: str = "auto"
    heldout_items: Sequence[str] | None = None
    factors: int = 16
    regularization: float = 5.0
    iterations: int = 15
    confidence: str = "log"
    alpha: float = 2.0
    epsilon: float = 1.0
    test_fraction: float = 0.2
    early_stopping: int = 0
    eval_max_users: int = 100_000
    k: int = 500


@dataclass(frozen=True)
class WMFPlan:
    runtime: Runtime
    sources: tuple[ListeningSource, ...]
    heldout_items: tuple[str, ...] | None
    settings: WMFSettings
    k: int


def plan_wmf(runtime: Runtime, options: WMFOptions) -> WMFPlan:
    from tasks.events import ListeningSource

    settings = WMFSettings(
        factors=options.factors,
        regularization=options.regularization,
        iterations=options.iterations,
        confidence=options.confidence,
        alpha=options.alpha,
        epsilon=options.epsilon,
        test_fraction=options.test_fraction,
        early_stopping_patience=options.early_stopping,
        eval_max_users=options.eval_max_users,
    )
    if not options.listening:
        raise ParameterError("wmf needs at least one listening file")
    sources = tuple(
        ListeningSource(runtime.path(p, "listening"), format=options.listening_format).resolved()
        for p in options.listening
    )
    if options.k < 1:
        raise ParameterError(f"k={options.k}: the cut-off of the ranking metrics must be >= 1")
    heldout = None if options.heldout_items is None else tuple(options.heldout_items)
    return WMFPlan(runtime, sources, heldout, settings, options.k)


def read_item_ids(path: Path) -> list[str]:
    """Item ids from a text file, one per line (blank lines skipped)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def run_wmf(plan: WMFPlan) -> WMFOutput:
    from flows.listening import factorize

    r = plan.runtime
    heldout = list(plan.heldout_items) if plan.heldout_items is not None else None
    return factorize(r.data_dir, list(plan.sources), heldout, plan.settings, r.tracking, k=plan.k, cluster=r.cluster)


# -------------------------------------------------------------------------------- train-tagger, train-recommender


@dataclass(frozen=True, kw_only=True)
class TrainOptions:
    """One model trained again on what an earlier pipeline run left under the storage root."""

    dataset: str = "synthetic"
    epochs: int | None = None


@dataclass(frozen=True)
class TrainPlan:
    settings: PipelineSettings


def plan_train(runtime: Runtime, options: TrainOptions) -> TrainPlan:
    """The last pipeline run's settings under this storage root (or the defaults) with this runtime's tracking.

    The cluster stays the pipeline run's: training runs in this process, on no Dask cluster.
    """
    from core.layout import Layout

    if Layout(runtime.data_dir).pipeline_settings().exists():
        from flows.retrain import load_pipeline_settings

        settings = load_pipeline_settings(runtime.data_dir, runtime.tracking)
    else:
        settings = PipelineSettings(data_dir=runtime.data_dir, tracking=runtime.tracking)
    settings = settings.model_copy(update={"dataset": options.dataset})
    return TrainPlan(settings.with_max_epochs(options.epochs) if options.epochs is not None else settings)


def run_train_tagger(plan: TrainPlan) -> TaggerOutput:
    """Train the tagger on the dataset's feature shards and register it (alias ``challenger``)."""
    from flows.registry import register_tagger
    from flows.training import train_tagger_flow

    s = plan.settings
    out = train_tagger_flow(s.data_dir, s.dataset, s.features.feature_set, s.features.mel, s.tagger, s.tracking)
    register_tagger(s.tracking, out, dataset=s.dataset)
    return out


def run_train_recommender(plan: TrainPlan) -> RecommenderOutput:
    """Train the latent-factor CNN on the current WMF factors (reused, not refitted) and register both."""
    from core.layout import Layout
    from flows.listening import factorize, factorized_batches
    from flows.registry import register_recommender
    from flows.training import train_recommender_flow
    from tasks.datasets import heldout_track_ids

    s = plan.settings
    heldout = heldout_track_ids(Layout(s.data_dir).tracks(s.dataset))
    # The factorization on disk covers these batches: asking for them again reuses its factors.
    wmf = factorize(
        s.data_dir, [], heldout, s.wmf, s.tracking, k=s.evaluation.k, ingested=factorized_batches(s.data_dir)
    )
    recommender = train_recommender_flow(
        s.data_dir,
        s.dataset,
        s.features.feature_set,
        s.features.mel,
        wmf,
        s.recommender,
        s.evaluation,
        s.tracking,
        confidence=s.wmf,
    )
    register_recommender(s.tracking, wmf=wmf, recommender=recommender, dataset=s.dataset)
    return recommender


# -------------------------------------------------------------------------------------------------- retrain


@dataclass(frozen=True, kw_only=True)
class RetrainOptions:
    """Overrides of the pipeline's promotion rule and fine-tuning length; None keeps the pipeline's."""

    metric: str | None = None
    margin: float | None = None
    epochs: int | None = None


@dataclass(frozen=True)
class RetrainPlan:
    data_dir: Path  # the retraining ingests the inbox in this process: no cluster
    tracking: TrackingSettings
    metric: str | None
    margin: float | None
    epochs: int | None


def plan_retrain(runtime: Runtime, options: RetrainOptions) -> RetrainPlan:
    # Validated here, before the flow starts: a bad value is a user error, not a failed run.
    PromotionSettings(
        **{k: v for k, v in {"metric": options.metric, "margin": options.margin}.items() if v is not None}
    )
    if options.epochs is not None:
        TrainSettings(max_epochs=options.epochs)
    return RetrainPlan(runtime.data_dir, runtime.tracking, options.metric, options.margin, options.epochs)


def run_retrain(plan: RetrainPlan) -> RetrainOutcome:
    from flows.retrain import retrain_on_new_listening

    return retrain_on_new_listening(
        plan.data_dir, plan.tracking, metric=plan.metric, margin=plan.margin, max_epochs=plan.epochs
    )


# -------------------------------------------------------------------------------------------------- studies


@dataclass(frozen=True, kw_only=True)
class TaggingStudyOptions(WorldOptions, TrainingOptions):
    """A tagging study: multiscale K-means features (ismir2013) or end-to-end learning (icassp2014, modern)."""

    preset: str = "ismir2013"
    dataset: str = "synthetic"
    k: int | None = None


@dataclass(frozen=True, kw_only=True)
class RecommendationStudyOptions(TaggingStudyOptions):
    """The NIPS 2013 cold-start table; ``query``: held-out tracks to query (default a seeded draw of ``queries``)."""

    preset: str = "nips2013"
    query: Sequence[str] = ()
    queries: int | None = None
    triplets: Sequence[PathLike] = ()


@dataclass(frozen=True, kw_only=True)
class TransferStudyOptions(TaggingStudyOptions):
    """ISMIR 2014: pre-training on tags and listening, transfer to the synthetic genre catalogue."""

    preset: str = "ismir2014"
    cv: int | None = None
    classifier: str | None = None
    triplets: Sequence[PathLike] = ()


@dataclass(frozen=True)
class StudyPlan:
    runtime: Runtime
    dataset: str
    study: AnyStudySettings
    world: WorldSettings
    triplets: tuple[Path, ...] = ()


def _study(
    runtime: Runtime, options: TaggingStudyOptions, kind: str, extra: dict[str, Any], triplets: Sequence[PathLike]
) -> StudyPlan:
    from tasks.studies import load_study, merge, preset_kind, preset_overrides

    found = preset_kind(options.preset)
    if found != kind:
        command = "tagging" if found in ("multiscale", "end-to-end") else found
        raise ParameterError(
            f"preset {options.preset!r} is a {found} study: run `mirflow study {command} --preset {options.preset}`"
        )
    overrides = preset_overrides(kind=kind, k=options.k, epochs=None, train=options.training())
    study = load_study(options.preset, kind, overrides=merge(overrides, extra))
    return StudyPlan(
        runtime,
        options.dataset,
        study,
        options.world(),
        tuple(runtime.path(p, "triplets") for p in triplets),
    )


def plan_tagging_study(runtime: Runtime, options: TaggingStudyOptions) -> StudyPlan:
    from tasks.studies import preset_kind

    kind = preset_kind(options.preset)
    if kind in ("recommendation", "transfer"):
        raise ParameterError(
            f"preset {options.preset!r} is a {kind} study: run `mirflow study {kind} --preset {options.preset}`"
        )
    return _study(runtime, options, kind, {}, ())


def run_tagging_study(plan: StudyPlan) -> StudyOutput:
    from flows.study import tagging_study

    r = plan.runtime
    return tagging_study(r.data_dir, plan.dataset, plan.study, r.cluster, r.tracking, world=plan.world)


def plan_recommendation_study(runtime: Runtime, options: RecommendationStudyOptions) -> StudyPlan:
    extra = {
        **({"query_ids": list(options.query)} if options.query else {}),
        **({"queries": options.queries} if options.queries is not None else {}),
    }
    return _study(runtime, options, "recommendation", extra, options.triplets)


def run_recommendation_study(plan: StudyPlan) -> RecommendationStudyOutput:
    from flows.recommendation import recommendation_study

    r = plan.runtime
    return recommendation_study(
        r.data_dir, plan.dataset, plan.study, r.cluster, r.tracking, world=plan.world, triplets=plan.triplets
    )


def plan_transfer_study(runtime: Runtime, options: TransferStudyOptions) -> StudyPlan:
    transfer = {
        **({"cv": options.cv} if options.cv is not None else {}),
        **({"classifier": options.classifier} if options.classifier else {}),
    }
    return _study(runtime, options, "transfer", {"transfer": transfer}, options.triplets)


def run_transfer_study(plan: StudyPlan) -> TransferStudyOutput:
    from flows.transfer import transfer_study

    r = plan.runtime
    return transfer_study(
        r.data_dir, plan.dataset, plan.study, r.cluster, r.tracking, world=plan.world, triplets=plan.triplets
    )


# ---------------------------------------------------------------------------------------- embed and transfer


@dataclass(frozen=True, kw_only=True)
class EmbedOptions:
    """Embeddings of a catalogue by a pre-trained model (its run id, or ``models:/name@alias``)."""

    model: str
    dataset: str
    adapter: str | None = None
    source: PathLike | None = None
    split: str | None = None
    split_dir: PathLike | None = None


@dataclass(frozen=True)
class EmbedPlan:
    runtime: Runtime
    dataset: str
    model: str
    source: SourceSettings | None


def plan_embed(runtime: Runtime, options: EmbedOptions) -> EmbedPlan:
    source = _catalogue(runtime, options.adapter, options.source, split=options.split, split_dir=options.split_dir)
    return EmbedPlan(runtime, options.dataset, options.model, source)


def run_embed(plan: EmbedPlan) -> EmbedOutput:
    from flows.transfer import embed_catalogue

    r = plan.runtime
    return embed_catalogue(r.data_dir, plan.dataset, plan.model, r.cluster, r.tracking, source=plan.source)


#: The target's feature sets a transfer job scores by default ("pretrained" only when models are given).
FEATURE_SETS = ("pretrained", "kmeans", "logmel-stats", "mfcc")


@dataclass(frozen=True, kw_only=True)
class TransferOptions:
    """A simple classifier per feature set on a labelled target catalogue."""

    dataset: str
    adapter: str | None = None
    source: PathLike | None = None
    models: Sequence[str] = ()
    feature_sets: Sequence[str] = ()
    cv: int | None = None
    classifier: str = "logreg"
    k: int = 200
    split: str | None = None
    split_dir: PathLike | None = None
    seed: int = 0


@dataclass(frozen=True)
class TransferPlan:
    runtime: Runtime
    dataset: str
    settings: TransferSettings
    features: FeatureSettings
    kmeans: KMeansSettings
    source: SourceSettings | None
    models: tuple[str, ...]


def plan_transfer(runtime: Runtime, options: TransferOptions) -> TransferPlan:
    sets = tuple(options.feature_sets) or tuple(s for s in FEATURE_SETS if s != "pretrained" or options.models)
    settings = TransferSettings(classifier=options.classifier, cv=options.cv, feature_sets=sets, seed=options.seed)
    source = _catalogue(
        runtime,
        options.adapter,
        options.source,
        split=options.split,
        split_dir=options.split_dir,
        seed=options.seed,
    )
    features = FeatureSettings()
    kmeans = KMeansSettings(k=options.k, timescales=(features.mel.column,))
    return TransferPlan(runtime, options.dataset, settings, features, kmeans, source, tuple(options.models))


def run_transfer(plan: TransferPlan) -> TransferOutput:
    from flows.transfer import transfer

    r = plan.runtime
    return transfer(
        r.data_dir,
        plan.dataset,
        plan.settings,
        plan.features,
        plan.kmeans,
        r.cluster,
        r.tracking,
        source=plan.source,
        models=plan.models,
    )


# ---------------------------------------------------------------------------------------------------- serve


@dataclass(frozen=True, kw_only=True)
class ServeOptions:
    """The web demo and its API over one catalogue's pipeline models."""

    dataset: str = "synthetic"
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = 20.0
    max_minutes: float = 10.0
    decode_timeout: float = 30.0
    decoders: int = 2
    wait: bool = False


@dataclass(frozen=True)
class ServePlan:
    runtime: Runtime
    options: ServeOptions
    limits: UploadLimits


def plan_serve(runtime: Runtime, options: ServeOptions) -> ServePlan:
    from tasks.uploads import UploadLimits

    for name in ("max_upload_mb", "max_minutes", "decode_timeout", "decoders"):
        value = getattr(options, name)
        if not value > 0:
            raise ParameterError(f"{name}={value}: must be positive")
    limits = UploadLimits(max_bytes=int(options.max_upload_mb * 2**20), max_seconds=options.max_minutes * 60.0)
    return ServePlan(runtime, options, limits)


def serve_loader(plan: ServePlan):
    """What loads the served catalogue (its models, map and embeddings) from the storage root: a function."""
    from mirflow.web.catalogue import load_catalogue

    r = plan.runtime

    def loader():
        return load_catalogue(r.data_dir, r.tracking, dataset=plan.options.dataset)

    return loader


def run_serve(plan: ServePlan, catalogue, loader, *, log_level: Literal["info", "warning"] = "warning") -> None:
    """Serve ``catalogue`` (None: loaded in the background by ``loader``, 503 with the reason until then)
    until the process is stopped."""
    import uvicorn

    from mirflow.web.app import create_app

    o = plan.options
    app = create_app(
        catalogue, loader=loader, limits=plan.limits, decode_timeout_s=o.decode_timeout, decoders_size=o.decoders
    )
    uvicorn.run(app, host=o.host, port=o.port, log_level=log_level)


def write_world(runtime: Runtime, options: WorldOptions) -> Path:
    """Only the synthetic world (MTAT-style mp3 tree and Taste Profile triplets); its folder."""
    from core.layout import Layout
    from tasks.synth import generate_world

    settings = options.world()
    root = Layout(runtime.data_dir).world()
    generate_world(root, settings)
    return root
