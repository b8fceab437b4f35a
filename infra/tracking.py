"""MLflow tracking: one sqlite store, one experiment per model family.

Every run carries the full settings as params, the git commit, and the Prefect
flow-run id when there is one, so that a run in the UI can be traced back to the
code and the orchestration that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from infra.settings import TrackingSettings

log = logging.getLogger("mirflow")
# MLflow rejects param values longer than this; longer ones are cut with a marker.
MAX_PARAM_LENGTH = 6000


def tracking_for(data_dir: Path) -> TrackingSettings:
    """The default store: sqlite and artifacts under the project's data folder."""
    data_dir = Path(data_dir).resolve()
    return TrackingSettings(
        tracking_uri=f"sqlite:///{data_dir / 'mlflow.db'}",
        artifact_root=(data_dir / "mlartifacts").as_uri(),
    )


def experiment_id(settings: TrackingSettings, family: str) -> str:
    """Id of the experiment ``<prefix>-<family>``, created with its artifact location if needed."""
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = f"{settings.experiment_prefix}-{family}"
    client = MlflowClient(settings.tracking_uri)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    if settings.artifact_root is None:
        return client.create_experiment(name)
    return client.create_experiment(name, artifact_location=f"{settings.artifact_root}/{name}")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def prefect_flow_run_id() -> str | None:
    try:
        from prefect.context import FlowRunContext
    except ImportError:
        return None
    context = FlowRunContext.get()
    return str(context.flow_run.id) if context and context.flow_run else None


def file_sha1(path: Path) -> str | None:
    """Hash of a data file (a feature manifest, a factor table) for run provenance; None if absent."""
    from tasks.shards import content_sha1

    try:
        return content_sha1(path)
    except OSError:
        return None


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = str(value)
        out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


COMPLETE_TAG = "mirflow.complete"  # set last, when a run's block ended without an error
RUN_KEY_TAG = "mirflow.run_key"


@contextmanager
def tracked_run(
    settings: TrackingSettings,
    family: str,
    *,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    resume_key: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run in the family's experiment with params and provenance tags.

    With ``resume_key``, the newest run of that key that did not complete (killed, or
    ended by an error) is continued instead: same run id, so same checkpoint folder,
    and a training run resumes from its ``last.ckpt``. The run is tagged complete last.
    """
    exp_id = experiment_id(settings, family)
    if resume_key is not None:
        unfinished = _unfinished(settings, exp_id, f"tags.`{RUN_KEY_TAG}` = '{resume_key}'")
        if unfinished is not None:
            with mlflow.start_run(run_id=unfinished) as run:
                log.info("resuming MLflow run %s (%s, not completed before)", unfinished, run_name)
                if flow_run := prefect_flow_run_id():
                    mlflow.set_tag("prefect.flow_run_id", flow_run)
                yield run
                mlflow.set_tag(COMPLETE_TAG, "true")
            return
    run_tags = {"mirflow.family": family}
    if commit := git_commit():
        run_tags["mlflow.source.git.commit"] = commit
    if flow_run := prefect_flow_run_id():
        run_tags["prefect.flow_run_id"] = flow_run
    if resume_key is not None:
        run_tags[RUN_KEY_TAG] = resume_key
    run_tags.update({key: str(value) for key, value in (tags or {}).items()})
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=run_tags) as run:
        mlflow.log_params(_params(params))
        yield run
        mlflow.set_tag(COMPLETE_TAG, "true")


def _unfinished(settings: TrackingSettings, experiment: str, filter_string: str) -> str | None:
    """The newest run matching ``filter_string`` that was never tagged complete, if any."""
    client = MlflowClient(settings.tracking_uri)
    runs = client.search_runs([experiment], filter_string=filter_string, order_by=["attributes.start_time DESC"],
                              max_results=1)
    if runs and runs[0].data.tags.get(COMPLETE_TAG) != "true":
        return runs[0].info.run_id
    return None


def run_key(*parts: Any) -> str:
    """A stable key of what a run computes (settings, data fingerprints): re-runs of it share the key."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextmanager
def parent_run(
    settings: TrackingSettings,
    family: str,
    *,
    key: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
    """The parent run of a study: the newest run of the family's experiment tagged ``mirflow.study_key=key``
    is resumed (its finished children are reused), else a new one is started.

    Yields ``(run, resumed)``.
    """
    exp_id = experiment_id(settings, family)
    client = MlflowClient(settings.tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.`mirflow.study_key` = '{key}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        with mlflow.start_run(run_id=found[0].info.run_id) as run:
            if flow_run := prefect_flow_run_id():
                mlflow.set_tag("prefect.flow_run_id", flow_run)
            yield run, True
        return
    with tracked_run(settings, family, run_name=run_name, params=params,
                     tags={**(tags or {}), "mirflow.study_key": key}) as run:
        yield run, False




def finished_children(settings: TrackingSettings, parent_run_id: str) -> dict[str, Any]:
    """``{mirflow.config_key: run}`` of the parent's nested runs that completed (the newest of each key).

    Complete means :func:`child_run`'s block ended without an error: a run that a
    logger marked FINISHED but that was killed before its last artifact is not reused.
    """
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
                                            f"tags.`{COMPLETE_TAG}` = 'true'",
                              order_by=["attributes.start_time ASC"], max_results=10_000)
    return {run.data.tags["mirflow.config_key"]: run for run in runs if "mirflow.config_key" in run.data.tags}


def log_table_replacing(frame, artifact_file: str) -> None:
    """``mlflow.log_table`` into the active run, replacing (not appending to) a table logged there before.

    A resumed study logs its tables again; ``log_table`` alone would double their rows.
    """
    import tempfile

    run = mlflow.active_run()
    existing = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, str(Path(artifact_file).parent)
                                                              if "/" in artifact_file else None)}
    if artifact_file not in existing:
        mlflow.log_table(frame, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same JSON layout log_table writes
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(frame.to_json(orient="split", index=False))
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent) if "/" in artifact_file else None)


@contextmanager
def child_run(*, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str],
              settings: TrackingSettings) -> Iterator[mlflow.ActiveRun]:
    """A nested run under the active (parent) run, in its experiment, with params and tags; tagged complete last.

    With a ``mirflow.config_key`` tag, a child of that key that did not complete (a
    killed study) is continued instead of started anew.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("child_run needs an active parent run")
    key = tags.get("mirflow.config_key")
    if key is not None:
        unfinished = _unfinished(settings, parent.info.experiment_id,
                                 f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                 f"tags.`mirflow.config_key` = '{key}'")
        if unfinished is not None:
            with mlflow.start_run(run_id=unfinished, nested=True) as run:
                log.info("resuming child run %s (%s)", unfinished, run_name)
                yield run
                mlflow.set_tag(COMPLETE_TAG, "true")
            return
    run_tags = {"mirflow.family": parent.data.tags.get("mirflow.family", ""), **{k: str(v) for k, v in tags.items()}}
    if commit := git_commit():
        run_tags["mlflow.source.git.commit"] = commit
    with mlflow.start_run(run_name=run_name, nested=True, experiment_id=parent.info.experiment_id,
                          tags=run_tags) as run:
        mlflow.log_params(_params(params))
        yield run
        mlflow.set_tag(COMPLETE_TAG, "true")
