"""mirflow as a service, on real servers started by the tests: `make serve`, deployments, retraining, Dask's CLI.

The service tests are one scenario, run in file order on one service. The module starts `make serve` once (Prefect server, work pool and worker, MLflow server,
Dask scheduler and workers, on free ports, deployments from the real prefect.yaml), runs
the pipeline and `retrain-on-new-listening` through `prefect deployment run`, and at the
end stops it with SIGINT and checks that none of its processes is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from distributed import Client
from mlflow.tracking import MlflowClient

from core.layout import Layout
from infra.registry import CHAMPION, LATENT_FACTOR_CNN, TAGGER, WMF
from mirflow.stack import SERVICE_ID, free_ports, service_processes
from tests.test_feature_flow import _catalogue, assert_every_track_once, kill_mid_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORLD = {"tracks": 128, "users": 400, "clip_seconds": 5.0, "epochs": 4, "initial_batches": 2}


class Service:
    """A `make serve` process group and what it printed."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.service_id = uuid.uuid4().hex
        prefect, mlflow_port, dask, dashboard, web = free_ports(5)
        args = (
            f"--prefect-port {prefect} --mlflow-port {mlflow_port} --dask-port {dask} "
            f"--dashboard-port {dashboard} --web-port {web} --workers 2 --paused-schedules"
        )
        self.env = {
            **os.environ,
            SERVICE_ID: self.service_id,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        }
        self.log = data_dir / "make-serve.log"
        self.out = open(self.log, "wb")
        self.process = subprocess.Popen(
            ["make", "-s", "-C", str(ROOT), "serve", f"DATA_DIR={data_dir}", f"SERVE_ARGS={args}"],
            env=self.env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.urls: dict[str, str] = {}

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace")
            if "mirflow is serving" in text and "logs" in text.split("mirflow is serving")[1]:
                printed = text.split("mirflow is serving")[1]  # the URL table, not the start-up lines
                for name in ("Prefect UI", "MLflow UI", "Dask dashboard", "web demo"):
                    self.urls[name] = re.search(rf"{name}\s+(\S+)", printed).group(1)
                return
            if self.process.poll() is not None:
                pytest.fail(f"make serve exited with {self.process.returncode}:\n{text[-3000:]}")
            time.sleep(0.5)
        pytest.fail(f"make serve did not get ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def prefect(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "prefect"), *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def run_deployment(self, name: str, **params) -> str:
        """Run a deployment to its end with `prefect deployment run --watch`; returns its final state name."""
        argv = ["deployment", "run", f"mirflow/{name}", "--watch"]
        for key, value in params.items():
            argv += ["--param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        done = self.prefect(*argv)
        match = re.search(r"Flow run finished (?:successfully )?in (?:state )?'(\w+)'", done.stdout)
        assert match, f"no final state in:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return match.group(1)

    def stop(self) -> int:
        os.killpg(self.process.pid, signal.SIGINT)  # what Ctrl-C does to the foreground group
        try:
            return self.process.wait(timeout=120)
        finally:
            self.out.close()


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    service = Service(tmp_path_factory.mktemp("service"))
    try:
        service.wait_ready()
        yield service
    finally:
        if service.process.poll() is None:
            service.stop()
        for pid in service_processes(service.service_id):  # never leave a stray server behind a failed test
            os.kill(pid, signal.SIGKILL)


def _registry(service: Service) -> MlflowClient:
    # Both URIs explicit: other tests in this process may have set a global registry URI.
    return MlflowClient(tracking_uri=service.urls["MLflow UI"], registry_uri=service.urls["MLflow UI"])


def _versions(service: Service, name: str) -> list:
    return sorted(_registry(service).search_model_versions(f"name='{name}'"), key=lambda mv: int(mv.version))


def _champion(service: Service, name: str) -> str:
    return str(_registry(service).get_model_version_by_alias(name, CHAMPION).version)


def _latest_decision(service: Service) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: service.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-on-new-listening"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    return found[0].data


def test_every_printed_url_answers(service):
    for name, url in service.urls.items():
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200, name
    assert all("127.0.0.1" in url for url in service.urls.values())


def test_a_second_make_serve_says_one_is_running_and_exits(service):
    done = subprocess.run(
        ["make", "-s", "-C", str(ROOT), "serve", f"DATA_DIR={service.data_dir}"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "already running" in done.stdout + done.stderr and service.urls["Prefect UI"] in done.stdout + done.stderr
    assert service.process.poll() is None  # the first one is untouched


def test_the_pipeline_deployment_registers_a_champion_of_every_family(service):
    assert service.run_deployment("pipeline", **WORLD) == "Completed"
    for name in (TAGGER, WMF, LATENT_FACTOR_CNN):
        assert [int(mv.version) for mv in _versions(service, name)] == [1], name
        assert _champion(service, name) == "1"
    cnn = _versions(service, LATENT_FACTOR_CNN)[0]
    assert cnn.tags["mirflow.wmf_version"] == "1"
    assert cnn.tags["mirflow.batches"] == "train_triplets.batch-000,train_triplets.batch-001"


def test_the_web_demo_waits_for_the_champions_then_serves_them(service):
    """It came up before any model existed (503 with the reason); after the pipeline run it serves the champions."""
    import json as json_module

    url = service.urls["web demo"]
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(f"{url}healthz", timeout=10) as response:
            health = json_module.loads(response.read())
        if health["status"] == "ok" or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert health["status"] == "ok" and health["tracks"] > 0 and "champions" in health["models"], health
    with urllib.request.urlopen(f"{url}api/map", timeout=30) as response:
        assert len(json_module.loads(response.read())["points"]) == health["tracks"]


def test_the_registered_tagger_scores_audio_as_the_shards_do(service):
    from lightning_modules.served import predict_tag_scores
    from lightning_modules.tagger import TaggerModule
    from tasks.audio import decode
    from tasks.shards import read_features

    mlflow.set_tracking_uri(service.urls["MLflow UI"])
    mlflow.set_registry_uri(service.urls["MLflow UI"])
    model = mlflow.pyfunc.load_model(f"models:/{TAGGER}@{CHAMPION}")
    layout = Layout(service.data_dir)
    tracks = pq.read_table(layout.tracks("synthetic")).to_pandas()
    track = tracks.iloc[0]
    waveform = decode(track["source_path"], sample_rate=16000)
    scores = model.predict(waveform[None, :].astype(np.float32))
    assert scores.shape[0] == 1 and ((scores.values > 0) & (scores.values < 1)).all()
    # The same scores from the track's feature shard: the model computes its input with the shards' code.
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{TAGGER}@{CHAMPION}")) / "artifacts"
    config = json.loads((files / "config.json").read_text())
    module = TaggerModule.load_from_checkpoint(next(files.glob("*.ckpt")), weights_only=True)
    feature_dir = next((service.data_dir / "features" / "synthetic").iterdir())
    mel = read_features(feature_dir, column="mel_1024", track_ids=[track["track_id"]])[track["track_id"]]
    expected = predict_tag_scores(module, [mel], crop=config["crop_frames"], hop=config["hop_frames"])
    np.testing.assert_allclose(scores.values, expected, atol=2e-3)
    assert list(scores.columns) == list(module.hparams.tags)


def test_a_batch_that_helps_is_promoted(service):
    inbox = Layout(service.data_dir).inbox()
    inbox.mkdir(parents=True, exist_ok=True)
    batch = Layout(service.data_dir).world() / "taste_profile" / "train_triplets.batch-002.txt"
    (inbox / batch.name).write_bytes(batch.read_bytes())
    assert service.run_deployment("retrain-on-new-listening") == "Completed"
    versions = _versions(service, LATENT_FACTOR_CNN)
    assert [int(mv.version) for mv in versions] == [1, 2]
    new = versions[-1]
    assert new.tags["mirflow.decision"] == "promoted"
    assert float(new.tags["mirflow.challenger_score"]) > float(new.tags["mirflow.champion_score"])
    assert new.tags["mirflow.new_batches"] == "train_triplets.batch-002"
    assert new.tags["mirflow.batches"].split(",")[-1] == "train_triplets.batch-002"
    assert _champion(service, LATENT_FACTOR_CNN) == "2" and _champion(service, WMF) == new.tags["mirflow.wmf_version"]
    assert "promoted" in _latest_decision(service)


def test_an_empty_inbox_gives_no_new_version(service):
    inbox = Layout(service.data_dir).inbox()
    for path in inbox.iterdir():  # what was there is ingested and covered by version 2
        path.unlink()
    assert service.run_deployment("retrain-on-new-listening") == "Completed"
    assert len(_versions(service, LATENT_FACTOR_CNN)) == 2
    assert "nothing-new" in _latest_decision(service)


def test_a_batch_of_random_plays_is_registered_but_not_promoted(service):
    layout = Layout(service.data_dir)
    users = pd.read_csv(layout.world() / "taste_profile" / "train_triplets.batch-000.txt", sep="\t", header=None)[0]
    songs = pq.read_table(layout.tracks("synthetic"), columns=["track_id"]).column(0).to_numpy()
    rng = np.random.default_rng(7)
    n = 20_000  # more plays than the real batches hold: noise that drowns the users' tastes
    noise = pd.DataFrame(
        {"user": rng.choice(users.unique(), n), "song": rng.choice(songs, n), "plays": rng.integers(1, 20, n)}
    )
    noise.to_csv(layout.inbox() / "random-plays.txt", sep="\t", header=False, index=False)
    assert service.run_deployment("retrain-on-new-listening") == "Completed"
    versions = _versions(service, LATENT_FACTOR_CNN)
    assert [int(mv.version) for mv in versions] == [1, 2, 3]
    assert versions[-1].tags["mirflow.decision"] == "kept-champion"
    assert float(versions[-1].tags["mirflow.challenger_score"]) < float(versions[-1].tags["mirflow.champion_score"]), (
        versions[-1].tags["mirflow.reason"]
    )
    assert _champion(service, LATENT_FACTOR_CNN) == "2"
    assert "champion stays" in _latest_decision(service)


def test_a_batch_without_valid_rows_retrains_nothing(service):
    inbox = Layout(service.data_dir).inbox()
    (inbox / "garbage.txt").write_text("not\ta\tcount\nmissing-columns\n")
    assert service.run_deployment("retrain-on-new-listening") == "Completed"
    assert len(_versions(service, LATENT_FACTOR_CNN)) == 3
    assert "no valid rows" in _latest_decision(service)


def test_sigint_stops_every_process_of_the_service(service):
    assert len(service_processes(service.service_id)) >= 6  # servers, workers, nannies
    assert service.stop() in (0, 2, -signal.SIGINT)  # make passes the interrupt on once its recipe is done
    deadline = time.monotonic() + 20
    while service_processes(service.service_id) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert service_processes(service.service_id) == []
    assert "stopped" in service.log.read_text()


# ---------------------------------------------------------------- Dask from its own CLI


def test_features_on_a_cli_started_cluster_survive_a_killed_worker(tmp_path, prefect_server):
    """`mirflow features --cluster address` on a scheduler and two workers started by Dask's CLI; one is SIGKILLed."""
    from typer.testing import CliRunner

    from core.settings import feature_settings_from_options
    from mirflow.cli import app

    tracks = _catalogue(tmp_path / "audio", 96, seconds=3.0)
    manifest = tmp_path / "catalogue.csv"
    tracks.rename(columns={"source_path": "path"})[["track_id", "path"]].to_csv(manifest, index=False)
    options = {
        "windows": "1024,2048",
        "hop": 512,
        "hop_policy": "fixed",
        "sample_rate": 16000,
        "n_mels": 32,
        "pyramid": "none",
        "pyramid_levels": 4,
        "audio_shards": False,
        "files_per_task": 2,
    }
    feature_dir = Layout(tmp_path / "data").features("tones", feature_settings_from_options(**options).feature_set)
    port, dashboard = free_ports(2)
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "DASK_LOGGING__DISTRIBUTED": "warning"}
    scheduler = subprocess.Popen(
        [
            str(BIN / "dask"),
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dashboard-address",
            f"127.0.0.1:{dashboard}",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workers = subprocess.Popen(
        [
            str(BIN / "dask"),
            "worker",
            address,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            pids = list(client.run(os.getpid).values())
            with kill_mid_run(feature_dir, pids[0]) as shards_at_kill:
                result = CliRunner().invoke(
                    app,
                    [
                        "features",
                        "--adapter",
                        "manifest",
                        "--source",
                        str(manifest),
                        "--dataset",
                        "tones",
                        "--data-dir",
                        str(tmp_path / "data"),
                        "--cluster",
                        "address",
                        "--address",
                        address,
                        "--windows",
                        options["windows"],
                        "--n-mels",
                        "32",
                        "--files-per-task",
                        "2",
                    ],
                )
            assert shards_at_kill, f"the worker was never killed:\n{result.output}"
            assert pids[0] not in client.run(os.getpid).values()
    finally:
        for process in (workers, scheduler):
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    assert result.exit_code == 0, result.output
    assert "96 tracks (96 extracted, 0 already present, 0 quarantined)" in result.output
    assert 4 <= shards_at_kill[0] < 48  # the kill came mid-run
    assert_every_track_once(feature_dir, tracks)  # every track exactly once
