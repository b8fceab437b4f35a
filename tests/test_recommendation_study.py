"""The recommendation study (NIPS 2013) on a tiny synthetic world, on real components (Dask, Prefect, MLflow, Parquet)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from core.errors import ParameterError
from core.settings import WorldSettings
from flows.recommendation import recommendation_study
from infra.tracking import run_inputs, tracking_for
from tasks.recommend import choose_queries, nearest_by_cosine, query_table
from tasks.studies import load_preset, preset_overrides

WORLD = WorldSettings(n_tracks=160, n_users=300, clip_seconds=4.0, seed=0)
ROWS = [
    "random",
    "popularity (oracle)",
    "linear regression",
    "MLP (1 hidden)",
    "CNN (MSE)",
    "CNN (WPE)",
    "WMF factors (upper bound)",
]


def test_nearest_by_cosine_ranks_by_angle_and_leaves_the_query_out():
    factors = np.array([[1.0, 0.0], [10.0, 0.5], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    order, similarity = nearest_by_cosine(factors, 0, n=3)
    assert order.tolist() == [1, 4, 2]  # the scale of [10, 0.5] does not matter, only its angle
    assert similarity[0] == pytest.approx(10 / np.hypot(10, 0.5))


def test_query_table_has_n_neighbours_by_each_factor_set_with_tags():
    ids = [f"t{i}" for i in range(8)]
    rng = np.random.default_rng(0)
    wmf, predicted = rng.normal(size=(8, 3)), rng.normal(size=(8, 3))
    tags = {t: ["rock"] if i % 2 else ["jazz", "piano"] for i, t in enumerate(ids)}
    table = query_table(ids, wmf_factors=wmf, predicted=predicted, tags=tags, queries=["t1", "t4"], n=5)
    assert len(table) == 2 * 5 and table.groupby("query").size().tolist() == [5, 5]
    assert (table["wmf_track"] != table["query"]).all() and (table["predicted_track"] != table["query"]).all()
    first = table[table["query"] == "t4"].iloc[0]
    assert first["query_tags"] == "jazz, piano" and first["wmf_tags"] == ", ".join(tags[first["wmf_track"]])


def test_queries_are_a_seeded_draw_or_known_tracks():
    ids = [str(i) for i in range(50)]
    assert choose_queries(ids, n=4, seed=1) == choose_queries(ids, n=4, seed=1)
    assert len(set(choose_queries(ids, n=4, seed=1))) == 4
    assert choose_queries(ids, n=4, seed=1, asked=["7"]) == ["7"]
    with pytest.raises(ParameterError, match="held-out"):
        choose_queries(ids, n=4, seed=1, asked=["nope"])


def test_presets_and_overrides_reach_every_trained_family():
    study = load_preset("nips2013", overrides=preset_overrides(kind="recommendation", k=32, epochs=3))
    assert study.kmeans.k == 32 and study.regressor.train.max_epochs == 3 and study.cnn.train.max_epochs == 3
    assert study.objectives == ("mse", "wpe") and study.evaluation.k == 500
    # The queries only read the models: other queries keep the settings hash, so the runs are reused.
    asked = load_preset("nips2013", overrides={"query_ids": ["2"], "queries": 3, "neighbours": 10})
    assert asked.settings_hash == load_preset("nips2013").settings_hash != study.settings_hash
    with pytest.raises(ParameterError, match="query_model"):
        load_preset("nips2013", overrides={"objectives": ["mse"]})


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, prefect_server, dask_cluster):
    data_dir = tmp_path_factory.mktemp("nips2013")
    study = load_preset("nips2013-smoke")
    cluster = dask_cluster
    out = recommendation_study(data_dir, "synthetic", study, cluster, tracking_for(data_dir), world=WORLD)
    return data_dir, study, cluster, out


@pytest.mark.integration
def test_the_study_lists_every_row_under_one_parent(study_run):
    data_dir, study, _, out = study_run
    client = MlflowClient(tracking_for(data_dir).tracking_uri)
    parent = client.get_run(out.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{out.parent_run_id}'"
    )
    assert sorted(c.data.tags["mirflow.configuration"] for c in children) == sorted(ROWS[2:6])
    logmel, kmeans = (f"features/synthetic/{parent.data.params[p]}" for p in ("feature_set", "kmeans_feature_set"))
    parent_inputs = run_inputs(parent)
    assert parent_inputs.keys() == {logmel, kmeans, "wmf-factors", "tracks/synthetic"}
    for child in children:
        assert 0.0 < child.data.metrics["test/auc"] <= 1.0
        assert "predicted_factors.parquet" in {a.path for a in client.list_artifacts(child.info.run_id)}
        # Lineage: the CNNs learn from log-mel, the regressors from K-means features; WPE from the plays too.
        name, own = child.data.tags["mirflow.configuration"], run_inputs(child)
        read = {logmel if name.startswith("CNN") else kmeans, "wmf-factors", "tracks/synthetic"}
        assert own.keys() == read | ({"listening"} if name == "CNN (WPE)" else set())
        assert {n: own[n] for n in read} == {n: parent_inputs[n] for n in read}
    local = client.download_artifacts(out.parent_run_id, "table_recommendation.json", str(data_dir))
    table = pd.read_json(local, orient="split")
    assert list(table["model"]) == ROWS
    scores = table[["mAP@500", "AUC", "NDCG@500"]].to_numpy(dtype=float)
    assert np.isfinite(scores).all() and ((scores > 0) & (scores <= 1)).all()
    upper = table.set_index("model").loc["WMF factors (upper bound)", "AUC"]
    assert upper > table.set_index("model").loc["random", "AUC"] + 0.2  # the fold-in knows the held-out plays
    for row in ROWS:
        assert row in out.table


@pytest.mark.integration
def test_the_query_table_has_two_times_five_neighbours_per_query(study_run):
    data_dir, study, _, out = study_run
    client = MlflowClient(tracking_for(data_dir).tracking_uri)
    local = client.download_artifacts(out.parent_run_id, "table_queries.json", str(data_dir))
    queries = pd.read_json(local, orient="split", dtype={"query": str, "wmf_track": str, "predicted_track": str})
    assert queries["query"].nunique() == study.queries
    for _, group in queries.groupby("query"):
        assert len(group) == 5 and group["wmf_track"].nunique() == 5 and group["predicted_track"].nunique() == 5
        assert (group["wmf_cosine"].diff().dropna() <= 1e-9).all()  # nearest first
    assert queries["query_tags"].str.len().gt(0).all() and queries["predicted_tags"].str.len().gt(0).any()
    report = open(out.report_path, encoding="utf-8").read()
    assert "## Queries" in report and "upper bound" in report


@pytest.mark.integration
def test_a_rerun_with_other_queries_reuses_every_model(study_run):
    data_dir, study, cluster, out = study_run
    client = MlflowClient(tracking_for(data_dir).tracking_uri)
    local = client.download_artifacts(out.parent_run_id, "table_queries.json", str(data_dir))
    first = str(pd.read_json(local, orient="split", dtype={"query": str})["query"].iloc[0])
    again = recommendation_study(
        data_dir,
        "synthetic",
        study.model_copy(update={"query_ids": (first,)}),
        cluster,
        tracking_for(data_dir),
        world=WORLD,
    )
    assert again.parent_run_id == out.parent_run_id and (again.n_runs, again.n_reused) == (0, 4)
    assert again.table == out.table and f"query {first}," in again.queries


@pytest.mark.integration
def test_an_unknown_query_is_refused_before_any_model_trains(study_run):
    data_dir, study, cluster, out = study_run
    with pytest.raises(ParameterError, match="'nope'"):
        recommendation_study(
            data_dir,
            "synthetic",
            study.model_copy(
                update={"query_ids": ("nope",), "regressor": study.regressor.model_copy(update={"hidden": 7})}
            ),
            cluster,
            tracking_for(data_dir),
            world=WORLD,
        )
    client = MlflowClient(tracking_for(data_dir).tracking_uri)
    parent = client.get_run(out.parent_run_id)
    parents = client.search_runs([parent.info.experiment_id], filter_string="tags.`mirflow.preset` = 'nips2013-smoke'")
    assert len(parents) == 1  # the other settings (hidden 7) would have started a second parent
