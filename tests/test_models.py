"""One interface suite over every model family: shapes, finite loss, overfitting, checkpoints, DDP."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from lightning_modules.datamodule import ClipWindowsDataset, clip_means, collate_windows
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.mlp import MLPTaggerModule
from lightning_modules.tagger import RawAudioTaggerModule, TaggerModule

N_MELS, CROP = 16, 94
N_INPUTS = 40  # pooled K-means features of the MLP tagger
N_SAMPLES = 4096  # raw-audio crops: 64 steps of a 64-sample stride
# The steps are called directly, outside a Trainer, so their self.log calls have nowhere to go.
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def _tagger() -> TaggerModule:
    return TaggerModule(n_mels=N_MELS, crop_frames=CROP, tags=["a", "b", "c"], learning_rate=3e-3)


def _latent() -> LatentFactorModule:
    return LatentFactorModule(
        n_mels=N_MELS, n_factors=5, channels=(16, 16, 32), hidden=32, dropout=0.0, learning_rate=3e-3, target_scale=2.0
    )


def _mlp_tagger() -> MLPTaggerModule:
    return MLPTaggerModule(n_inputs=N_INPUTS, tags=["a", "b", "c"], hidden=32, dropout=0.0, learning_rate=3e-3)


def _short_chunk_resnet() -> TaggerModule:
    return TaggerModule(
        n_mels=N_MELS * 4,
        crop_frames=CROP,
        tags=["a", "b", "c"],
        architecture="short-chunk-resnet",
        resnet_channels=8,
        learning_rate=3e-3,
    )


def _wide_crops(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, N_MELS * 4, CROP, generator=g)  # seven stride-2 blocks need >= 64 bands


def _raw_tagger() -> RawAudioTaggerModule:
    return RawAudioTaggerModule(
        crop_samples=N_SAMPLES, tags=["a", "b", "c"], filter_length=64, stride=64, n_filters=16, learning_rate=3e-3
    )


def _waveforms(n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, 1, N_SAMPLES, generator=g) * 3000.0).round()  # int16-valued PCM


def _crops(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, N_MELS, CROP, generator=g)


def _vectors(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(n, N_INPUTS, generator=g)


# family: (module factory, inputs(n, generator), targets(generator) for 8 examples)
FAMILIES = {
    "tagger": (_tagger, _crops, lambda g: (torch.rand(8, 3, generator=g) > 0.5).float()),
    "latent_factors": (_latent, _crops, lambda g: torch.randn(8, 5, generator=g)),
    "mlp_tagger": (_mlp_tagger, _vectors, lambda g: (torch.rand(8, 3, generator=g) > 0.5).float()),
    "raw_audio_tagger": (_raw_tagger, _waveforms, lambda g: (torch.rand(8, 3, generator=g) > 0.5).float()),
    "short_chunk_resnet": (_short_chunk_resnet, _wide_crops, lambda g: (torch.rand(8, 3, generator=g) > 0.5).float()),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    make, inputs, targets = FAMILIES[request.param]
    g = torch.Generator().manual_seed(0)
    x = inputs(8, g)
    return request.param, make, x, targets(g)


def test_output_shape_and_finite_loss(family):
    _, make, x, y = family
    module = make()
    out = module(x)
    assert out.shape == y.shape
    loss = module.training_step((x, y), 0)
    assert torch.isfinite(loss)


def test_overfits_one_batch(family):
    _, make, x, y = family
    L.seed_everything(0)
    module = make()
    optimizer = module.configure_optimizers()
    first = module.training_step((x, y), 0).item()
    for _ in range(150):
        optimizer.zero_grad()
        loss = module.training_step((x, y), 0)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * first


def test_checkpoint_round_trip_with_weights_only(family, tmp_path):
    name, make, x, _ = family
    module = make().eval()
    trainer = L.Trainer(
        max_epochs=0, logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.strategy.connect(module)
    path = tmp_path / f"{name}.ckpt"
    trainer.save_checkpoint(path)
    loaded = type(module).load_from_checkpoint(path, weights_only=True).eval()
    torch.testing.assert_close(loaded(x), module(x))
    assert loaded.hparams == module.hparams


def test_clip_windows_average_back_to_one_prediction_per_clip():
    clips = [torch.randn(N_MELS, 200).half(), torch.randn(N_MELS, 100).half()]
    dataset = ClipWindowsDataset(clips, torch.zeros(2, 3), crop=CROP, hop=47)
    windows, clip_index, targets, positions = collate_windows([dataset[0], dataset[1]])
    assert positions.tolist() == [0, 1]
    assert windows.shape[1:] == (N_MELS, CROP)
    assert clip_index.tolist().count(0) == 1 + (200 - CROP) // 47 and clip_index.tolist().count(1) == 1
    means = clip_means(torch.arange(len(windows), dtype=torch.float32)[:, None], clip_index, 2)
    assert means[0].item() == np.mean(np.flatnonzero(clip_index.numpy() == 0)) and targets.shape == (2, 3)


class _RandomCrops(L.LightningDataModule):
    def __init__(self, inputs, targets):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = torch.utils.data.TensorDataset(inputs(16, g), targets(g)[:1].repeat(16, 1))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=4)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_trains_under_ddp_with_two_cpu_processes(family, tmp_path, monkeypatch):
    from torch.multiprocessing import ProcessExitedException

    name, make, _, _ = family
    module = make()
    before = [p.detach().clone() for p in module.parameters()]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    for attempt in range(2):
        # Seen once in ~6 full-suite runs on 2 cores: a spawned rank killed by a signal
        # while gloo connects. One retry on a fresh port tells that apart from a real failure.
        monkeypatch.setenv("MASTER_PORT", str(_free_port()))
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2,
            strategy="ddp_spawn",
            max_epochs=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        try:
            trainer.fit(module, datamodule=_RandomCrops(*FAMILIES[name][1:]))
            break
        except ProcessExitedException:
            if attempt == 1:
                raise
    # ddp_spawn hands rank 0's trained weights back to this process.
    assert trainer.world_size == 2
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))


def test_mlp_tagger_learns_separable_tags_and_reports_per_tag_metrics(tmp_path):
    from core.settings import MLPSettings, TrainSettings
    from lightning_modules.train import train_mlp_tagger

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((N_INPUTS, 3))
    splits = {}
    for split, n in (("train", 600), ("valid", 100), ("test", 100)):
        x = rng.standard_normal((n, N_INPUTS)).astype(np.float32) * 5.0 + 3.0  # unstandardized on purpose
        splits[split] = (x, ((x - 3.0) @ weights > 0).astype(np.float32))
    settings = MLPSettings(
        hidden=32, dropout=0.2, train=TrainSettings(max_epochs=30, patience=30, batch_size=32, seed=0)
    )
    result = train_mlp_tagger(
        features={s: v[0] for s, v in splits.items()},
        targets={s: v[1] for s, v in splits.items()},
        tags=["a", "b", "c"],
        settings=settings,
        checkpoint_dir=tmp_path,
        quiet=True,
    )
    assert result.metrics["test/roc_auc"] > 0.9 and result.metrics["test/pr_auc"] > 0.8
    assert list(result.module.test_table.columns) == ["tag", "positives", "roc_auc", "pr_auc"]
    assert sorted(result.module.test_table["tag"]) == ["a", "b", "c"]
    assert result.checkpoint.exists()


class _FixedClips(L.LightningDataModule):
    """Seven clips (an odd number: two ranks' samplers pad with a repeat) of fixed features and targets."""

    def __init__(self, n_targets: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        clips = [torch.randn(N_MELS, CROP + 40 * i, generator=g).half() for i in range(7)]
        targets = torch.tensor(
            [[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1], [1, 1, 1]], dtype=torch.float32
        )
        if n_targets != 3:  # real-valued factors
            targets = torch.randn(7, n_targets, generator=g)
        self.dataset = ClipWindowsDataset(clips, targets, crop=CROP, hop=40)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.dataset, batch_size=2, collate_fn=collate_windows)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "n_targets", "metrics"),
    [(_tagger, 3, ("val/roc_auc", "val/pr_auc")), (_latent, 5, ("val/mse",))],
    ids=["tagger", "latent"],
)
def test_evaluation_under_ddp_counts_every_clip_once_and_equals_one_device(
    make, n_targets, metrics, tmp_path, monkeypatch
):
    L.seed_everything(0)
    module = make().eval()
    one = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).validate(module, datamodule=_FixedClips(n_targets), verbose=False)[0]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    two = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).validate(module, datamodule=_FixedClips(n_targets), verbose=False)[0]
    for metric in metrics:
        assert two[metric] == pytest.approx(one[metric], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{"precision": "bf16-mixed"}, {"compile": True}], ids=["bf16-mixed", "compile"])
def test_mixed_precision_and_compile_train_and_checkpoint(options, tmp_path):
    from core.settings import MLPSettings, TrainSettings
    from lightning_modules.train import train_mlp_tagger

    rng = np.random.default_rng(0)
    weights = rng.standard_normal((N_INPUTS, 3))
    splits = {}
    for split, n in (("train", 600), ("valid", 100), ("test", 100)):
        x = rng.standard_normal((n, N_INPUTS)).astype(np.float32)
        splits[split] = (x, (x @ weights > 0).astype(np.float32))
    settings = MLPSettings(
        hidden=32, dropout=0.0, train=TrainSettings(max_epochs=12, patience=12, batch_size=32, seed=0, **options)
    )
    result = train_mlp_tagger(
        features={s: v[0] for s, v in splits.items()},
        targets={s: v[1] for s, v in splits.items()},
        tags=["a", "b", "c"],
        settings=settings,
        checkpoint_dir=tmp_path,
        quiet=True,
    )
    assert result.metrics["test/roc_auc"] > 0.75  # it trained
    state = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)  # compiled in place: loadable by the plain module
