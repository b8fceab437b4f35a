"""Flow: the recommendation study (van den Oord, Dieleman & Schrauwen, NIPS 2013; DESIGN.md §3 II).

    tracks ──► log-mel (Dask) ──► K-means features (Dask) ──► linear regression, MLP ───┐
      │                 └───────────────────────────────────► CNN (MSE), CNN (WPE) ────┤ child runs
      └──► listening ──► WMF (held-out tracks folded in: the upper bound) ────────────────┴──► cold-start table,
                                                                                                 queries ──► parent run

Every model predicts the factors of the tracks held out of the factorization from
their audio; users rank those tracks by ``x_uᵀ ŷ_i``, scored against their real plays.
A re-run with the same settings and data resumes the parent run and reuses its children.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from core.errors import DatasetError, ParameterError
from core.layout import Layout
from core.settings import (
    ClusterSettings,
    RecommendationStudySettings,
    TrackingSettings,
    WorldSettings,
)
from flows.features import extract_features
from flows.kmeans_features import kmeans_features
from flows.listening import WMFOutput, factorize
from flows.study import study_cluster
from flows.training import mlflow_logger, training_confidence
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    child_run,
    features_input,
    file_sha1,
    finished_children,
    listening_input,
    log_table_replacing,
    parent_run,
    run_key,
    tracks_input,
    wmf_factors_input,
)
from lightning_modules.train import train_factor_regressor, train_latent_factor_cnn
from tasks.datasets import heldout_track_ids
from tasks.kmeans_features import read_kmeans_features
from tasks.listening import load_factors, play_matrix_for
from tasks.recommend import (
    choose_queries,
    cold_start_rows,
    cold_start_track_splits,
    neighbour_tag_agreement,
    query_table,
    ranking_row,
    recommendation_table,
    rows_as_metrics,
)
from tasks.report import metric_slug, plot_recommendation_bars
from tasks.shards import MANIFEST, read_manifest, write_text_atomic

log = logging.getLogger("mirflow")
PREDICTIONS = "predicted_factors.parquet"
UPPER_BOUND = "WMF factors (upper bound)"


@dataclass(frozen=True)
class RecommendationStudyOutput:
    table: str  # the paper-shaped table, as printed
    queries: str  # the query table, as printed
    parent_run_id: str
    report_path: str
    n_runs: int
    n_reused: int
    seconds: float


@dataclass(frozen=True)
class Recommenders:
    """What every model of the study learns from and is scored on."""

    track_ids: dict[str, list[str]]  # train / valid (factorized) and test (held out), with features
    factors: dict[str, np.ndarray]  # WMF item factors; the held-out tracks' folded in
    users: np.ndarray
    user_factors: np.ndarray
    relevant: object  # sp.csr_matrix (n_users, n_test): the held-out plays
    tags: dict[str, list[str]]
    fingerprint: str


def listening_files(layout: Layout, dataset: str, triplets: tuple[Path, ...]) -> list[Path]:
    """The listening files of the study: the synthetic world's batches, or ``triplets`` for another catalogue."""
    if dataset == "synthetic" and not triplets:
        return sorted((layout.world() / "taste_profile").glob("train_triplets.batch-*.txt"))
    if not triplets:
        raise ParameterError(f"dataset {dataset!r}: pass its listening data (--triplets, Taste Profile files)")
    return list(triplets)


@flow(name="study-recommendation")
def recommendation_study(
    data_dir: Path,
    dataset: str,
    study: RecommendationStudySettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    world: WorldSettings | None = None,
    triplets: tuple[Path, ...] = (),
) -> RecommendationStudyOutput:
    """Cold-start recommendation of held-out tracks by every model of the NIPS 2013 table; queries; a report."""
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    kmeans = study.kmeans.model_copy(update={"timescales": study.timescales})
    with study_cluster(layout, dataset, cluster, world=world, n_tags=study.n_tags) as shared:
        extract_features(data_dir, dataset, study.features, shared, tracking)
        kmeans_dir = Path(kmeans_features(data_dir, dataset, study.features, kmeans, shared, tracking).feature_dir)
    files = listening_files(layout, dataset, triplets)
    wmf = factorize(
        data_dir, files, heldout_track_ids(layout.tracks(dataset)), study.wmf, tracking, k=study.evaluation.k
    )
    feature_dir = layout.features(dataset, study.features.feature_set)
    data = load_recommenders(layout, dataset, wmf, feature_dir=feature_dir, kmeans_dir=kmeans_dir)
    # The queries are checked now, not after every model has trained.
    asked = choose_queries(data.track_ids["test"], n=study.queries, seed=study.evaluation.seed, asked=study.query_ids)

    models = [
        ("linear regression", 0),
        (f"MLP ({study.mlp_layers} hidden)", study.mlp_layers),
        *((f"CNN ({objective.upper()})", objective) for objective in study.objectives),
    ]
    key = f"{study.settings_hash}-{dataset}-{data.fingerprint}"
    params = {
        **study.flat(),
        "dataset": dataset,
        "data_fingerprint": data.fingerprint,
        "wmf_run_id": wmf.run_id,
        "kmeans_feature_set": kmeans_dir.name,
        "feature_set": study.features.feature_set,
        **{f"n_{split}": len(ids) for split, ids in data.track_ids.items()},
    }
    inputs = {
        "logmel": features_input(feature_dir, dataset),
        "kmeans": features_input(kmeans_dir, dataset),
        "factors": wmf_factors_input(wmf),
        "tracks": tracks_input(layout.tracks(dataset), dataset),
    }
    with parent_run(
        tracking,
        "study",
        key=key,
        run_name=f"study-{study.preset}-{dataset}",
        params=params,
        tags={"mirflow.preset": study.preset, "mirflow.dataset": dataset},
        inputs=inputs.values(),
    ) as (parent, resumed):
        reuse = finished_children(tracking, parent.info.run_id) if resumed else {}
        predicted, results = {}, []
        checkpoints = layout.checkpoints("study") / parent.info.run_id
        for i, (name, model) in enumerate(models, start=1):
            run = run_recommender(
                name,
                model,
                study=study,
                data=data,
                layout=layout,
                dataset=dataset,
                wmf=wmf,
                kmeans_dir=kmeans_dir,
                feature_dir=feature_dir,
                reuse=reuse,
                tracking=tracking,
                checkpoint_dir=checkpoints,
                inputs=inputs,
            )
            predicted[name] = run.pop("predicted")
            results.append(run)
            log.info(
                "study %s %d/%d %s: mAP@%d %.4f, AUC %.4f (%s)",
                study.preset,
                i,
                len(models),
                name,
                study.evaluation.k,
                run["map"],
                run["auc"],
                "reused" if run["reused"] else f"{run['seconds']:.0f} s",
            )
        test_ids = data.track_ids["test"]
        true = np.stack([data.factors[t] for t in test_ids])
        rows = cold_start_rows(
            heldout_plays=data.relevant,
            k=study.evaluation.k,
            seed=study.evaluation.seed,
            models={
                **{name: (data.user_factors, p) for name, p in predicted.items()},
                UPPER_BOUND: (data.user_factors, true),
            },
        )
        table = recommendation_table(rows, k=study.evaluation.k)
        query_model = f"CNN ({study.query_model.upper()})"
        queries = query_table(
            test_ids,
            wmf_factors=true,
            predicted=predicted[query_model],
            tags=data.tags,
            queries=asked,
            n=study.neighbours,
        )
        n_reused = sum(1 for r in results if r["reused"])
        seconds = time.perf_counter() - start
        report = _log_recommendation(
            table,
            queries,
            results,
            rows,
            study=study,
            dataset=dataset,
            layout=layout,
            run_id=parent.info.run_id,
            seconds=seconds,
            n_reused=n_reused,
            query_model=query_model,
        )
        text = table.to_string(index=False, float_format=lambda v: f"{v:.4f}")
        get_run_logger().info("study %s on %s\n%s", study.preset, dataset, text)
    return RecommendationStudyOutput(
        table=text,
        queries=format_queries(queries),
        parent_run_id=parent.info.run_id,
        report_path=str(report),
        n_runs=len(results) - n_reused,
        n_reused=n_reused,
        seconds=seconds,
    )


def load_recommenders(
    layout: Layout, dataset: str, wmf: WMFOutput, *, feature_dir: Path, kmeans_dir: Path
) -> Recommenders:
    """The tracks with log-mel and K-means features, split for cold start, with their factors and plays."""
    tracks = pd.read_parquet(layout.tracks(dataset), columns=["track_id", "split", "tags"])
    for folder in (feature_dir, kmeans_dir):
        tracks = tracks[tracks["track_id"].isin(set(read_manifest(folder).column("track_id").to_pylist()))]
    users, user_factors = load_factors(wmf.user_factors)
    items, item_factors = load_factors(wmf.item_factors)
    heldout, heldout_factors = load_factors(wmf.heldout_item_factors)
    factors = {**dict(zip(items, item_factors)), **dict(zip(heldout, heldout_factors))}
    track_ids = cold_start_track_splits(tracks, factorized=set(items), heldout=set(heldout))
    for split, ids in track_ids.items():
        if len(ids) < 2:
            raise DatasetError(
                f"the recommendation study needs tracks with features and factors in every split; "
                f"{split!r} has {len(ids)}"
            )
    relevant = play_matrix_for(
        pd.read_parquet(wmf.heldout_plays), users=users, items=np.asarray(track_ids["test"], dtype=str)
    )
    fingerprint = run_key(
        file_sha1(feature_dir / MANIFEST),
        file_sha1(kmeans_dir / MANIFEST),
        file_sha1(Path(wmf.item_factors)),
        file_sha1(Path(wmf.heldout_item_factors)),
        file_sha1(Path(wmf.user_factors)),
        track_ids,
    )
    return Recommenders(
        track_ids=track_ids,
        factors=factors,
        users=users,
        user_factors=user_factors,
        relevant=relevant,
        tags={str(t): list(v) for t, v in zip(tracks["track_id"], tracks["tags"])},
        fingerprint=fingerprint,
    )


def run_recommender(
    name: str,
    model: int | str,
    *,
    study: RecommendationStudySettings,
    data: Recommenders,
    layout: Layout,
    dataset: str,
    wmf: WMFOutput,
    kmeans_dir: Path,
    feature_dir: Path,
    reuse: dict,
    tracking: TrackingSettings,
    checkpoint_dir: Path,
    inputs: Mapping[str, RunInput],
) -> dict:
    """Train one model in a child run and predict the held-out tracks' factors, or reuse a completed child's.

    ``inputs``: the study's datasets by kind (``logmel``, ``kmeans``, ``factors``, ``tracks``); the child logs
    those it reads, and the listening batches for the WPE objective.
    """
    is_cnn = isinstance(model, str)
    settings = study.cnn.model_copy(update={"objective": model}) if is_cnn else study.regressor
    key = run_key(
        name,
        settings.model_dump(mode="json"),
        study.features.feature_set if is_cnn else kmeans_dir.name,
        data.fingerprint,
    )
    row = {"name": name, "model": "cnn" if is_cnn else "regressor"}
    test_ids = data.track_ids["test"]
    if key in reuse:
        run = reuse[key]
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path=PREDICTIONS, dst_path=tmp, tracking_uri=tracking.tracking_uri
            )
            predicted = _read_predictions(Path(path), test_ids)
        own = ranking_row(name, data.user_factors, predicted, data.relevant, k=study.evaluation.k)
        return {
            **row,
            "map": own.map_at_k,
            "auc": own.auc,
            "seconds": 0.0,
            "reused": True,
            "run_id": run.info.run_id,
            "predicted": predicted,
        }
    start = time.perf_counter()
    params = {
        "model": name,
        **settings.flat("cnn." if is_cnn else "regressor."),
        **({} if is_cnn else {"layers": model, "kmeans_feature_set": kmeans_dir.name}),
    }
    read = [
        inputs["logmel" if is_cnn else "kmeans"],
        inputs["factors"],
        inputs["tracks"],
        listening_input(layout.listening(), wmf.batches) if model == "wpe" else None,
    ]
    with child_run(
        run_name=name,
        params=params,
        tags={"mirflow.config_key": key, "mirflow.configuration": name},
        settings=tracking,
        inputs=read,
    ) as run:
        logger = mlflow_logger(tracking, "study", run.info.run_id)
        if is_cnn:
            plays = {}
            if model == "wpe":
                plays = {
                    "user_factors": data.user_factors,
                    "train_confidence": training_confidence(
                        layout, wmf, users=data.users, tracks=data.track_ids["train"], settings=study.wmf
                    ),
                }
            result = train_latent_factor_cnn(
                callbacks=[ThreadPolicy()],
                feature_dir=feature_dir,
                track_ids=data.track_ids,
                item_factors=data.factors,
                settings=settings,
                mel=study.features.mel,
                checkpoint_dir=checkpoint_dir / key,
                logger=logger,
                **plays,
            )
            predicted = result.predicted_factors
        else:
            splits = data.track_ids
            features = {
                s: read_kmeans_features(kmeans_dir, timescales=study.timescales, track_ids=ids)
                for s, ids in splits.items()
            }
            targets = {s: np.stack([data.factors[t] for t in ids]) for s, ids in splits.items()}
            result = train_factor_regressor(
                callbacks=[ThreadPolicy()],
                features=features,
                targets=targets,
                layers=model,
                settings=settings,
                checkpoint_dir=checkpoint_dir / key,
                logger=logger,
                quiet=True,
            )
            predicted = result.predicted
        own = ranking_row(name, data.user_factors, predicted, data.relevant, k=study.evaluation.k)
        k = study.evaluation.k
        mlflow.log_metrics(
            {
                "epochs": result.epochs,
                **{
                    name: v
                    for name, v in (
                        (f"test/map_at_{k}", own.map_at_k),
                        ("test/auc", own.auc),
                        (f"test/ndcg_at_{k}", own.ndcg_at_k),
                    )
                    if np.isfinite(v)
                },
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / PREDICTIONS
            pq.write_table(pa.table({"track_id": test_ids, "factors": list(predicted.astype(np.float32))}), path)
            mlflow.log_artifact(str(path))
    return {
        **row,
        "map": own.map_at_k,
        "auc": own.auc,
        "seconds": time.perf_counter() - start,
        "reused": False,
        "run_id": run.info.run_id,
        "predicted": predicted,
    }


def _read_predictions(path: Path, track_ids: list[str]) -> np.ndarray:
    frame = pq.read_table(path).to_pandas().set_index("track_id")
    return np.stack([np.asarray(v, dtype=np.float32) for v in frame.loc[track_ids, "factors"]])


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


def _log_recommendation(
    table: pd.DataFrame,
    queries: pd.DataFrame,
    results: list[dict],
    rows,
    *,
    study: RecommendationStudySettings,
    dataset: str,
    layout: Layout,
    run_id: str,
    seconds: float,
    n_reused: int,
    query_model: str,
) -> Path:
    """Table, queries, plot and the markdown report into the parent run; returns the report's path."""
    log_table_replacing(table, "table_recommendation.json")
    log_table_replacing(queries, "table_queries.json")
    log_table_replacing(pd.DataFrame(results), "study_runs.json")
    agreement = neighbour_tag_agreement(queries)
    mlflow.log_metrics(
        {
            **rows_as_metrics(rows, prefix="test/", k=study.evaluation.k),
            "study_seconds": seconds,
            "children_reused": n_reused,
            **{f"queries/{side}_tag_jaccard": v for side, v in agreement.items() if np.isfinite(v)},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        plot_recommendation_bars(
            table,
            k=study.evaluation.k,
            path=Path(tmp) / "recommendation.png",
            title=f"{study.preset} on {dataset}: cold start on the held-out tracks",
        )
        mlflow.log_artifacts(tmp, artifact_path="plots")
    report = layout.reports() / f"study-{study.preset}-{run_id}.md"
    k = study.evaluation.k
    write_text_atomic(
        report,
        "\n".join(
            [
                f"# Study {study.preset} on {dataset}",
                "",
                (
                    f"MLflow parent run `{run_id}`, {len(results)} trained models ({n_reused} reused), {seconds:.0f} s. "
                    f"Cold start: {len(queries['query'].unique()) if len(queries) else 0} queries; every user ranks the "
                    f"held-out tracks by x_u·ŷ_i. Popularity uses the held-out plays themselves (an oracle); the WMF row "
                    "folds those plays in (the upper bound)."
                ),
                "",
                f"## mAP@{k}, AUC, NDCG@{k}",
                "",
                "```",
                table.to_string(index=False, float_format=lambda v: f"{v:.4f}"),
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
    mlflow.log_metrics({f"{metric_slug(r['name'])}/seconds": r["seconds"] for r in results if not r["reused"]})
    return report
