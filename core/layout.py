"""Where everything lives under the storage root (DESIGN.md §2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    def world(self) -> Path:
        return self.root / "raw" / "synthetic"

    def tracks(self, dataset: str) -> Path:
        return self.root / "tracks" / f"{dataset}.parquet"

    def quarantine(self, dataset: str) -> Path:
        return self.root / "quarantine" / f"{dataset}.parquet"

    def features(self, dataset: str, feature_set: str) -> Path:
        return self.root / "features" / dataset / feature_set

    def audio(self, dataset: str) -> Path:
        return self.root / "audio" / dataset

    def listening(self) -> Path:
        return self.root / "listening"

    def wmf(self) -> Path:
        return self.root / "models" / "wmf"

    def checkpoints(self, family: str) -> Path:
        return self.root / "models" / family

    def reports(self) -> Path:
        return self.root / "reports"

    def inbox(self) -> Path:
        """Where new listening files land for ``retrain-on-new-listening``."""
        return self.root / "inbox" / "listening"

    def retrain_lock(self) -> Path:
        """Held while a retraining runs: one at a time per storage root."""
        return self.root / "models" / ".retrain.lock"

    def pipeline_settings(self) -> Path:
        """The settings of the last finished pipeline run (what retraining starts from)."""
        return self.root / "models" / "pipeline-settings.json"
