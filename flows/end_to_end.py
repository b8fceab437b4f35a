"""Flow: an end-to-end study (ICASSP 2014), raw-audio convnets beside spectrogram convnets (DESIGN.md §3 III).

    tracks ──► one log-mel feature set per (length, stride) + int16 PCM shards (Dask)
                                   │
      every model (spectrogram / raw per row, raw variants, modern baseline) ──► child run
                                   │         (raw models: first-layer filter plots)
      the paper's three tables (+ modern), bar chart, report ──► parent run

Same conventions as the multiscale study: one parent run per settings and data, nested
children, finished children reused, and a child killed mid-training continues in its
own run from its last checkpoint.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from core.errors import DatasetError
from core.layout import Layout
from core.settings import (
    ClusterSettings,
    EndToEndStudySettings,
    FeatureSettings,
    TrackingSettings,
    WorldSettings,
)
from flows.features import extract_features
from flows.study import StudyOutput, study_cluster
from flows.training import mlflow_logger
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    child_run,
    features_input,
    file_sha1,
    finished_children,
    log_table_replacing,
    parent_run,
    run_key,
    table_input,
    tracks_input,
)
from lightning_modules.train import train_raw_tagger, train_tagger
from tasks.datasets import tag_vocabulary
from tasks.filters import dominant_frequencies, group_similarity, mel_likeness
from tasks.report import (
    metric_slug,
    plot_dominant_frequencies,
    plot_end_to_end_bars,
    plot_filter_spectra,
    plot_pooled_filters,
)
from tasks.shards import MANIFEST, read_manifest, write_text_atomic
from tasks.studies import (
    END_TO_END_TABLES,
    ModelRun,
    end_to_end_runs,
    end_to_end_tables,
    format_end_to_end,
)

log = logging.getLogger("mirflow")
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
    runs = end_to_end_runs(study)
    sets = feature_sets(study)
    with study_cluster(layout, dataset, cluster, world=world, n_tags=study.n_tags) as shared:
        for settings in sets.values():
            extract_features(data_dir, dataset, settings, shared, tracking)

    # The clips every model can use: in every feature set (the PCM shards follow the first one's).
    tracks = pd.read_parquet(layout.tracks(dataset), columns=["track_id", "split", "tags"])
    manifests = {shape: layout.features(dataset, s.feature_set) / MANIFEST for shape, s in sets.items()}
    for settings in sets.values():
        present = set(read_manifest(layout.features(dataset, settings.feature_set)).column("track_id").to_pylist())
        tracks = tracks[tracks["track_id"].isin(present)]
    tracks = tracks.sort_values("track_id").reset_index(drop=True)
    for split in ("train", "valid", "test"):
        if not (tracks["split"] == split).any():
            raise DatasetError(f"the study needs clips in train, valid and test; none with features in {split!r}")
    tags = tag_vocabulary(tracks, n=study.n_tags)
    # Same clips, splits, labels and feature content = same fingerprint (finished children are reused).
    fingerprint = run_key(
        [f"{s.feature_set}:{file_sha1(manifests[shape]) or 'none'}" for shape, s in sets.items()],
        [(t, split, "|".join(sorted(labels))) for t, split, labels in tracks.itertuples(index=False)],
        tags,
    )

    key = f"{study.settings_hash}-{dataset}-{fingerprint}"
    params = {
        **study.flat(),
        "dataset": dataset,
        "tags": ",".join(tags),
        "data_fingerprint": fingerprint,
        **{f"n_{split}": int((tracks["split"] == split).sum()) for split in ("train", "valid", "test")},
        **{f"feature_set.{length}_{stride}": s.feature_set for (length, stride), s in sets.items()},
    }
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
    with parent_run(
        tracking,
        "study",
        key=key,
        run_name=f"study-{study.preset}-{dataset}",
        params=params,
        tags={"mirflow.preset": study.preset, "mirflow.dataset": dataset},
        inputs=[*features.values(), audio, catalogue],
    ) as (parent, resumed):
        reuse = finished_children(tracking, parent.info.run_id) if resumed else {}
        results = []
        for i, model in enumerate(runs, start=1):
            shape = (model.length, model.stride)
            row = run_model(
                model,
                study=study,
                tracks=tracks,
                tags=tags,
                layout=layout,
                dataset=dataset,
                feature_set=sets[shape],
                fingerprint=fingerprint,
                reuse=reuse,
                tracking=tracking,
                checkpoint_dir=layout.checkpoints("study") / parent.info.run_id,
                inputs=[audio if model.model == "raw" else features[shape], catalogue],
            )
            results.append(row)
            log.info(
                "study %s %d/%d %s: test ROC-AUC %.4f, PR-AUC %.4f (%s)",
                study.preset,
                i,
                len(runs),
                model.name,
                row["roc_auc"],
                row["pr_auc"],
                "reused" if row["reused"] else f"{row['seconds']:.0f} s",
            )
        tables = end_to_end_tables(study, results)
        n_reused = sum(1 for r in results if r["reused"])
        seconds = time.perf_counter() - start
        report = _log_end_to_end(
            tables,
            results,
            study=study,
            dataset=dataset,
            layout=layout,
            run_id=parent.info.run_id,
            seconds=seconds,
            n_reused=n_reused,
        )
        text = format_end_to_end(tables)
        get_run_logger().info("study %s on %s\n%s", study.preset, dataset, text)
    return StudyOutput(
        table=text,
        importance="",
        parent_run_id=parent.info.run_id,
        report_path=str(report),
        n_runs=len(results) - n_reused,
        n_reused=n_reused,
        seconds=seconds,
    )


def run_model(
    model: ModelRun,
    *,
    study: EndToEndStudySettings,
    tracks: pd.DataFrame,
    tags: list[str],
    layout: Layout,
    dataset: str,
    feature_set: FeatureSettings,
    fingerprint: str,
    reuse: dict,
    tracking: TrackingSettings,
    checkpoint_dir: Path,
    inputs: Sequence[RunInput | None] = (),
) -> dict:
    """Train and test one model in a child run (continuing a killed one; ``inputs``: its datasets), or reuse a
    completed child."""
    key = model.key(study, fingerprint)
    row = {**model.__dict__}
    if key in reuse:
        run = reuse[key]
        return {
            **row,
            "roc_auc": run.data.metrics["test/roc_auc"],
            "pr_auc": run.data.metrics["test/pr_auc"],
            "seconds": 0.0,
            "reused": True,
            "run_id": run.info.run_id,
        }
    start = time.perf_counter()
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
    run_tags = {"mirflow.config_key": key, "mirflow.configuration": model.name, "mirflow.model": model.model}
    with child_run(run_name=model.name, params=params, tags=run_tags, settings=tracking, inputs=inputs) as run:
        logger = mlflow_logger(tracking, "study", run.info.run_id)
        if model.model == "raw":
            result = train_raw_tagger(
                callbacks=[ThreadPolicy()],
                audio_dir=layout.audio(dataset),
                tracks=tracks,
                tags=tags,
                train=tagger.train,
                sample_rate=study.sample_rate,
                checkpoint_dir=checkpoint_dir / key,
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
                checkpoint_dir=checkpoint_dir / key,
                logger=logger,
                quiet=True,
            )
        log_table_replacing(result.module.test_table, PER_TAG)  # a continued child logs it again
        mlflow.log_metric("epochs", result.epochs)
    return {
        **row,
        "roc_auc": float(result.metrics["test/roc_auc"]),
        "pr_auc": float(result.metrics["test/pr_auc"]),
        "seconds": time.perf_counter() - start,
        "reused": False,
        "run_id": run.info.run_id,
    }


def _log_filters(filters: np.ndarray, model: ModelRun, *, sample_rate: int) -> None:
    """The raw model's first layer: spectra, dominant frequencies against the mel scale, pooled groups."""
    score = mel_likeness(np.sort(dominant_frequencies(filters, sample_rate=sample_rate)), fmax=sample_rate / 2)
    metrics = {"filters/mel_rms_mel": score["mel"], "filters/linear_rms_mel": score["linear"]}
    if model.feature_pooling != "none":
        alike = group_similarity(filters, pool_size=model.pool_size, sample_rate=sample_rate)
        metrics |= {"filters/group_cosine_within": alike["within"], "filters/group_cosine_across": alike["across"]}
    mlflow.log_metrics(metrics)
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
        if model.feature_pooling != "none":
            plot_pooled_filters(
                filters,
                pool_size=model.pool_size,
                path=Path(tmp) / "pooled_filters.png",
                title=f"{model.name}: the filters of each pooling group",
            )
        mlflow.log_artifacts(tmp, artifact_path="plots")


def _log_end_to_end(
    tables: dict[str, pd.DataFrame],
    results: list[dict],
    *,
    study: EndToEndStudySettings,
    dataset: str,
    layout: Layout,
    run_id: str,
    seconds: float,
    n_reused: int,
) -> Path:
    """Tables, plot and the markdown report into the parent run; returns the report's path."""
    for name, table in tables.items():
        log_table_replacing(table, f"table_{name}.json")
    log_table_replacing(pd.DataFrame(results), "study_runs.json")
    mlflow.log_metrics(
        {
            **{f"{metric_slug(r['name'])}/roc_auc": r["roc_auc"] for r in results},
            "study_seconds": seconds,
            "children_reused": n_reused,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        plot_end_to_end_bars(
            pd.DataFrame(results),
            path=Path(tmp) / "study_roc_auc.png",
            title=f"{study.preset} on {dataset}: test ROC-AUC per model",
        )
        mlflow.log_artifacts(tmp, artifact_path="plots")
    report = layout.reports() / f"study-{study.preset}-{run_id}.md"
    sections = []
    for name, table in tables.items():
        sections += [
            f"## {END_TO_END_TABLES[name]}",
            "",
            "```",
            table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"),
            "```",
            "",
        ]
    write_text_atomic(
        report,
        "\n".join(
            [
                f"# Study {study.preset} on {dataset}",
                "",
                (
                    f"MLflow parent run `{run_id}`, {len(results)} models ({n_reused} reused), {seconds:.0f} s. "
                    "Test ROC-AUC and PR-AUC, macro over tags; each clip's prediction averages its windows."
                ),
                "",
                *sections,
                (
                    "The raw models' first-layer filters (spectra, dominant frequencies against the mel scale, pooled groups) "
                    "are under `plots/` in each child run."
                ),
                "",
                "## Settings",
                "",
                "```json",
                study.model_dump_json(indent=1),
                "```",
                "",
            ]
        ),
    )
    mlflow.log_artifact(str(report))
    return report
