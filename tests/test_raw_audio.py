"""The raw-audio convnet's parts, against hand computations, and the DataModule over PCM shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import DatasetError
from lightning_modules.architectures import (
    FeaturePooling,
    FirstLayerNonlinearity,
    RawAudioConvNet2014,
)
from lightning_modules.audio_datamodule import AudioDataModule
from tasks.shards import audio_to_table, write_feature_shard


def test_output_shape_and_gradients_reach_the_first_layer() -> None:
    net = RawAudioConvNet2014(
        n_samples=8192,
        n_outputs=5,
        filter_length=128,
        stride=64,
        n_filters=32,
        nonlinearity="log1p_square",
        feature_pooling="l2",
        pool_size=4,
        batch_norm=True,
    )
    x = torch.randn(3, 8192, requires_grad=True)
    out = net(x)
    assert out.shape == (3, 5)
    out.sum().backward()
    assert net.first.weight.grad is not None and net.first.weight.grad.abs().sum() > 0
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert net.first_layer_filters().shape == (32, 128)
    assert net.norm.num_features == 8  # 32 filters pooled in groups of 4


def test_first_layer_steps_are_filter_length_and_stride() -> None:
    net = RawAudioConvNet2014(n_samples=16000, n_outputs=2, filter_length=512, stride=256, n_filters=8)
    steps = net.front(net.first(torch.zeros(1, 1, 16000))).shape[-1]
    assert steps == 1 + (16000 - 512) // 256


def test_l2_and_max_feature_pooling_against_a_hand_computation() -> None:
    x = torch.tensor([[[3.0, 0.0], [4.0, 1.0], [1.0, 2.0], [2.0, 2.0]]])  # (batch 1, 4 filters, 2 steps)
    l2 = FeaturePooling("l2", size=2)(x)
    torch.testing.assert_close(l2, torch.tensor([[[5.0, 1.0], [np.sqrt(5.0), np.sqrt(8.0)]]], dtype=torch.float32))
    torch.testing.assert_close(FeaturePooling("max", size=2)(x), torch.tensor([[[4.0, 1.0], [2.0, 2.0]]]))
    with pytest.raises(ValueError, match="groups of 3"):
        FeaturePooling("l2", size=3)(x)


def test_first_layer_nonlinearities() -> None:
    x = torch.tensor([-2.0, 0.0, 0.5])
    torch.testing.assert_close(FirstLayerNonlinearity("relu")(x), torch.tensor([0.0, 0.0, 0.5]))
    torch.testing.assert_close(FirstLayerNonlinearity("log1p_square", c=10.0)(x), torch.log1p(10.0 * x**2))
    torch.testing.assert_close(FirstLayerNonlinearity("log1p_abs", c=10.0)(x), torch.log1p(10.0 * x.abs()))
    with pytest.raises(ValueError, match="expected one of"):
        FirstLayerNonlinearity("tanh")
    with pytest.raises(ValueError, match="shorter than one filter"):
        RawAudioConvNet2014(n_samples=100, n_outputs=2, filter_length=256)


def _pcm_shards(tmp_path, lengths: dict[str, int]):
    rows = [(t, np.sin(np.arange(n) / 10.0).astype(np.float32) * 0.5) for t, n in lengths.items()]
    write_feature_shard(audio_to_table(rows, sample_rate=16000), tmp_path / "part-0.parquet")
    return tmp_path


def test_audio_datamodule_crops_windows_and_pads(tmp_path) -> None:
    lengths = {"a": 20000, "b": 9000, "c": 12000, "d": 30000}
    audio_dir = _pcm_shards(tmp_path, lengths)
    targets = {t: np.array([i % 2], dtype=np.float32) for i, t in enumerate(lengths)}
    module = AudioDataModule(
        audio_dir=audio_dir,
        track_ids={"train": ["a", "b"], "valid": ["c"], "test": ["d"]},
        targets=targets,
        crop_samples=10000,
        eval_hop_samples=5000,
        batch_size=2,
        crops_per_clip=3,
    )
    module.setup()
    x, y, clips = next(iter(module.train_dataloader()))
    assert x.shape == (2, 1, 10000) and x.dtype == torch.float32 and y.shape == (2, 1)
    assert set(clips.tolist()) <= {0, 1}  # each crop's clip, by position in the train split
    assert float(x.abs().max()) <= 32768.0 and float(x.abs().max()) > 1000.0  # int16-valued, not rescaled
    assert module._clips["train"][1].shape == (1, 10000)  # 9,000 samples padded to one crop
    windows, clip_index, clip_targets, positions = next(iter(module.test_dataloader()))
    assert windows.shape == (1 + (30000 - 10000) // 5000, 1, 10000) and set(clip_index.tolist()) == {0}
    assert clip_targets.shape == (1, 1) and positions.tolist() == [0]  # one clip: the first of its split
    missing = AudioDataModule(
        audio_dir=audio_dir,
        track_ids={"train": ["a", "zz"], "valid": ["c"], "test": ["d"]},
        targets=targets,
        crop_samples=10000,
        eval_hop_samples=5000,
        batch_size=2,
        crops_per_clip=1,
    )
    with pytest.raises(DatasetError, match="no raw-audio shard"):
        missing.setup()
    other_rate = AudioDataModule(
        audio_dir=audio_dir,
        track_ids={"train": ["a"], "valid": ["c"], "test": ["d"]},
        targets=targets,
        crop_samples=10000,
        eval_hop_samples=5000,
        batch_size=2,
        crops_per_clip=1,
        sample_rate=22050,
    )
    with pytest.raises(DatasetError, match="not 22050 Hz"):
        other_rate.setup()


def test_short_chunk_resnet_at_its_published_size() -> None:
    from lightning_modules.architectures import ShortChunkResNet

    net = ShortChunkResNet(n_mels=128, n_frames=231, n_outputs=50).eval()  # 59,049 samples at hop 256
    assert net(torch.randn(2, 128, 231)).shape == (2, 50)
    widths = [m.body[0].out_channels for m in net.features if hasattr(m, "body")]
    assert widths == [128, 128, 256, 256, 256, 256, 512]
    with pytest.raises(ValueError, match="too small"):
        ShortChunkResNet(n_mels=32, n_frames=231, n_outputs=50)


def test_resident_crops_are_slices_of_their_clips() -> None:
    from lightning_modules.datamodule import ResidentCrops

    clips = [torch.arange(2 * n, dtype=torch.float16).reshape(2, n) + 1000 * i for i, n in enumerate((50, 80, 64))]
    targets = torch.eye(3)
    crops = ResidentCrops(clips, targets, crop=20, crops_per_clip=4, batch_size=5, seed=0)
    batches = list(crops)
    assert len(batches) == len(crops) == 3  # 12 crops in batches of 5
    seen = torch.zeros(3)
    for x, y, positions in batches:
        assert x.shape[1:] == (2, 20) and x.dtype == torch.float32
        for crop, target, position in zip(x, y, positions):
            i = int(target.argmax())
            assert int(position) == i
            seen[i] += 1
            start = int(crop[0, 0]) - 1000 * i
            torch.testing.assert_close(crop, clips[i][:, start : start + 20].float())
    assert seen.tolist() == [4.0, 4.0, 4.0]  # every clip crops_per_clip times
    with pytest.raises(DatasetError, match="shorter than a crop"):
        ResidentCrops(clips, targets, crop=60, crops_per_clip=1, batch_size=2)


def test_resident_crops_split_an_epoch_evenly_between_ranks(monkeypatch) -> None:
    from lightning_modules.datamodule import ResidentCrops

    g = torch.Generator().manual_seed(0)
    clips = [torch.randn(2, 60, generator=g) for _ in range(11)]  # 11 clips x 3 crops = 33: odd on purpose
    targets = torch.arange(11, dtype=torch.float32)[:, None]
    drawn = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        monkeypatch.setattr(ResidentCrops, "_rank", staticmethod(lambda rank=rank, world=world: (rank, world)))
        crops = ResidentCrops(clips, targets, crop=20, crops_per_clip=3, batch_size=4, seed=5)
        epochs = [[(x, y) for x, y, _ in crops] for _ in range(2)]
        assert [len(e) for e in epochs] == [len(crops)] * 2
        drawn[rank, world] = [torch.cat([y for _, y in e]).flatten().tolist() for e in epochs]
    assert len(crops) == 4  # 16 crops on each of 2 ranks (the 33rd dropped): the same number of steps
    for epoch in range(2):  # every rank drew the one-process epoch and took alternate crops of it, epoch after epoch
        whole = drawn[0, 1][epoch]
        assert drawn[0, 2][epoch] == whole[0::2][:16] and drawn[1, 2][epoch] == whole[1::2][:16]


@pytest.mark.parametrize("resident", ["off", "cpu"])
def test_raw_tagger_trains_from_pcm_shards(tmp_path, resident) -> None:
    import pandas as pd

    from core.settings import TrainSettings
    from lightning_modules.train import train_raw_tagger

    rng = np.random.default_rng(0)
    ids = [f"t{i}" for i in range(24)]
    loud = [i % 2 == 0 for i in range(24)]  # "tone": a 440 Hz tone; the others noise
    t = np.arange(8000) / 8000.0
    rows = [
        (track, (0.5 * np.sin(2 * np.pi * 440 * t) if on else 0.3 * rng.standard_normal(8000)).astype(np.float32))
        for track, on in zip(ids, loud)
    ]
    audio_dir = tmp_path / "audio"
    write_feature_shard(audio_to_table(rows, sample_rate=8000), audio_dir / "part-0.parquet")
    tracks = pd.DataFrame(
        {
            "track_id": ids,
            "split": ["train"] * 16 + ["valid"] * 4 + ["test"] * 4,
            "tags": [["tone"] if on else ["noise"] for on in loud],
        }
    )
    train = TrainSettings(
        crop_seconds=0.5,
        eval_hop_seconds=0.25,
        batch_size=8,
        crops_per_clip=2,
        max_epochs=3,
        patience=3,
        resident_data=resident,
        seed=0,
    )
    result = train_raw_tagger(
        audio_dir=audio_dir,
        tracks=tracks,
        tags=["noise", "tone"],
        train=train,
        sample_rate=8000,
        model={"filter_length": 64, "stride": 32, "n_filters": 16},
        checkpoint_dir=tmp_path / "ckpt",
    )
    assert result.metrics["test/roc_auc"] > 0.9 and result.checkpoint.exists()
