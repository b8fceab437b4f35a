"""The whole pipeline on a tiny synthetic world, on real components.

A real Dask LocalCluster, Prefect's test harness (a real temporary server), an
MLflow sqlite store and Parquet files in ``tmp_path``; then assertions on what
landed and on whether learning happened. The margins were checked over world
seeds 0, 1 and 2 (set MIRFLOW_TEST_SEED to repeat that).
"""

from __future__ import annotations

import os

import mlflow
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from prefect.testing.utilities import prefect_test_harness

from flows.features import extract_features
from flows.pipeline import pipeline
from infra.layout import Layout
from infra.settings import ClusterSettings, LatentFactorSettings, PipelineSettings, TaggerSettings, TrainSettings, WorldSettings
from infra.tracking import tracking_for

pytestmark = pytest.mark.integration
SEED = int(os.environ.get("MIRFLOW_TEST_SEED", "0"))


@pytest.fixture(scope="module")
def prefect_server():
    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_server):
    data_dir = tmp_path_factory.mktemp("pipeline")
    settings = PipelineSettings(
        data_dir=data_dir,
        world=WorldSettings(n_tracks=192, n_users=400, clip_seconds=6.0, seed=SEED),
        cluster=ClusterSettings(kind="local", n_workers=2),
        tagger=TaggerSettings(train=TrainSettings(max_epochs=12, patience=12, crops_per_clip=4, seed=SEED)),
        recommender=LatentFactorSettings(train=TrainSettings(max_epochs=12, patience=12, crops_per_clip=4, seed=SEED)),
        tracking=tracking_for(data_dir),
    )
    return settings, pipeline(settings)


def test_every_track_has_features_exactly_once(run):
    settings, summary = run
    layout = Layout(settings.data_dir)
    feature_dir = layout.features("synthetic", settings.features.feature_set)
    manifest = pq.read_table(feature_dir / "_manifest.parquet").to_pandas()
    assert len(manifest) == manifest["track_id"].nunique() == 192 == summary.n_tracks
    rows = sum(pq.read_metadata(p).num_rows for p in feature_dir.glob("part-*.parquet"))
    assert rows == 192
    assert not list(feature_dir.glob(".*.tmp"))
    tracks = pq.read_table(layout.tracks("synthetic")).to_pandas()
    assert tracks["content_sha1"].notna().all() and (tracks["duration_s"] > 5.9).all()
    assert set(tracks["split"]) == {"train", "valid", "test"}


def test_rerun_skips_finished_tracks(run):
    settings, _ = run
    summary = extract_features(settings.data_dir, "synthetic", settings.features, settings.cluster, settings.tracking)
    assert (summary.n_extracted, summary.n_skipped, summary.n_tracks) == (0, 192, 192)


def test_every_step_landed_in_mlflow(run):
    settings, summary = run
    client = MlflowClient(settings.tracking.tracking_uri)
    runs = {}
    for family in ("features", "wmf", "tagger", "latent-factors", "pipeline"):
        experiment = client.get_experiment_by_name(f"mirflow-{family}")
        assert experiment is not None, family
        found = client.search_runs([experiment.experiment_id])
        assert found and all(r.info.status == "FINISHED" for r in found), family
        runs[family] = found[-1]  # the first run of the family (the re-run test adds a features run)
    tagger = runs["tagger"]
    assert tagger.data.tags["mirflow.features_manifest_sha1"] == runs["features"].data.tags["mirflow.features_manifest_sha1"]
    assert len(tagger.data.tags["mlflow.source.git.commit"]) == 40 and tagger.data.tags["prefect.flow_run_id"]
    assert tagger.data.params["tagger.train.max_epochs"] == "12"
    assert abs(tagger.data.metrics["test/roc_auc"] - summary.tagger_roc_auc) < 1e-6
    assert "val/roc_auc" in tagger.data.metrics and "train/loss" in tagger.data.metrics
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(tagger.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/tagger-best.ckpt"}
    assert {a.path for a in client.list_artifacts(tagger.info.run_id, "plots")} == {
        "plots/roc_curves.png", "plots/first_layer_filters.png"}
    recommender = runs["latent-factors"].data.metrics
    assert "test/cnn_predicted_factors/map_at_500" in recommender
    assert {a.path for a in client.list_artifacts(runs["latent-factors"].info.run_id, "plots")} == {
        "plots/predicted_vs_wmf_factors.png", "plots/tsne_predicted_factors.png", "plots/tsne_wmf_factors.png"}
    assert {a.path for a in client.list_artifacts(runs["wmf"].info.run_id, "factors")} >= {
        "factors/user_factors.parquet", "factors/item_factors.parquet"}
    pipeline_run = runs["pipeline"]
    assert pipeline_run.data.params["world.n_tracks"] == "192"
    assert summary.report_path.exists() and "mAP@500" in summary.report_path.read_text()


def test_learning_happened(run):
    _, summary = run
    assert summary.tagger_roc_auc > 0.75
    assert summary.tagger_pr_auc > summary.tagger_pr_auc_chance + 0.2
    rows = {r.name: r for r in summary.ranking}
    assert abs(rows["random"].auc - 0.5) < 0.05
    assert rows["CNN-predicted factors"].auc > rows["random"].auc + 0.1
    assert rows["WMF factors (upper bound)"].auc > rows["CNN-predicted factors"].auc
    assert rows["WMF factors (upper bound)"].map_at_k > rows["popularity"].map_at_k > rows["random"].map_at_k
