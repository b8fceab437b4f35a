"""Deployment entry points: what ``prefect deployment run 'mirflow/<name>'`` runs (see prefect.yaml).

Each takes plain parameters (what ``--param key=value`` can give), reads the service
environment once (:mod:`mirflow.environment`: storage root, MLflow server, Dask scheduler
address), builds the same settings objects the CLI builds, and calls the same flow.
They all carry the flow name ``mirflow``; the deployment name says which job it is.

Every deployment run starts a fresh Python process that imports this module, so each
job imports only the flows it runs (the features job needs neither Lightning nor the
registry): the imports are a fixed cost of every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import flow

from core.layout import Layout
from core.settings import (
    PipelineSettings,
    SourceSettings,
    WMFSettings,
    feature_settings_from_options,
)
from mirflow.environment import (
    ServiceEnvironment,
    service_environment,
    subflow_heartbeats_off,
)

if TYPE_CHECKING:
    from flows.listening import WMFOutput
    from flows.recommendation import RecommendationStudyOutput
    from flows.retrain import RetrainOutcome
    from flows.study import StudyOutput
    from flows.training import RecommenderOutput, TaggerOutput
    from flows.transfer import EmbedOutput, TransferOutput, TransferStudyOutput
    from tasks.features import FeatureSummary
    from tasks.report import PipelineSummary


def _pipeline_settings(env: ServiceEnvironment, dataset: str, epochs: int | None) -> PipelineSettings:
    """The last pipeline run's settings under this storage root (or the defaults), for single-step jobs."""
    from flows.retrain import load_pipeline_settings

    path = Layout(env.data_dir).pipeline_settings()
    if path.exists():
        settings = load_pipeline_settings(env.data_dir, env.tracking)
        if settings.dataset != dataset:
            settings = settings.model_copy(update={"dataset": dataset})
    else:
        settings = PipelineSettings(data_dir=env.data_dir, dataset=dataset, tracking=env.tracking)
    settings = settings.model_copy(update={"cluster": env.cluster()})
    return settings.with_max_epochs(epochs) if epochs is not None else settings


@flow(name="mirflow", flow_run_name="pipeline-{dataset}")
def pipeline_job(
    dataset: str = "synthetic",
    annotations: str | None = None,
    audio_root: str | None = None,
    triplets: list[str] | None = None,
    epochs: int | None = None,
    tracks: int = 1200,
    users: int = 3000,
    clip_seconds: float = 15.0,
    seed: int = 0,
    initial_batches: int | None = None,
) -> PipelineSummary:
    """The whole pipeline (the synthetic world by default, or MTAT-layout audio with Taste Profile triplets)."""
    from flows.pipeline import pipeline

    env = service_environment()
    settings = PipelineSettings(
        data_dir=env.data_dir,
        dataset=dataset,
        annotations=annotations,
        audio_root=audio_root,
        triplets=tuple(Path(t) for t in triplets or ()),
        initial_batches=initial_batches,
        world={"n_tracks": tracks, "n_users": users, "clip_seconds": clip_seconds, "seed": seed},
        cluster=env.cluster(),
        tracking=env.tracking,
    )
    with subflow_heartbeats_off():
        return pipeline(settings.with_max_epochs(epochs) if epochs is not None else settings)


@flow(name="mirflow", flow_run_name="features-{dataset}")
def features_job(
    adapter: str,
    source: str,
    dataset: str,
    audio_root: str | None = None,
    split: str | None = None,
    split_dir: str | None = None,
    windows: str = "1024,2048,4096,8192",
    hop: int = 512,
    hop_policy: str = "fixed",
    sample_rate: int = 16000,
    n_mels: int = 128,
    pyramid: str = "none",
    pyramid_levels: int = 4,
    audio_shards: bool = False,
    files_per_task: int = 32,
) -> FeatureSummary:
    """Feature shards of any catalogue (adapters mtat, gtzan, manifest), on the service's Dask cluster."""
    from flows.features import catalogue_features

    env = service_environment()
    features = feature_settings_from_options(
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
    catalogue = SourceSettings(
        adapter=adapter, path=Path(source).resolve(), audio_root=audio_root, split=split, split_dir=split_dir
    )
    with subflow_heartbeats_off():
        return catalogue_features(env.data_dir, dataset, catalogue, features, env.cluster(), env.tracking)


@flow(name="mirflow", flow_run_name="wmf")
def wmf_job(
    listening: list[str],
    listening_format: str = "auto",
    heldout_items: list[str] | None = None,
    factors: int = 16,
    regularization: float = 5.0,
    iterations: int = 15,
    early_stopping: int = 0,
    k: int = 500,
) -> WMFOutput:
    """Ingest listening files and factorize them (in-matrix, or cold start with ``heldout_items``)."""
    from flows.listening import factorize
    from tasks.events import ListeningSource

    env = service_environment()
    settings = WMFSettings(
        factors=factors, regularization=regularization, iterations=iterations, early_stopping_patience=early_stopping
    )
    sources = [ListeningSource(Path(p).resolve(), format=listening_format).resolved() for p in listening]
    with subflow_heartbeats_off():
        return factorize(env.data_dir, sources, heldout_items, settings, env.tracking, k=k)


@flow(name="mirflow", flow_run_name="train-tagger-{dataset}")
def train_tagger_job(dataset: str = "synthetic", epochs: int | None = None) -> TaggerOutput:
    """Train the tagger on the dataset's feature shards and register it (alias ``challenger``)."""
    from flows.registry import register_tagger
    from flows.training import train_tagger_flow

    env = service_environment()
    settings = _pipeline_settings(env, dataset, epochs)
    with subflow_heartbeats_off():
        out = train_tagger_flow(
            settings.data_dir,
            dataset,
            settings.features.feature_set,
            settings.features.mel,
            settings.tagger,
            settings.tracking,
        )
    register_tagger(settings.tracking, out, dataset=dataset)
    return out


@flow(name="mirflow", flow_run_name="train-recommender-{dataset}")
def train_recommender_job(dataset: str = "synthetic", epochs: int | None = None) -> RecommenderOutput:
    """Train the latent-factor CNN on the current WMF factors (reused, not refitted) and register both."""
    from flows.listening import factorize, factorized_batches
    from flows.registry import register_recommender
    from flows.training import train_recommender_flow
    from tasks.datasets import heldout_track_ids

    env = service_environment()
    settings = _pipeline_settings(env, dataset, epochs)
    heldout = heldout_track_ids(Layout(settings.data_dir).tracks(dataset))
    # The factorization on disk covers these batches: asking for them again reuses its factors.
    with subflow_heartbeats_off():
        wmf = factorize(
            settings.data_dir,
            [],
            heldout,
            settings.wmf,
            settings.tracking,
            k=settings.evaluation.k,
            ingested=factorized_batches(settings.data_dir),
        )
        recommender = train_recommender_flow(
            settings.data_dir,
            dataset,
            settings.features.feature_set,
            settings.features.mel,
            wmf,
            settings.recommender,
            settings.evaluation,
            settings.tracking,
            confidence=settings.wmf,
        )
    register_recommender(settings.tracking, wmf=wmf, recommender=recommender, dataset=dataset)
    return recommender


@flow(name="mirflow", flow_run_name="retrain-on-new-listening")
def retrain_job(
    metric: Literal["map_at_k", "auc", "ndcg_at_k", "precision_at_k"] | None = None,
    margin: float | None = None,
    epochs: int | None = None,
) -> RetrainOutcome:
    """Retrain the recommender on new files in ``<data>/inbox/listening``; promote it only if it is better.

    ``metric`` (map_at_k, auc, ndcg_at_k, precision_at_k) and ``margin`` override the
    promotion rule of the pipeline's settings; ``epochs`` caps the fine-tuning.
    """
    from flows.retrain import retrain_on_new_listening

    env = service_environment()
    with subflow_heartbeats_off():
        return retrain_on_new_listening(env.data_dir, env.tracking, metric=metric, margin=margin, max_epochs=epochs)


@flow(name="mirflow", flow_run_name="study-tagging-{preset}-{dataset}")
def study_tagging_job(
    preset: str = "ismir2013",
    dataset: str = "synthetic",
    k: int | None = None,
    epochs: int | None = None,
    tracks: int = 1200,
    users: int = 3000,
    clip_seconds: float = 15.0,
    seed: int = 0,
) -> StudyOutput:
    """A tagging study under one parent run: ``ismir2013`` (multiscale K-means features, MLP per configuration),
    ``icassp2014`` (raw audio against spectrograms) or ``modern`` (the short-chunk ResNet)."""
    from core.settings import WorldSettings
    from flows.study import tagging_study
    from tasks.studies import load_preset, preset_kind, preset_overrides

    env = service_environment()
    study = load_preset(preset, overrides=preset_overrides(kind=preset_kind(preset), k=k, epochs=epochs))
    world = WorldSettings(n_tracks=tracks, n_users=users, clip_seconds=clip_seconds, seed=seed)
    with subflow_heartbeats_off():
        return tagging_study(env.data_dir, dataset, study, env.cluster(), env.tracking, world=world)


def _source(
    adapter: str | None, source: str | None, split: str | None, split_dir: str | None = None, seed: int = 0
) -> SourceSettings | None:
    """A catalogue to (re)read, or None to use the dataset's tracks table from an earlier run."""
    from core.errors import ParameterError

    if adapter is None:
        return None
    if not source or not Path(source).is_absolute():
        raise ParameterError(f"adapter {adapter!r} needs source: an absolute path on the workers' machines")
    return SourceSettings(
        adapter=adapter, path=Path(source), split=split, split_dir=Path(split_dir) if split_dir else None, seed=seed
    )


@flow(name="mirflow", flow_run_name="study-recommendation-{preset}-{dataset}")
def study_recommendation_job(
    preset: str = "nips2013",
    dataset: str = "synthetic",
    queries: list[str] | None = None,
    triplets: list[str] | None = None,
    k: int | None = None,
    epochs: int | None = None,
    tracks: int = 1200,
    users: int = 3000,
    clip_seconds: float = 15.0,
    seed: int = 0,
) -> RecommendationStudyOutput:
    """The NIPS 2013 table (cold start: random, popularity, linear regression, MLP, CNN-MSE, CNN-WPE, WMF upper
    bound) and nearest-neighbour ``queries`` (held-out track ids; default a seeded draw), under one parent run.
    ``triplets``: the listening files of a catalogue other than the synthetic one."""
    from core.settings import WorldSettings
    from flows.recommendation import recommendation_study
    from tasks.studies import load_study, merge, preset_overrides

    env = service_environment()
    extra = {"query_ids": list(queries)} if queries else {}
    study = load_study(
        preset, "recommendation", overrides=merge(preset_overrides(kind="recommendation", k=k, epochs=epochs), extra)
    )
    world = WorldSettings(n_tracks=tracks, n_users=users, clip_seconds=clip_seconds, seed=seed)
    with subflow_heartbeats_off():
        return recommendation_study(
            env.data_dir,
            dataset,
            study,
            env.cluster(),
            env.tracking,
            world=world,
            triplets=tuple(Path(p) for p in triplets or ()),
        )


@flow(name="mirflow", flow_run_name="study-transfer-{preset}-{dataset}")
def study_transfer_job(
    preset: str = "ismir2014",
    dataset: str = "synthetic",
    k: int | None = None,
    epochs: int | None = None,
    cv: int | None = None,
    classifier: Literal["logreg", "svm"] | None = None,
    triplets: list[str] | None = None,
    tracks: int = 1200,
    users: int = 3000,
    clip_seconds: float = 15.0,
    seed: int = 0,
) -> TransferStudyOutput:
    """ISMIR 2014: source models pre-trained on tags and listening data (registered), transferred to the synthetic
    genre catalogue beside its own features; source and transfer tables under one parent run."""
    from core.settings import WorldSettings
    from flows.transfer import transfer_study
    from tasks.studies import load_study, merge, preset_overrides

    env = service_environment()
    extra = {
        "transfer": {**({"cv": cv} if cv is not None else {}), **({"classifier": classifier} if classifier else {})}
    }
    study = load_study(
        preset, "transfer", overrides=merge(preset_overrides(kind="transfer", k=k, epochs=epochs), extra)
    )
    world = WorldSettings(n_tracks=tracks, n_users=users, clip_seconds=clip_seconds, seed=seed)
    with subflow_heartbeats_off():
        return transfer_study(
            env.data_dir,
            dataset,
            study,
            env.cluster(),
            env.tracking,
            world=world,
            triplets=tuple(Path(p) for p in triplets or ()),
        )


@flow(name="mirflow", flow_run_name="embed-{dataset}")
def embed_job(
    model: str,
    dataset: str,
    adapter: Literal["manifest", "gtzan", "mtat"] | None = None,
    source: str | None = None,
    split: str | None = None,
    split_dir: str | None = None,
) -> EmbedOutput:
    """Embeddings of a catalogue by a pre-trained model (run id or models:/name@alias), as Parquet."""
    from flows.transfer import embed_catalogue

    env = service_environment()
    catalogue = _source(adapter, source, split, split_dir)
    with subflow_heartbeats_off():
        return embed_catalogue(env.data_dir, dataset, model, env.cluster(), env.tracking, source=catalogue)


@flow(name="mirflow", flow_run_name="transfer-{dataset}")
def transfer_job(
    dataset: str,
    adapter: Literal["manifest", "gtzan", "mtat"] | None = None,
    source: str | None = None,
    models: list[str] | None = None,
    feature_sets: list[str] | None = None,
    cv: int | None = None,
    classifier: Literal["logreg", "svm"] = "logreg",
    k: int = 200,
    split: str | None = None,
    seed: int = 0,
) -> TransferOutput:
    """A simple classifier per feature set on a labelled target catalogue (accuracy, or macro ROC-AUC for tags)."""
    from core.settings import FeatureSettings, KMeansSettings, TransferSettings
    from flows.transfer import transfer

    env = service_environment()
    sets = feature_sets or [s for s in ("pretrained", "kmeans", "logmel-stats", "mfcc") if s != "pretrained" or models]
    settings = TransferSettings(classifier=classifier, cv=cv, feature_sets=tuple(sets), seed=seed)
    catalogue = _source(adapter, source, split, seed=seed)
    features = FeatureSettings()
    with subflow_heartbeats_off():
        return transfer(
            env.data_dir,
            dataset,
            settings,
            features,
            KMeansSettings(k=k, timescales=(features.mel.column,)),
            env.cluster(),
            env.tracking,
            source=catalogue,
            models=tuple(models or ()),
        )
