"""Errors a user can cause, fed to the function the user reaches: each is a ``MirflowError`` whose message says what
was wrong and what to do, in the words of that function's API (settings and arguments, never a command-line flag).

The CLI cases run the ``mirflow`` command's entry point in a subprocess, as ``tests/test_cli_errors.py`` does: the
message alone on stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from core import storage
from core.errors import DatasetError, DecodeError, MirflowError, ParameterError
from core.settings import KMeansSettings

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- codebooks


def _codebook(tmp_path: Path):
    from tasks.kmeans import Codebook, Whitening

    return Codebook(
        means=np.eye(3, 8, dtype=np.float32),
        whitening=Whitening(mean=np.zeros(8, np.float32), matrix=np.eye(8, dtype=np.float32)),
        context=2,
        n_mels=4,
        kind="kmeans",
        info={},
    )


def test_a_codebook_of_another_format_is_refused_by_name(tmp_path):
    from tasks.kmeans import Codebook

    good = _codebook(tmp_path).save(tmp_path / "good.npz")
    assert Codebook.load(good).context == 2
    arrays = storage.read_npz(good)
    arrays["header"] = np.array(json.dumps({"format": "other-codebook-9", "context": 2, "n_mels": 4, "kind": "x"}))
    storage.write_npz(tmp_path / "other.npz", arrays)
    with pytest.raises(DatasetError, match=r"names the format 'other-codebook-9', not 'mirflow-codebook-1'") as err:
        Codebook.load(tmp_path / "other.npz")
    assert "Codebook.save" in str(err.value)


@pytest.mark.parametrize(
    ("content", "found"),
    [(b"not a zip archive at all", "not a mirflow codebook"), (b"PK\x03\x04 a cut archive", "not a mirflow codebook")],
)
def test_a_file_that_is_no_codebook_is_refused_with_what_to_give(tmp_path, content, found):
    from tasks.kmeans import Codebook

    path = tmp_path / "mel_1024.npz"
    path.write_bytes(content)
    with pytest.raises(DatasetError, match=found) as err:
        Codebook.load(path)
    assert str(path) in str(err.value) and "written by Codebook.save" in str(err.value)


def test_installing_codebooks_checks_each_one_and_leaves_the_store_as_it_was(tmp_path):
    from tasks.kmeans_features import install_codebooks

    given = tmp_path / "given"
    _codebook(tmp_path).save(given / "mel_1024.npz")
    (given / "mel_2048.npz").write_bytes(b"a model file of some other program")
    kmeans_dir = tmp_path / "store" / "kmeans"
    with pytest.raises(DatasetError, match="mel_2048.npz is not a mirflow codebook"):
        install_codebooks(given, kmeans_dir, ("mel_1024", "mel_2048"))
    installed = sorted(p.name for p in kmeans_dir.rglob("*"))
    assert installed == ["codebooks", "mel_1024.npz"]  # the good one is in place whole, no temporary file left


def test_a_cuda_kmeans_without_a_gpu_is_refused_in_the_settings_words():
    from tasks.kmeans_features import kmeans_device

    with pytest.raises(ParameterError, match="set the K-means device to 'auto' or 'cpu'") as err:
        kmeans_device(KMeansSettings(device="cuda"), None)
    assert "--" not in str(err.value)


# ----------------------------------------------------------------------------------------------- shards


def _write_shards(folder: Path) -> None:
    from tasks.shards import features_to_table, write_feature_shard, write_manifest

    source = {"source_path": "a.wav", "source_size": 1, "source_mtime_ns": 1, "duration_s": 1.0}
    rows = [("a", "sha", {"mel_1024": np.zeros((4, 16), np.float32)}, source)]
    write_feature_shard(features_to_table(rows, n_mels=16), folder / "part-0.parquet")
    write_manifest(
        folder,
        [
            {
                "track_id": "a",
                "content_sha1": "sha",
                "shard": "part-0.parquet",
                "n_frames": 4,
                "settings_hash": "h",
                "duration_s": 1.0,
                "sample_rate": 16000,
            }
        ],
    )


def test_a_damaged_manifest_is_a_dataset_error_that_says_to_compute_the_features_again(tmp_path):
    from tasks.shards import MANIFEST, read_features, read_manifest

    _write_shards(tmp_path)
    assert read_manifest(tmp_path).num_rows == 1
    (tmp_path / MANIFEST).write_bytes(b"PAR1 the first bytes of a manifest, then nothing")
    for reach in (lambda: read_manifest(tmp_path), lambda: read_features(tmp_path, column="mel_1024")):
        with pytest.raises(DatasetError, match="cannot be read") as err:
            reach()
        assert str(tmp_path / MANIFEST) in str(err.value) and "computed again" in str(err.value)


def test_a_manifest_without_its_shard_column_is_refused_by_name(tmp_path):
    from tasks.shards import MANIFEST, read_features

    _write_shards(tmp_path)
    storage.write_parquet(tmp_path / MANIFEST, pa.table({"track_id": ["a"], "content_sha1": ["sha"]}))
    with pytest.raises(DatasetError, match=r"lacks the column\(s\) \['shard'\]") as err:
        read_features(tmp_path, column="mel_1024")
    assert "compute the features again" in str(err.value)


def test_a_missing_shard_or_column_names_the_file_and_the_columns(tmp_path):
    from tasks.shards import read_features

    _write_shards(tmp_path)
    with pytest.raises(DatasetError, match=r"columns \['track_id', 'mel_4096'\]") as err:
        read_features(tmp_path, column="mel_4096")
    assert "other settings" in str(err.value)
    (tmp_path / "part-0.parquet").unlink()
    with pytest.raises(DatasetError, match="part-0.parquet cannot be read"):
        read_features(tmp_path, column="mel_1024")


def test_rows_that_do_not_make_one_shard_are_parameter_errors():
    from tasks.shards import features_to_table

    source = {"source_path": "a.wav", "source_size": 1, "source_mtime_ns": 1, "duration_s": 1.0}
    with pytest.raises(ParameterError, match="leave empty batches out"):
        features_to_table([], n_mels=16)
    rows = [
        ("a", "sha", {"mel_1024": np.zeros((4, 16))}, source),
        ("b", "sha", {"mel_2048": np.zeros((2, 16))}, source),
    ]
    with pytest.raises(ParameterError, match="every track of a shard needs the same resolutions"):
        features_to_table(rows, n_mels=16)
    with pytest.raises(ValueError, match=r"expected \(n_frames, 16\): compute it with n_mels=16"):  # still a ValueError
        features_to_table([("a", "sha", {"mel_1024": np.zeros((4, 8))}, source)], n_mels=16)


# ----------------------------------------------------------------------------------------------- audio


def test_a_file_that_is_no_audio_is_a_decode_error(tmp_path):
    from tasks.audio import decode

    path = tmp_path / "song.wav"
    path.write_text("these are the lyrics, not the song\n")
    with pytest.raises(DecodeError) as err:
        decode(path, sample_rate=16000)
    assert err.value.stage == "read" and str(path) in str(err.value)
    (tmp_path / "empty.mp3").write_bytes(b"")
    with pytest.raises(DecodeError, match=r"file is empty \(0 bytes\)"):
        decode(tmp_path / "empty.mp3", sample_rate=16000)


def test_a_stream_without_channels_is_a_decode_error_not_a_value_error(tmp_path, monkeypatch):
    """audioread (the fallback for what libsndfile cannot read) reporting no channels: no audio stream."""
    import audioread

    from tasks.audio import decode

    class NoChannels:
        channels, samplerate, duration = 0, 44100, 0.0

        def __iter__(self):
            return iter([b""])

    monkeypatch.setattr(audioread, "audio_open", lambda name: contextlib.nullcontext(NoChannels()))
    path = tmp_path / "video.m4a"
    path.write_bytes(b"\x00\x00\x00\x18ftypM4A not really")
    with pytest.raises(DecodeError, match="no audio stream") as err:
        decode(path, sample_rate=16000)
    assert err.value.stage == "read" and not isinstance(err.value, ValueError)


# ----------------------------------------------------------------------------------------------- models


def test_bad_model_settings_are_parameter_errors_that_name_the_setting():
    import torch

    from lightning_modules.architectures import FeaturePooling, RawAudioConvNet2014, SpectrogramConvNet2014
    from lightning_modules.datamodule import stat_buffer
    from lightning_modules.latent_factors import LatentFactorModule
    from lightning_modules.tagger import TaggerModule

    cases = [
        (lambda: LatentFactorModule(n_mels=16, n_factors=4, objective="mae"), "objective 'mae': choose 'mse' or 'wpe'"),
        (
            lambda: TaggerModule(tags=["rock"], n_mels=16, crop_frames=64, architecture="transformer"),
            "choose 'convnet2014' or 'short-chunk-resnet'",
        ),
        (lambda: FeaturePooling("mean", size=2), "choose 'l2' or 'max'"),
        (lambda: FeaturePooling("l2", size=1), "pool groups of 2 or more filters"),
        (lambda: FeaturePooling("l2", size=3)(torch.zeros(1, 4, 2)), "choose a pooling size that divides"),
        (lambda: RawAudioConvNet2014(n_samples=100, n_outputs=2, filter_length=256), r"longer crops \(crop_seconds\)"),
        (lambda: SpectrogramConvNet2014(n_mels=16, n_frames=8, n_outputs=2), r"longer crops \(crop_seconds\)"),
        (lambda: stat_buffer([0.0] * 3, 16, 0.0), "3 per-band statistics for 16 mel bands"),
    ]
    for build, message in cases:
        with pytest.raises(ParameterError, match=message) as err:
            build()
        assert isinstance(err.value, ValueError)  # callers that caught the old ValueError still do


def test_wpe_training_without_plays_or_with_the_wrong_users_says_what_to_give():
    import scipy.sparse as sp
    import torch

    from lightning_modules.latent_factors import LatentFactorModule

    module = LatentFactorModule(n_mels=16, n_factors=4, channels=(8, 8, 16), hidden=16, objective="wpe")
    with pytest.raises(ParameterError, match="one row per user of the factorization"):
        module.use_plays(np.zeros((5, 4), np.float32), sp.csr_matrix((3, 8), dtype=np.float32))
    with pytest.raises(ParameterError, match=r"call use_plays\(user_factors, confidence\) before training"):
        module.training_step((torch.randn(2, 16, 94), torch.zeros(2, 4), torch.arange(2)), 0)


def test_an_end_to_end_study_refuses_k_in_the_words_of_its_overrides():
    from tasks.studies import preset_overrides

    with pytest.raises(ParameterError, match="an end-to-end study has none: leave k unset") as err:
        preset_overrides(kind="end-to-end", k=10)
    assert "--" not in str(err.value)


def test_a_registered_model_without_its_artifact_is_a_registry_error(tmp_path):
    from mlflow.exceptions import MlflowException

    from infra.registry import RegistryError, _one

    (tmp_path / "artifacts").mkdir()
    with pytest.raises(RegistryError, match=r"0 files matching \*\.ckpt") as err:
        _one(tmp_path / "artifacts", "*.ckpt")
    assert isinstance(err.value, MirflowError) and isinstance(err.value, MlflowException)
    assert "register a model logged by mirflow" in str(err.value)


def test_the_web_app_needs_a_catalogue_or_a_loader():
    from mirflow.web.app import Served

    with pytest.raises(ParameterError, match="a catalogue to serve, or a loader"):
        Served(None)


# ----------------------------------------------------------------------------------------------- the sources


# Raises of built-in exceptions left on purpose: internal invariants, not reachable by a user's input.
INTERNAL = {
    ("infra/tracking.py", "RuntimeError"),  # child_run outside a parent run: a flow's bug, not a user's input
}
# Library messages that name a command: none (the job layer words a refusal for the front doors).
NAMES_A_COMMAND: set[tuple[str, str]] = set()
BUILTIN = {"ValueError", "RuntimeError", "TypeError", "KeyError", "IndexError", "Exception", "AssertionError"}


def _raises(folders):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for function in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
                for node in ast.walk(function):
                    if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                        yield str(path.relative_to(ROOT)), function.name, node.exc


def test_no_user_error_is_a_bare_builtin_exception_and_no_message_names_a_flag():
    bare, flags = [], []
    for where, function, call in _raises(("tasks", "lightning_modules", "infra", "mirflow/web")):
        name = call.func.id if isinstance(call.func, ast.Name) else None
        if name in BUILTIN and (where, name) not in INTERNAL:
            bare.append(f"{where}:{call.lineno} {name}")
        text = "".join(
            part.value for part in ast.walk(call) if isinstance(part, ast.Constant) and isinstance(part.value, str)
        )
        if " --" in f" {text}" and (where, function) not in NAMES_A_COMMAND:
            flags.append(f"{where}:{call.lineno} {function}")
    assert bare == [] and flags == []


# ----------------------------------------------------------------------------------------------- the command


def mirflow(*args: str | Path) -> subprocess.CompletedProcess:
    """The ``mirflow`` console script's entry point (``mirflow.cli:app``, as pyproject.toml declares it), run in a
    subprocess of this interpreter, so that it is this checkout's CLI whatever script the environment installed."""
    entry = "import sys; from mirflow.cli import app; sys.argv[0] = 'mirflow'; sys.exit(app())"
    return subprocess.run(
        [sys.executable, "-c", entry, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "80"},
    )


def test_the_command_line_shows_a_library_refusal_as_one_line_and_exit_status_2(tmp_path):
    run = mirflow("study", "tagging", "--preset", "icassp2014", "--k", "10", "--data-dir", tmp_path / "data")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert run.returncode == 2, run.stderr
    assert lines == [
        "mirflow: k sets the size of a study's K-means codebooks, and an end-to-end study has none: leave k unset"
    ]
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert not (tmp_path / "data").exists()  # refused before anything was written
