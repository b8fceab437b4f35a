"""The ``mirflow`` command line, as a user runs it on data in the real formats."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from core.settings import WorldSettings
from mirflow.cli import app
from tasks import synth


def test_bad_settings_end_with_a_message_not_a_traceback(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--tracks", "3", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "n_tracks" in result.output and "greater than or equal to 16" in result.output
    result = CliRunner().invoke(app, ["demo", "--cluster", "address", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "needs an address" in result.output


def test_retrain_rejects_bad_settings_before_anything_runs(tmp_path):
    result = CliRunner().invoke(app, ["retrain", "--metric", "accuracy", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "map_at_k" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["retrain", "--epochs", "0", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "max_epochs" in result.output
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.integration
def test_retrain_without_a_pipeline_run_says_what_to_do(tmp_path, prefect_server):
    result = CliRunner().invoke(app, ["retrain", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2 and "run the pipeline first" in result.output


@pytest.mark.slow
@pytest.mark.integration
def test_pipeline_command_on_external_data_quarantines_a_corrupt_clip(tmp_path, prefect_server):
    source = tmp_path / "external"
    synth.generate_world(source, WorldSettings(n_tracks=64, n_users=120, clip_seconds=4.0, seed=3))
    corrupt = sorted((source / "mtat" / "audio").rglob("*.mp3"))[0]
    corrupt.write_bytes(b"\x00" * 100)
    triplets = sorted((source / "taste_profile").glob("*.txt"))
    data_dir = tmp_path / "store"
    args = [
        "pipeline",
        "--annotations",
        str(source / "mtat" / "annotations_final.csv"),
        "--audio-root",
        str(source / "mtat" / "audio"),
        "--dataset",
        "external",
        "--data-dir",
        str(data_dir),
        "--epochs",
        "2",
        "--workers",
        "1",
    ]
    for path in triplets:
        args += ["--triplets", str(path)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tracks 63 (quarantined 1)" in result.output
    assert "WMF factors (upper bound)" in result.output
    quarantine = pq.read_table(data_dir / "quarantine" / "external.parquet").to_pylist()
    assert [q["path"] for q in quarantine] == [str(corrupt)]
    assert quarantine[0]["stage"] == "read"


@pytest.mark.integration
def test_features_command_runs_a_manifest_and_then_only_new_files(tmp_path, prefect_server):
    import numpy as np
    import pandas as pd
    import soundfile as sf

    rows = []
    for i in range(6):
        path = tmp_path / f"tone{i}.wav"
        sf.write(path, 0.2 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(32000) / 16000), 16000)
        rows.append({"track_id": f"t{i}", "path": path.name, "tags": "tone|test", "split": "train"})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows[:5]).to_csv(manifest, index=False)
    args = [
        "features",
        "--adapter",
        "manifest",
        "--source",
        str(manifest),
        "--dataset",
        "tones",
        "--windows",
        "512,2048",
        "--n-mels",
        "40",
        "--pyramid",
        "gaussian",
        "--pyramid-levels",
        "3",
        "--workers",
        "1",
        "--data-dir",
        str(tmp_path / "store"),
    ]
    first = CliRunner().invoke(app, args)
    pd.DataFrame(rows).to_csv(manifest, index=False)
    second = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "5 tracks (5 extracted, 0 already present, 0 quarantined)" in first.output
    assert second.exit_code == 0 and "6 tracks (1 extracted, 5 already present, 0 quarantined)" in second.output
    bad = CliRunner().invoke(app, [*args[:-2], "--data-dir", str(tmp_path / "store"), "--windows", "512,512"])
    assert bad.exit_code == 2 and "distinct" in bad.output


@pytest.mark.integration
def test_wmf_command_ingests_quarantines_and_updates(tmp_path, prefect_server):
    from tasks.synth_listening import ListeningWorld, write_triplets

    first = write_triplets(ListeningWorld(n_users=300, n_items=150, n_rows=6000, seed=1), tmp_path / "batch-000.txt")
    second = tmp_path / "batch-001.txt"
    second.write_text(first.read_text().replace("\n", "\nbroken line\n", 3))
    data_dir = tmp_path / "store"
    base = ["wmf", "--data-dir", str(data_dir), "--k", "50", "--iterations", "5"]
    one = CliRunner().invoke(app, [*base, "--listening", str(first)])
    two = CliRunner().invoke(app, [*base, "--listening", str(first), "--listening", str(second)])
    assert one.exit_code == 0 and two.exit_code == 0, one.output + two.output
    assert "WMF (full)" in one.output and "popularity" in one.output and "NDCG@50" in one.output
    assert "WMF (incremental)" in two.output and "WMF full refit" in two.output
    quarantine = pq.read_table(data_dir / "quarantine" / "listening.parquet").to_pandas()
    assert len(quarantine) == 3 and quarantine["reason"].str.contains("expected 3 tab-separated fields").all()
    bad = CliRunner().invoke(app, [*base, "--listening", str(first), "--format", "xml"])
    assert bad.exit_code == 2 and "format" in bad.output


def test_study_rejects_bad_settings_before_anything_runs(tmp_path):
    for argv, message in (
        (["--k", "1"], "at least 2 means"),
        (["--preset", "ismir1999"], "unknown preset"),
        (["--clip-seconds", "1"], "clip_seconds"),
    ):
        result = CliRunner().invoke(app, ["study", "tagging", *argv, "--data-dir", str(tmp_path)])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    assert not list(tmp_path.iterdir())  # nothing was written


@pytest.mark.integration
def test_study_with_a_context_longer_than_the_clips_stops_before_any_work(tmp_path, prefect_server):
    preset = tmp_path / "long-context.json"
    import json

    from tasks.studies import PRESETS

    preset.write_text(json.dumps({**PRESETS["smoke"], "kmeans": {**PRESETS["smoke"]["kmeans"], "context": 400}}))
    data_dir = tmp_path / "data"
    result = CliRunner().invoke(
        app, ["study", "tagging", "--preset", str(preset), "--clip-seconds", "6", "--data-dir", str(data_dir)]
    )
    assert result.exit_code == 2, result.output
    assert "context=400 frames is longer than the synthetic clips" in result.output
    assert not (data_dir / "raw").exists() and not (data_dir / "features").exists()
