"""Flow: a study, one MLflow parent run with a nested child run per configuration (DESIGN.md §8).

    tracks ──► log-mel + pyramids (Dask) ──► K-means codebooks + pooled features (Dask), one set per codebook kind
                                                     │
              every configuration (timescales × codebook, leave-one-out) ──► MLP tagger ──► child run
                                                     │
              paper-shaped table, bar chart, timescale importance heatmap, report ──► parent run

A re-run with the same settings resumes the same parent run and reuses its finished children.
This module is the study kind (configurations, "run one", the table shaper);
:func:`flows.study_runner.run_study` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from core.layout import Layout
from core.settings import (
    ClusterSettings,
    EndToEndStudySettings,
    StudySettings,
    TrackingSettings,
    WorldSettings,
)
from core.storage import read_frame
from flows.end_to_end import end_to_end_study
from flows.features import extract_features
from flows.kmeans_features import kmeans_features
from flows.study_runner import (
    Child,
    Findings,
    StudyKind,
    StudyOutput,
    StudyParent,
    downloaded,
    run_study,
    study_cluster,
)
from flows.training import mlflow_logger
from infra.threads import ThreadPolicy
from infra.tracking import RunInput, features_input, log_table_replacing, tracks_input
from lightning_modules.train import train_mlp_tagger
from tasks.kmeans_features import check_context
from tasks.report import plot_importance_heatmap, plot_study_bars
from tasks.studies import (
    Configuration,
    StudyData,
    configurations,
    format_importance,
    format_table,
    load_study_data,
    study_table,
    timescale_importance,
    world_tag_types,
)
from tasks.study_tables import read_split_table, tagging_metrics, tagging_report

PER_TAG = "per_tag_test_metrics.json"


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
        return end_to_end_study(data_dir, dataset, study, cluster, tracking, world=world)
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
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

    tracks = read_frame(layout.tracks(dataset), columns=["track_id", "split", "tags"])
    data = load_study_data(tracks, kmeans_dirs, timescales=study.timescales, n_tags=study.mlp.n_tags)
    tag_types, tag_timescales = world_tag_types(layout.world()) if dataset == "synthetic" else ({}, {})
    features = {codebook: features_input(folder, dataset) for codebook, folder in kmeans_dirs.items()}
    catalogue = tracks_input(layout.tracks(dataset), dataset)
    # One parent per settings and data: a re-run on the same data resumes it, other data starts another.
    parent = StudyParent(
        key=f"{study.settings_hash}-{dataset}-{data.fingerprint}",
        params={
            **study.flat(),
            "dataset": dataset,
            "tags": ",".join(data.tags),
            "data_fingerprint": data.fingerprint,
            **{f"n_{split}": len(ids) for split, ids in data.split_ids.items()},
            **{f"kmeans_feature_set.{c}": p.name for c, p in kmeans_dirs.items()},
        },
        inputs=[*features.values(), catalogue],
    )
    configs = configurations(study)

    def conclude(rows: list[dict], parent_id: str) -> Findings:
        per_tag = {row["name"]: row["per_tag"] for row in rows}
        table = study_table([{k: v for k, v in row.items() if k != "per_tag"} for row in rows])
        importance = timescale_importance(
            {g: per_tag[f"{g} · kmeans"] for g in study.importance},
            {(c.base, c.left_out): per_tag[c.name] for c in configs if c.group == "without"},
            tag_types=tag_types,
            tag_timescales=tag_timescales,
        )

        def plots(folder: Path) -> None:
            plot_study_bars(
                table,
                path=folder / "study_roc_auc.png",
                title=f"{study.preset} on {dataset}: K-means features against random means",
            )
            for group in importance["group"].unique():
                plot_importance_heatmap(importance, group=group, path=folder / f"timescale_importance_{group}.png")

        return Findings(
            tables={
                "study_table.json": table,
                **({"timescale_importance.json": importance} if not importance.empty else {}),
            },
            text=format_table(table),
            metrics=tagging_metrics(table),
            plots=plots,
            report=lambda s: tagging_report(
                table, importance, run_id=s.run_id, n=s.n_rows, n_reused=s.n_reused, seconds=s.seconds
            ),
            values={"importance": format_importance(importance)},
        )

    kind = StudyKind(
        configurations=configs,
        name=lambda config: config.name,
        key=lambda config: config.key(study, data.fingerprint),
        reuse=lambda config, run: reused_configuration(config, run, data=data, tracking=tracking),
        run_one=lambda config, child: run_configuration(
            config, child, study=study, data=data, inputs=[features[config.codebook], catalogue]
        ),
        conclude=conclude,
        progress=lambda row: f"test ROC-AUC {row['roc_auc']:.4f}, PR-AUC {row['pr_auc']:.4f}",
    )
    out = run_study(kind, study=study, dataset=dataset, parent=parent, layout=layout, tracking=tracking, start=start)
    get_run_logger().info("study %s on %s\n%s", study.preset, dataset, out.findings.text)
    return StudyOutput(
        table=out.findings.text,
        importance=out.findings.values["importance"],
        parent_run_id=out.parent_run_id,
        report_path=str(out.report_path),
        n_runs=out.n_runs,
        n_reused=out.n_reused,
        seconds=out.seconds,
    )


def _row(config: Configuration, data: StudyData) -> dict:
    """What a configuration's row says of it before any score."""
    return {
        "name": config.name,
        "group": config.group,
        "base": config.base,
        "codebook": config.codebook,
        "timescales": config.timescales,
        "left_out": config.left_out,
        "n_inputs": data.width(config),
    }


def reused_configuration(config: Configuration, run, *, data: StudyData, tracking: TrackingSettings) -> dict:
    """The row of a configuration's finished child: its test scores and its per-tag table."""
    return {
        **_row(config, data),
        "roc_auc": run.data.metrics["test/roc_auc"],
        "pr_auc": run.data.metrics["test/pr_auc"],
        "run_id": run.info.run_id,
        "per_tag": downloaded(tracking, run, PER_TAG, read_split_table),
    }


def run_configuration(
    config: Configuration, child: Child, *, study: StudySettings, data: StudyData, inputs: list[RunInput]
) -> dict:
    """Train and test one configuration's MLP tagger in its child run (``inputs``: its datasets)."""
    features = data.inputs(config)
    row = _row(config, data)
    params = {
        "configuration": config.name,
        "group": config.group,
        "codebook": config.codebook,
        "timescales": ",".join(config.timescales),
        "left_out": config.left_out or "",
        "n_inputs": row["n_inputs"],
        **study.mlp.flat("mlp."),
    }
    tags = {"mirflow.codebook": config.codebook, "mirflow.group": config.group}
    with child.run(params=params, tags=tags, inputs=inputs) as run:
        result = train_mlp_tagger(
            callbacks=[ThreadPolicy()],
            features=features,
            targets=data.targets,
            tags=data.tags,
            settings=study.mlp,
            checkpoint_dir=child.checkpoint_dir,
            logger=mlflow_logger(child.tracking, "study", run.info.run_id),
            quiet=True,
        )
        table = result.module.test_table
        log_table_replacing(table, PER_TAG)  # a continued child logs it again
        mlflow.log_metrics({"epochs": result.epochs, "n_inputs": row["n_inputs"]})
    return {
        **row,
        "roc_auc": float(result.metrics["test/roc_auc"]),
        "pr_auc": float(result.metrics["test/pr_auc"]),
        "run_id": run.info.run_id,
        "per_tag": table,
    }
