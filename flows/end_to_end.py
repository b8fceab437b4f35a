"""Flow: an end-to-end study (ICASSP 2014), raw-audio convnets beside spectrogram convnets (DESIGN.md §3 III).

    tracks ──► one log-mel feature set per (length, stride) + int16 PCM shards (Dask)
                                   │
      every model (spectrogram / raw per row, raw variants, modern baseline) ──► child run
                                   │         (raw models: first-layer filter plots)
      the paper's three tables (+ modern), bar chart, report ──► parent run

Same conventions as the multiscale study: one parent run per settings and data, nested
children, finished children reused, and a child killed mid-training continues in its
own run from its last checkpoint. This module is the study kind; :func:`flows.study_runner.run_study`
runs it.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from core.layout import Layout
from core.settings import (
    ClusterSettings,
    EndToEndStudySettings,
    FeatureSettings,
    TrackingSettings,
    WorldSettings,
)
from core.storage import read_frame
from flows.features import extract_features
from flows.study_runner import Child, Findings, StudyKind, StudyOutput, StudyParent, run_study, study_cluster
from flows.training import mlflow_logger
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    features_input,
    file_sha1,
    log_table_replacing,
    run_key,
    table_input,
    tracks_input,
)
from lightning_modules.train import train_raw_tagger, train_tagger
from tasks.datasets import tag_vocabulary
from tasks.report import (
    metric_slug,
    plot_dominant_frequencies,
    plot_end_to_end_bars,
    plot_filter_spectra,
    plot_pooled_filters,
)
from tasks.shards import MANIFEST
from tasks.studies import (
    ModelRun,
    clip_labels,
    end_to_end_clips,
    end_to_end_runs,
    end_to_end_tables,
    format_end_to_end,
    manifest_ids,
    split_counts,
)
from tasks.study_tables import end_to_end_report, filter_metrics, frame

PER_TAG = "per_tag_test_metrics.json"


def feature_sets(study: EndToEndStudySettings) -> dict[tuple[int, int], FeatureSettings]:
    """The log-mel feature set of each spectrogram model's (window, hop); one of them also writes the PCM shards
    of the raw models (the first; a raw-only study extracts its first raw shape's for that).

    Only one feature set may write them: each keeps ``audio/<dataset>/`` to its own shards.
    """
    runs = end_to_end_runs(study)
    sets = {
        shape: study.spectrogram(*shape)
        for shape in dict.fromkeys((r.length, r.stride) for r in runs if r.model != "raw")
    }
    raw = [(r.length, r.stride) for r in runs if r.model == "raw"]
    if raw:
        carrier = next(iter(sets), raw[0])
        sets[carrier] = study.spectrogram(*carrier).model_copy(update={"audio_shards": True})
    return sets


@flow(name="study-end-to-end")
def end_to_end_study(
    data_dir: Path,
    dataset: str,
    study: EndToEndStudySettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    world: WorldSettings | None = None,
) -> StudyOutput:
    """Train every model of an end-to-end study on one split and seed; tabulate them like the paper."""
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    sets = feature_sets(study)
    with study_cluster(layout, dataset, cluster, world=world, n_tags=study.n_tags) as shared:
        for settings in sets.values():
            extract_features(data_dir, dataset, settings, shared, tracking)

    # The clips every model can use: in every feature set (the PCM shards follow the first one's).
    tracks = end_to_end_clips(
        read_frame(layout.tracks(dataset), columns=["track_id", "split", "tags"]),
        [manifest_ids(layout.features(dataset, s.feature_set)) for s in sets.values()],
    )
    tags = tag_vocabulary(tracks, n=study.n_tags)
    manifests = {shape: layout.features(dataset, s.feature_set) / MANIFEST for shape, s in sets.items()}
    # Same clips, splits, labels and feature content = same fingerprint (finished children are reused).
    fingerprint = run_key(
        [f"{s.feature_set}:{file_sha1(manifests[shape]) or 'none'}" for shape, s in sets.items()],
        clip_labels(tracks),
        tags,
    )
    features = {shape: features_input(layout.features(dataset, s.feature_set), dataset) for shape, s in sets.items()}
    carrier = next((layout.features(dataset, s.feature_set) for s in sets.values() if s.audio_shards), None)
    # The PCM shards are written beside the carrier's log-mel: which clips' content, at which sample rate.
    audio = (
        None
        if carrier is None
        else table_input(
            carrier / MANIFEST,
            name=f"audio/{dataset}",
            context="training",
            columns=("track_id", "content_sha1", "sample_rate"),
            source=layout.audio(dataset),
        )
    )
    catalogue = tracks_input(layout.tracks(dataset), dataset)
    parent = StudyParent(
        key=f"{study.settings_hash}-{dataset}-{fingerprint}",
        params={
            **study.flat(),
            "dataset": dataset,
            "tags": ",".join(tags),
            "data_fingerprint": fingerprint,
            **{f"n_{split}": n for split, n in split_counts(tracks).items()},
            **{f"feature_set.{length}_{stride}": s.feature_set for (length, stride), s in sets.items()},
        },
        inputs=[*features.values(), audio, catalogue],
    )

    def conclude(rows: list[dict], parent_id: str) -> Findings:
        tables = end_to_end_tables(study, rows)

        def plots(folder: Path) -> None:
            plot_end_to_end_bars(
                frame(rows),
                path=folder / "study_roc_auc.png",
                title=f"{study.preset} on {dataset}: test ROC-AUC per model",
            )

        return Findings(
            tables={f"table_{name}.json": table for name, table in tables.items()},
            text=format_end_to_end(tables),
            metrics={f"{metric_slug(r['name'])}/roc_auc": r["roc_auc"] for r in rows},
            plots=plots,
            report=lambda s: end_to_end_report(
                tables, run_id=s.run_id, n=s.n_rows, n_reused=s.n_reused, seconds=s.seconds
            ),
        )

    def run_one(model: ModelRun, child: Child) -> dict:
        shape = (model.length, model.stride)
        return run_model(
            model,
            child,
            study=study,
            tracks=tracks,
            tags=tags,
            layout=layout,
            dataset=dataset,
            feature_set=sets[shape],
            inputs=[audio if model.model == "raw" else features[shape], catalogue],
        )

    kind = StudyKind(
        configurations=end_to_end_runs(study),
        name=lambda model: model.name,
        key=lambda model: model.key(study, fingerprint),
        reuse=lambda model, run: {
            **model.__dict__,
            "roc_auc": run.data.metrics["test/roc_auc"],
            "pr_auc": run.data.metrics["test/pr_auc"],
            "run_id": run.info.run_id,
        },
        run_one=run_one,
        conclude=conclude,
        progress=lambda row: f"test ROC-AUC {row['roc_auc']:.4f}, PR-AUC {row['pr_auc']:.4f}",
    )
    out = run_study(kind, study=study, dataset=dataset, parent=parent, layout=layout, tracking=tracking, start=start)
    get_run_logger().info("study %s on %s\n%s", study.preset, dataset, out.findings.text)
    return StudyOutput(
        table=out.findings.text,
        importance="",
        parent_run_id=out.parent_run_id,
        report_path=str(out.report_path),
        n_runs=out.n_runs,
        n_reused=out.n_reused,
        seconds=out.seconds,
    )


def run_model(
    model: ModelRun,
    child: Child,
    *,
    study: EndToEndStudySettings,
    tracks,
    tags: list[str],
    layout: Layout,
    dataset: str,
    feature_set: FeatureSettings,
    inputs: Sequence[RunInput | None] = (),
) -> dict:
    """Train and test one model in its child run (continuing a killed one; ``inputs``: its datasets).

    ``tracks``: the clips of the study (``track_id``, ``split``, ``tags``), as :func:`tasks.studies.end_to_end_clips`.
    """
    tagger = study.resnet if model.model == "short-chunk-resnet" else study.tagger
    params = {
        "model": model.model,
        "filter_length": model.length,
        "stride": model.stride,
        "nonlinearity": model.nonlinearity,
        "feature_pooling": model.feature_pooling,
        "pool_size": model.pool_size,
        "feature_set": feature_set.feature_set,
        **tagger.flat("tagger."),
    }
    with child.run(params=params, tags={"mirflow.model": model.model}, inputs=inputs) as run:
        logger = mlflow_logger(child.tracking, "study", run.info.run_id)
        if model.model == "raw":
            result = train_raw_tagger(
                callbacks=[ThreadPolicy()],
                audio_dir=layout.audio(dataset),
                tracks=tracks,
                tags=tags,
                train=tagger.train,
                sample_rate=study.sample_rate,
                checkpoint_dir=child.checkpoint_dir,
                logger=logger,
                quiet=True,
                model={
                    "filter_length": model.length,
                    "stride": model.stride,
                    "n_filters": study.n_filters,
                    "nonlinearity": model.nonlinearity,
                    "log_c": study.log_c,
                    "feature_pooling": model.feature_pooling,
                    **({"pool_size": model.pool_size} if model.feature_pooling != "none" else {}),
                    "channels": tagger.conv_channels,
                    "conv_length": tagger.conv_length,
                    "pool": tagger.pool,
                    "hidden": tagger.hidden,
                    "pool_ceil": tagger.pool_ceil,
                },
            )
            _log_filters(result.module.net.first_layer_filters().cpu().numpy(), model, sample_rate=study.sample_rate)
        else:
            result = train_tagger(
                callbacks=[ThreadPolicy()],
                feature_dir=layout.features(dataset, feature_set.feature_set),
                tracks=tracks,
                tags=tags,
                settings=tagger,
                mel=feature_set.mel,
                checkpoint_dir=child.checkpoint_dir,
                logger=logger,
                quiet=True,
            )
        log_table_replacing(result.module.test_table, PER_TAG)  # a continued child logs it again
        mlflow.log_metric("epochs", result.epochs)
    return {
        **model.__dict__,
        "roc_auc": float(result.metrics["test/roc_auc"]),
        "pr_auc": float(result.metrics["test/pr_auc"]),
        "run_id": run.info.run_id,
    }


def _log_filters(filters, model: ModelRun, *, sample_rate: int) -> None:
    """The raw model's first layer [ndarray, shape=(n_filters, length)]: spectra, dominant frequencies against
    the mel scale, pooled groups."""
    pooled = model.feature_pooling != "none"
    mlflow.log_metrics(filter_metrics(filters, sample_rate=sample_rate, pool_size=model.pool_size if pooled else None))
    with tempfile.TemporaryDirectory() as tmp:
        plot_filter_spectra(
            filters,
            sample_rate=sample_rate,
            path=Path(tmp) / "filter_spectra.png",
            title=f"{model.name}: first-layer filter spectra",
        )
        plot_dominant_frequencies(
            filters,
            sample_rate=sample_rate,
            path=Path(tmp) / "dominant_frequencies.png",
            title=f"{model.name}: dominant frequency per filter",
        )
        if pooled:
            plot_pooled_filters(
                filters,
                pool_size=model.pool_size,
                path=Path(tmp) / "pooled_filters.png",
                title=f"{model.name}: the filters of each pooling group",
            )
        mlflow.log_artifacts(tmp, artifact_path="plots")
