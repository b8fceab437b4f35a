"""A LightningDataModule over the raw-audio (int16 PCM) shards, for the end-to-end models.

Training draws random fixed-length crops (3 s at 16 kHz by default) from each clip;
evaluation cuts every clip into overlapping windows, which the tagger averages into
one prediction per clip, exactly as the spectrogram path does. Clips stay int16 in
memory (2 bytes a sample); the model scales them to [-1, 1] itself, so that a
checkpoint applied to a decoded waveform sees what it saw in training.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from core.errors import DatasetError
from lightning_modules.datamodule import ClipDataModule
from tasks.shards import read_audio

PCM_SCALE = 1.0 / 32768.0  # int16 sample -> [-1, 1)


class AudioDataModule(ClipDataModule):
    """Crops of raw waveforms ``(1, crop_samples)`` with one target vector per track.

    Parameters
    ----------
    audio_dir : Path
        Folder of the PCM shards (``audio/<dataset>/``, written by the feature flow with ``audio_shards``).
    track_ids, targets : as for :class:`~lightning_modules.datamodule.FeatureDataModule`
    crop_samples, eval_hop_samples : int > 0
        Training crop length and the hop between evaluation windows, in samples.
    sample_rate : int, optional
        The rate the model expects; a clip stored at another rate is a ``DatasetError``.
    """

    def __init__(
        self,
        *,
        audio_dir: Path,
        track_ids: dict[str, list[str]],
        targets: dict[str, np.ndarray],
        crop_samples: int,
        eval_hop_samples: int,
        batch_size: int,
        crops_per_clip: int,
        num_workers: int = 0,
        resident: str | None = None,
        seed: int = 0,
        sample_rate: int | None = None,
    ) -> None:
        super().__init__(
            track_ids=track_ids,
            targets=targets,
            crop=crop_samples,
            hop=eval_hop_samples,
            batch_size=batch_size,
            crops_per_clip=crops_per_clip,
            num_workers=num_workers,
            resident=resident,
            seed=seed,
        )
        self.audio_dir = Path(audio_dir)
        self.sample_rate = sample_rate  # when given, every clip must be stored at this rate

    def setup(self, stage: str | None = None) -> None:
        if self._clips:
            return
        wanted = [t for ids in self.track_ids.values() for t in ids]
        pcm = read_audio(self.audio_dir, track_ids=wanted, sample_rate=self.sample_rate)
        missing = sorted(set(wanted) - set(pcm))
        if missing:
            raise DatasetError(
                f"{len(missing)} tracks have no raw-audio shard in {self.audio_dir}, e.g. "
                f"{missing[:3]}: run the feature flow with audio shards (FeatureSettings.audio_shards=True)"
            )
        for split, ids in self.track_ids.items():
            self._clips[split] = [self._prepare(pcm[t]) for t in ids]

    def _prepare(self, samples: np.ndarray) -> torch.Tensor:
        """``(1, n_samples)`` int16; a clip shorter than a crop is padded with silence."""
        if samples.size < self.crop:
            samples = np.concatenate([samples, np.zeros(self.crop - samples.size, dtype=np.int16)])
        return torch.from_numpy(np.ascontiguousarray(samples, dtype=np.int16)).unsqueeze(0)
