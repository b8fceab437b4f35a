"""Study tables: what the study runner's rows turn into (the runs table, each study kind's metrics,
printed tables and report body), as plain functions of rows and frames (DESIGN.md §8).

A row is one configuration's result as :func:`flows.study_runner.run_study` collects it:
a dict with its name, its scores, ``seconds``, ``reused`` and ``run_id``. Each study kind
has its table shaper in :mod:`tasks.studies` (or :mod:`tasks.recommend`) and its report
body here; the report's title and settings around the body are :func:`study_report`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.filters import dominant_frequencies, group_similarity, mel_likeness
from tasks.recommend import neighbour_tag_agreement, rows_as_metrics
from tasks.report import RankingRow, metric_slug
from tasks.studies import END_TO_END_TABLES, format_table, importance_by_type


def _four(v: float) -> str:
    return f"{v:.4f}"


# --- every study ----------------------------------------------------------------------------------


def runs_table(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per configuration for the parent run's ``study_runs.json``: tuples joined with commas,
    arrays and tables (predictions, per-tag scores: what the kind's shaper reads) left out."""
    return pd.DataFrame(
        [
            {
                k: (",".join(map(str, v)) if isinstance(v, tuple) else v)
                for k, v in r.items()
                if not isinstance(v, (np.ndarray, pd.DataFrame))
            }
            for r in rows
        ]
    )


def frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts of scalars) as a table, in their order."""
    return pd.DataFrame(list(rows))


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    """The metrics with a finite value (MLflow refuses NaN in some stores; a missing score is left out)."""
    return {name: float(v) for name, v in metrics.items() if math.isfinite(float(v))}


def study_report(title: str, body: Sequence[str], settings_json: str) -> str:
    """The markdown report of a study: its title, the kind's body, and the settings it ran with."""
    return "\n".join([f"# {title}", "", *body, "## Settings", "", "```json", settings_json, "```", ""])


def read_split_table(path: Path) -> pd.DataFrame:
    """A table logged by ``mlflow.log_table`` (JSON, ``orient="split"``) read back."""
    return pd.read_json(path, orient="split")


def stack_by_id(values: Mapping[str, np.ndarray], ids: Sequence[str]) -> np.ndarray:
    """``values[id]`` of each of ``ids`` as the rows of one matrix [shape=(len(ids), width)]."""
    return np.stack([values[t] for t in ids])


# --- the tagging study (ISMIR 2013) ---------------------------------------------------------------


def tagging_metrics(table: pd.DataFrame) -> dict[str, float]:
    """``<configuration>/<codebook>_roc_auc`` of every cell of the study table that has a score."""
    metrics = {}
    for row in table.to_dict("records"):
        for codebook, column in (("kmeans", "K-means ROC-AUC"), ("random", "random ROC-AUC")):
            if np.isfinite(row[column]):
                metrics[f"{metric_slug(row['configuration'])}/{codebook}_roc_auc"] = float(row[column])
    return metrics


def tagging_report(
    table: pd.DataFrame, importance: pd.DataFrame, *, run_id: str, n: int, n_reused: int, seconds: float
) -> list[str]:
    """The tagging study's report body: the table and the mean ROC-AUC lost per left-out timescale."""
    by_type = importance_by_type(importance)
    return [
        f"MLflow parent run `{run_id}`, {n} configurations ({n_reused} reused), {seconds:.0f} s.",
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
    ]


# --- the end-to-end study (ICASSP 2014) -----------------------------------------------------------


def filter_metrics(filters: np.ndarray, *, sample_rate: int, pool_size: int | None) -> dict[str, float]:
    """A raw model's first layer [shape=(n_filters, length)] against the mel scale: RMS distance (in mels) of
    its sorted dominant frequencies to a mel and a linear spacing; with feature pooling (``pool_size``), the
    mean cosine similarity of the filters' spectra within and across pooling groups."""
    score = mel_likeness(np.sort(dominant_frequencies(filters, sample_rate=sample_rate)), fmax=sample_rate / 2)
    metrics = {"filters/mel_rms_mel": score["mel"], "filters/linear_rms_mel": score["linear"]}
    if pool_size is not None:
        alike = group_similarity(filters, pool_size=pool_size, sample_rate=sample_rate)
        metrics |= {"filters/group_cosine_within": alike["within"], "filters/group_cosine_across": alike["across"]}
    return metrics


def end_to_end_report(
    tables: Mapping[str, pd.DataFrame], *, run_id: str, n: int, n_reused: int, seconds: float
) -> list[str]:
    """The end-to-end study's report body: each of its tables under its title."""
    sections = []
    for name, table in tables.items():
        sections += [
            f"## {END_TO_END_TABLES[name]}",
            "",
            "```",
            table.to_string(index=False, float_format=_four, na_rep="-"),
            "```",
            "",
        ]
    return [
        (
            f"MLflow parent run `{run_id}`, {n} models ({n_reused} reused), {seconds:.0f} s. "
            "Test ROC-AUC and PR-AUC, macro over tags; each clip's prediction averages its windows."
        ),
        "",
        *sections,
        (
            "The raw models' first-layer filters (spectra, dominant frequencies against the mel scale, pooled groups) "
            "are under `plots/` in each child run."
        ),
        "",
    ]


# --- the recommendation study (NIPS 2013) ---------------------------------------------------------


def format_recommendation(table: pd.DataFrame) -> str:
    """The cold-start table as printed."""
    return table.to_string(index=False, float_format=_four)


def format_queries(queries: pd.DataFrame) -> str:
    """The query table as text: per query its tags, then the WMF and predicted neighbours side by side."""
    lines = []
    for query, group in queries.groupby("query", sort=False):
        lines.append(f"query {query}, tags: {group['query_tags'].iloc[0]}")
        lines.append(
            group[["rank", "wmf_track", "wmf_tags", "predicted_track", "predicted_tags"]].to_string(
                index=False, max_colwidth=48
            )
        )
        lines.append("")
    return "\n".join(lines)


def recommendation_metrics(
    rows: list[RankingRow], results: Sequence[Mapping[str, Any]], queries: pd.DataFrame, *, k: int
) -> dict[str, float]:
    """The parent run's metrics: every cold-start row's scores, the neighbours' tag agreement with their
    query, and the seconds of each model trained in this run."""
    agreement = neighbour_tag_agreement(queries)
    return {
        **rows_as_metrics(rows, prefix="test/", k=k),
        **{f"queries/{side}_tag_jaccard": v for side, v in agreement.items() if np.isfinite(v)},
        **{f"{metric_slug(r['name'])}/seconds": r["seconds"] for r in results if not r["reused"]},
    }


def recommendation_report(
    table: pd.DataFrame,
    queries: pd.DataFrame,
    *,
    k: int,
    query_model: str,
    run_id: str,
    n: int,
    n_reused: int,
    seconds: float,
) -> list[str]:
    """The recommendation study's report body: the cold-start table and the nearest-neighbour queries."""
    agreement = neighbour_tag_agreement(queries)
    return [
        (
            f"MLflow parent run `{run_id}`, {n} trained models ({n_reused} reused), {seconds:.0f} s. "
            f"Cold start: {len(queries['query'].unique()) if len(queries) else 0} queries; every user ranks the "
            f"held-out tracks by x_u·ŷ_i. Popularity uses the held-out plays themselves (an oracle); the WMF row "
            "folds those plays in (the upper bound)."
        ),
        "",
        f"## mAP@{k}, AUC, NDCG@{k}",
        "",
        "```",
        format_recommendation(table),
        "```",
        "",
        f"## Queries: nearest held-out tracks by WMF factors and by {query_model} predicted factors (cosine)",
        "",
        (
            f"Mean tag overlap (Jaccard) of a neighbour with its query: WMF {agreement['wmf']:.3f}, "
            f"predicted {agreement['predicted']:.3f}."
        ),
        "",
        "```",
        format_queries(queries),
        "```",
        "",
    ]


def predicted_factors(predictions: pd.DataFrame, track_ids: Sequence[str]) -> np.ndarray:
    """The ``factors`` of ``track_ids`` from a predictions table (``track_id``, ``factors``), in that order
    [shape=(len(track_ids), n_factors), float32]."""
    by_id = predictions.set_index("track_id")
    return np.stack([np.asarray(v, dtype=np.float32) for v in by_id.loc[list(track_ids), "factors"]])


def predictions_frame(track_ids: Sequence[str], predicted: np.ndarray) -> pd.DataFrame:
    """Predicted factors [shape=(n_tracks, n_factors)] as a table of ``track_id`` and ``factors`` (float32)."""
    return pd.DataFrame({"track_id": list(track_ids), "factors": list(predicted.astype(np.float32))})


# --- the transfer study (ISMIR 2014) --------------------------------------------------------------

SOURCE_SCORES = ("nmse", "auc", "map")


def source_table(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The source table: one row per (task, model) with its test NMSE, AUC and mAP."""
    return pd.DataFrame([{k: r[k] for k in ("task", "model", *SOURCE_SCORES)} for r in results])


def format_source_table(table: pd.DataFrame) -> str:
    return table.rename(columns={"nmse": "NMSE", "auc": "AUC", "map": "mAP"}).to_string(index=False, float_format=_four)


def transfer_study_metrics(
    results: Sequence[Mapping[str, Any]], transfer_rows: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Each source model's finite scores and each transfer feature set's value, as parent-run metrics."""
    return {
        **{
            f"source/{r['task']}_{metric_slug(r['model'])}/{m}": r[m]
            for r in results
            for m in SOURCE_SCORES
            if np.isfinite(r[m])
        },
        **{f"transfer/{metric_slug(r['feature_set'])}": r["value"] for r in transfer_rows},
    }


def transfer_study_report(
    source: pd.DataFrame,
    *,
    transfer_table: str,
    transfer_run_id: str,
    n_target: int,
    metric: str,
    registered: Sequence[str],
    k: int,
    run_id: str,
    n: int,
    n_reused: int,
    seconds: float,
) -> list[str]:
    """The transfer study's report body: the source table, the transfer table and the registered models."""
    return [
        f"MLflow parent run `{run_id}`, {n} source models ({n_reused} reused), {seconds:.0f} s.",
        "",
        "## Source tasks (test split)",
        "",
        (
            "tags: the track × tag matrix reduced by WMF; AUC and mAP of the tags ranked per track, macro over tags. "
            f"listening: the WMF item factors; AUC and mAP@{k} of the held-out tracks ranked per user "
            "(cold start). NMSE: squared error over the targets' variance."
        ),
        "",
        "```",
        format_source_table(source),
        "```",
        "",
        f"## Transfer to the synthetic genre catalogue ({n_target} tracks, {metric})",
        "",
        "```",
        transfer_table,
        "```",
        "",
        f"Transfer run `{transfer_run_id}` (experiment mirflow-transfer).",
        "",
        "## Registered models",
        "",
        *registered,
        "",
    ]
