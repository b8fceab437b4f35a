"""The WMF flow on a Prefect test server and an MLflow sqlite store: full fit, reuse, incremental update."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from core.layout import Layout
from core.settings import WMFSettings
from flows.listening import factorize
from infra.tracking import tracking_for
from tasks.events import read_id_map
from tasks.listening import load_factors
from tasks.synth_listening import ListeningWorld, item_keys, iter_rows, user_keys

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]  # every test here runs flows
WMF = WMFSettings(factors=16, regularization=5.0, iterations=10, eval_max_users=0)


def _batches(folder, n_batches: int = 3):
    """One synthetic world cut into time-ordered batch files by user chunks (later batches bring new users)."""
    world = ListeningWorld(n_users=900, n_items=400, n_rows=30_000, styles=6, seed=3)
    ukeys, ikeys = user_keys(world.n_users).to_pylist(), item_keys(world.n_items).to_pylist()
    paths = []
    for b, (users, items, plays) in enumerate(iter_rows(world, users_per_chunk=400)):
        path = folder / f"train_triplets.batch-{b:03d}.txt"
        path.write_text("".join(f"{ukeys[u]}\t{ikeys[i]}\t{p}\n" for u, i, p in zip(users, items, plays)))
        paths.append(path)
    assert len(paths) == n_batches
    return paths, ikeys


def test_full_fit_then_reuse_then_incremental_update_on_new_batches(tmp_path):
    paths, _ = _batches(tmp_path)
    data_dir = tmp_path / "data"
    tracking = tracking_for(data_dir)

    first = factorize(data_dir, paths[:2], None, WMF, tracking, k=50)
    assert first.mode == "full" and first.batches == ("train_triplets.batch-000", "train_triplets.batch-001")
    table = {row.name: row for row in first.rows}
    assert set(table) == {"random", "popularity", "WMF"}
    assert table["WMF"].map_at_k > 1.5 * table["popularity"].map_at_k > 1.5 * table["random"].map_at_k
    assert table["WMF"].auc > table["popularity"].auc > table["random"].auc - 0.05
    assert 0.45 < table["random"].auc < 0.55

    again = factorize(data_dir, paths[:2], None, WMF, tracking, k=50)
    assert again.mode == "reused" and again.run_id == first.run_id and again.eval_run_id == first.eval_run_id
    assert again.rows == first.rows
    other_k = factorize(data_dir, paths[:2], None, WMF, tracking, k=20)  # same factors, evaluated anew
    assert other_k.mode == "reused" and other_k.run_id == first.run_id and other_k.eval_run_id != first.eval_run_id
    assert {r.name for r in other_k.rows} == {"random", "popularity", "WMF"}

    update = factorize(data_dir, paths, None, WMF, tracking, k=50)
    assert update.mode == "incremental" and update.n_users > first.n_users
    rows = {row.name: row for row in update.rows}
    assert rows["WMF"].map_at_k > 0.8 * rows["WMF full refit"].map_at_k
    assert rows["WMF"].map_at_k > 1.5 * rows["popularity"].map_at_k

    client = MlflowClient(tracking.tracking_uri)
    run = client.get_run(update.run_id)
    metrics = run.data.metrics
    for key in (
        "incremental/seconds",
        "full_refit/seconds",
        "incremental/objective",
        "full_refit/objective",
        "incremental/new_users",
        "incremental/time_vs_full_refit",
        "ingest/rows",
    ):
        assert key in metrics, key
    assert metrics["incremental/objective"] < 1.05 * metrics["full_refit/objective"]
    assert run.data.params["mode"] == "incremental" and run.data.tags["mirflow.previous_batches"].count("batch") == 2
    artifacts = {a.path for a in client.list_artifacts(update.run_id, "factors")} | {
        a.path for a in client.list_artifacts(update.run_id, "id_maps")
    }
    assert {
        "factors/user_factors.parquet",
        "factors/item_factors.parquet",
        "id_maps/users.parquet",
        "id_maps/items.parquet",
    } <= artifacts
    evaluation = client.get_run(update.eval_run_id)
    assert evaluation.data.tags["mirflow.fit_run_id"] == update.run_id
    assert evaluation.data.metrics["wmf/ndcg_at_k"] > evaluation.data.metrics["popularity/ndcg_at_k"]

    # The factors are keyed by the stable ids' keys, and the state names the batches.
    keys, factors = load_factors(update.user_factors)
    assert set(keys) <= set(read_id_map(Layout(data_dir).listening() / "users.parquet"))
    assert factors.shape == (update.n_users, WMF.factors)
    state = json.loads((Layout(data_dir).wmf() / "state.json").read_text())
    assert list(state["batches"]) == list(update.batches) and state["run_id"] == update.run_id

    # A batch whose file changed since it was factorized: neither reuse nor update, a full refit.
    paths[0].write_text(paths[0].read_text().replace("\t1\n", "\t2\n", 50))
    changed = factorize(data_dir, paths, None, WMF, tracking, k=50)
    assert changed.mode == "full"


def test_cold_start_protocol_and_early_stopping(tmp_path):
    paths, ikeys = _batches(tmp_path)
    data_dir = tmp_path / "data"
    tracking = tracking_for(data_dir)
    heldout = ikeys[::10]
    settings = WMF.model_copy(update={"iterations": 30, "early_stopping_patience": 2, "eval_every": 2})

    out = factorize(data_dir, paths, heldout, settings, tracking, k=50)
    rows = {row.name: row for row in out.rows}
    assert out.n_heldout == len(heldout)
    assert rows["WMF factors (upper bound)"].auc > rows["popularity"].auc > 0.5
    assert pq.read_table(out.heldout_plays).num_rows > 0
    run = MlflowClient(tracking.tracking_uri).get_run(out.run_id)
    history = MlflowClient(tracking.tracking_uri).get_metric_history(out.run_id, "validation/map_at_k")
    assert len(history) >= 3 and run.data.metrics["sweeps"] <= 30
    assert run.data.metrics["sweeps"] == max(history, key=lambda m: m.value).step


@pytest.mark.realdata
def test_real_hetrec_lastfm_wmf_beats_popularity(shared_data, tmp_path):
    """HetRec 2011 Last.fm (1,892 users, 17,632 artists): 80/20 split of each user's artists."""
    data_dir = tmp_path / "data"
    settings = WMFSettings(test_fraction=0.2, eval_max_users=0)  # the defaults: 16 factors, log confidence
    out = factorize(
        data_dir,
        [shared_data / "lastfm_hetrec2011_2k" / "user_artists.dat"],
        None,
        settings,
        tracking_for(data_dir),
        k=500,
    )
    rows = {row.name: row for row in out.rows}
    wmf, popularity, random = rows["WMF"], rows["popularity"], rows["random"]
    print(
        {
            name: (round(r.map_at_k, 4), round(r.auc, 4), round(r.precision_at_k, 4), round(r.ndcg_at_k, 4), r.n_users)
            for name, r in rows.items()
        }
    )
    assert wmf.n_users > 1800
    assert wmf.map_at_k > 2 * popularity.map_at_k > 10 * random.map_at_k
    assert wmf.auc > popularity.auc + 0.03 and popularity.auc > random.auc + 0.3
    assert wmf.ndcg_at_k > popularity.ndcg_at_k


def test_a_run_killed_after_writing_factors_is_not_mistaken_for_the_previous_one(tmp_path, monkeypatch):
    import flows.listening as listening_flow

    paths, _ = _batches(tmp_path)
    data_dir = tmp_path / "data"
    tracking = tracking_for(data_dir)
    first = factorize(data_dir, paths[:2], None, WMF, tracking, k=50)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during evaluation")

    monkeypatch.setattr(listening_flow, "evaluate", killed)
    with pytest.raises(BaseException, match="killed"):
        factorize(data_dir, paths, None, WMF, tracking, k=50)  # new factors written, then the process dies
    monkeypatch.undo()
    # The factor files now hold the 3-batch fit: they must not be reused as the 2-batch one.
    again = factorize(data_dir, paths[:2], None, WMF, tracking, k=50)
    assert again.mode == "full" and again.run_id != first.run_id and again.n_users == first.n_users


def test_large_listening_files_are_ingested_on_the_cluster_the_flow_is_given(
    tmp_path, monkeypatch, caplog, dask_cluster
):
    """Past CLUSTER_MIN_BYTES the ingestion task fans out on the Dask cluster; the batch is the one a process makes."""
    import flows.listening as listening_flow
    from tasks.events import ListeningSource, read_batch_events

    paths, _ = _batches(tmp_path)
    sources = [ListeningSource(p).resolved() for p in paths[:2]]
    here = tmp_path / "here"
    listening_flow.ingest_listening.fn(sources, here / "listening", here / "quarantine.parquet")
    monkeypatch.setattr(listening_flow, "CLUSTER_MIN_BYTES", 1)
    monkeypatch.setattr(listening_flow, "CLUSTER_CHUNK_BYTES", 50_000)  # several chunks per file
    there = tmp_path / "there"
    with caplog.at_level("INFO", logger="mirflow"):
        report = listening_flow.ingest_listening.fn(
            sources, there / "listening", there / "quarantine.parquet", dask_cluster
        )
    assert "ingesting on the Dask cluster" in caplog.text
    assert report.totals()["events"] == read_batch_events(there / "listening").num_rows > 0
    assert read_batch_events(there / "listening").equals(read_batch_events(here / "listening"))
    assert (
        read_id_map(there / "listening" / "users.parquet").tolist()
        == read_id_map(here / "listening" / "users.parquet").tolist()
    )
