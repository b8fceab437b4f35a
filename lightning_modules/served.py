"""The trained families as MLflow pyfunc models: what the registry serves.

The tagger and the latent-factor CNN take **audio**: a float32 array of mono
waveforms at the model's sample rate, ``[shape=(batch, n_samples)]`` (one clip per
row; clips of different lengths go in separate calls). The log-mel spectrogram is
computed inside the model by :func:`tasks.spectrogram.log_mel`, the function that
builds the feature shards, with the settings the model was trained on (stored with
the model as ``config.json``), and rounded through float16 as the shards are. Every
window of a clip goes through the network and the outputs are averaged, exactly as
evaluation does. The mirflow packages travel with each model (MLflow ``code_paths``),
so there is one copy of this code, not a second one for serving.

``mirflow-wmf`` takes a table of ``user_id, item_id`` pairs and returns
``score = x_uᵀ y_i`` (NaN for an unknown user or item).

Checkpoints load with ``weights_only=True``; nothing is unpickled. The models are
logged as MLflow "models from code" (``lightning_modules/mlflow_models/*.py``), so the
Python object is not pickled either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from core import storage
from core.errors import ParameterError
from core.settings import MelSettings
from lightning_modules.datamodule import clip_windows, pad_to_crop
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.tagger import TaggerModule


def mel_clips(waveforms: np.ndarray, *, mel: MelSettings) -> list[np.ndarray]:
    """Log-mel of each waveform ``[shape=(batch, n)]`` as the shards hold it: float16 ``(n_frames, n_mels)``."""
    from tasks.spectrogram import log_mel

    waveforms = np.asarray(waveforms, dtype=np.float32)
    if waveforms.ndim == 1:
        waveforms = waveforms[None]
    if waveforms.ndim != 2 or waveforms.shape[1] == 0:
        raise ParameterError(
            f"expected waveforms shaped (batch, n_samples) at {mel.sample_rate} Hz, got shape {waveforms.shape}"
        )
    out = log_mel(waveforms, settings=mel)
    return [clip.to(torch.float16).numpy() for clip in out]


@torch.no_grad()
def clip_outputs(
    module: torch.nn.Module,
    mels: Sequence[np.ndarray],
    *,
    crop: int,
    hop: int,
    transform: Callable[[torch.Tensor], torch.Tensor],
) -> np.ndarray:
    """``transform(module(window))`` averaged over every window of each clip.

    Parameters
    ----------
    mels : sequence of np.ndarray [shape=(n_frames, n_mels)]
        Log-mel clips as the shards hold them; shorter than ``crop`` frames is padded
        with the training split's band means (as the DataModule does).
    crop, hop : int > 0
        Window length and hop in frames.

    Returns
    -------
    np.ndarray [shape=(n_clips, n_outputs), dtype=float32]
    """
    was_training = module.training
    module.eval()
    fill = module.feature_mean.cpu().numpy()
    out = []
    try:
        for mel in mels:
            x = pad_to_crop(np.asarray(mel, dtype=np.float16).T, crop=crop, fill=fill)
            windows = clip_windows(torch.from_numpy(np.ascontiguousarray(x)), crop=crop, hop=hop)
            out.append(transform(module(windows.to(module.device)).float()).mean(dim=0).cpu())
    finally:
        module.train(was_training)
    return torch.stack(out).numpy().astype(np.float32)


def predict_latent_factors(
    module: LatentFactorModule, mels: Sequence[np.ndarray], *, crop: int, hop: int
) -> np.ndarray:
    """Item factors predicted from log-mel clips, in the factorization's scale ``[shape=(n_clips, n_factors)]``."""
    scale = float(module.hparams.target_scale)
    return clip_outputs(module, mels, crop=crop, hop=hop, transform=lambda y: y * scale)


def predict_tag_scores(module: TaggerModule, mels: Sequence[np.ndarray], *, crop: int, hop: int) -> np.ndarray:
    """Tag probabilities of log-mel clips ``[shape=(n_clips, n_tags)]`` (window sigmoids averaged)."""
    return clip_outputs(module, mels, crop=crop, hop=hop, transform=torch.sigmoid)


def served_config(*, mel: MelSettings, crop_frames: int, hop_frames: int) -> dict:
    """What a served model needs besides its weights: the spectrogram settings and the windowing."""
    return {"mel": mel.model_dump(mode="json"), "crop_frames": crop_frames, "hop_frames": hop_frames}


class _AudioModel(mlflow.pyfunc.PythonModel):
    module_class: type = TaggerModule

    def load_context(self, context) -> None:
        config = storage.read_json(context.artifacts["config"])
        self.mel = MelSettings.model_validate(config["mel"])
        self.crop, self.hop = int(config["crop_frames"]), int(config["hop_frames"])
        self.module = self.module_class.load_from_checkpoint(
            context.artifacts["checkpoint"], weights_only=True, map_location="cpu"
        )
        self.module.eval()


class TaggerPyfunc(_AudioModel):
    """Waveforms ``(batch, n_samples)`` at the model rate -> a DataFrame of tag probabilities, one column per tag."""

    module_class = TaggerModule

    def predict(self, context, model_input: np.ndarray, params=None) -> pd.DataFrame:
        scores = predict_tag_scores(self.module, mel_clips(model_input, mel=self.mel), crop=self.crop, hop=self.hop)
        return pd.DataFrame(scores.astype(np.float64), columns=list(self.module.hparams.tags))


class LatentFactorPyfunc(_AudioModel):
    """Waveforms ``(batch, n_samples)`` at the model rate -> predicted WMF item factors ``(batch, n_factors)``."""

    module_class = LatentFactorModule

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        return predict_latent_factors(self.module, mel_clips(model_input, mel=self.mel), crop=self.crop, hop=self.hop)


class WMFPyfunc(mlflow.pyfunc.PythonModel):
    """``user_id, item_id`` pairs -> ``score = x_uᵀ y_i``; NaN where either id is unknown."""

    def load_context(self, context) -> None:
        from tasks.listening import load_factors

        users, self.user_factors = load_factors(Path(context.artifacts["user_factors"]))
        items, item_factors = load_factors(Path(context.artifacts["item_factors"]))
        if "heldout_item_factors" in context.artifacts:  # cold start: held-out items folded in from their plays
            heldout, heldout_factors = load_factors(Path(context.artifacts["heldout_item_factors"]))
            items, item_factors = np.concatenate([items, heldout]), np.concatenate([item_factors, heldout_factors])
        self.item_factors = item_factors
        self.users, self.items = pd.Index(users.astype(str)), pd.Index(items.astype(str))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        frame = pd.DataFrame(model_input)
        missing = {"user_id", "item_id"} - set(frame.columns)
        if missing:
            raise ParameterError(f"mirflow-wmf needs columns user_id and item_id; missing {sorted(missing)}")
        u = self.users.get_indexer(frame["user_id"].astype(str))
        i = self.items.get_indexer(frame["item_id"].astype(str))
        known = (u >= 0) & (i >= 0)
        scores = np.full(len(frame), np.nan)
        scores[known] = np.einsum("nf,nf->n", self.user_factors[u[known]], self.item_factors[i[known]])
        return pd.DataFrame({"score": scores})


class PretrainedEmbeddingPyfunc(mlflow.pyfunc.PythonModel):
    """Pooled K-means features ``(batch, n_inputs)`` -> embeddings ``(batch, n_hidden)``: a pre-trained source model.

    The model's ``config.json`` holds the feature and K-means settings its inputs need and
    its ``codebooks`` folder the codebooks: ``mirflow embed`` computes those inputs for a
    new catalogue with the feature flows, then calls this (or the module directly).
    """

    def load_context(self, context) -> None:
        from lightning_modules.mlp import FactorRegressorModule

        self.module = FactorRegressorModule.load_from_checkpoint(
            context.artifacts["checkpoint"], weights_only=True, map_location="cpu"
        ).eval()
        self.config = storage.read_json(context.artifacts["config"])

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        x = np.asarray(model_input, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.module.hparams.n_inputs:
            raise ParameterError(
                f"expected pooled K-means features shaped (batch, {self.module.hparams.n_inputs}), got {x.shape}"
            )
        return self.module.embed(torch.from_numpy(x)).numpy()
