"""Flow: a study, one MLflow parent run with a nested child run per configuration (DESIGN.md §8).

    tracks ──► log-mel + pyramids (Dask) ──► K-means codebooks + pooled features (Dask), one set per codebook kind
                                                     │
              every configuration (timescales × codebook, leave-one-out) ──► MLP tagger ──► child run
                                                     │
              paper-shaped table, bar chart, timescale importance heatmap, report ──► parent run

A re-run with the same settings resumes the same parent run and reuses its finished children.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    StudySettings,
    TrackingSettings,
    WorldSettings,
)
from flows.features import extract_features
from flows.kmeans_features import kmeans_features
from flows.pipeline import ingest_mtat
from flows.training import mlflow_logger
from flows.world import synthetic_world
from infra.cluster import dask_client, shared_settings
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    child_run,
    features_input,
    finished_children,
    log_table_replacing,
    parent_run,
    tracks_input,
)
from lightning_modules.train import train_mlp_tagger
from tasks.kmeans_features import check_context
from tasks.report import metric_slug, plot_importance_heatmap, plot_study_bars
from tasks.shards import write_text_atomic
from tasks.studies import (
    Configuration,
    StudyData,
    configurations,
    format_importance,
    format_table,
    importance_by_type,
    load_study_data,
    study_table,
    timescale_importance,
    world_tag_types,
)

log = logging.getLogger("mirflow")
PER_TAG = "per_tag_test_metrics.json"


@dataclass(frozen=True)
class StudyOutput:
    table: str  # the paper-shaped table, as printed
    importance: str  # mean ROC-AUC drop per tag type and left-out timescale, as printed
    parent_run_id: str
    report_path: str
    n_runs: int  # configurations trained in this run
    n_reused: int  # finished children of an earlier run, reused
    seconds: float


@flow(name="study-tagging")
def tagging_study(
    data_dir: Path,
    dataset: str,
    study: StudySettings | EndToEndStudySettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    world: WorldSettings | None = None,
) -> StudyOutput:
    """Run every configuration of a tagging study on one split and seed; tabulate and analyse them.

    An end-to-end preset (``icassp2014``, ``modern``) runs :func:`flows.end_to_end.end_to_end_study`.
    """
    if isinstance(study, EndToEndStudySettings):
        from flows.end_to_end import end_to_end_study

        return end_to_end_study(data_dir, dataset, study, cluster, tracking, world=world)
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    configs = configurations(study)
    if dataset == "synthetic":  # the clips' length is known before anything is rendered: check the context now
        check_context(
            study.features,
            study.kmeans,
            seconds=(world or WorldSettings()).clip_seconds,
            timescales=study.timescales,
            what="the synthetic clips",
        )
    with study_cluster(layout, dataset, cluster, world=world, n_tags=study.mlp.n_tags) as shared:
        extract_features(data_dir, dataset, study.features, shared, tracking)
        kmeans_dirs = {}
        for codebook in study.codebooks:
            settings = study.kmeans.model_copy(update={"codebook": codebook, "timescales": study.timescales})
            kmeans_dirs[codebook] = Path(
                kmeans_features(data_dir, dataset, study.features, settings, shared, tracking).feature_dir
            )

    tracks = pd.read_parquet(layout.tracks(dataset), columns=["track_id", "split", "tags"])
    data = load_study_data(tracks, kmeans_dirs, timescales=study.timescales, n_tags=study.mlp.n_tags)
    tag_types, tag_timescales = world_tag_types(layout.world()) if dataset == "synthetic" else ({}, {})

    # One parent per settings and data: a re-run on the same data resumes it, other data starts another.
    key = f"{study.settings_hash}-{dataset}-{data.fingerprint}"
    params = {
        **study.flat(),
        "dataset": dataset,
        "tags": ",".join(data.tags),
        "data_fingerprint": data.fingerprint,
        **{f"n_{split}": len(ids) for split, ids in data.split_ids.items()},
        **{f"kmeans_feature_set.{c}": p.name for c, p in kmeans_dirs.items()},
    }
    features = {codebook: features_input(folder, dataset) for codebook, folder in kmeans_dirs.items()}
    catalogue = tracks_input(layout.tracks(dataset), dataset)
    with parent_run(
        tracking,
        "study",
        key=key,
        run_name=f"study-{study.preset}-{dataset}",
        params=params,
        tags={"mirflow.preset": study.preset, "mirflow.dataset": dataset},
        inputs=[*features.values(), catalogue],
    ) as (parent, resumed):
        reuse = finished_children(tracking, parent.info.run_id) if resumed else {}
        results, per_tag = [], {}
        for i, config in enumerate(configs, start=1):
            row, table, reused = run_configuration(
                config,
                study=study,
                data=data,
                reuse=reuse,
                tracking=tracking,
                checkpoint_dir=layout.checkpoints("study") / parent.info.run_id,
                inputs=[features[config.codebook], catalogue],
            )
            results.append(row)
            per_tag[config.name] = table
            log.info(
                "study %s %d/%d %s: test ROC-AUC %.4f, PR-AUC %.4f (%s)",
                study.preset,
                i,
                len(configs),
                config.name,
                row["roc_auc"],
                row["pr_auc"],
                "reused" if reused else f"{row['seconds']:.0f} s",
            )
        table = study_table(results)
        importance = timescale_importance(
            {g: per_tag[f"{g} · kmeans"] for g in study.importance},
            {(c.base, c.left_out): per_tag[c.name] for c in configs if c.group == "without"},
            tag_types=tag_types,
            tag_timescales=tag_timescales,
        )
        n_reused = sum(1 for r in results if r["reused"])
        seconds = time.perf_counter() - start
        report = _log_study(
            table,
            importance,
            results,
            study=study,
            dataset=dataset,
            layout=layout,
            run_id=parent.info.run_id,
            seconds=seconds,
            n_reused=n_reused,
        )
        text = format_table(table)
        get_run_logger().info("study %s on %s\n%s", study.preset, dataset, text)
    return StudyOutput(
        table=text,
        importance=format_importance(importance),
        parent_run_id=parent.info.run_id,
        report_path=str(report),
        n_runs=len(results) - n_reused,
        n_reused=n_reused,
        seconds=seconds,
    )


@contextmanager
def study_cluster(
    layout: Layout, dataset: str, cluster: ClusterSettings, *, world: WorldSettings | None, n_tags: int
) -> Iterator[ClusterSettings]:
    """One Dask cluster for a study's feature steps, with the catalogue ready: the synthetic world built and
    ingested (top ``n_tags`` tags), or another dataset's catalogue checked. Yields the settings that reach it."""
    with dask_client(cluster) as client:
        shared = shared_settings(client, cluster)
        if dataset == "synthetic":
            root = synthetic_world(layout.world(), world or WorldSettings(), shared)
            ingest_mtat(
                root / "mtat" / "annotations_final.csv", root / "mtat" / "audio", n_tags, layout.tracks(dataset)
            )
        elif not layout.tracks(dataset).exists():
            raise DatasetError(f"no catalogue {dataset!r} under {layout.root}: run `mirflow features` for it first")
        yield shared


def run_configuration(
    config: Configuration,
    *,
    study: StudySettings,
    data: StudyData,
    reuse: dict,
    tracking: TrackingSettings,
    checkpoint_dir: Path,
    inputs: Sequence[RunInput] = (),
) -> tuple[dict, pd.DataFrame, bool]:
    """Train and test one configuration in a child run (``inputs``: its datasets), or reuse the completed child
    of an earlier run."""
    key = config.key(study, data.fingerprint)
    features = data.inputs(config)
    row = {
        "name": config.name,
        "group": config.group,
        "base": config.base,
        "codebook": config.codebook,
        "timescales": config.timescales,
        "left_out": config.left_out,
        "n_inputs": features["train"].shape[1],
    }
    if key in reuse:
        run = reuse[key]
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=PER_TAG, dst_path=tmp, tracking_uri=tracking.tracking_uri
            )
            table = pd.read_json(path, orient="split")
        return (
            {
                **row,
                "roc_auc": run.data.metrics["test/roc_auc"],
                "pr_auc": run.data.metrics["test/pr_auc"],
                "seconds": 0.0,
                "reused": True,
                "run_id": run.info.run_id,
            },
            table,
            True,
        )
    start = time.perf_counter()
    params = {
        "configuration": config.name,
        "group": config.group,
        "codebook": config.codebook,
        "timescales": ",".join(config.timescales),
        "left_out": config.left_out or "",
        "n_inputs": row["n_inputs"],
        **study.mlp.flat("mlp."),
    }
    tags_ = {
        "mirflow.config_key": key,
        "mirflow.configuration": config.name,
        "mirflow.codebook": config.codebook,
        "mirflow.group": config.group,
    }
    with child_run(run_name=config.name, params=params, tags=tags_, settings=tracking, inputs=inputs) as run:
        result = train_mlp_tagger(
            callbacks=[ThreadPolicy()],
            features=features,
            targets=data.targets,
            tags=data.tags,
            settings=study.mlp,
            checkpoint_dir=checkpoint_dir / key,
            logger=mlflow_logger(tracking, "study", run.info.run_id),
            quiet=True,
        )
        table = result.module.test_table
        log_table_replacing(table, PER_TAG)  # a continued child logs it again
        mlflow.log_metrics({"epochs": result.epochs, "n_inputs": row["n_inputs"]})
    return (
        {
            **row,
            "roc_auc": float(result.metrics["test/roc_auc"]),
            "pr_auc": float(result.metrics["test/pr_auc"]),
            "seconds": time.perf_counter() - start,
            "reused": False,
            "run_id": run.info.run_id,
        },
        table,
        False,
    )


def _log_study(
    table: pd.DataFrame,
    importance: pd.DataFrame,
    results: list[dict],
    *,
    study: StudySettings,
    dataset: str,
    layout: Layout,
    run_id: str,
    seconds: float,
    n_reused: int,
) -> Path:
    """Table, plots, importance and the markdown report into the parent run; returns the report's path."""
    log_table_replacing(table, "study_table.json")
    log_table_replacing(
        pd.DataFrame([{k: (",".join(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in results]),
        "study_runs.json",
    )
    metrics = {}
    for row in table.to_dict("records"):
        for codebook, column in (("kmeans", "K-means ROC-AUC"), ("random", "random ROC-AUC")):
            if np.isfinite(row[column]):
                metrics[f"{metric_slug(row['configuration'])}/{codebook}_roc_auc"] = float(row[column])
    mlflow.log_metrics({**metrics, "study_seconds": seconds, "children_reused": n_reused})
    with tempfile.TemporaryDirectory() as tmp:
        plot_study_bars(
            table,
            path=Path(tmp) / "study_roc_auc.png",
            title=f"{study.preset} on {dataset}: K-means features against random means",
        )
        if not importance.empty:
            log_table_replacing(importance, "timescale_importance.json")
            for group in importance["group"].unique():
                plot_importance_heatmap(importance, group=group, path=Path(tmp) / f"timescale_importance_{group}.png")
        mlflow.log_artifacts(tmp, artifact_path="plots")
    report = layout.reports() / f"study-{study.preset}-{run_id}.md"
    by_type = importance_by_type(importance)
    write_text_atomic(
        report,
        "\n".join(
            [
                f"# Study {study.preset} on {dataset}",
                "",
                f"MLflow parent run `{run_id}`, {len(results)} configurations ({n_reused} reused), {seconds:.0f} s.",
                "",
                "## Test ROC-AUC and PR-AUC (macro over tags)",
                "",
                "```",
                format_table(table),
                "```",
                "",
                "## ROC-AUC lost when one timescale is left out, mean per tag type",
                "",
                "```",
                by_type.to_string(float_format=lambda v: f"{v:+.4f}") if not by_type.empty else "(none)",
                "```",
                "",
                "Per tag: `timescale_importance.json` and the heatmaps under `plots/` in the parent run.",
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
