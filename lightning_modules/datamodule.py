"""A LightningDataModule over the Parquet feature shards.

Training draws random fixed-length crops (3 s by default) from each clip;
evaluation cuts every clip into overlapping windows, and the LightningModules
average the windows' outputs into one prediction per clip.

The selected tracks' features are read once into memory as float16 (small for the
datasets of the papers: all of MagnaTagATune is about 8.5 GB at hop 512). The
training split's per-band mean and deviation are computed here and handed to the
LightningModule, which standardizes its input itself, so that a checkpoint applied
to fresh ``log_mel`` output sees what it saw in training.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from core.errors import DatasetError, ParameterError
from tasks.shards import read_features


class RandomCropDataset(Dataset):
    """``crops_per_clip`` random crops per clip and epoch: ``(mel [n_mels, crop], target, clip position)``.

    The clip's position in the split lets an objective look up more than the target
    (the WPE objective: the clip's listeners).
    """

    def __init__(self, clips: list[torch.Tensor], targets: torch.Tensor, *, crop: int, crops_per_clip: int) -> None:
        self.clips, self.targets, self.crop, self.crops_per_clip = clips, targets, crop, crops_per_clip

    def __len__(self) -> int:
        return len(self.clips) * self.crops_per_clip

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        i = index % len(self.clips)
        clip = self.clips[i]
        start = int(torch.randint(0, clip.shape[1] - self.crop + 1, ()).item())
        return clip[:, start : start + self.crop].float(), self.targets[i], i


class ClipWindowsDataset(Dataset):
    """Every window of a clip at a fixed hop: ``(windows [n_windows, n_mels, crop], target, clip position)``.

    The clip's position in the split travels with it, so that evaluation gathered from
    several ranks (whose samplers pad with repeated clips) can count every clip once.
    """

    def __init__(self, clips: list[torch.Tensor], targets: torch.Tensor, *, crop: int, hop: int) -> None:
        self.clips, self.targets, self.crop, self.hop = clips, targets, crop, hop

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return clip_windows(self.clips[index], crop=self.crop, hop=self.hop), self.targets[index], index


def clip_windows(clip: torch.Tensor, *, crop: int, hop: int) -> torch.Tensor:
    """Every window of one clip ``[shape=(n_mels, n_frames)]`` at a fixed hop ``[shape=(n_windows, n_mels, crop)]``."""
    return clip.unfold(1, crop, hop).permute(1, 0, 2).float()


def pad_to_crop(clip: np.ndarray, *, crop: int, fill: np.ndarray) -> np.ndarray:
    """A clip ``[shape=(n_mels, n_frames)]`` shorter than a crop, padded on the right with ``fill [shape=(n_mels,)]``."""
    if clip.shape[1] >= crop:
        return clip
    pad = np.repeat(np.asarray(fill, dtype=clip.dtype)[:, None], crop - clip.shape[1], axis=1)
    return np.concatenate([clip, pad], axis=1)


def collate_windows(
    batch: list[tuple[torch.Tensor, torch.Tensor, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack all windows of a batch of clips: ``(windows, clip index of each window, targets, clip positions)``."""
    windows = torch.cat([w for w, _, _ in batch])
    clip_index = torch.cat([torch.full((len(w),), i, dtype=torch.long) for i, (w, _, _) in enumerate(batch)])
    return windows, clip_index, torch.stack([t for _, t, _ in batch]), torch.tensor([p for _, _, p in batch])


def stat_buffer(values: list[float] | None, n: int, default: float) -> torch.Tensor:
    """Per-band statistics as a float32 tensor (``default`` everywhere when None)."""
    if values is None:
        return torch.full((n,), default)
    if len(values) != n:
        raise ParameterError(
            f"{len(values)} per-band statistics for {n} mel bands: give one mean and one deviation per band "
            "(compute them on features with the model's n_mels)"
        )
    return torch.tensor(values, dtype=torch.float32)


def standardize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-band standardization of crops ``[shape=(batch, n_mels, n_frames)]``."""
    return (x.float() - mean[:, None]) / std[:, None]


def clip_means(values: torch.Tensor, clip_index: torch.Tensor, n_clips: int) -> torch.Tensor:
    """Average window outputs ``[shape=(n_windows, d)]`` into clip outputs ``[shape=(n_clips, d)]``."""
    sums = torch.zeros(n_clips, values.shape[1], dtype=values.dtype, device=values.device).index_add_(
        0, clip_index, values
    )
    counts = torch.bincount(clip_index, minlength=n_clips).clamp_min(1).to(values.dtype)
    return sums / counts[:, None]


class ResidentCrops(IterableDataset):
    """Random crops cut by gather from one padded tensor of every clip, on its device; yields whole batches
    ``(crops, targets, clip positions)``.

    For small models the loader, not the model, is the limit (DESIGN.md §7): with the
    split resident (on the GPU, or in this process's memory) a batch of crops is one
    indexing operation instead of ``batch_size`` Python calls and a copy. An epoch has
    as many crops as :class:`RandomCropDataset` (``crops_per_clip`` per clip), each clip
    drawn ``crops_per_clip`` times in a shuffled order, with a uniform start in the clip.
    """

    def __init__(
        self,
        clips: list[torch.Tensor],
        targets: torch.Tensor,
        *,
        crop: int,
        crops_per_clip: int,
        batch_size: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> None:
        lengths = torch.tensor([c.shape[-1] for c in clips])
        if int(lengths.min()) < crop:
            raise DatasetError(f"a clip of {int(lengths.min())} steps is shorter than a crop of {crop}")
        # Time-major (clip, step, channel): a crop is a run of whole rows, so the gather reads contiguous memory.
        padded = torch.zeros(len(clips), int(lengths.max()), clips[0].shape[0], dtype=clips[0].dtype)
        for i, clip in enumerate(clips):
            padded[i, : clip.shape[-1]] = clip.T
        self.device = torch.device(device)
        self.clips, self.lengths = padded.to(self.device), lengths  # lengths stay on the CPU: offsets are drawn there
        self.targets = targets.to(self.device)
        self.crop, self.crops_per_clip, self.batch_size = crop, crops_per_clip, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = torch.arange(crop, device=self.device)

    @staticmethod
    def _rank() -> tuple[int, int]:
        """``(rank, world size)``: under DDP every rank draws the same order and keeps its own share of it."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _share(self) -> int:
        """Crops per rank and epoch: equal on every rank (a remainder of fewer than ``world`` crops is dropped),
        so that every rank takes the same number of steps."""
        _, world = self._rank()
        return len(self.clips) * self.crops_per_clip // world

    def __len__(self) -> int:
        return (self._share() + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        # The whole epoch's draws first, the same on every rank (same seed, same calls); then this rank's share.
        order = torch.randperm(len(self.clips) * self.crops_per_clip, generator=self.generator) % len(self.clips)
        starts = torch.rand(len(order), generator=self.generator)
        rank, world = self._rank()
        share = self._share()
        order, starts = order[rank::world][:share], starts[rank::world][:share]
        for start in range(0, share, self.batch_size):
            clip = order[start : start + self.batch_size]
            room = self.lengths[clip] - self.crop + 1
            offset = (starts[start : start + self.batch_size] * room).long()
            clip = clip.to(self.device)
            if self.device.type == "cpu":  # each crop is one run of whole rows: copy the runs, build no index
                crops = torch.stack([self.clips[c, o : o + self.crop] for c, o in zip(clip.tolist(), offset.tolist())])
            else:  # one gather kernel, whatever the batch size
                where = offset.to(self.device)[:, None] + self.steps[None, :]  # (batch, crop) positions in each clip
                crops = self.clips[clip[:, None], where]  # (batch, crop, channels)
            yield crops.float().transpose(1, 2).contiguous(), self.targets[clip], clip


class ClipDataModule(L.LightningDataModule):
    """Clips with one target vector each: random crops to train, every window of a clip to evaluate.

    Subclasses fill ``self._clips`` (``{split: [tensor [shape=(channels, length)]]}``) in
    :meth:`setup`; crops and windows are cut along the last axis.
    """

    def __init__(
        self,
        *,
        track_ids: dict[str, list[str]],
        targets: dict[str, np.ndarray],
        crop: int,
        hop: int,
        batch_size: int,
        crops_per_clip: int,
        num_workers: int = 0,
        resident: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for split in ("train", "valid", "test"):
            if not track_ids.get(split):
                raise DatasetError(f"the {split!r} split has no tracks with features and targets")
        self.track_ids, self.targets = track_ids, targets
        self.crop, self.hop = crop, hop
        self.batch_size, self.crops_per_clip, self.num_workers = batch_size, crops_per_clip, num_workers
        self.resident, self.seed = resident, seed  # resident: the device the training split lives on, or None
        self._clips: dict[str, list[torch.Tensor]] = {}

    def _targets(self, split: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.targets[t] for t in self.track_ids[split]]).astype(np.float32))

    def train_dataloader(self) -> DataLoader:
        if self.resident is not None:  # batches are made where the data lives: no workers, no collation
            device = self.resident
            if device == "cuda" and self.trainer is not None:  # under DDP: this rank's GPU
                device = self.trainer.strategy.root_device
            crops = ResidentCrops(
                self._clips["train"],
                self._targets("train"),
                crop=self.crop,
                crops_per_clip=self.crops_per_clip,
                batch_size=self.batch_size,
                device=device,
                seed=self.seed,
            )
            return DataLoader(crops, batch_size=None)
        dataset = RandomCropDataset(
            self._clips["train"], self._targets("train"), crop=self.crop, crops_per_clip=self.crops_per_clip
        )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(dataset) > self.batch_size,
            num_workers=self.num_workers,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = ClipWindowsDataset(self._clips[split], self._targets(split), crop=self.crop, hop=self.hop)
        clips_per_batch = max(1, self.batch_size // 8)
        return DataLoader(dataset, batch_size=clips_per_batch, collate_fn=collate_windows, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("valid")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


class FeatureDataModule(ClipDataModule):
    """Crops of log-mel features with one target vector per track.

    Parameters
    ----------
    feature_dir : Path
        Folder of the shards and their manifest.
    column : str
        Feature column, e.g. ``mel_1024``.
    track_ids : dict[str, list[str]]
        Track ids per split (``train``, ``valid``, ``test``).
    targets : dict[str, np.ndarray]
        Target vector of every track id (multi-hot tags or latent factors).
    crop_frames, eval_hop_frames : int > 0
        Training crop length and the hop between evaluation windows, in frames.
    """

    def __init__(
        self,
        *,
        feature_dir: Path,
        column: str,
        track_ids: dict[str, list[str]],
        targets: dict[str, np.ndarray],
        crop_frames: int,
        eval_hop_frames: int,
        batch_size: int,
        crops_per_clip: int,
        num_workers: int = 0,
        resident: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            track_ids=track_ids,
            targets=targets,
            crop=crop_frames,
            hop=eval_hop_frames,
            batch_size=batch_size,
            crops_per_clip=crops_per_clip,
            num_workers=num_workers,
            resident=resident,
            seed=seed,
        )
        self.feature_dir, self.column = Path(feature_dir), column
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def setup(self, stage: str | None = None) -> None:
        if self._clips:
            return
        wanted = [t for ids in self.track_ids.values() for t in ids]
        features = read_features(self.feature_dir, column=self.column, track_ids=wanted)
        train = np.concatenate([features[t] for t in self.track_ids["train"]]).astype(np.float32)
        self.mean, self.std = train.mean(axis=0), train.std(axis=0) + 1e-5
        for split, ids in self.track_ids.items():
            self._clips[split] = [self._prepare(features[t]) for t in ids]

    def _prepare(self, mel: np.ndarray) -> torch.Tensor:
        """Transpose to (n_mels, n_frames); pad clips shorter than a crop with the band means."""
        x = pad_to_crop(mel.T, crop=self.crop, fill=self.mean)
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16))


class VectorDataModule(L.LightningDataModule):
    """One feature vector and one target vector per clip (pooled K-means features, embeddings).

    Parameters
    ----------
    features : dict[str, np.ndarray]
        ``{split: [shape=(n_clips, n_inputs)]}`` for ``train``, ``valid`` and ``test``.
    targets : dict[str, np.ndarray]
        ``{split: [shape=(n_clips, n_outputs)]}``, rows aligned with ``features``.
    """

    def __init__(
        self, *, features: dict[str, np.ndarray], targets: dict[str, np.ndarray], batch_size: int, num_workers: int = 0
    ) -> None:
        super().__init__()
        for split in ("train", "valid", "test"):
            if split not in features or len(features[split]) == 0:
                raise DatasetError(f"the {split!r} split has no clips with features and targets")
            if len(features[split]) != len(targets[split]):
                raise DatasetError(f"{split}: {len(features[split])} feature rows but {len(targets[split])} targets")
        self.features = {s: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for s, v in features.items()}
        self.targets = {s: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for s, v in targets.items()}
        self.batch_size, self.num_workers = batch_size, num_workers
        self.mean = self.features["train"].mean(dim=0).numpy()
        std = self.features["train"].std(dim=0).numpy()
        # A dimension constant over the training clips (e.g. a unit no clip activates) stays unscaled.
        self.std = np.where(std < 1e-6, 1.0, std).astype(np.float32)

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        tensors = (self.features[split], self.targets[split])
        if not shuffle:  # evaluation: each row's position, so that gathered ranks count every clip once
            tensors += (torch.arange(len(self.features[split])),)
        dataset = TensorDataset(*tensors)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            drop_last=shuffle and len(dataset) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
