"""Flow: log-mel shards -> spherical K-means codebooks -> pooled multiscale features, fanned out over Dask."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
from prefect import flow

from core.layout import Layout
from core.settings import (
    ClusterSettings,
    FeatureSettings,
    KMeansSettings,
    TrackingSettings,
    kmeans_feature_set,
)
from infra.cluster import dask_client, map_batches, spectrogram_device
from infra.tracking import RunInput, features_input, file_sha1, log_inputs, tracked_run, tracks_input
from tasks.catalogue import read_tracks
from tasks.kmeans import Codebook
from tasks.kmeans_features import (
    KMeansSummary,
    codebook_path,
    codebooks_digest,
    encode_batch,
    finish_kmeans_features,
    fit_timescale_codebook,
    install_codebooks,
    kmeans_device,
    plan_encoding,
    plan_kmeans_features,
)
from tasks.report import plot_first_layer_filters
from tasks.shards import MANIFEST, append_quarantine

log = logging.getLogger("mirflow")


@flow(name="kmeans-features")
def kmeans_features(
    data_dir: Path,
    dataset: str,
    features: FeatureSettings,
    kmeans: KMeansSettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    codebooks_from: Path | None = None,
) -> KMeansSummary:
    """Fit a codebook per timescale on the training split, then encode every clip; re-runs do only new clips.

    The log-mel features of ``features`` must exist (the features flow). Settings that
    cannot work (a timescale the shards lack, a context longer than the clips) fail
    here, before any worker starts.

    ``codebooks_from`` (a folder of ``<timescale>.npz``, e.g. a pre-trained model's) encodes
    the catalogue with those codebooks instead of fitting its own; the features go to a
    folder named after them too.
    """
    layout = Layout(Path(data_dir))
    base_dir = layout.features(dataset, features.feature_set)
    name = kmeans_feature_set(features, kmeans)
    codebooks = None  # frozen codebooks, an input too
    if codebooks_from is not None:
        timescales = tuple(kmeans.timescales) or tuple(features.columns)
        frozen = codebooks_digest(Path(codebooks_from), timescales)
        name = f"{name}-cb{frozen}"
        install_codebooks(Path(codebooks_from), layout.features(dataset, name), timescales)
        codebooks = RunInput(
            name="codebooks",
            digest=frozen,
            source=str(codebooks_from),
            context="codebooks",
            profile={"timescales": ",".join(timescales)},
        )
    kmeans_dir = layout.features(dataset, name)
    tracks = read_tracks(layout.tracks(dataset), columns=["track_id", "split"])
    plan = plan_kmeans_features(
        tracks,
        base_dir=base_dir,
        kmeans_dir=kmeans_dir,
        features=features,
        kmeans=kmeans,
        frozen=codebooks_from is not None,
    )
    inputs = [features_input(base_dir, dataset), tracks_input(layout.tracks(dataset), dataset), codebooks]
    params = {
        **kmeans.flat("kmeans."),
        **cluster.flat("cluster."),
        "dataset": dataset,
        "feature_set": features.feature_set,
        "kmeans_feature_set": kmeans_dir.name,
    }
    with tracked_run(
        tracking,
        "kmeans-features",
        run_name=f"kmeans-features-{dataset}",
        params=params,
        tags={"mirflow.features_manifest_sha1": file_sha1(base_dir / MANIFEST) or "none"},
        inputs=inputs,
    ):
        start = time.perf_counter()
        with dask_client(cluster) as client:
            device = kmeans_device(kmeans, spectrogram_device(client, cluster))
            fits = map_batches(
                client,
                fit_timescale_codebook,
                list(plan.to_fit),
                description="K-means codebooks",
                unit="timescales",
                base_dir=base_dir,
                kmeans_dir=kmeans_dir,
                fit_track_ids=plan.fit_track_ids,
                kmeans=kmeans,
                n_mels=features.mel.n_mels,
                device=device,
            )
            encode = plan_encoding(plan, base_dir=base_dir, kmeans_dir=kmeans_dir, kmeans=kmeans)
            results = map_batches(
                client,
                encode_batch,
                encode.batches,
                description="K-means encoding",
                unit="clips",
                size=lambda batch: len(batch.track_ids),
                base_dir=base_dir,
                kmeans_dir=kmeans_dir,
                timescales=plan.timescales,
                kmeans=kmeans,
                encoding_hash=encode.encoding_hash,
                device=device,
            )
        summary, quarantined = finish_kmeans_features(
            plan, encode, results, kmeans_dir=kmeans_dir, kmeans=kmeans, wall_seconds=time.perf_counter() - start
        )
        append_quarantine(layout.quarantine(dataset), quarantined)
        for fit in fits:
            log.info(
                "codebook %s: %s windows of %d clips, mean cosine %s, %s re-seeded, %.1f s",
                fit["column"],
                fit["sample_windows"],
                fit["fit_clips"],
                fit.get("mean_cosine", "-"),
                fit.get("reseeded", "-"),
                fit["seconds"],
            )
            if "mean_cosine" in fit:
                mlflow.log_metric(f"codebook/{fit['column']}/mean_cosine", fit["mean_cosine"])
        mlflow.set_tag("mirflow.encoding_hash", encode.encoding_hash)
        mlflow.log_metrics(
            {
                "tracks": summary.n_tracks,
                "encoded": summary.n_encoded,
                "skipped": summary.n_skipped,
                "quarantined": summary.n_quarantined,
                "clips_per_s": summary.clips_per_s,
                "codebooks_fitted": len(fits),
            }
        )
        fitted = tuple(fit["column"] for fit in fits)  # a re-run that kept its codebooks logs nothing again
        for column in fitted:
            mlflow.log_artifact(str(codebook_path(kmeans_dir, column)), artifact_path="codebooks")
        log_codebook_filters(kmeans_dir, fitted)
        if (kmeans_dir / MANIFEST).exists():
            log_inputs([features_input(kmeans_dir, dataset, context="output")])
        log.info(
            "K-means features: %d clips (%d encoded, %d already present, %d quarantined), %.1f clips/s -> %s",
            summary.n_tracks,
            summary.n_encoded,
            summary.n_skipped,
            summary.n_quarantined,
            summary.clips_per_s,
            kmeans_dir,
        )
    return summary


def log_codebook_filters(kmeans_dir: Path, timescales: tuple[str, ...]) -> None:
    """Each timescale's means mapped back through the inverse whitening: the window each mean stands for."""
    if not timescales:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for column in timescales:
            codebook = Codebook.load(codebook_path(kmeans_dir, column))
            plot_first_layer_filters(
                codebook.unwhitened_means(),
                path=Path(tmp) / f"means_{column}.png",
                title=f"{codebook.kind} codebook of {column}: means, un-whitened (mel band × frame)",
            )
        mlflow.log_artifacts(tmp, artifact_path="plots")
