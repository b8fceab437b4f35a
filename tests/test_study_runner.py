"""The one study runner (flows/study_runner.py) on a trivial study kind, in a real MLflow sqlite store.

The kind "squares" trains nothing: each configuration ``n`` logs ``n²`` as its score in its
child run. What is checked is the runner's part: one parent run, one child per configuration,
finished children reused, a killed child continued in its own run, the kind's table logged as
an MLflow table (replaced on a re-run, never appended to), and the report around its body.
"""

from __future__ import annotations

import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from core.layout import Layout
from flows.study_runner import Child, Findings, StudyKind, StudyParent, run_study
from infra.tracking import COMPLETE_TAG, tracking_for
from tasks.study_tables import frame


class Squares(BaseModel):
    """A study's settings as the runner reads them: a preset name, dumped into the report."""

    preset: str = "squares"
    n: int = 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow sqlite store for the module (creating one takes seconds); each test keeps to its own key."""
    root = tmp_path_factory.mktemp("runner")
    return root, tracking_for(root)


def _kind(study: Squares, trained: list[int], concluded: list) -> StudyKind[int]:
    def run_one(n: int, child: Child) -> dict:
        trained.append(n)
        with child.run(params={"n": n}, tags={"squares.n": str(n)}) as run:
            mlflow.log_metric("test/score", float(n * n))
        return {"name": child.name, "n": n, "score": float(n * n), "run_id": run.info.run_id}

    def conclude(rows: list[dict], parent_id: str) -> Findings:
        concluded.append((mlflow.active_run(), parent_id, [row["reused"] for row in rows]))
        table = frame([{"n": row["n"], "score": row["score"]} for row in rows])
        return Findings(
            tables={"table_squares.json": table},
            text=table.to_string(index=False),
            metrics={"total": float(table["score"].sum())},
            report=lambda s: [f"{s.n_rows} squares ({s.n_reused} reused), parent `{s.run_id}`.", ""],
            tags={"squares.done": "yes"},
            values={"largest": float(table["score"].max())},
        )

    return StudyKind(
        configurations=list(range(1, study.n + 1)),
        name=lambda n: f"square {n}",
        key=lambda n: f"{study.preset}-{n}",
        reuse=lambda n, run: {
            "name": f"square {n}",
            "n": n,
            "score": run.data.metrics["test/score"],
            "run_id": run.info.run_id,
        },
        run_one=run_one,
        conclude=conclude,
        progress=lambda row: f"score {row['score']:.0f}",
    )


def _run(store, study: Squares, *, key: str = "data-1"):
    root, tracking = store
    trained, concluded = [], []
    out = run_study(
        _kind(study, trained, concluded),
        study=study,
        dataset="toy",
        parent=StudyParent(key=f"{study.preset}-{key}", params={"n": study.n}),
        layout=Layout(root),
        tracking=tracking,
        start=time.perf_counter(),
    )
    return out, trained, concluded


def _children(store, parent_run_id: str):
    client = MlflowClient(store[1].tracking_uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return client, parent, children


def _table(client: MlflowClient, run_id: str, name: str, dst: Path) -> pd.DataFrame:
    dst.mkdir(parents=True, exist_ok=True)
    return pd.read_json(client.download_artifacts(run_id, name, str(dst)), orient="split")


def test_one_parent_one_child_per_configuration_and_the_kinds_findings_in_it(store, tmp_path):
    study = Squares(preset="first")
    out, trained, concluded = _run(store, study)
    client, parent, children = _children(store, out.parent_run_id)
    assert trained == [1, 2, 3] and (out.n_runs, out.n_reused) == (3, 0)
    assert sorted(c.data.tags["mirflow.configuration"] for c in children) == ["square 1", "square 2", "square 3"]
    assert {c.data.tags["mirflow.config_key"] for c in children} == {"first-1", "first-2", "first-3"}
    assert all(c.data.tags[COMPLETE_TAG] == "true" for c in children)
    assert {c.data.tags["squares.n"] for c in children} == {"1", "2", "3"}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mirflow.preset"] == "first" and parent.data.tags["squares.done"] == "yes"
    assert parent.data.metrics["total"] == pytest.approx(14.0)
    assert parent.data.metrics["children_reused"] == 0.0 and parent.data.metrics["study_seconds"] >= 0.0
    table = _table(client, out.parent_run_id, "table_squares.json", tmp_path / "a")
    assert list(table.columns) == ["n", "score"] and table["score"].tolist() == pytest.approx([1.0, 4.0, 9.0])
    runs = _table(client, out.parent_run_id, "study_runs.json", tmp_path / "b")
    assert len(runs) == 3 and set(runs["run_id"]) == {c.info.run_id for c in children}
    assert not runs["reused"].any()
    # The kind shaped its tables with no run active, knowing the parent.
    assert concluded == [(None, out.parent_run_id, [False, False, False])]
    assert out.findings.values["largest"] == pytest.approx(9.0)
    report = out.report_path.read_text(encoding="utf-8")
    assert out.report_path.name == f"study-first-{out.parent_run_id}.md"
    assert report.startswith("# Study first on toy\n\n3 squares (0 reused), parent ")
    assert report.endswith('## Settings\n\n```json\n{\n "preset": "first",\n "n": 3\n}\n```\n')
    assert out.report_path.name in {a.path for a in client.list_artifacts(out.parent_run_id)}


def test_a_rerun_resumes_the_parent_and_reuses_every_finished_child(store, tmp_path):
    study = Squares(preset="again")
    first, _, _ = _run(store, study)
    again, trained, concluded = _run(store, study)
    client, parent, children = _children(store, first.parent_run_id)
    assert again.parent_run_id == first.parent_run_id
    assert trained == [] and (again.n_runs, again.n_reused) == (0, 3)
    assert len(children) == 3  # nothing started again
    assert [row["score"] for row in again.rows] == pytest.approx([1.0, 4.0, 9.0])
    assert all(row["reused"] and row["seconds"] == 0.0 for row in again.rows)
    assert concluded[0][2] == [True, True, True]
    assert parent.data.metrics["children_reused"] == 3.0
    # The resumed parent's tables are replaced, not appended to.
    assert len(_table(client, first.parent_run_id, "table_squares.json", tmp_path / "a")) == 3
    assert len(_table(client, first.parent_run_id, "study_runs.json", tmp_path / "b")) == 3
    assert again.report_path == first.report_path and "3 squares (3 reused)" in again.report_path.read_text()


def test_a_killed_child_continues_in_its_own_run_and_only_it_trains(store):
    study = Squares(preset="killed")
    first, _, _ = _run(store, study)
    client, _, children = _children(store, first.parent_run_id)
    killed = next(c for c in children if c.data.tags["mirflow.config_key"] == "killed-2")
    client.delete_tag(killed.info.run_id, COMPLETE_TAG)  # as a study killed while that child trained
    again, trained, _ = _run(store, study)
    assert trained == [2] and (again.n_runs, again.n_reused) == (1, 2)
    _, _, after = _children(store, first.parent_run_id)
    assert len(after) == 3  # continued, not duplicated
    assert client.get_run(killed.info.run_id).data.tags[COMPLETE_TAG] == "true"
    assert next(row for row in again.rows if row["n"] == 2)["run_id"] == killed.info.run_id


def test_other_data_starts_another_parent_and_reuses_nothing(store):
    study = Squares(preset="other")
    first, _, _ = _run(store, study, key="data-1")
    other, trained, _ = _run(store, study, key="data-2")
    assert other.parent_run_id != first.parent_run_id
    assert trained == [1, 2, 3] and other.n_reused == 0


def test_a_new_configuration_trains_alone_beside_the_reused_ones(store):
    _run(store, Squares(preset="grown", n=2))
    grown, trained, _ = _run(store, Squares(preset="grown", n=3))  # same parent key: the settings hash is the test's
    assert trained == [3] and (grown.n_runs, grown.n_reused) == (1, 2)
