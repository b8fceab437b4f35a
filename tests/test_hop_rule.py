"""One hop rule: the shards, the training crops and the served spectrogram of an upload use the same hop.

Under ``hop_policy="half"`` every resolution's hop is half its window, the first one included, so
``mel.hop_length`` (what training and serving read) and the shards' first column agree by
construction; a ``mel.hop_length`` that says otherwise is refused. The test builds features,
trains a tagger and serves an upload under each policy, with settings where the two policies'
hops differ (window 1024: hop 256 fixed, 512 half).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from pydantic import ValidationError

from core.settings import FeatureSettings, MelSettings, TaggerSettings, TrainSettings, feature_settings_from_options

SR = 16000
SECONDS = 4.0


def test_half_refuses_a_first_hop_that_is_not_half_its_window() -> None:
    with pytest.raises(ValidationError, match="mel.hop_length must be 512"):
        FeatureSettings(mel=MelSettings(n_fft=1024, hop_length=256), hop_policy="half", extra_windows=(2048,))
    with pytest.raises(ValidationError, match="mel.hop_length must be 512"):
        FeatureSettings.model_validate(
            {"mel": {"n_fft": 1024, "hop_length": 256}, "hop_policy": "half", "extra_windows": [2048]}
        )


@pytest.mark.parametrize("n_fft", [512, 1024, 2048])
def test_half_sets_the_first_hop_when_it_is_left_unset(n_fft: int) -> None:
    settings = FeatureSettings(mel=MelSettings(n_fft=n_fft), hop_policy="half", extra_windows=(4096,))
    assert settings.mel.hop_length == n_fft // 2 == settings.resolutions()[0].hop_length
    assert [r.hop_length for r in settings.resolutions()] == [n_fft // 2, 2048]
    assert f"-h{n_fft // 2}h-" in settings.feature_set  # the name says the hop the shards have
    assert FeatureSettings.model_validate_json(settings.model_dump_json()) == settings  # a preset round trip


def test_the_options_parser_follows_the_same_rule() -> None:
    def parsed(policy: str) -> FeatureSettings:
        return feature_settings_from_options(
            windows="1024,2048",
            hop=256,
            hop_policy=policy,
            sample_rate=SR,
            n_mels=32,
            pyramid="none",
            pyramid_levels=4,
            audio_shards=False,
        )

    assert [r.hop_length for r in parsed("fixed").resolutions()] == [256, 256]
    assert [r.hop_length for r in parsed("half").resolutions()] == [512, 1024]
    assert parsed("half") == FeatureSettings(
        mel=MelSettings(sample_rate=SR, n_fft=1024, n_mels=32), extra_windows=(2048,), hop_policy="half"
    )


def _catalogue(folder: Path) -> pd.DataFrame:
    """Eight 4 s clips: low tones tagged ``low``, high tones tagged ``high``; 4 train, 2 valid, 2 test."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(int(SR * SECONDS)) / SR
    rows = []
    for i in range(8):
        tag = "low" if i % 2 == 0 else "high"
        freq = (220.0 if tag == "low" else 2200.0) * (1 + 0.05 * i)
        y = 0.4 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
        path = folder / f"clip{i}.wav"
        sf.write(path, y.astype(np.float32), SR)
        split = "train" if i < 4 else ("valid" if i < 6 else "test")
        rows.append({"track_id": f"t{i}", "source_path": str(path), "split": split, "tags": [tag]})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("policy", ["fixed", "half"])
def test_features_training_and_serving_use_the_same_hop(tmp_path: Path, policy: str) -> None:
    from flows.training import log_audio_model
    from infra.registry import tag_scores_schema
    from lightning_modules.train import frames, train_tagger
    from tasks.audio import decode
    from tasks.features import extract_shard, finish_features, plan_feature_batches
    from tasks.shards import read_features

    mel = {"sample_rate": SR, "n_fft": 1024, "n_mels": 32} | ({"hop_length": 256} if policy == "fixed" else {})
    settings = FeatureSettings(mel=mel, extra_windows=(2048,), hop_policy=policy)
    hop = {"fixed": 256, "half": 512}[policy]
    tracks = _catalogue(tmp_path / "audio")

    # Features: the shards' first column has one frame per `hop` samples.
    feature_dir = tmp_path / "features"
    plan = plan_feature_batches(tracks, feature_dir=feature_dir, settings=settings)
    results = [extract_shard(batch, feature_dir=feature_dir, settings=settings) for batch in plan.batches]
    finish_features(plan, results, feature_dir=feature_dir, quarantine_path=tmp_path / "q.parquet", wall_seconds=1.0)
    n_samples = int(SR * SECONDS)
    shard = read_features(feature_dir, column=settings.mel.column, track_ids=["t0"])["t0"]
    assert shard.shape == (1 + n_samples // hop, 32)
    wide = read_features(feature_dir, column="mel_2048", track_ids=["t0"])["t0"]
    assert wide.shape[0] == 1 + n_samples // settings.resolutions()[1].hop_length

    # Training: the tagger reads `mel` (the first resolution), so its crops count frames of that hop.
    train = TrainSettings(max_epochs=1, batch_size=8, crops_per_clip=2, crop_seconds=2.0, eval_hop_seconds=1.0)
    tagger = TaggerSettings(n_tags=2, conv_channels=4, hidden=8, pool_ceil=True, train=train)
    assert settings.mel == settings.resolutions()[0]
    assert frames(train.crop_seconds, settings.mel) == round(train.crop_seconds * SR / hop)
    result = train_tagger(
        feature_dir=feature_dir,
        tracks=tracks,
        tags=["high", "low"],
        settings=tagger,
        mel=settings.mel,
        checkpoint_dir=tmp_path / "checkpoints",
        quiet=True,
    )
    assert result.epochs == 1 and all(np.isfinite(v) for v in result.metrics.values())

    # Serving: the model is logged as the pipeline logs it and loaded as the service loads it; an
    # upload of the same audio gets the spectrogram the shards hold (float16 storage: 1e-2 absolute).
    # A store of its own, and no process-wide active experiment left behind for the tests after this one.
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment = mlflow.MlflowClient().create_experiment("hop-rule")
        with mlflow.start_run(experiment_id=experiment):
            uri = log_audio_model(
                "tagger",
                result.checkpoint,
                tracks=tracks,
                mel=settings.mel,
                train=train,
                outputs=tag_scores_schema(["high", "low"]),
            )
        served = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(previous)
    assert served.mel.hop_length == hop
    assert served.crop == round(train.crop_seconds * SR / hop)
    from lightning_modules.served import mel_clips

    upload = decode(tracks["source_path"].iloc[0], sample_rate=SR)
    (spectrogram,) = mel_clips(upload[None, :], mel=served.mel)
    assert spectrogram.shape == shard.shape
    np.testing.assert_allclose(spectrogram.astype(np.float32), shard.astype(np.float32), atol=1e-2)
