"""The study runner: one MLflow parent run, a nested child run per configuration (DESIGN.md §8).

    configurations ──► finished child of an earlier run? ──► its row (reused)
                              │ no
                              └──► run it in a nested child run (same split, same seed) ──► its row
    rows ──► the kind's findings (tables, metrics, plots, report body) ──► parent run, markdown report

Every study (tagging, end-to-end, recommendation, transfer) is a :class:`StudyKind`:
its configurations, the key of each, how a finished child's row is read back, how one
configuration runs, and what its rows make (:class:`Findings`). The loop, the reuse and
the logging are written here once; a new study kind adds a preset, its table shaper
and its "run one", not another loop.

A re-run with the same settings and data resumes the same parent run and reuses its
finished children; a child killed mid-training continues in its own run (``child_run``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import mlflow
from pydantic import BaseModel

from core.errors import DatasetError, ParameterError
from core.layout import Layout
from core.settings import ClusterSettings, TrackingSettings, WorldSettings
from core.storage import write_text
from flows.pipeline import ingest_mtat
from flows.world import synthetic_world
from infra.cluster import dask_client, shared_settings
from infra.tracking import RunInput, child_run, finished_children, log_table_replacing, parent_run
from tasks.study_tables import runs_table, study_report

log = logging.getLogger("mirflow")
Config = TypeVar("Config")
Row = dict[str, Any]  # one configuration's result: its name, scores, "seconds", "reused", "run_id", ...


@dataclass(frozen=True)
class StudyOutput:
    """What a tagging study (multiscale or end-to-end) returns."""

    table: str  # the paper-shaped table, as printed
    importance: str  # mean ROC-AUC drop per tag type and left-out timescale, as printed ("" when not analysed)
    parent_run_id: str
    report_path: str
    n_runs: int  # configurations trained in this run
    n_reused: int  # finished children of an earlier run, reused
    seconds: float


@dataclass(frozen=True)
class Child:
    """One configuration about to run: opens its nested run (key and name tagged) under the parent."""

    name: str
    key: str  # mirflow.config_key: the same key in a later run reuses this child once it completed
    checkpoint_dir: Path  # this configuration's own checkpoint folder (a killed child resumes from it)
    tracking: TrackingSettings

    def run(
        self,
        *,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
        inputs: Iterable[RunInput | None] = (),
    ) -> AbstractContextManager[mlflow.ActiveRun]:
        """The nested child run, with ``params``, extra ``tags`` and ``inputs`` (the datasets it reads)."""
        return child_run(
            run_name=self.name,
            params=params,
            tags={"mirflow.config_key": self.key, "mirflow.configuration": self.name, **(tags or {})},
            settings=self.tracking,
            inputs=inputs,
        )


@dataclass(frozen=True)
class Summary:
    """The study run as the report states it."""

    run_id: str  # the parent run
    n_rows: int  # configurations
    n_reused: int
    seconds: float  # from the flow's start to its report


@dataclass(frozen=True)
class Findings:
    """What a study kind makes of its rows, logged into the parent run by :func:`run_study`."""

    tables: Mapping[str, Any]  # artifact file (``*.json``) -> DataFrame, logged as MLflow tables
    text: str  # the study's table(s) as printed
    report: Callable[[Summary], list[str]]  # the report's body: the lines between its title and its settings
    metrics: Mapping[str, float] = field(default_factory=dict)  # into the parent run, beside the timings
    plots: Callable[[Path], None] | None = None  # writes PNG files into a folder; logged under ``plots/``
    tags: Mapping[str, str] = field(default_factory=dict)  # into the parent run
    values: Mapping[str, Any] = field(default_factory=dict)  # for the flow's output (e.g. a second table)


@dataclass(frozen=True)
class StudyKind(Generic[Config]):
    """One study: its configurations and what to do with each.

    ``reuse(config, run)`` reads a finished child's row back (metrics, artifacts); ``run_one(config, child)``
    opens ``child.run(...)``, trains and tests in it and returns the row; ``conclude(rows, parent_run_id)``
    shapes the tables (called once every configuration has a row, with no run active, so it may start runs of
    its own);
    ``progress(row)`` is the scores part of the log line of each configuration.
    """

    configurations: Sequence[Config]
    name: Callable[[Config], str]
    key: Callable[[Config], str]
    reuse: Callable[[Config, Any], Row]
    run_one: Callable[[Config, Child], Row]
    conclude: Callable[[list[Row], str], Findings]
    progress: Callable[[Row], str]


@dataclass(frozen=True)
class StudyRun:
    parent_run_id: str
    rows: list[Row]
    findings: Findings
    report_path: Path
    n_runs: int  # trained in this run
    n_reused: int
    seconds: float


@dataclass(frozen=True)
class StudyParent:
    """The parent run of a study: one per settings and data (``key``), resumed by a re-run."""

    key: str
    params: Mapping[str, Any]
    inputs: Iterable[RunInput | None] = ()


def run_study(
    kind: StudyKind[Config],
    *,
    study: BaseModel,
    dataset: str,
    parent: StudyParent,
    layout: Layout,
    tracking: TrackingSettings,
    start: float,
) -> StudyRun:
    """Run (or reuse) every configuration of ``kind`` in one parent run, then log its findings and report.

    ``study``: the study's settings (``preset`` names the runs and the report; the report ends with them);
    ``start``: ``time.perf_counter()`` at the flow's start (the study's seconds include its feature steps).
    """
    preset = study.preset
    run_name = f"study-{preset}-{dataset}"
    with parent_run(
        tracking,
        "study",
        key=parent.key,
        run_name=run_name,
        params=parent.params,
        tags={"mirflow.preset": preset, "mirflow.dataset": dataset},
        inputs=parent.inputs,
    ) as (run, resumed):
        parent_id = run.info.run_id
        reuse = finished_children(tracking, parent_id) if resumed else {}
        checkpoints = layout.checkpoints("study") / parent_id
        rows = []
        for i, config in enumerate(kind.configurations, start=1):
            name, key = kind.name(config), kind.key(config)
            if key in reuse:
                row = {**kind.reuse(config, reuse[key]), "seconds": 0.0, "reused": True}
            else:
                began = time.perf_counter()
                row = kind.run_one(config, Child(name, key, checkpoints / key, tracking))
                row = {**row, "seconds": time.perf_counter() - began, "reused": False}
            rows.append(row)
            when = "reused" if row["reused"] else f"{row['seconds']:.0f} s"
            log.info("study %s %d/%d %s: %s (%s)", preset, i, len(kind.configurations), name, kind.progress(row), when)
    # Shaped with no run active: a kind may start runs of its own here (the transfer study's transfer run).
    findings = kind.conclude(rows, parent_id)
    n_reused = sum(1 for row in rows if row["reused"])
    summary = Summary(run_id=parent_id, n_rows=len(rows), n_reused=n_reused, seconds=time.perf_counter() - start)
    with parent_run(tracking, "study", key=parent.key, run_name=run_name, params=parent.params) as _:
        report = _log_findings(findings, rows, summary, study=study, dataset=dataset, layout=layout)
    return StudyRun(
        parent_run_id=parent_id,
        rows=rows,
        findings=findings,
        report_path=report,
        n_runs=len(rows) - n_reused,
        n_reused=n_reused,
        seconds=summary.seconds,
    )


def _log_findings(
    findings: Findings, rows: list[Row], summary: Summary, *, study: BaseModel, dataset: str, layout: Layout
) -> Path:
    """Tables, tags, metrics, plots and the markdown report into the active parent run; the report's path."""
    for artifact, table in findings.tables.items():
        log_table_replacing(table, artifact)  # a resumed parent replaces its tables, never appends to them
    log_table_replacing(runs_table(rows), "study_runs.json")
    for name, value in findings.tags.items():
        mlflow.set_tag(name, value)
    mlflow.log_metrics({**findings.metrics, "study_seconds": summary.seconds, "children_reused": summary.n_reused})
    if findings.plots is not None:
        with tempfile.TemporaryDirectory() as tmp:
            findings.plots(Path(tmp))
            mlflow.log_artifacts(tmp, artifact_path="plots")
    report = layout.reports() / f"study-{study.preset}-{summary.run_id}.md"
    write_text(
        report,
        study_report(f"Study {study.preset} on {dataset}", findings.report(summary), study.model_dump_json(indent=1)),
    )
    mlflow.log_artifact(str(report))
    return report


def downloaded(tracking: TrackingSettings, run: Any, artifact: str, read: Callable[[Path], Any]) -> Any:
    """``read`` of one artifact of a finished run, downloaded into a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=artifact, dst_path=tmp, tracking_uri=tracking.tracking_uri
        )
        return read(Path(path))


@contextmanager
def study_cluster(
    layout: Layout, dataset: str, cluster: ClusterSettings, *, world: WorldSettings | None, n_tags: int
) -> Iterator[ClusterSettings]:
    """One Dask cluster for a study's feature steps, with the catalogue ready: the synthetic world built and
    ingested (top ``n_tags`` tags), or another dataset's catalogue checked. Yields the settings that reach it."""
    with dask_client(cluster) as client:
        shared = shared_settings(client, cluster)
        if dataset == "synthetic":
            root = synthetic_world(layout.world(), world or WorldSettings(), shared)
            ingest_mtat(
                root / "mtat" / "annotations_final.csv", root / "mtat" / "audio", n_tags, layout.tracks(dataset)
            )
        elif not layout.tracks(dataset).exists():
            raise DatasetError(f"no catalogue {dataset!r} under {layout.root}: run `mirflow features` for it first")
        yield shared


def listening_files(layout: Layout, dataset: str, triplets: tuple[Path, ...]) -> list[Path]:
    """The listening files of a study: the synthetic world's batches, or ``triplets`` for another catalogue."""
    if dataset == "synthetic" and not triplets:
        return sorted((layout.world() / "taste_profile").glob("train_triplets.batch-*.txt"))
    if not triplets:
        raise ParameterError(f"dataset {dataset!r}: pass its listening data (--triplets, Taste Profile files)")
    return list(triplets)
