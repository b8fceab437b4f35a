"""Flow: the recommendation study (van den Oord, Dieleman & Schrauwen, NIPS 2013; DESIGN.md §3 II).

    tracks ──► log-mel (Dask) ──► K-means features (Dask) ──► linear regression, MLP ───┐
      │                 └───────────────────────────────────► CNN (MSE), CNN (WPE) ────┤ child runs
      └──► listening ──► WMF (held-out tracks folded in: the upper bound) ────────────────┴──► cold-start table,
                                                                                                 queries ──► parent run

Every model predicts the factors of the tracks held out of the factorization from
their audio; users rank those tracks by ``x_uᵀ ŷ_i``, scored against their real plays.
A re-run with the same settings and data resumes the parent run and reuses its children
(:func:`flows.study_runner.run_study` runs the study kind this module builds).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import mlflow
from prefect import flow, get_run_logger

from core.layout import Layout
from core.settings import (
    ClusterSettings,
    RecommendationStudySettings,
    TrackingSettings,
    WorldSettings,
)
from core.storage import read_frame, write_frame
from flows.features import extract_features
from flows.kmeans_features import kmeans_features
from flows.listening import WMFOutput, factorize
from flows.study_runner import (
    Child,
    Findings,
    StudyKind,
    StudyParent,
    downloaded,
    listening_files,
    run_study,
    study_cluster,
)
from flows.training import mlflow_logger, training_confidence
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    features_input,
    file_sha1,
    listening_input,
    run_key,
    tracks_input,
    wmf_factors_input,
)
from lightning_modules.train import train_factor_regressor, train_latent_factor_cnn
from tasks.datasets import heldout_track_ids
from tasks.kmeans_features import read_kmeans_features
from tasks.recommend import choose_queries, cold_start_rows, query_table, ranking_row, recommendation_table
from tasks.report import plot_recommendation_bars
from tasks.shards import MANIFEST
from tasks.studies import (
    Recommenders,
    clips_with_features,
    manifest_ids,
    read_listening_factors,
    recommenders,
)
from tasks.study_tables import (
    finite,
    format_queries,
    format_recommendation,
    predicted_factors,
    predictions_frame,
    recommendation_metrics,
    recommendation_report,
    stack_by_id,
)

PREDICTIONS = "predicted_factors.parquet"
UPPER_BOUND = "WMF factors (upper bound)"
__all__ = ["RecommendationStudyOutput", "Recommenders", "listening_files", "recommendation_study"]


@dataclass(frozen=True)
class RecommendationStudyOutput:
    table: str  # the paper-shaped table, as printed
    queries: str  # the query table, as printed
    parent_run_id: str
    report_path: str
    n_runs: int
    n_reused: int
    seconds: float


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
    test_ids = data.track_ids["test"]
    k = study.evaluation.k

    inputs = {
        "logmel": features_input(feature_dir, dataset),
        "kmeans": features_input(kmeans_dir, dataset),
        "factors": wmf_factors_input(wmf),
        "tracks": tracks_input(layout.tracks(dataset), dataset),
    }
    parent = StudyParent(
        key=f"{study.settings_hash}-{dataset}-{data.fingerprint}",
        params={
            **study.flat(),
            "dataset": dataset,
            "data_fingerprint": data.fingerprint,
            "wmf_run_id": wmf.run_id,
            "kmeans_feature_set": kmeans_dir.name,
            "feature_set": study.features.feature_set,
            **{f"n_{split}": len(ids) for split, ids in data.track_ids.items()},
        },
        inputs=inputs.values(),
    )
    models = [
        ("linear regression", 0),
        (f"MLP ({study.mlp_layers} hidden)", study.mlp_layers),
        *((f"CNN ({objective.upper()})", objective) for objective in study.objectives),
    ]

    def key(model: tuple[str, int | str]) -> str:
        name, kind = model
        is_cnn = isinstance(kind, str)
        return run_key(
            name,
            _settings(study, kind).model_dump(mode="json"),
            study.features.feature_set if is_cnn else kmeans_dir.name,
            data.fingerprint,
        )

    def scored(predicted, own, run_id: str) -> dict:
        """A model's row: its own ranking of the held-out tracks, and its predictions for the shaper."""
        return {"map": own.map_at_k, "auc": own.auc, "run_id": run_id, "predicted": predicted}

    def reuse(model: tuple[str, int | str], run) -> dict:
        name, kind = model
        predicted = downloaded(tracking, run, PREDICTIONS, lambda path: predicted_factors(read_frame(path), test_ids))
        own = ranking_row(name, data.user_factors, predicted, data.relevant, k=k)
        return {**_row(name, kind), **scored(predicted, own, run.info.run_id)}

    def run_one(model: tuple[str, int | str], child: Child) -> dict:
        name, kind = model
        predicted, own, run_id = run_recommender(
            name,
            kind,
            child,
            study=study,
            data=data,
            layout=layout,
            wmf=wmf,
            kmeans_dir=kmeans_dir,
            feature_dir=feature_dir,
            inputs=inputs,
        )
        return {**_row(name, kind), **scored(predicted, own, run_id)}

    def conclude(rows: list[dict], parent_id: str) -> Findings:
        predicted = {row["name"]: row["predicted"] for row in rows}
        true = stack_by_id(data.factors, test_ids)
        ranked = cold_start_rows(
            heldout_plays=data.relevant,
            k=k,
            seed=study.evaluation.seed,
            models={
                **{name: (data.user_factors, p) for name, p in predicted.items()},
                UPPER_BOUND: (data.user_factors, true),
            },
        )
        table = recommendation_table(ranked, k=k)
        query_model = f"CNN ({study.query_model.upper()})"
        queries = query_table(
            test_ids,
            wmf_factors=true,
            predicted=predicted[query_model],
            tags=data.tags,
            queries=asked,
            n=study.neighbours,
        )

        def plots(folder: Path) -> None:
            plot_recommendation_bars(
                table,
                k=k,
                path=folder / "recommendation.png",
                title=f"{study.preset} on {dataset}: cold start on the held-out tracks",
            )

        return Findings(
            tables={"table_recommendation.json": table, "table_queries.json": queries},
            text=format_recommendation(table),
            metrics=recommendation_metrics(ranked, rows, queries, k=k),
            plots=plots,
            report=lambda s: recommendation_report(
                table,
                queries,
                k=k,
                query_model=query_model,
                run_id=s.run_id,
                n=s.n_rows,
                n_reused=s.n_reused,
                seconds=s.seconds,
            ),
            values={"queries": format_queries(queries)},
        )

    kind = StudyKind(
        configurations=models,
        name=lambda model: model[0],
        key=key,
        reuse=reuse,
        run_one=run_one,
        conclude=conclude,
        progress=lambda row: f"mAP@{k} {row['map']:.4f}, AUC {row['auc']:.4f}",
    )
    out = run_study(kind, study=study, dataset=dataset, parent=parent, layout=layout, tracking=tracking, start=start)
    get_run_logger().info("study %s on %s\n%s", study.preset, dataset, out.findings.text)
    return RecommendationStudyOutput(
        table=out.findings.text,
        queries=out.findings.values["queries"],
        parent_run_id=out.parent_run_id,
        report_path=str(out.report_path),
        n_runs=out.n_runs,
        n_reused=out.n_reused,
        seconds=out.seconds,
    )


def load_recommenders(
    layout: Layout, dataset: str, wmf: WMFOutput, *, feature_dir: Path, kmeans_dir: Path
) -> Recommenders:
    """The tracks with log-mel and K-means features, split for cold start, with their factors and plays."""
    tracks = clips_with_features(
        read_frame(layout.tracks(dataset), columns=["track_id", "split", "tags"]),
        [manifest_ids(feature_dir), manifest_ids(kmeans_dir)],
    )
    factors = read_listening_factors(wmf.user_factors, wmf.item_factors, wmf.heldout_item_factors)
    data = recommenders(tracks, factors, read_frame(wmf.heldout_plays))
    fingerprint = run_key(
        file_sha1(feature_dir / MANIFEST),
        file_sha1(kmeans_dir / MANIFEST),
        file_sha1(Path(wmf.item_factors)),
        file_sha1(Path(wmf.heldout_item_factors)),
        file_sha1(Path(wmf.user_factors)),
        data.track_ids,
    )
    return dataclasses.replace(data, fingerprint=fingerprint)


def _settings(study: RecommendationStudySettings, model: int | str):
    """A CNN's settings (``model``: its objective) or the regressors' (``model``: hidden layers)."""
    return study.cnn.model_copy(update={"objective": model}) if isinstance(model, str) else study.regressor


def _row(name: str, model: int | str) -> dict:
    return {"name": name, "model": "cnn" if isinstance(model, str) else "regressor"}


def run_recommender(
    name: str,
    model: int | str,
    child: Child,
    *,
    study: RecommendationStudySettings,
    data: Recommenders,
    layout: Layout,
    wmf: WMFOutput,
    kmeans_dir: Path,
    feature_dir: Path,
    inputs: Mapping[str, RunInput],
):
    """Train one model in its child run and predict the held-out tracks' factors: ``(predicted, ranking, run_id)``,
    the prediction an ndarray [shape=(n_test, n_factors)] (also logged as the child's ``predicted_factors.parquet``),
    the ranking its users' held-out plays score (a ``RankingRow``).

    ``inputs``: the study's datasets by kind (``logmel``, ``kmeans``, ``factors``, ``tracks``); the child logs
    those it reads, and the listening batches for the WPE objective.
    """
    is_cnn = isinstance(model, str)
    settings = _settings(study, model)
    test_ids = data.track_ids["test"]
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
    with child.run(params=params, inputs=read) as run:
        logger = mlflow_logger(child.tracking, "study", run.info.run_id)
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
                checkpoint_dir=child.checkpoint_dir,
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
            targets = {s: stack_by_id(data.factors, ids) for s, ids in splits.items()}
            result = train_factor_regressor(
                callbacks=[ThreadPolicy()],
                features=features,
                targets=targets,
                layers=model,
                settings=settings,
                checkpoint_dir=child.checkpoint_dir,
                logger=logger,
                quiet=True,
            )
            predicted = result.predicted
        own = ranking_row(name, data.user_factors, predicted, data.relevant, k=study.evaluation.k)
        k = study.evaluation.k
        mlflow.log_metrics(
            {
                "epochs": result.epochs,
                **finite({f"test/map_at_{k}": own.map_at_k, "test/auc": own.auc, f"test/ndcg_at_{k}": own.ndcg_at_k}),
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.log_artifact(str(write_frame(Path(tmp) / PREDICTIONS, predictions_frame(test_ids, predicted))))
    return predicted, own, run.info.run_id
