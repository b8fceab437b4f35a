"""The whole pipeline on a tiny synthetic world, on real components.

A real Dask LocalCluster, Prefect's test harness (a real temporary server), an
MLflow sqlite store and Parquet files in ``tmp_path``; then assertions on what
landed and on whether learning happened. The run is the session's ``pipeline_run``
(tests/conftest.py: 192 tracks of 6 s, 12 epochs); the margins were checked over world
seeds 0, 1 and 2 (set MIRFLOW_TEST_SEED to repeat that).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from core.layout import Layout
from flows.features import extract_features
from infra.tracking import run_inputs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(pipeline_run):
    """The session's pipeline run (tests/conftest.py); this module works on its storage root (the retraining tests add to it)."""
    return pipeline_run.settings, pipeline_run.summary


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
    assert (
        tagger.data.tags["mirflow.features_manifest_sha1"]
        == runs["features"].data.tags["mirflow.features_manifest_sha1"]
    )
    assert len(tagger.data.tags["mlflow.source.git.commit"]) == 40 and tagger.data.tags["prefect.flow_run_id"]
    assert tagger.data.params["tagger.train.max_epochs"] == "12"
    assert abs(tagger.data.metrics["test/roc_auc"] - summary.tagger_roc_auc) < 1e-6
    assert "val/roc_auc" in tagger.data.metrics and "train/loss" in tagger.data.metrics
    mlflow.set_tracking_uri(settings.tracking.tracking_uri)
    artifacts = {a.path for a in client.list_artifacts(tagger.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/tagger-best.ckpt"}
    assert {a.path for a in client.list_artifacts(tagger.info.run_id, "plots")} == {
        "plots/roc_curves.png",
        "plots/first_layer_filters.png",
    }
    recommender = runs["latent-factors"].data.metrics
    assert "test/cnn_predicted_factors/map_at_500" in recommender
    assert {a.path for a in client.list_artifacts(runs["latent-factors"].info.run_id, "plots")} == {
        "plots/predicted_vs_wmf_factors.png",
        "plots/tsne_predicted_factors.png",
        "plots/tsne_wmf_factors.png",
    }
    assert {a.path for a in client.list_artifacts(runs["wmf"].info.run_id, "factors")} >= {
        "factors/user_factors.parquet",
        "factors/item_factors.parquet",
    }
    pipeline_run = runs["pipeline"]
    assert pipeline_run.data.params["world.n_tracks"] == "192"
    assert summary.report_path.exists() and "mAP@500" in summary.report_path.read_text()


def test_every_run_shows_its_inputs_and_the_same_data_the_same_digest(run):
    """Lineage: the MLflow Dataset column of each run, and each experiment's description."""
    from infra.tracking import DESCRIPTION_TAG, FAMILY_DESCRIPTIONS

    settings, _ = run
    client = MlflowClient(settings.tracking.tracking_uri)
    runs = {}
    for family in ("features", "wmf", "tagger", "latent-factors", "pipeline"):
        experiment = client.get_experiment_by_name(f"mirflow-{family}")
        assert experiment.tags[DESCRIPTION_TAG] == FAMILY_DESCRIPTIONS[family]
        runs[family] = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    features, tracks = f"features/synthetic/{settings.features.feature_set}", "tracks/synthetic"
    extracted = run_inputs(runs["features"][0])
    assert extracted.keys() == {tracks, features} and extracted[features][1] == "output"
    if len(runs["features"]) > 1:  # the re-run test's: nothing changed, so the same digests
        assert run_inputs(runs["features"][1]) == extracted
    tagger = run_inputs(runs["tagger"][0])
    # What the tagger trained on is what the features run left, and the same tracks (annotated since).
    assert tagger == {features: (extracted[features][0], "training"), tracks: extracted[tracks]}
    cnn = run_inputs(runs["latent-factors"][0])
    assert cnn.keys() == {features, tracks, "wmf-factors"} and cnn[features] == tagger[features]
    fit, evaluation = (run_inputs(r) for r in runs["wmf"][:2])
    assert fit.keys() == {"listening", "heldout-items"} and fit["listening"][1] == "training"
    assert evaluation["listening"] == (fit["listening"][0], "evaluation")
    assert run_inputs(runs["pipeline"][0])["listening"] == fit["listening"]


def test_learning_happened(run):
    _, summary = run
    assert summary.tagger_roc_auc > 0.75
    assert summary.tagger_pr_auc > summary.tagger_pr_auc_chance + 0.2
    rows = {r.name: r for r in summary.ranking}
    assert abs(rows["random"].auc - 0.5) < 0.05
    assert rows["CNN-predicted factors"].auc > rows["random"].auc + 0.1
    assert rows["WMF factors (upper bound)"].auc > rows["CNN-predicted factors"].auc
    assert rows["WMF factors (upper bound)"].map_at_k > rows["popularity"].map_at_k > rows["random"].map_at_k


def test_the_wpe_objective_trains_the_cnn_from_the_plays(run):
    """The same CNN, trained on the weighted prediction error of the factorized plays, ranks held-out tracks."""
    from flows.listening import factorize, factorized_batches
    from flows.training import train_recommender_flow
    from tasks.datasets import heldout_track_ids

    settings, summary = run
    layout = Layout(settings.data_dir)
    wmf = factorize(
        settings.data_dir,
        [],
        heldout_track_ids(layout.tracks("synthetic")),
        settings.wmf,
        settings.tracking,
        k=settings.evaluation.k,
        ingested=factorized_batches(settings.data_dir),
    )
    assert wmf.mode == "reused"
    recommender = settings.recommender.model_copy(update={"objective": "wpe"})
    out = train_recommender_flow(
        settings.data_dir,
        "synthetic",
        settings.features.feature_set,
        settings.features.mel,
        wmf,
        recommender,
        settings.evaluation,
        settings.tracking,
        confidence=settings.wmf,
    )
    rows = {r.name: r for r in out.rows}
    # Seeds 0, 1, 2: CNN-WPE AUC 0.656, 0.592, 0.730; random 0.491, 0.486, 0.491; the popularity oracle
    # 0.560, 0.546, 0.578 (12 epochs on 192 clips).
    assert rows["CNN-predicted factors"].auc > rows["random"].auc + 0.08
    assert rows["CNN-predicted factors"].auc > rows["popularity"].auc
    run_data = MlflowClient(settings.tracking.tracking_uri).get_run(out.run_id).data
    assert run_data.params["recommender.objective"] == "wpe" and "train/wpe" in run_data.metrics


# ---------------------------------------------------------------- registry and retraining


def test_every_family_is_registered_with_a_champion_that_predicts(run):
    from infra.registry import CHAMPION, LATENT_FACTOR_CNN, TAGGER, WMF, client_for
    from tasks.audio import decode
    from tasks.listening import load_factors

    settings, _ = run
    client = client_for(settings.tracking)
    for name in (TAGGER, WMF, LATENT_FACTOR_CNN):
        champion = client.get_model_version_by_alias(name, CHAMPION)
        assert str(champion.version) == "1" and client.get_model_version_by_alias(name, "challenger").version == 1
    assert client.get_model_version_by_alias(LATENT_FACTOR_CNN, CHAMPION).tags["mirflow.wmf_version"] == "1"

    tracks = pq.read_table(Layout(settings.data_dir).tracks("synthetic")).to_pandas()
    waveform = decode(tracks["source_path"].iloc[0], sample_rate=16000)[None, :]
    tags = mlflow.pyfunc.load_model(f"models:/{TAGGER}@{CHAMPION}").predict(waveform)
    assert tags.shape[0] == 1 and tags.shape[1] >= 5 and tags.values.min() > 0 and tags.values.max() < 1
    factors = mlflow.pyfunc.load_model(f"models:/{LATENT_FACTOR_CNN}@{CHAMPION}").predict(waveform)
    assert factors.shape == (1, settings.wmf.factors) and np.isfinite(factors).all()
    wmf = mlflow.pyfunc.load_model(f"models:/{WMF}@{CHAMPION}")
    users, user_factors = load_factors(Layout(settings.data_dir).wmf() / "user_factors.parquet")
    items, item_factors = load_factors(Layout(settings.data_dir).wmf() / "item_factors.parquet")
    pairs = pd.DataFrame({"user_id": [users[0], users[1], "nobody"], "item_id": [items[0], items[2], items[0]]})
    scores = wmf.predict(pairs)["score"].to_numpy()
    np.testing.assert_allclose(
        scores[:2], [user_factors[0] @ item_factors[0], user_factors[1] @ item_factors[2]], rtol=1e-5
    )
    assert np.isnan(scores[2])  # an unknown user has no score
    with pytest.raises(Exception, match="user_id"):
        wmf.predict(pd.DataFrame({"user": ["x"]}))


def test_an_interrupted_retrain_resumes_without_redoing_ingestion_or_wmf(run):
    """A run killed after ingestion and the WMF update is run again: both are found done, only fine-tuning reruns."""
    from flows.listening import factorize
    from flows.retrain import retrain_on_new_listening
    from infra.registry import CHAMPION, LATENT_FACTOR_CNN, WMF, client_for
    from tasks.events import ListeningSource

    settings, _ = run
    layout = Layout(settings.data_dir)
    inbox = layout.inbox()
    inbox.mkdir(parents=True, exist_ok=True)
    batch = layout.world() / "taste_profile" / "train_triplets.batch-002.txt"
    (inbox / batch.name).write_bytes(batch.read_bytes())
    # What the killed run had finished: the new batch ingested and the factors updated.
    tracks = pq.read_table(layout.tracks("synthetic")).to_pandas()
    heldout = list(tracks.loc[tracks["split"] == "test", "track_id"])
    before = factorize(
        settings.data_dir,
        [ListeningSource(inbox / batch.name)],
        heldout,
        settings.wmf,
        settings.tracking,
        k=settings.evaluation.k,
        ingested=["train_triplets.batch-000", "train_triplets.batch-001"],
    )
    assert before.mode == "incremental"
    marker = layout.listening() / "events" / "batch=train_triplets.batch-002" / "_source.json"
    ingested_at = marker.stat().st_mtime_ns
    client = MlflowClient(settings.tracking.tracking_uri)
    wmf_runs = len(client.search_runs([client.get_experiment_by_name("mirflow-wmf").experiment_id]))

    outcome = retrain_on_new_listening(settings.data_dir, settings.tracking, max_epochs=3)
    assert outcome.status in ("promoted", "kept-champion") and outcome.new_batches == ("train_triplets.batch-002",)
    assert len(client.search_runs([client.get_experiment_by_name("mirflow-wmf").experiment_id])) == wmf_runs
    assert marker.stat().st_mtime_ns == ingested_at  # not ingested again
    registry = client_for(settings.tracking)
    new = registry.get_model_version(LATENT_FACTOR_CNN, outcome.challenger_version)
    assert new.tags["mirflow.decision"] == outcome.status
    assert new.tags["mirflow.wmf_version"] == str(registry.get_model_version_by_alias(WMF, "challenger").version)
    assert {r.name for r in outcome.rows} == {"random", "popularity", "champion", "challenger"}
    retrain_runs = client.search_runs([client.get_experiment_by_name("mirflow-retrain").experiment_id])
    assert retrain_runs[0].data.tags["mirflow.decision"] == outcome.status
    # The challenger's listening data: the three batches of the incremental fit, not the pipeline's two.
    listening = run_inputs(retrain_runs[0])["listening"]
    assert listening == run_inputs(client.get_run(before.run_id))["listening"]
    pipeline_run = client.search_runs([client.get_experiment_by_name("mirflow-pipeline").experiment_id])[-1]
    assert listening[0] != run_inputs(pipeline_run)["listening"][0]
    assert str(registry.get_model_version_by_alias(LATENT_FACTOR_CNN, CHAMPION).version) == outcome.champion_version


def test_a_promotion_cut_between_its_two_alias_moves_is_repaired(run):
    from flows.retrain import retrain_on_new_listening
    from infra.registry import CHAMPION, LATENT_FACTOR_CNN, WMF, client_for

    settings, _ = run
    registry = client_for(settings.tracking)
    named = registry.get_model_version_by_alias(LATENT_FACTOR_CNN, CHAMPION).tags["mirflow.wmf_version"]
    other = "2" if named == "1" else "1"
    registry.set_registered_model_alias(WMF, CHAMPION, other)  # as if killed after the WMF alias moved
    outcome = retrain_on_new_listening(settings.data_dir, settings.tracking)
    assert outcome.status == "nothing-new"
    assert str(registry.get_model_version_by_alias(WMF, CHAMPION).version) == named
