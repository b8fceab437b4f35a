"""Flow: audio files -> log-mel Parquet shards, fanned out over a Dask cluster."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from core.layout import Layout
from core.settings import ClusterSettings, FeatureSettings, SourceSettings, TrackingSettings
from infra.cluster import dask_client, map_batches, spectrogram_device
from infra.retries import TRANSIENT_IO_RETRIES
from infra.tracking import features_input, file_sha1, log_inputs, tracked_run, tracks_input
from tasks.catalogue import read_tracks, write_tracks
from tasks.datasets import tracks_from_source
from tasks.features import FeatureSummary, annotate_tracks, extract_shard, finish_features, plan_feature_batches
from tasks.shards import MANIFEST, read_manifest

log = logging.getLogger("mirflow")


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def update_tracks_table(tracks_path: Path, feature_dir: Path) -> Path:
    annotated = annotate_tracks(read_tracks(tracks_path), read_manifest(feature_dir).to_pandas())
    return write_tracks(tracks_path, annotated)


@flow(name="features")
def extract_features(
    data_dir: Path, dataset: str, features: FeatureSettings, cluster: ClusterSettings, tracking: TrackingSettings
) -> FeatureSummary:
    """Extract features for every track of ``tracks/<dataset>.parquet`` not already in the manifest."""
    layout = Layout(Path(data_dir))
    tracks_path = layout.tracks(dataset)
    feature_dir = layout.features(dataset, features.feature_set)
    tracks = read_tracks(tracks_path, columns=["track_id", "source_path"])
    audio_dir = layout.audio(dataset) if features.audio_shards else None
    plan = plan_feature_batches(tracks, feature_dir=feature_dir, settings=features, audio_dir=audio_dir)
    params = {**features.flat("features."), **cluster.flat("cluster."), "dataset": dataset}
    with tracked_run(
        tracking, "features", run_name=f"features-{dataset}", params=params, inputs=[tracks_input(tracks_path, dataset)]
    ):
        start = time.perf_counter()
        with dask_client(cluster) as client:
            results = map_batches(
                client,
                extract_shard,
                plan.batches,
                description="log-mel features",
                unit="clips",
                size=lambda batch: len(batch.track_ids),
                feature_dir=feature_dir,
                settings=features,
                audio_dir=audio_dir,
                device=spectrogram_device(client, cluster),
            )
        summary = finish_features(
            plan,
            results,
            feature_dir=feature_dir,
            quarantine_path=layout.quarantine(dataset),
            wall_seconds=time.perf_counter() - start,
            audio_dir=audio_dir,
        )
        update_tracks_table(tracks_path, feature_dir)
        mlflow.set_tag("mirflow.features_manifest_sha1", file_sha1(feature_dir / MANIFEST) or "none")
        if (feature_dir / MANIFEST).exists():  # what it leaves: the digest the training runs show as their input
            log_inputs([features_input(feature_dir, dataset, context="output")])
        mlflow.log_metrics(
            {
                "tracks": summary.n_tracks,
                "extracted": summary.n_extracted,
                "skipped": summary.n_skipped,
                "quarantined": summary.n_quarantined,
                "clips_per_s": summary.clips_per_s,
                "peak_worker_rss_mb": summary.peak_worker_rss_mb,
            }
        )
        report_feature_run(summary, dataset=dataset)
    return summary


@task(cache_policy=NO_CACHE)
def report_feature_run(summary: FeatureSummary, dataset: str) -> None:
    """The run summary as a Prefect table artifact and one log line."""
    row = {
        "dataset": dataset,
        "tracks": summary.n_tracks,
        "extracted": summary.n_extracted,
        "skipped (already present)": summary.n_skipped,
        "quarantined": summary.n_quarantined,
        "clips/s": round(summary.clips_per_s, 1),
        "peak worker memory (MiB)": round(summary.peak_worker_rss_mb),
    }
    create_table_artifact(
        [row], key=f"features-{re.sub(r'[^a-z0-9]+', '-', dataset.lower())}", description="feature extraction summary"
    )
    log.info("features: %s", ", ".join(f"{k} {v}" for k, v in row.items()))


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def ingest_catalogue(source: SourceSettings, tracks_path: Path) -> Path:
    """Read a catalogue through its adapter and write ``tracks/<dataset>.parquet``."""
    return write_tracks(tracks_path, tracks_from_source(source))


@flow(name="features-from-source")
def catalogue_features(
    data_dir: Path,
    dataset: str,
    source: SourceSettings,
    features: FeatureSettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
) -> FeatureSummary:
    """Any adapter's catalogue (MTAT, GTZAN, a manifest) to feature shards."""
    ingest_catalogue(source, Layout(Path(data_dir)).tracks(dataset))
    return extract_features(data_dir, dataset, features, cluster, tracking)
