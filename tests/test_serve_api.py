"""The web service's API (FastAPI TestClient) over a tiny world's pipeline run: real models, real uploads."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from infra.tracking import tracking_for
from mirflow.web.app import create_app
from mirflow.web.catalogue import load_catalogue
from tasks.uploads import UploadLimits

N_TRACKS = 192  # the session pipeline run's world
LIMITS = UploadLimits(max_bytes=4 * 2**20, max_seconds=120.0, min_seconds=1.0)


@pytest.fixture(scope="module")
def served(tmp_path_factory, pipeline_run):
    """The app over a copy of the session's pipeline run (tests/conftest.py): the last test deletes its models."""
    data_dir = pipeline_run.copy_to(tmp_path_factory.mktemp("serve"))
    catalogue = load_catalogue(data_dir, tracking_for(data_dir))
    return data_dir, catalogue, TestClient(create_app(catalogue, limits=LIMITS, decode_timeout_s=20))


def _upload(client, name: str, data: bytes):
    return client.post("/api/analyze", files={"file": (name, data, "application/octet-stream")})


@pytest.mark.integration
def test_health_map_and_a_track_with_both_neighbour_lists(served):
    _, catalogue, client = served
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["tracks"] == len(catalogue.track_ids) == N_TRACKS
    assert "registry" in health["models"]
    points = client.get("/api/map").json()["points"]
    assert len(points) == N_TRACKS and all(np.isfinite([p["x"], p["y"]]).all() for p in points)
    with_wmf = next(t for t, row in zip(catalogue.track_ids, catalogue.wmf) if np.isfinite(row).all())
    body = client.get(f"/api/tracks/{with_wmf}").json()
    assert len(body["by_wmf"]) == len(body["by_predicted"]) == 5
    assert with_wmf not in {n["track_id"] for n in body["by_wmf"] + body["by_predicted"]}
    assert client.get(f"/api/audio/{with_wmf}").status_code == 200


@pytest.mark.integration
@pytest.mark.realdata
@pytest.mark.parametrize("pattern", ["mtat/audio/*/*.mp3", "gtzan/au/jazz.00000.au"])
def test_real_clips_get_tags_neighbours_and_listeners(served, shared_data, pattern):
    _, catalogue, client = served
    path = sorted(shared_data.glob(pattern))[0]
    response = _upload(client, path.name, path.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["tags"]) == len(catalogue.tagger.module.hparams.tags)
    assert all(0.0 <= t["score"] <= 1.0 for t in body["tags"])
    assert len(body["similar"]) == 10 and len(body["listeners"]) == 10
    assert len(body["factors"]) == catalogue.predicted.shape[1]


def _wav_bytes(tmp_path, seconds: float, *, nan: bool = False) -> bytes:
    y = (0.2 * np.sin(np.arange(int(16000 * seconds)) / 7)).astype(np.float32)
    if nan:
        y[::50] = np.nan
    path = tmp_path / "x.wav"
    sf.write(path, y, 16000, subtype="FLOAT" if nan else "PCM_16")
    return path.read_bytes()


@pytest.mark.integration
def test_bad_uploads_get_a_json_reason_and_the_server_keeps_serving(served, tmp_path):
    _, _, client = served
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "x" * 1000)
    mp3 = tmp_path / "a.mp3"
    sf.write(mp3, (0.1 * np.sin(np.arange(48000) / 5)).astype(np.float32), 16000, format="MP3")
    bad = {
        "empty.wav": (b"", 422),
        "notes.mp3": (b"hello, not audio\n" * 40, 415),
        "cut.mp3": (mp3.read_bytes()[:300], None),
        "short.wav": (_wav_bytes(tmp_path, 0.1), 422),
        "nan.wav": (_wav_bytes(tmp_path, 2.0, nan=True), 422),
        "big.wav": (b"\0" * (5 * 2**20), 413),
        "a.zip": (archive.read_bytes(), 415),
    }
    for name, (data, status) in bad.items():
        response = _upload(client, name, data)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
        assert status is None or response.status_code == status, (name, response.status_code)
        assert set(response.json()) == {"error"} and response.json()["error"], name
    assert _upload(client, "good.wav", _wav_bytes(tmp_path, 3.0)).status_code == 200


@pytest.mark.integration
def test_ids_are_validated_and_unknown_ones_are_404_json(served):
    _, catalogue, client = served
    for url, status in (
        ("/api/tracks/..%2F..%2Fetc%2Fpasswd", 400),
        ("/api/tracks/nope", 404),
        ("/api/audio/nope", 404),
        ("/api/users/nobody/recommendations", 404),
        ("/api/tracks/a%20b", 400),
    ):
        response = client.get(url)
        assert response.status_code in (status, 404), (url, response.status_code)
        assert "error" in response.json()
    user = str(catalogue.users[0])
    body = client.get(f"/api/users/{user}/recommendations").json()
    assert len(body["tracks"]) == 10 and body["candidates"].startswith("new tracks")
    scores = [t["score"] for t in body["tracks"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.integration
def test_a_second_start_on_the_same_data_gives_the_same_answers(served):
    data_dir, catalogue, client = served
    again = TestClient(create_app(load_catalogue(data_dir, tracking_for(data_dir)), limits=LIMITS))
    track = str(catalogue.track_ids[3])
    assert again.get(f"/api/tracks/{track}").json() == client.get(f"/api/tracks/{track}").json()
    assert again.get("/api/map").json() == client.get("/api/map").json()


def _chromium() -> str | None:
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(served):
    """The app on a free 127.0.0.1 port, served by uvicorn in a thread."""
    import socket
    import threading
    import time

    import uvicorn

    _, catalogue, _ = served
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(catalogue, limits=LIMITS), host="127.0.0.1", port=port, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    instance.should_exit = True
    thread.join(10)


@pytest.mark.integration
@pytest.mark.browser
def test_the_page_in_a_real_browser(server, served, tmp_path):
    if _chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    _, catalogue, _ = served
    clip = tmp_path / "upload.wav"
    sf.write(clip, (0.3 * np.sin(np.arange(16000 * 4) * 2 * np.pi * 330 / 16000)).astype(np.float32), 16000)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server)
        page.wait_for_selector("#map circle")
        assert page.locator("#map circle").count() == len(catalogue.track_ids)
        page.set_input_files("#file", str(clip))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.locator("#tags li").count() == 10
        assert page.locator("#similar li").count() == 10 and page.locator("#similar audio").count() == 10
        page.locator("#map circle").nth(5).click(force=True)  # the circle under the pointer may be a neighbour
        page.wait_for_selector("#track:not([hidden])")
        page.wait_for_function("document.querySelectorAll('#neighbours tbody tr').length === 5")
        assert page.locator("#neighbours tbody tr").count() == 5
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        browser.close()
    assert not errors, errors
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@pytest.mark.integration
def test_without_a_registry_the_latest_pipeline_run_is_served_and_said_so(served, caplog):
    """Runs last in this module: it deletes the registered models."""
    from mlflow.tracking import MlflowClient

    from infra.registry import LATENT_FACTOR_CNN, TAGGER, WMF

    data_dir, catalogue, client = served
    registry = MlflowClient(tracking_for(data_dir).tracking_uri)
    for name in (TAGGER, LATENT_FACTOR_CNN, WMF):
        registry.delete_registered_model(name)
    with caplog.at_level("WARNING", logger="mirflow"):
        fallback = load_catalogue(data_dir, tracking_for(data_dir))
    assert fallback.source.startswith("pipeline run") and "no champion models in the registry" in caplog.text
    app = TestClient(create_app(fallback, limits=LIMITS))
    assert app.get("/healthz").json()["models"].startswith("pipeline run")
    track = str(catalogue.track_ids[7])
    assert app.get(f"/api/tracks/{track}").json() == client.get(f"/api/tracks/{track}").json()
