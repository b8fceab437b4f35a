"""Deployment entry points: what ``prefect deployment run 'mirflow/<name>'`` runs (see prefect.yaml).

Each takes plain parameters (what ``--param key=value`` can give), the same options as its
``mirflow`` command with the same defaults (:mod:`mirflow.jobs` holds both), reads the service
environment once (:mod:`mirflow.environment`: storage root, MLflow server, Dask scheduler
address) and runs the job. They all carry the flow name ``mirflow``; the deployment name says
which job it is. A path parameter must be absolute: the worker's directory is not the caller's.

Every deployment run starts a fresh Python process that imports this module, so each job
imports only the flows it runs (the features job needs neither Lightning nor the registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from prefect import flow

from mirflow import jobs
from mirflow.environment import service_environment, subflow_heartbeats_off

if TYPE_CHECKING:
    from flows.listening import WMFOutput
    from flows.recommendation import RecommendationStudyOutput
    from flows.retrain import RetrainOutcome
    from flows.study_runner import StudyOutput
    from flows.training import RecommenderOutput, TaggerOutput
    from flows.transfer import EmbedOutput, TransferOutput, TransferStudyOutput
    from tasks.features import FeatureSummary
    from tasks.report import PipelineSummary

Adapter = Literal["manifest", "gtzan", "mtat"]
Metric = Literal["map_at_k", "auc", "ndcg_at_k", "precision_at_k"]

# The defaults are the job options' own (one place for both doors).
P, F, W, T = jobs.PipelineOptions, jobs.FeaturesOptions, jobs.WMFOptions, jobs.TrainOptions
ST, SR, SX = jobs.TaggingStudyOptions, jobs.RecommendationStudyOptions, jobs.TransferStudyOptions
X = jobs.TransferOptions


def runtime() -> jobs.Runtime:
    """This deployment run's runtime: the service environment's storage root, tracking and Dask scheduler."""
    env = service_environment()
    return jobs.service_runtime(env.data_dir, env.tracking, env.dask_address)


@flow(name="mirflow", flow_run_name="pipeline-{dataset}")
def pipeline_job(
    dataset: str = P.dataset,
    annotations: str | None = None,
    audio_root: str | None = None,
    triplets: list[str] | None = None,
    epochs: int | None = None,
    tracks: int = P.tracks,
    users: int = P.users,
    clip_seconds: float = P.clip_seconds,
    seed: int = P.seed,
    initial_batches: int | None = None,
    model: str = P.model,
    objective: str = P.objective,
    devices: int = P.devices,
    precision: str = P.precision,
    compile: bool = P.compile,
) -> PipelineSummary:
    """The whole pipeline (the synthetic world by default, or MTAT-layout audio with Taste Profile triplets)."""
    options = jobs.PipelineOptions(
        dataset=dataset,
        annotations=annotations,
        audio_root=audio_root,
        triplets=tuple(triplets or ()),
        epochs=epochs,
        tracks=tracks,
        users=users,
        clip_seconds=clip_seconds,
        seed=seed,
        initial_batches=initial_batches,
        model=model,
        objective=objective,
        devices=devices,
        precision=precision,
        compile=compile,
    )
    plan = jobs.plan_pipeline(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_pipeline(plan)


@flow(name="mirflow", flow_run_name="features-{dataset}")
def features_job(
    adapter: Adapter,
    source: str,
    dataset: str,
    audio_root: str | None = None,
    split: str | None = None,
    split_dir: str | None = None,
    windows: str = F.windows,
    hop: int = F.hop,
    hop_policy: str = F.hop_policy,
    sample_rate: int = F.sample_rate,
    n_mels: int = F.n_mels,
    pyramid: str = F.pyramid,
    pyramid_levels: int = F.pyramid_levels,
    audio_shards: bool = F.audio_shards,
    files_per_task: int = F.files_per_task,
) -> FeatureSummary:
    """Feature shards of any catalogue (adapters mtat, gtzan, manifest), on the service's Dask cluster."""
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
    plan = jobs.plan_features(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_features(plan)


@flow(name="mirflow", flow_run_name="wmf")
def wmf_job(
    listening: list[str],
    listening_format: str = W.listening_format,
    heldout_items: list[str] | None = None,
    factors: int = W.factors,
    regularization: float = W.regularization,
    iterations: int = W.iterations,
    confidence: Literal["log", "linear"] = W.confidence,
    alpha: float = W.alpha,
    epsilon: float = W.epsilon,
    test_fraction: float = W.test_fraction,
    early_stopping: int = W.early_stopping,
    eval_max_users: int = W.eval_max_users,
    k: int = W.k,
) -> WMFOutput:
    """Ingest listening files and factorize them (in-matrix, or cold start with ``heldout_items``, item ids),
    ingesting big files on the service's Dask cluster."""
    options = jobs.WMFOptions(
        listening=tuple(listening),
        listening_format=listening_format,
        heldout_items=heldout_items,
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
    plan = jobs.plan_wmf(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_wmf(plan)


@flow(name="mirflow", flow_run_name="train-tagger-{dataset}")
def train_tagger_job(dataset: str = T.dataset, epochs: int | None = None) -> TaggerOutput:
    """Train the tagger on the dataset's feature shards and register it (alias ``challenger``)."""
    plan = jobs.plan_train(runtime(), jobs.TrainOptions(dataset=dataset, epochs=epochs))
    with subflow_heartbeats_off():
        return jobs.run_train_tagger(plan)


@flow(name="mirflow", flow_run_name="train-recommender-{dataset}")
def train_recommender_job(dataset: str = T.dataset, epochs: int | None = None) -> RecommenderOutput:
    """Train the latent-factor CNN on the current WMF factors (reused, not refitted) and register both."""
    plan = jobs.plan_train(runtime(), jobs.TrainOptions(dataset=dataset, epochs=epochs))
    with subflow_heartbeats_off():
        return jobs.run_train_recommender(plan)


@flow(name="mirflow", flow_run_name="retrain-on-new-listening")
def retrain_job(metric: Metric | None = None, margin: float | None = None, epochs: int | None = None) -> RetrainOutcome:
    """Retrain the recommender on new files in ``<data>/inbox/listening``; promote it only if it is better.

    ``metric`` (map_at_k, auc, ndcg_at_k, precision_at_k) and ``margin`` override the
    promotion rule of the pipeline's settings; ``epochs`` caps the fine-tuning.
    """
    plan = jobs.plan_retrain(runtime(), jobs.RetrainOptions(metric=metric, margin=margin, epochs=epochs))
    with subflow_heartbeats_off():
        return jobs.run_retrain(plan)


@flow(name="mirflow", flow_run_name="study-tagging-{preset}-{dataset}")
def study_tagging_job(
    preset: str = ST.preset,
    dataset: str = ST.dataset,
    k: int | None = None,
    epochs: int | None = None,
    tracks: int = ST.tracks,
    users: int = ST.users,
    clip_seconds: float = ST.clip_seconds,
    seed: int = ST.seed,
    devices: int = ST.devices,
    precision: str = ST.precision,
    compile: bool = ST.compile,
) -> StudyOutput:
    """A tagging study under one parent run: ``ismir2013`` (multiscale K-means features, MLP per configuration),
    ``icassp2014`` (raw audio against spectrograms) or ``modern`` (the short-chunk ResNet)."""
    options = jobs.TaggingStudyOptions(
        preset=preset,
        dataset=dataset,
        k=k,
        epochs=epochs,
        tracks=tracks,
        users=users,
        clip_seconds=clip_seconds,
        seed=seed,
        devices=devices,
        precision=precision,
        compile=compile,
    )
    plan = jobs.plan_tagging_study(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_tagging_study(plan)


@flow(name="mirflow", flow_run_name="study-recommendation-{preset}-{dataset}")
def study_recommendation_job(
    preset: str = SR.preset,
    dataset: str = SR.dataset,
    query: list[str] | None = None,
    queries: int | None = None,
    triplets: list[str] | None = None,
    k: int | None = None,
    epochs: int | None = None,
    tracks: int = SR.tracks,
    users: int = SR.users,
    clip_seconds: float = SR.clip_seconds,
    seed: int = SR.seed,
    devices: int = SR.devices,
    precision: str = SR.precision,
    compile: bool = SR.compile,
) -> RecommendationStudyOutput:
    """The NIPS 2013 table (cold start: random, popularity, linear regression, MLP, CNN-MSE, CNN-WPE, WMF upper
    bound) and nearest-neighbour queries under one parent run: ``query`` held-out track ids, or a seeded draw of
    ``queries`` tracks. ``triplets``: the listening files of a catalogue other than the synthetic one."""
    options = jobs.RecommendationStudyOptions(
        preset=preset,
        dataset=dataset,
        query=tuple(query or ()),
        queries=queries,
        triplets=tuple(triplets or ()),
        k=k,
        epochs=epochs,
        tracks=tracks,
        users=users,
        clip_seconds=clip_seconds,
        seed=seed,
        devices=devices,
        precision=precision,
        compile=compile,
    )
    plan = jobs.plan_recommendation_study(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_recommendation_study(plan)


@flow(name="mirflow", flow_run_name="study-transfer-{preset}-{dataset}")
def study_transfer_job(
    preset: str = SX.preset,
    dataset: str = SX.dataset,
    k: int | None = None,
    epochs: int | None = None,
    cv: int | None = None,
    classifier: Literal["logreg", "svm"] | None = None,
    triplets: list[str] | None = None,
    tracks: int = SX.tracks,
    users: int = SX.users,
    clip_seconds: float = SX.clip_seconds,
    seed: int = SX.seed,
    devices: int = SX.devices,
    precision: str = SX.precision,
    compile: bool = SX.compile,
) -> TransferStudyOutput:
    """ISMIR 2014: source models pre-trained on tags and listening data (registered), transferred to the synthetic
    genre catalogue beside its own features; source and transfer tables under one parent run."""
    options = jobs.TransferStudyOptions(
        preset=preset,
        dataset=dataset,
        k=k,
        epochs=epochs,
        cv=cv,
        classifier=classifier,
        triplets=tuple(triplets or ()),
        tracks=tracks,
        users=users,
        clip_seconds=clip_seconds,
        seed=seed,
        devices=devices,
        precision=precision,
        compile=compile,
    )
    plan = jobs.plan_transfer_study(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_transfer_study(plan)


@flow(name="mirflow", flow_run_name="embed-{dataset}")
def embed_job(
    model: str,
    dataset: str,
    adapter: Adapter | None = None,
    source: str | None = None,
    split: str | None = None,
    split_dir: str | None = None,
) -> EmbedOutput:
    """Embeddings of a catalogue by a pre-trained model (run id or models:/name@alias), as Parquet."""
    options = jobs.EmbedOptions(
        model=model, dataset=dataset, adapter=adapter, source=source, split=split, split_dir=split_dir
    )
    plan = jobs.plan_embed(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_embed(plan)


@flow(name="mirflow", flow_run_name="transfer-{dataset}")
def transfer_job(
    dataset: str,
    adapter: Adapter | None = None,
    source: str | None = None,
    models: list[str] | None = None,
    feature_sets: list[str] | None = None,
    cv: int | None = None,
    classifier: Literal["logreg", "svm"] = X.classifier,
    k: int = X.k,
    split: str | None = None,
    split_dir: str | None = None,
    seed: int = X.seed,
) -> TransferOutput:
    """A simple classifier per feature set on a labelled target catalogue (accuracy, or macro ROC-AUC for tags)."""
    options = jobs.TransferOptions(
        dataset=dataset,
        adapter=adapter,
        source=source,
        models=tuple(models or ()),
        feature_sets=tuple(feature_sets or ()),
        cv=cv,
        classifier=classifier,
        k=k,
        split=split,
        split_dir=split_dir,
        seed=seed,
    )
    plan = jobs.plan_transfer(runtime(), options)
    with subflow_heartbeats_off():
        return jobs.run_transfer(plan)
