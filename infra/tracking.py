"""MLflow tracking: one sqlite store, one experiment per model family.

Every run carries the full settings as params, the git commit, and the Prefect
flow-run id when there is one, so that a run in the UI can be traced back to the
code and the orchestration that made it; and its inputs as MLflow datasets (the
UI's Dataset column), each with a digest of its content, so that it can be traced
back to the data: two runs on the same data show the same digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.dataset_source_registry import get_registered_sources, resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.tracking import MlflowClient, fluent

from core import storage
from core.settings import TrackingSettings

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


# The experiment tag MLflow shows (and edits) as the description on an experiment's page.
DESCRIPTION_TAG = "mlflow.note.content"
# What each family's experiment holds, for its page in the MLflow UI (markdown).
FAMILY_DESCRIPTIONS = {
    "features": (
        "**Log-mel feature extraction** (`mirflow features`, `flows/features.py`): audio files to log-mel "
        "Parquet shards on the Dask cluster, incrementally. One run per call: settings, tracks extracted, "
        "skipped (already present) and quarantined, clips/s, peak worker memory. Inputs: the tracks table; "
        "the feature manifest it leaves is logged with context `output`."
    ),
    "kmeans-features": (
        "**Spherical K-means features** (`flows/kmeans_features.py`): a codebook per timescale fitted on the "
        "training split of the log-mel features, then one pooled vector per clip and timescale. Codebooks "
        "and their means as artifacts. Inputs: the log-mel feature manifest and the tracks table; the K-means "
        "manifest it leaves is logged with context `output`."
    ),
    "tagger": (
        "**Auto-tagger** (`flows/training.py`): the 2014 spectrogram convnet (or the short-chunk ResNet) "
        "trained on log-mel crops to predict the top tags; ROC-AUC and PR-AUC per epoch and on the test split, "
        "per-tag table, ROC curves, checkpoint, and the model (`mirflow-tagger`). Inputs: the feature "
        "manifest (`training`) and the tracks table (labels and split)."
    ),
    "latent-factors": (
        "**Latent-factor CNN** (`flows/training.py`, NIPS 2013): a CNN regressing the WMF item factors from "
        "log-mel, scored by ranking held-out tracks for every user (cold start, mAP@k, AUC). Checkpoint, "
        "t-SNE plots and the model (`mirflow-latent-factor-cnn`). Inputs: the feature manifest and the WMF "
        "factors (`training`), the tracks table."
    ),
    "wmf": (
        "**Weighted matrix factorization** of the listening data (`mirflow wmf`, `flows/listening.py`, "
        "implicit ALS): fit runs (full, or incremental on new batches) with factors and id maps as artifacts "
        "and the model (`mirflow-wmf`), and evaluation runs against popularity and random rankings. Inputs: "
        "the ingested listening batches (digest of their files' content) and the held-out items."
    ),
    "study": (
        "**Studies** (`mirflow study`, DESIGN.md §8): one parent run per study, settings and data, with the "
        "paper-shaped tables and the report; one nested child run per configuration (same split, same seed). "
        "Select the children and press Compare. Inputs: the features (log-mel or K-means), the WMF factors "
        "for recommendation, and the tracks table; each child logs the ones it trains on."
    ),
    "embed": (
        "**Embeddings** (`mirflow embed`, `flows/transfer.py`): a pre-trained source model applied to a "
        "catalogue (its log-mel and K-means features with the model's codebooks). Inputs: the K-means "
        "manifest and the tracks table; the embeddings file is logged with context `output`."
    ),
    "transfer": (
        "**Transfer** (`mirflow transfer`, ISMIR 2014): one simple classifier per feature set on a labelled "
        "target catalogue; the table, per-class scores and confusion matrices. Inputs: the target's tracks "
        "table and every feature set (manifests, embeddings files)."
    ),
    "retrain": (
        "**Retraining on new listening data** (`retrain-on-new-listening`): the WMF update, the fine-tuned "
        "CNN against the champion on the same held-out tracks, and the promotion decision. Inputs: the "
        "listening batches of the challenger (`training`) and the feature manifest both are scored on "
        "(`evaluation`)."
    ),
    "pipeline": (
        "**Pipeline summaries** (`make demo`, `mirflow pipeline`): one run per pipeline with the report and "
        "the headline metrics; tags point to the tagger, WMF and CNN runs. Inputs: the tracks table, the "
        "feature manifest and the listening batches."
    ),
}


def experiment_id(settings: TrackingSettings, family: str) -> str:
    """Id of the experiment ``<prefix>-<family>``, created with its artifact location and description if needed.

    An experiment without a description gets the family's; one that has a description
    (edited in the UI, say) keeps it.
    """
    mlflow.set_tracking_uri(settings.tracking_uri)
    name = f"{settings.experiment_prefix}-{family}"
    client = MlflowClient(settings.tracking_uri)
    description = FAMILY_DESCRIPTIONS.get(family)
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if description is not None and not existing.tags.get(DESCRIPTION_TAG):
            client.set_experiment_tag(existing.experiment_id, DESCRIPTION_TAG, description)
        return existing.experiment_id
    tags = {DESCRIPTION_TAG: description} if description is not None else None
    if settings.artifact_root is None:
        return client.create_experiment(name, tags=tags)
    return client.create_experiment(name, artifact_location=f"{settings.artifact_root}/{name}", tags=tags)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        )
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


# ----------------------------------------------------------------------------- inputs (MLflow datasets)

DIGEST_LENGTH = 12  # hex digits of a content SHA-1 shown as a dataset's digest (MLflow allows 36)
# The columns that are the data of a table, not where it lives: the digest reads only these.
TRACKS_COLUMNS = ("track_id", "split", "tags")  # the catalogue; its audio's content is in the features'
MANIFEST_COLUMNS = ("track_id", "content_sha1", "settings_hash")  # which audio, under which settings


@dataclass(frozen=True)
class RunInput:
    """A dataset a run reads, as MLflow's Dataset column shows it.

    ``digest`` is a function of the content only (never of paths or write times), so
    runs on the same data show the same digest; ``source`` is where it lives now.
    """

    name: str  # e.g. "features/synthetic/logmel-1a2b", "tracks/synthetic", "listening"
    digest: str
    source: str  # a path or URI
    context: str  # "training", "evaluation", "tracks", "output", ...
    profile: Mapping[str, Any] = field(default_factory=dict)  # shown beside it: rows, batches, file hashes


def table_input(
    path: Path, *, name: str, context: str, columns: tuple[str, ...], source: Path | None = None
) -> RunInput:
    """A Parquet table as a run input, its digest over ``columns`` (see :func:`tasks.shards.table_content_sha1`)."""
    from tasks.shards import table_content_sha1

    path = Path(path)
    return RunInput(
        name=name,
        digest=table_content_sha1(path, columns=columns)[:DIGEST_LENGTH],
        source=str(source or path),
        context=context,
        profile={"rows": storage.parquet_num_rows(path), "digest_of": ",".join(columns)},
    )


def tracks_input(path: Path, dataset: str, *, context: str = "tracks") -> RunInput:
    """The tracks table ``tracks/<dataset>.parquet``: ids, splits and tags (labels)."""
    return table_input(path, name=f"tracks/{dataset}", context=context, columns=TRACKS_COLUMNS)


def features_input(
    feature_dir: Path, dataset: str, *, context: str = "training", name: str | None = None, source: Path | None = None
) -> RunInput:
    """A feature set (log-mel or K-means shards) by its manifest: which clips' content, under which settings."""
    from tasks.shards import MANIFEST

    feature_dir = Path(feature_dir)
    return table_input(
        feature_dir / MANIFEST,
        name=name or f"features/{dataset}/{feature_dir.name}",
        context=context,
        columns=MANIFEST_COLUMNS,
        source=source or feature_dir,
    )


def listening_input(listening_dir: Path, batches: Iterable[str], *, context: str = "training") -> RunInput:
    """Ingested listening batches, by the content hashes of their source files (as recorded at ingestion).

    The digest is of the hashes sorted, so it does not depend on the batches' names or order.
    """
    from tasks.events import batch_record

    records = {batch: batch_record(listening_dir, batch) for batch in batches}
    digest = hashlib.sha1("\n".join(sorted(r["sha1"] for r in records.values())).encode()).hexdigest()
    return RunInput(
        name="listening",
        digest=digest[:DIGEST_LENGTH],
        source=str(listening_dir),
        context=context,
        profile={
            "batches": ",".join(records),
            "n_batches": len(records),
            "events": sum(int(r.get("events", 0)) for r in records.values()),
        },
    )


def files_input(files: Mapping[str, Path], *, name: str, context: str, source: Path | None = None) -> RunInput:
    """Files read whole (factor tables, embeddings), by the SHA-1 of each file's bytes; ``files``: label -> path."""
    from tasks.shards import content_sha1

    hashes = {label: content_sha1(path) for label, path in files.items()}
    digest = hashlib.sha1("\n".join(f"{label}:{h}" for label, h in sorted(hashes.items())).encode()).hexdigest()
    if source is None:
        source = next(iter(files.values())) if len(files) == 1 else Path(next(iter(files.values()))).parent
    return RunInput(
        name=name,
        digest=digest[:DIGEST_LENGTH],
        source=str(source),
        context=context,
        profile={f"{label}_sha1": h for label, h in hashes.items()},
    )


def wmf_factors_input(wmf: Any, *, context: str = "training") -> RunInput:
    """The WMF factors a model learns from and is scored with (a ``WMFOutput``): user, item, held-out item factors."""
    files = {
        n: Path(getattr(wmf, n)) for n in ("user_factors", "item_factors", "heldout_item_factors") if getattr(wmf, n)
    }
    return files_input(files, name="wmf-factors", context=context)


class InputDataset(MetaDataset):
    """An MLflow dataset of metadata only (name, digest, source) with a profile: the data stays where it is."""

    def __init__(self, source, *, name: str, digest: str, profile: Mapping[str, Any]):
        self._profile = dict(profile)
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def _dataset_source(uri: str):
    """MLflow's dataset source of a path or URI. A local path would match two alike sources (for the ``file``
    scheme and for none), and MLflow would warn on every run: the first is taken."""
    local = [s for s in get_registered_sources() if s._get_source_type() == "local"][:1]
    return resolve_dataset_source(uri, candidate_sources=local if "://" not in uri else None)


def log_inputs(inputs: Iterable[RunInput | None]) -> None:
    """Log ``inputs`` (None ones skipped) as MLflow datasets of the active run, each with its context.

    Logging the same dataset into a run again (a resumed run) adds nothing.
    """
    inputs = [item for item in inputs if item is not None]
    if not inputs:
        return
    datasets = [
        InputDataset(_dataset_source(item.source), name=item.name, digest=item.digest, profile=item.profile)
        for item in inputs
    ]
    mlflow.log_inputs(datasets=datasets, contexts=[item.context for item in inputs], tags_list=[None] * len(inputs))


def run_inputs(run) -> dict[str, tuple[str, str]]:
    """``{dataset name: (digest, context)}`` of an MLflow run's logged inputs (an ``mlflow.entities.Run``)."""
    return {
        i.dataset.name: (i.dataset.digest, {t.key: t.value for t in i.tags}.get("mlflow.data.context", ""))
        for i in run.inputs.dataset_inputs
    }


def _params(params: Mapping[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = str(value)
        out[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return out


COMPLETE_TAG = "mirflow.complete"  # set last, when a run's block ended without an error
RUN_KEY_TAG = "mirflow.run_key"


def _resume(run_id: str, *, nested: bool = False) -> mlflow.ActiveRun:
    """``mlflow.start_run`` of an existing run, whatever experiment the process made active.

    MLflow refuses to resume a run of another experiment than the process's active one, set by any
    earlier ``mlflow.set_experiment`` (a caller's, in a notebook or a test). Setting ours instead would
    leak into the caller's later runs, and MLflow has no public way to unset it: the check is passed
    by clearing the active experiment for this one call and putting the caller's back at once.
    """
    saved = fluent._active_experiment_id
    fluent._active_experiment_id = None
    try:
        return mlflow.start_run(run_id=run_id, nested=nested)
    finally:
        fluent._active_experiment_id = saved


@contextmanager
def tracked_run(
    settings: TrackingSettings,
    family: str,
    *,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    resume_key: str | None = None,
    inputs: Iterable[RunInput | None] = (),
) -> Iterator[mlflow.ActiveRun]:
    """Start an MLflow run in the family's experiment with params, provenance tags and ``inputs`` (datasets).

    With ``resume_key``, the newest run of that key that did not complete (killed, or
    ended by an error) is continued instead: same run id, so same checkpoint folder,
    and a training run resumes from its ``last.ckpt``. The run is tagged complete last.
    """
    exp_id = experiment_id(settings, family)
    if resume_key is not None:
        unfinished = _unfinished(settings, exp_id, f"tags.`{RUN_KEY_TAG}` = '{resume_key}'")
        if unfinished is not None:
            with _resume(unfinished) as run:
                log.info("resuming MLflow run %s (%s, not completed before)", unfinished, run_name)
                if flow_run := prefect_flow_run_id():
                    mlflow.set_tag("prefect.flow_run_id", flow_run)
                log_inputs(inputs)
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
        log_inputs(inputs)
        yield run
        mlflow.set_tag(COMPLETE_TAG, "true")


def _unfinished(settings: TrackingSettings, experiment: str, filter_string: str) -> str | None:
    """The newest run matching ``filter_string`` that was never tagged complete, if any."""
    client = MlflowClient(settings.tracking_uri)
    runs = client.search_runs(
        [experiment], filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=1
    )
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
    inputs: Iterable[RunInput | None] = (),
) -> Iterator[tuple[mlflow.ActiveRun, bool]]:
    """The parent run of a study: the newest run of the family's experiment tagged ``mirflow.study_key=key``
    is resumed (its finished children are reused), else a new one is started; ``inputs`` are logged into it.

    Yields ``(run, resumed)``.
    """
    exp_id = experiment_id(settings, family)
    client = MlflowClient(settings.tracking_uri)
    found = client.search_runs(
        [exp_id],
        filter_string=f"tags.`mirflow.study_key` = '{key}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if found:
        with _resume(found[0].info.run_id) as run:
            if flow_run := prefect_flow_run_id():
                mlflow.set_tag("prefect.flow_run_id", flow_run)
            log_inputs(inputs)
            yield run, True
        return
    with tracked_run(
        settings,
        family,
        run_name=run_name,
        params=params,
        tags={**(tags or {}), "mirflow.study_key": key},
        inputs=inputs,
    ) as run:
        yield run, False


def finished_children(settings: TrackingSettings, parent_run_id: str) -> dict[str, Any]:
    """``{mirflow.config_key: run}`` of the parent's nested runs that completed (the newest of each key).

    Complete means :func:`child_run`'s block ended without an error: a run that a
    logger marked FINISHED but that was killed before its last artifact is not reused.
    """
    client = MlflowClient(settings.tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{COMPLETE_TAG}` = 'true'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    return {run.data.tags["mirflow.config_key"]: run for run in runs if "mirflow.config_key" in run.data.tags}


def log_table_replacing(frame, artifact_file: str) -> None:
    """``mlflow.log_table`` into the active run, replacing (not appending to) a table logged there before.

    A resumed study logs its tables again; ``log_table`` alone would double their rows.
    """
    import tempfile

    run = mlflow.active_run()
    existing = {
        a.path
        for a in MlflowClient().list_artifacts(
            run.info.run_id, str(Path(artifact_file).parent) if "/" in artifact_file else None
        )
    }
    if artifact_file not in existing:
        mlflow.log_table(frame, artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:  # the same JSON layout log_table writes
        path = Path(tmp) / Path(artifact_file).name
        storage.write_text(path, frame.to_json(orient="split", index=False), durable=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent) if "/" in artifact_file else None)


@contextmanager
def child_run(
    *,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
    settings: TrackingSettings,
    inputs: Iterable[RunInput | None] = (),
) -> Iterator[mlflow.ActiveRun]:
    """A nested run under the active (parent) run, in its experiment, with params, tags and ``inputs`` (datasets);
    tagged complete last.

    With a ``mirflow.config_key`` tag, a child of that key that did not complete (a
    killed study) is continued instead of started anew.
    """
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("child_run needs an active parent run")
    key = tags.get("mirflow.config_key")
    if key is not None:
        unfinished = _unfinished(
            settings,
            parent.info.experiment_id,
            f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`mirflow.config_key` = '{key}'",
        )
        if unfinished is not None:
            with _resume(unfinished, nested=True) as run:
                log.info("resuming child run %s (%s)", unfinished, run_name)
                log_inputs(inputs)
                yield run
                mlflow.set_tag(COMPLETE_TAG, "true")
            return
    run_tags = {"mirflow.family": parent.data.tags.get("mirflow.family", ""), **{k: str(v) for k, v in tags.items()}}
    if commit := git_commit():
        run_tags["mlflow.source.git.commit"] = commit
    with mlflow.start_run(
        run_name=run_name, nested=True, experiment_id=parent.info.experiment_id, tags=run_tags
    ) as run:
        mlflow.log_params(_params(params))
        log_inputs(inputs)
        yield run
        mlflow.set_tag(COMPLETE_TAG, "true")
