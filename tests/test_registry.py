"""The registry rules, the promotion decision, the inbox, retries and the service's own bookkeeping (no servers)."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest

from core.errors import ParameterError
from core.settings import PromotionSettings
from flows.retrain import CHALLENGER_ROW, CHAMPION_ROW, decide, inbox_sources, new_sources
from infra.registry import (
    CHALLENGER,
    CHAMPION,
    LATENT_FACTOR_CNN,
    WMF,
    WMF_VERSION_TAG,
    champion,
    client_for,
    promote_recommender,
    register,
    repair_recommender_aliases,
)
from infra.retries import is_transient
from infra.tracking import tracking_for
from mirflow.environment import service_environment
from mirflow.stack import Ports, Stack, StackError, free_ports
from tasks.events import ingest_sources
from tasks.recommend import compare_recommenders
from tasks.report import RankingRow


@pytest.fixture
def tracking(tmp_path):
    return tracking_for(tmp_path)


def _logged_model(tracking, tag: str) -> str:
    """A tiny pyfunc model logged in a run of its own (the registry only needs a model URI)."""
    import mlflow

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
            return pd.DataFrame({"score": np.zeros(len(model_input))})

    client_for(tracking)
    with mlflow.start_run(run_name=tag):
        return mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=["mlflow"]).model_uri


def test_the_first_version_is_champion_later_ones_challengers(tracking):
    first = register(tracking, WMF, _logged_model(tracking, "a"))
    second = register(tracking, WMF, _logged_model(tracking, "b"), tags={"mirflow.batches": "b1,b2"})
    client = client_for(tracking)
    assert str(client.get_model_version_by_alias(WMF, CHAMPION).version) == str(first.version) == "1"
    assert str(client.get_model_version_by_alias(WMF, CHALLENGER).version) == str(second.version) == "2"
    assert second.tags["mirflow.batches"] == "b1,b2"


def test_registering_the_same_model_again_makes_no_new_version(tracking):
    uri = _logged_model(tracking, "a")
    assert register(tracking, WMF, uri).version == register(tracking, WMF, uri).version
    assert len(client_for(tracking).search_model_versions(f"name='{WMF}'")) == 1


def test_the_cnn_alias_is_the_commit_point_of_a_promotion(tracking):
    for tag in ("a", "b"):
        wmf = register(tracking, WMF, _logged_model(tracking, f"wmf-{tag}"))
        register(
            tracking, LATENT_FACTOR_CNN, _logged_model(tracking, f"cnn-{tag}"), tags={WMF_VERSION_TAG: str(wmf.version)}
        )
    assert repair_recommender_aliases(tracking) is None  # version 1 of both: consistent
    # Killed after the WMF alias moved and before the CNN's: readers still see CNN v1 and the WMF it names.
    client_for(tracking).set_registered_model_alias(WMF, CHAMPION, "2")
    assert repair_recommender_aliases(tracking) == "1"
    assert str(champion(tracking, WMF).version) == "1"
    promote_recommender(tracking, cnn_version="2", wmf_version="2")
    assert str(champion(tracking, LATENT_FACTOR_CNN).version) == "2" and str(champion(tracking, WMF).version) == "2"
    assert repair_recommender_aliases(tracking) is None


def test_a_promotion_registered_but_never_applied_is_finished(tracking):
    for tag in ("a", "b"):
        wmf = register(tracking, WMF, _logged_model(tracking, f"wmf-{tag}"))
        register(
            tracking,
            LATENT_FACTOR_CNN,
            _logged_model(tracking, f"cnn-{tag}"),
            tags={WMF_VERSION_TAG: str(wmf.version), **({"mirflow.decision": "promoted"} if tag == "b" else {})},
        )
    # Killed after registering v2 as promoted, before any alias moved: v1 is still champion of both.
    assert str(champion(tracking, LATENT_FACTOR_CNN).version) == "1"
    repair_recommender_aliases(tracking)
    assert str(champion(tracking, LATENT_FACTOR_CNN).version) == "2" and str(champion(tracking, WMF).version) == "2"


def _rows(new: float, old: float) -> list[RankingRow]:
    return [RankingRow("random", 0.1, 0.5), RankingRow(CHAMPION_ROW, old, 0.7), RankingRow(CHALLENGER_ROW, new, 0.8)]


@pytest.mark.parametrize(
    ("new", "old", "margin", "promoted"),
    [
        (0.30, 0.20, 0.0, True),
        (0.20, 0.20, 0.0, False),
        (0.19, 0.20, 0.0, False),
        (0.30, 0.20, 0.2, False),
        (0.30, 0.20, 0.1, True),
        (0.201, 0.20, 0.0, True),
    ],
)
def test_promotion_needs_a_better_challenger_by_the_margin(new, old, margin, promoted):
    promote, challenger, champion_score, reason = decide(_rows(new, old), PromotionSettings(margin=margin))
    assert (promote, challenger, champion_score) == (promoted, new, old)
    assert ("promoted" if promoted else "champion stays") in reason and f"{margin:.4f}" in reason
    with pytest.raises(ValueError):
        PromotionSettings(margin=-0.01)


def test_promotion_on_another_metric_and_an_undefined_one():
    promote, new, old, _ = decide(_rows(0.1, 0.2), PromotionSettings(metric="auc"))
    assert promote and (new, old) == (0.8, 0.7)
    rows = [RankingRow(CHAMPION_ROW, 0.2, 0.7), RankingRow(CHALLENGER_ROW, float("nan"), 0.8)]
    promote, _, _, reason = decide(rows, PromotionSettings())
    assert not promote and "undefined" in reason
    with pytest.raises(ValueError):
        PromotionSettings(metric="accuracy")


def test_recommenders_are_compared_on_the_users_they_all_know():
    plays = pd.DataFrame({"user": ["u1", "u2", "u3"], "item": ["t1", "t2", "t1"], "plays": [3, 2, 5]})
    tracks = np.array(["t1", "t2", "t3"])
    items = np.array([[1.0], [-1.0], [0.0]])
    perfect = (np.array(["u3", "u1", "u2"]), np.array([[1.0], [1.0], [-1.0]]), items)
    # Knows only u1 and u2, and ranks their tracks last; u3 is scored for no one.
    backwards = (np.array(["u2", "u1"]), np.array([[1.0], [-1.0]]), items)
    rows = {
        r.name: r
        for r in compare_recommenders(
            heldout_plays=plays, track_ids=tracks, recommenders={"good": perfect, "bad": backwards}, k=2, seed=0
        )
    }
    assert rows["good"].n_users == rows["bad"].n_users == rows["random"].n_users == 2  # u1 and u2
    assert rows["good"].auc == 1.0 and rows["bad"].auc == 0.0


def test_the_inbox_yields_only_what_the_last_recommender_did_not_cover(tmp_path):
    inbox, listening = tmp_path / "inbox", tmp_path / "listening"
    inbox.mkdir()
    (inbox / "b1.txt").write_text("u1\ts1\t3\n")
    (inbox / "b2.csv").write_text("user,item,plays\nu2,s1,1\n")
    (inbox / ".partial.txt").write_text("u3\ts1\t1\n")  # being written: ignored
    sources = inbox_sources(inbox)
    assert [(s.batch, s.format) for s in sources] == [("b1", "triplets"), ("b2", "events")]
    ingest_sources(sources, listening_dir=listening, quarantine_path=tmp_path / "q.parquet")
    assert [s.batch for s in new_sources(sources, covered=["b1"], listening_dir=listening)] == ["b2"]
    (inbox / "b1.txt").write_text("u1\ts1\t4\n")  # changed since it was covered
    assert [s.batch for s in new_sources(inbox_sources(inbox), covered=["b1", "b2"], listening_dir=listening)] == ["b1"]
    assert inbox_sources(tmp_path / "missing") == []


def test_retraining_before_any_pipeline_run_or_beside_another_does_nothing(tmp_path, prefect_server):
    from core.layout import Layout
    from flows.retrain import retrain_on_new_listening
    from infra.locks import try_lock

    outcome = retrain_on_new_listening(tmp_path, tracking_for(tmp_path))
    assert outcome.status == "no-champion" and "run the pipeline first" in outcome.message
    with try_lock(Layout(tmp_path).retrain_lock()):  # another retraining holds the storage root
        outcome = retrain_on_new_listening(tmp_path, tracking_for(tmp_path))
    assert outcome.status == "busy" and "another retrain-on-new-listening" in outcome.message
    assert champion(tracking_for(tmp_path), LATENT_FACTOR_CNN) is None


def test_only_transient_io_errors_are_retried():
    assert is_transient(OSError(5, "Input/output error")) and is_transient(ConnectionResetError())
    assert is_transient(TimeoutError())
    for error in (FileNotFoundError(), PermissionError(), ValueError("bad"), None):
        assert not is_transient(error)


def test_prefect_retries_a_task_that_met_a_transient_io_error(prefect_server):
    from prefect import flow, task

    from infra.retries import TRANSIENT_IO_RETRIES

    calls = {"flaky": 0, "missing": 0}

    @task(**{**TRANSIENT_IO_RETRIES, "retry_delay_seconds": 0})
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise OSError(5, "Input/output error")
        return "written"

    @task(**{**TRANSIENT_IO_RETRIES, "retry_delay_seconds": 0})
    def missing() -> None:
        calls["missing"] += 1
        raise FileNotFoundError("no such file")

    @flow
    def both() -> str:
        out = flaky()
        with pytest.raises(FileNotFoundError):
            missing()
        return out

    assert both() == "written"
    assert calls == {"flaky": 2, "missing": 1}


def test_the_service_environment_is_read_when_asked(tmp_path):
    env = service_environment(
        {
            "MIRFLOW_DATA_DIR": str(tmp_path),
            "MIRFLOW_TRACKING_URI": "http://127.0.0.1:5000",
            "MIRFLOW_DASK_ADDRESS": "tcp://127.0.0.1:8786",
        }
    )
    assert env.data_dir == tmp_path and env.tracking.artifact_root is None
    assert env.cluster().kind == "address" and env.cluster().address == "tcp://127.0.0.1:8786"
    local = service_environment({"MIRFLOW_DATA_DIR": str(tmp_path)})
    assert local.tracking.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}" and local.cluster().kind == "local"
    shared = service_environment(
        {"MIRFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MIRFLOW_ARTIFACT_ROOT": (tmp_path / "mlartifacts").as_uri()}
    )
    assert shared.tracking.artifact_root == (tmp_path / "mlartifacts").as_uri()


def test_one_service_per_storage_root_and_free_ports(tmp_path):
    first = Stack(data_dir=tmp_path)
    first.acquire()
    try:
        with pytest.raises(StackError, match="already running"):
            Stack(data_dir=tmp_path).acquire()
    finally:
        first.stop()
    Stack(data_dir=tmp_path).acquire()  # released: the next one may start
    free = free_ports(3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StackError, match=f"port {port} .*--mlflow-port"):
            Ports(prefect=free[0], mlflow=port, dask=free[1], dashboard=free[2]).check()
    with pytest.raises(ParameterError, match="must differ"):
        Ports(prefect=4200, mlflow=4200)
