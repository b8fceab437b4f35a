"""The feature flow on a real Dask cluster and a Prefect test server: incremental runs, a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from distributed import Client, LocalCluster
from mlflow.tracking import MlflowClient

from core.layout import Layout
from core.settings import ClusterSettings, FeatureSettings, MelSettings
from flows.features import extract_features
from infra.tracking import tracking_for
from tasks.shards import read_audio, read_features, read_manifest

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("prefect_server")]  # every test here runs flows


@pytest.fixture(scope="module")
def prefect_server():
    """This module's own Prefect server, not the session's: the first test reads the progress artifacts back by
    key, and every feature run of the other modules writes one under the same key."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


def _catalogue(folder, n: int, *, start: int = 0, seconds: float = 2.0) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + n):
        t = np.arange(int(16000 * seconds)) / 16000
        path = folder / f"clip{i:04d}.wav"
        sf.write(path, 0.2 * np.sin(2 * np.pi * (150 + 7 * i) * t), 16000)
        rows.append({"track_id": f"c{i:04d}", "source_path": str(path), "split": "train", "tags": ["tone"]})
    return pd.DataFrame(rows)


def _write_tracks(data_dir, tracks: pd.DataFrame) -> None:
    path = Layout(data_dir).tracks("tones")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(tracks, preserve_index=False), path)


SETTINGS = FeatureSettings(
    mel=MelSettings(n_mels=32),
    extra_windows=(2048,),
    pyramid="both",
    pyramid_levels=3,
    files_per_task=8,
    audio_shards=True,
)


def test_one_percent_new_files_are_the_only_work(tmp_path):
    tracks = _catalogue(tmp_path / "audio", 100)
    tracking = tracking_for(tmp_path)
    cluster = ClusterSettings(n_workers=2)
    _write_tracks(tmp_path, tracks)
    first = extract_features(tmp_path, "tones", SETTINGS, cluster, tracking)
    assert (first.n_extracted, first.n_skipped, first.n_quarantined) == (100, 0, 0)

    _write_tracks(tmp_path, pd.concat([tracks, _catalogue(tmp_path / "audio", 1, start=100)], ignore_index=True))
    second = extract_features(tmp_path, "tones", SETTINGS, cluster, tracking)
    assert (second.n_extracted, second.n_skipped, second.n_tracks) == (1, 100, 101)

    feature_dir = Layout(tmp_path).features("tones", SETTINGS.feature_set)
    # 2 s at hop 512: 63 frames; the Gaussian pyramid halves them (ceil) per level, and the
    # top Laplacian level is the top Gaussian level.
    top = read_features(feature_dir, column="mel_1024_l2", track_ids=["c0100"])["c0100"]
    np.testing.assert_array_equal(top, read_features(feature_dir, column="mel_1024_g2", track_ids=["c0100"])["c0100"])
    assert top.shape == (16, 32)
    assert read_features(feature_dir, column="mel_2048", track_ids=["c0100"])["c0100"].shape == (63, 32)
    audio = read_audio(Layout(tmp_path).audio("tones"), track_ids=["c0000", "c0100"])
    assert set(audio) == {"c0000", "c0100"} and audio["c0100"].dtype == np.int16 and len(audio["c0100"]) == 32000
    runs = MlflowClient(tracking.tracking_uri).search_runs(
        [MlflowClient(tracking.tracking_uri).get_experiment_by_name("mirflow-features").experiment_id]
    )
    assert sorted(r.data.metrics["extracted"] for r in runs) == [1, 100]
    assert all(r.data.metrics["peak_worker_rss_mb"] > 50 for r in runs)
    artifacts = {a.key: a for a in _artifacts(["features-tones", "log-mel-features"])}
    assert artifacts["features-tones"].type == "table" and artifacts["log-mel-features"].type == "progress"
    assert artifacts["log-mel-features"].data == 100.0


def _artifacts(keys: list[str]):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))


@contextmanager
def kill_mid_run(feature_dir, pid: int, *, after_shards: int = 4, timeout: float = 120) -> Iterator[list[int]]:
    """While inside, a thread SIGKILLs ``pid`` once ``after_shards`` shards exist; the list gets the count it saw.

    Nothing is killed when the shards do not appear in time or the block ends first.
    """
    seen: list[int] = []
    done = threading.Event()

    def kill() -> None:
        deadline = time.monotonic() + timeout
        while len(list(feature_dir.glob("part-*.parquet"))) < after_shards:
            if done.is_set() or time.monotonic() > deadline:
                return
            time.sleep(0.05)
        seen.append(len(list(feature_dir.glob("part-*.parquet"))))
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=kill)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join()


def assert_every_track_once(feature_dir, tracks: pd.DataFrame) -> None:
    manifest = read_manifest(feature_dir).to_pandas()
    assert sorted(manifest["track_id"]) == sorted(tracks["track_id"])
    shard_ids = [
        t
        for p in feature_dir.glob("part-*.parquet")
        for t in pq.read_table(p, columns=["track_id"]).column(0).to_pylist()
    ]
    assert sorted(shard_ids) == sorted(tracks["track_id"])  # every track once, in complete shards
    assert not list(feature_dir.glob(".*.tmp"))


def test_a_killed_worker_costs_nothing_but_time(tmp_path):
    tracks = _catalogue(tmp_path / "audio", 96, seconds=3.0)
    _write_tracks(tmp_path, tracks)
    settings = SETTINGS.model_copy(update={"files_per_task": 2, "audio_shards": False})
    feature_dir = Layout(tmp_path).features("tones", settings.feature_set)
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster,
        Client(cluster) as client,
    ):
        pids = list(client.run(os.getpid).values())
        with kill_mid_run(feature_dir, pids[0], timeout=60) as shards_at_kill:
            summary = extract_features(
                tmp_path,
                "tones",
                settings,
                ClusterSettings(kind="address", address=cluster.scheduler_address),
                tracking_for(tmp_path),
            )
        assert shards_at_kill, "the worker was never killed"
        assert pids[0] not in client.run(os.getpid).values()  # the nanny started a new worker
    assert 4 <= shards_at_kill[0] < 48  # the kill came mid-run
    assert summary.n_tracks == 96 and summary.n_quarantined == 0
    assert_every_track_once(feature_dir, tracks)


@pytest.mark.realdata
def test_real_samples_go_through_the_adapters_and_the_flow(tmp_path, shared_data):
    from core.settings import SourceSettings
    from flows.features import catalogue_features

    gtzan = shared_data / "gtzan"
    manifest = tmp_path / "manifest.csv"
    paths = [
        *sorted((gtzan / "au").glob("*.au")),
        shared_data / "mtat" / "audio" / "e" / "joram-moments_of_clarity-08-solipsism-59-88.mp3",
        shared_data / "msd" / "TRWJAZW128F42760DD.mp3",
    ]
    pd.DataFrame(
        {
            "track_id": [p.stem for p in paths],
            "path": [str(p) for p in paths],
            "tags": ["real"] * len(paths),
            "split": "test",
        }
    ).to_csv(manifest, index=False)
    settings = FeatureSettings(mel=MelSettings(sample_rate=22050), extra_windows=(8192,), pyramid="laplacian")
    cluster, tracking = ClusterSettings(n_workers=2), tracking_for(tmp_path)
    via_manifest = catalogue_features(
        tmp_path, "real-manifest", SourceSettings(adapter="manifest", path=manifest), settings, cluster, tracking
    )
    via_gtzan = catalogue_features(
        tmp_path,
        "real-gtzan",
        SourceSettings(adapter="gtzan", path=gtzan / "wav", split_dir=gtzan / "splits"),
        settings,
        cluster,
        tracking,
    )
    assert (via_manifest.n_tracks, via_manifest.n_quarantined) == (12, 0)
    assert (via_gtzan.n_tracks, via_gtzan.n_quarantined) == (10, 0)
    layout = Layout(tmp_path)
    au = read_features(
        layout.features("real-manifest", settings.feature_set), column="mel_1024", track_ids=["blues.00000"]
    )["blues.00000"]
    wav = read_features(
        layout.features("real-gtzan", settings.feature_set), column="mel_1024", track_ids=["blues.00000"]
    )["blues.00000"]
    np.testing.assert_allclose(au.astype(np.float32), wav.astype(np.float32), atol=0.02)  # same samples, two formats
    tracks = pq.read_table(layout.tracks("real-gtzan")).to_pandas()
    assert set(tracks["split"]) <= {"train", "valid", "test"} and (tracks["duration_s"] > 29).all()
