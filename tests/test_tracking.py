"""Lineage in MLflow: run inputs as datasets with content digests, and experiment descriptions.

A real MLflow sqlite store in ``tmp_path``; tiny tables written the way the flows write them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient

from infra.tracking import (
    DESCRIPTION_TAG,
    FAMILY_DESCRIPTIONS,
    experiment_id,
    features_input,
    files_input,
    listening_input,
    run_inputs,
    tracked_run,
    tracking_for,
    tracks_input,
)
from tasks.shards import MANIFEST, write_manifest, write_table_atomic

FLOWS = Path(__file__).resolve().parents[1] / "flows"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow sqlite store for the module (creating one takes seconds); tests keep to their own runs."""
    return tracking_for(tmp_path_factory.mktemp("mlflow"))


def _catalogue(root: Path, *, tags_of_b: tuple[str, ...] = ("rock",), sha1_of_b: str = "bb", reverse: bool = False):
    """A tracks table and a feature manifest of two tracks under ``root``; ``reverse`` writes the rows the other
    way round. Paths, sizes and times differ with ``root``; the content only with the keyword values."""
    rows = [("a", "train", ["piano"], "aa"), ("b", "test", list(tags_of_b), sha1_of_b)]
    rows = rows[::-1] if reverse else rows
    tracks = pd.DataFrame(
        {
            "track_id": [r[0] for r in rows],
            "source_path": [str(root / f"{r[0]}.mp3") for r in rows],
            "split": [r[1] for r in rows],
            "tags": [r[2] for r in rows],
        }
    )
    tracks_path = write_table_atomic(pa.Table.from_pandas(tracks, preserve_index=False), root / "tracks" / "x.parquet")
    feature_dir = root / "features" / "x" / "logmel-test"
    write_manifest(
        feature_dir,
        [
            {
                "track_id": t,
                "content_sha1": sha1,
                "shard": f"part-{root.name}.parquet",
                "n_frames": 10,
                "settings_hash": "s1",
                "duration_s": 1.0,
                "sample_rate": 22050,
                "source_path": str(root / f"{t}.mp3"),
                "source_size": len(str(root)),
                "source_mtime_ns": hash(str(root)) & 0xFFFF,
            }
            for t, _, _, sha1 in rows
        ],
    )
    return tracks_path, feature_dir


def _batch(listening_dir: Path, batch: str, sha1: str, events: int = 3) -> None:
    """The record ingestion leaves for a batch (``events/batch=<id>/_source.json``)."""
    folder = listening_dir / "events" / f"batch={batch}"
    folder.mkdir(parents=True)
    (folder / "_source.json").write_text(json.dumps({"batch": batch, "sha1": sha1, "events": events}))


def test_runs_on_the_same_data_show_the_same_digests_and_other_data_others(tmp_path, store):
    tracking = store
    listening = tmp_path / "listening"
    _batch(listening, "b1", "1" * 40)
    _batch(listening, "b2", "2" * 40)
    _batch(listening, "renamed", "1" * 40)
    _batch(listening, "b3", "3" * 40)

    def run(root: Path, batches: list[str], **content) -> dict[str, tuple[str, str]]:
        tracks_path, feature_dir = _catalogue(root, **content)
        inputs = [features_input(feature_dir, "x"), tracks_input(tracks_path, "x"), listening_input(listening, batches)]
        with tracked_run(tracking, "tagger", run_name="t", params={}, inputs=inputs) as active:
            pass
        return run_inputs(MlflowClient(tracking.tracking_uri).get_run(active.info.run_id))

    first = run(tmp_path / "one", ["b1", "b2"])
    assert first.keys() == {"features/x/logmel-test", "tracks/x", "listening"}
    assert [context for _, context in first.values()] == ["training", "tracks", "training"]
    assert all(re.fullmatch(r"[0-9a-f]{12}", digest) for digest, _ in first.values())
    # The same content elsewhere, rows in another order, batches in another order or renamed: the same digests.
    assert run(tmp_path / "two", ["b2", "b1"], reverse=True) == first
    assert run(tmp_path / "three", ["renamed", "b2"]) == first
    # Other content: another digest for that input only.
    other = run(tmp_path / "four", ["b1", "b3"], tags_of_b=("jazz",), sha1_of_b="cc")
    assert {name: other[name][0] != first[name][0] for name in first} == {
        "features/x/logmel-test": True,
        "tracks/x": True,
        "listening": True,
    }
    audio_only = run(tmp_path / "five", ["b1", "b2"], sha1_of_b="cc")
    assert audio_only["tracks/x"] == first["tracks/x"]  # the audio's content is the features' digest
    assert audio_only["features/x/logmel-test"] != first["features/x/logmel-test"]


def test_a_resumed_run_logs_its_inputs_once_and_files_are_hashed_by_content(tmp_path, store):
    tracking = store
    tracks_path, feature_dir = _catalogue(tmp_path)
    copy = tmp_path / "elsewhere" / "manifest.parquet"
    copy.parent.mkdir()
    copy.write_bytes((feature_dir / MANIFEST).read_bytes())
    inputs = [tracks_input(tracks_path, "x"), files_input({"m": feature_dir / MANIFEST}, name="m", context="output")]
    with (
        pytest.raises(RuntimeError),
        tracked_run(tracking, "tagger", run_name="t", params={}, inputs=inputs, resume_key="k") as first,
    ):
        raise RuntimeError("killed")
    with tracked_run(tracking, "tagger", run_name="t", params={}, inputs=inputs, resume_key="k") as again:
        pass
    assert again.info.run_id == first.info.run_id
    assert len(MlflowClient(tracking.tracking_uri).get_run(first.info.run_id).inputs.dataset_inputs) == 2
    assert files_input({"m": copy}, name="m", context="output").digest == inputs[1].digest
    copy.write_bytes(copy.read_bytes() + b"\0")
    assert files_input({"m": copy}, name="m", context="output").digest != inputs[1].digest


def test_every_family_has_a_description_and_a_users_edit_is_kept(store):
    tracking = store.model_copy(update={"experiment_prefix": "described"})  # experiments of its own
    client = MlflowClient(tracking.tracking_uri)
    used = set()
    for path in FLOWS.glob("*.py"):  # every family a flow opens runs in
        used |= set(re.findall(r'(?:tracked_run|parent_run|mlflow_logger)\(\s*[\w.]+,\s*"([a-z-]+)"', path.read_text()))
    assert {"features", "tagger", "wmf", "study", "pipeline"} <= used <= FAMILY_DESCRIPTIONS.keys()
    older = client.create_experiment("described-embed")  # made before experiments had descriptions
    for family, description in FAMILY_DESCRIPTIONS.items():
        experiment = client.get_experiment(experiment_id(tracking, family))
        assert experiment.tags[DESCRIPTION_TAG] == description and description.startswith("**")
    assert experiment_id(tracking, "embed") == older
    # A description edited in the UI stays.
    tagger = experiment_id(tracking, "tagger")
    client.set_experiment_tag(tagger, DESCRIPTION_TAG, "my notes")
    assert experiment_id(tracking, "tagger") == tagger
    assert client.get_experiment(tagger).tags[DESCRIPTION_TAG] == "my notes"


_RESUME_CHECK = """
import sys
import mlflow
from infra.tracking import _resume

mlflow.set_tracking_uri(sys.argv[1])
client = mlflow.MlflowClient()
ours, theirs = client.create_experiment("mirflow-study"), client.create_experiment("theirs")
with mlflow.start_run(experiment_id=ours) as parent:
    with mlflow.start_run(experiment_id=ours, nested=True) as child:
        pass
mlflow.set_experiment(experiment_id=theirs)  # what a notebook user might have done before
with _resume(parent.info.run_id) as resumed:
    with _resume(child.info.run_id, nested=True) as resumed_child:
        assert resumed_child.info.run_id == child.info.run_id
    assert resumed.info.run_id == parent.info.run_id
# ...and the caller's active experiment is left as the caller set it.
with mlflow.start_run() as theirs_run:
    assert theirs_run.info.experiment_id == theirs
print("resumed")
"""


def test_a_run_is_resumed_whatever_experiment_the_caller_made_active(tmp_path):
    """MLflow refuses to resume a run of another experiment than the process's active one; a caller's own
    ``mlflow.set_experiment`` must not break a study's or a training run's resumption. (In a process of its
    own: an active experiment cannot be unset, and it would leak into the tests after this one.)"""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _RESUME_CHECK, f"sqlite:///{tmp_path / 'mlflow.db'}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and "resumed" in done.stdout, done.stderr[-2000:]
