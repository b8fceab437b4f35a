"""User errors on the command line, as a user meets them: every command run by its real entry point on a bad
input ends with the message alone on stderr, exit status 2, no traceback unless ``--verbose``, and the files an
earlier run wrote stay as they were.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from prefect.client.orchestration import get_client

from core.errors import DatasetError
from mirflow.cli import UserErrorConsoleFilter

MIRFLOW = Path(sys.executable).parent / "mirflow"


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


def mirflow(*args: str | Path, env: dict[str, str] | None = None) -> Run:
    done = subprocess.run(
        [str(MIRFLOW), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80", **(env or {})},
    )
    return Run(done.returncode, done.stdout, done.stderr)


def tones(folder: Path, n: int) -> list[str]:
    """``n`` one-second tones at 16 kHz; their file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        sf.write(folder / f"tone{i}.wav", 0.2 * np.sin(2 * np.pi * (220 + 40 * i) * np.arange(16000) / 16000), 16000)
        names.append(f"tone{i}.wav")
    return names


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root``: its relative path and content hash."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def flows_env(tmp_path_factory, prefect_server):
    """The environment of a `mirflow` that runs flows: the session's Prefect test server shared by this module's
    runs (instead of one ephemeral server per process), its own Prefect home."""
    from prefect.settings import PREFECT_API_URL

    return {"PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect"))}


FEATURES = ("--windows", "512", "--n-mels", "16", "--workers", "1")


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory, flows_env):
    """A storage root where `mirflow features` already made the shards of a 2-track manifest."""
    root = tmp_path_factory.mktemp("catalogue")
    names = tones(root / "audio", 2)
    good = root / "good.csv"
    good.write_text("track_id,path\n" + "".join(f"t{i},audio/{name}\n" for i, name in enumerate(names)))
    done = mirflow(
        "features",
        "--adapter",
        "manifest",
        "--source",
        good,
        "--dataset",
        "tones",
        *FEATURES,
        "--data-dir",
        root / "store",
        env=flows_env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (root / "store" / "tracks" / "tones.parquet").is_file()
    return root


BAD_MANIFESTS = {
    "missing-column": (
        "track_id,file\nt0,audio/tone0.wav\n",
        "missing required columns ['path'] (found ['track_id', 'file']); it needs track_id and path",
    ),
    "empty-track-id": (
        "track_id,path\nt0,audio/tone0.wav\n,audio/tone1.wav\n",
        "empty track_id in rows [3] (counting the header as row 1); every track needs an id",
    ),
    "duplicate-track-id": (
        "track_id,path\nt0,audio/tone0.wav\nt0,audio/tone1.wav\n",
        "duplicate track ids ['t0']; track ids must be unique",
    ),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_a_bad_manifest_ends_with_its_message_alone_and_loses_nothing(case, catalogue, flows_env):
    text, reason = BAD_MANIFESTS[case]
    manifest = catalogue / f"{case}.csv"
    manifest.write_text(text)
    store = catalogue / "store"
    before = snapshot(store)
    run = mirflow(
        "features",
        "--adapter",
        "manifest",
        "--source",
        manifest,
        "--dataset",
        "tones",
        *FEATURES,
        "--data-dir",
        store,
        env=flows_env,
    )
    assert run.returncode == 2
    assert run.stderr_lines == [f"mirflow: manifest {manifest}: {reason}"], run.stderr
    assert "Traceback" not in run.stdout
    after = snapshot(store)
    assert {path: after.get(path) for path in before} == before  # the earlier tracks table, shards, manifest
    assert any(path.startswith("features/tones/") for path in before)
    with get_client(sync_client=True) as client:  # the Prefect server still has the whole report
        logs = [log.message for log in client.read_logs()]
    assert any(str(manifest) in log and "Traceback (most recent call last)" in log for log in logs)


@pytest.mark.integration
def test_verbose_keeps_the_tracebacks(catalogue, flows_env):
    manifest = catalogue / "verbose.csv"
    manifest.write_text(BAD_MANIFESTS["duplicate-track-id"][0])
    run = mirflow(
        "features",
        "--adapter",
        "manifest",
        "--source",
        manifest,
        "--dataset",
        "tones",
        *FEATURES,
        "--data-dir",
        catalogue / "store",
        "--verbose",
        env=flows_env,
    )
    assert run.returncode == 2
    assert "Encountered exception during execution" in run.stderr  # Prefect's own report, with its traceback
    assert run.stderr.count("Traceback (most recent call last)") >= 2  # Prefect's and the command's
    assert run.stderr_lines[-1] == f"mirflow: manifest {manifest}: {BAD_MANIFESTS['duplicate-track-id'][1]}"
    before_flow = mirflow("world", "--tracks", "3", "--data-dir", catalogue / "unused", "--verbose")
    assert before_flow.returncode == 2 and "Traceback (most recent call last)" in before_flow.stderr


# Every command on a bad option or setting: refused before anything runs or is written.
COMMANDS = {
    "world": (
        ["world", "--tracks", "3"],
        "invalid settings (WorldSettings): n_tracks: Input should be greater than or equal to 16 (got 3)",
    ),
    "demo": (
        ["demo", "--clip-seconds", "1"],
        "invalid settings (WorldSettings): clip_seconds: Input should be greater than or equal to 3 (got 1.0)",
    ),
    "pipeline": (
        [
            "pipeline",
            "--annotations",
            "{inputs}/annotations.csv",
            "--audio-root",
            "{inputs}",
            "--triplets",
            "{inputs}/triplets.txt",
            "--cluster",
            "address",
        ],
        "invalid settings (ClusterSettings): cluster kind 'address' needs an address such as tcp://127.0.0.1:8786",
    ),
    "features": (
        [
            "features",
            "--adapter",
            "manifest",
            "--source",
            "{inputs}/annotations.csv",
            "--dataset",
            "x",
            "--windows",
            "1024,2k",
        ],
        "windows='1024,2k': FFT windows are whole numbers of samples, comma-separated, e.g. 1024,2048,4096,8192",
    ),
    "wmf": (
        ["wmf", "--listening", "{inputs}/triplets.txt", "--format", "xml"],
        "listening format 'xml' is unknown: use triplets, hetrec, events or auto",
    ),
    "train-tagger": (
        ["train-tagger", "--epochs", "0"],
        "invalid settings (TrainSettings): max_epochs: Input should be greater than or equal to 1 (got 0)",
    ),
    "train-recommender": (
        ["train-recommender", "--epochs", "0"],
        "invalid settings (TrainSettings): max_epochs: Input should be greater than or equal to 1 (got 0)",
    ),
    "retrain": (
        ["retrain", "--metric", "accuracy"],
        "invalid settings (PromotionSettings): metric: Input should be 'map_at_k', 'auc', 'ndcg_at_k' or "
        "'precision_at_k' (got 'accuracy')",
    ),
    "up": (
        ["up", "--prefect-port", "5000", "--mlflow-port", "5000"],
        "the service ports must differ, got {'prefect': 5000, 'mlflow': 5000, 'dask': 8786, 'dashboard': 8787, "
        "'web': 8000}",
    ),
    "study-tagging": (
        ["study", "tagging", "--k", "1"],
        "preset 'ismir2013': invalid settings (StudySettings): kmeans.k: k=1: K-means needs at least 2 means (got 1)",
    ),
    "study-recommendation": (
        ["study", "recommendation", "--preset", "ismir2013"],
        "preset 'ismir2013' is a multiscale study: run `mirflow study tagging --preset ismir2013`",
    ),
    "study-transfer": (
        ["study", "transfer", "--cv", "1"],
        "preset 'ismir2014': invalid settings (TransferStudySettings): transfer.cv: Input should be "
        "greater than or equal to 2 (got 1)",
    ),
    "embed": (
        ["embed", "--model", "models:/none@champion", "--dataset", "x", "--adapter", "gtzan"],
        "adapter 'gtzan' needs a source (gtzan: the genre folders' root; manifest: the CSV/Parquet file; "
        "mtat: annotations_final.csv)",
    ),
    "transfer": (
        ["transfer", "--dataset", "x", "--classifier", "forest"],
        "invalid settings (TransferSettings): classifier: Input should be 'logreg' or 'svm' (got 'forest')",
    ),
    "serve": (["serve", "--decoders", "0"], "decoders=0: must be positive"),
}


def test_every_command_is_covered():
    from typer.main import get_command

    from mirflow.cli import app

    def names(group, prefix=""):
        for name, command in group.commands.items():
            yield from names(command, f"{prefix}{name}-") if hasattr(command, "commands") else [prefix + name]

    assert sorted(names(get_command(app))) == sorted(COMMANDS)


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[str, tuple[Run, Path]]:
    """Every command of :data:`COMMANDS` run on its bad option, a few at once; each with its own storage root."""
    inputs = tmp_path_factory.mktemp("inputs")
    (inputs / "annotations.csv").write_text("clip_id\tmp3_path\n")
    (inputs / "triplets.txt").write_text("user\tsong\t1\n")
    data_dirs = {command: tmp_path_factory.mktemp(command) / "data" for command in COMMANDS}

    def run(command: str) -> tuple[Run, Path]:
        argv, _ = COMMANDS[command]
        return mirflow(*(arg.format(inputs=inputs) for arg in argv), "--data-dir", data_dirs[command]), data_dirs[
            command
        ]

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(COMMANDS, pool.map(run, COMMANDS)))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_option_ends_with_its_message_alone(command, refused):
    run, data_dir = refused[command]
    assert run.returncode == 2
    assert run.stderr_lines == [f"mirflow: {COMMANDS[command][1]}"], run.stderr
    assert run.stdout == ""
    assert not data_dir.exists()  # refused before anything was written


def _record(
    exc: BaseException | None, message: str = "Encountered exception during execution", level: int = logging.ERROR
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("prefect.flow_runs", level, __file__, 1, message, None, exc_info)


def test_the_console_filter_drops_only_reports_of_user_errors():
    keep = UserErrorConsoleFilter().filter
    assert not keep(_record(DatasetError("manifest: duplicate track ids")))
    assert not keep(_record(None, "Finished in state Failed('Task run encountered an exception DatasetError: x')"))
    assert keep(_record(KeyError("a bug")))  # a crash keeps its traceback
    assert keep(_record(None, "Finished in state Failed('Task run encountered an exception KeyError: x')"))
    assert keep(_record(None, "Finished in state Completed()", logging.INFO))
    other = _record(DatasetError("x"))
    other.name = "mirflow"
    assert keep(other)
