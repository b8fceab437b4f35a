"""What the web service serves: the champion models and the catalogue they describe, loaded once.

Models come from the MLflow registry (the ``champion`` of ``mirflow-tagger`` and
``mirflow-latent-factor-cnn``, and the WMF version that CNN names); without a registry,
from the latest pipeline run's artifacts (and the log says so). The catalogue is the
pipeline's tracks table with every track's tags, its WMF factors where the factorization
has them, its factors predicted from audio by the CNN (from the log-mel shards, the
features the CNN was trained on) and 2-D t-SNE coordinates of those predictions. The
predictions and the map are computed once per (models, shards) and cached under
``<data>/serve/``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from core import storage
from core.errors import DatasetError
from core.layout import Layout
from core.settings import MelSettings, TrackingSettings
from infra.registry import (
    CHAMPION,
    LATENT_FACTOR_CNN,
    TAGGER,
    WMF,
    WMF_VERSION_TAG,
    client_for,
)
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.served import predict_latent_factors
from lightning_modules.tagger import TaggerModule
from tasks.listening import load_factors
from tasks.report import tsne_coordinates
from tasks.shards import MANIFEST, content_sha1, read_features

log = logging.getLogger("mirflow")
TRACK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what an id in a URL may look like


@dataclass
class AudioModel:
    """A tagger or CNN with the spectrogram settings and windowing it was trained with."""

    module: TaggerModule | LatentFactorModule
    mel: MelSettings
    crop: int
    hop: int
    version: str  # "mirflow-tagger v3", or "run <id>"


@dataclass
class Catalogue:
    dataset: str
    track_ids: np.ndarray  # (n,) str, the tracks table's order
    tags: list[list[str]]
    audio: dict[str, str]  # track id -> its file (served by id, never by a path from a request)
    predicted: np.ndarray  # (n, f) factors predicted from audio
    wmf: np.ndarray  # (n, f) WMF item factors (held-out tracks folded in from their plays); NaN where none
    factorized: np.ndarray  # (n,) bool: the track was in the factorization (False: new, cold start)
    users: np.ndarray  # (u,) str
    user_factors: np.ndarray  # (u, f)
    coordinates: np.ndarray  # (n, 2) t-SNE of ``predicted``
    tagger: AudioModel
    cnn: AudioModel
    source: str  # where the models came from, for /healthz and the log
    position: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.position = {t: i for i, t in enumerate(self.track_ids)}


def _audio_model(folder: Path, module_class, version: str) -> AudioModel:
    artifacts = Path(folder) / "artifacts"
    config = storage.read_json(artifacts / "config.json")
    checkpoint = next(artifacts.glob("*.ckpt"))
    module = module_class.load_from_checkpoint(checkpoint, weights_only=True, map_location="cpu").eval()
    return AudioModel(
        module=module,
        mel=MelSettings.model_validate(config["mel"]),
        crop=int(config["crop_frames"]),
        hop=int(config["hop_frames"]),
        version=version,
    )


def _download(uri: str, into: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))


def load_models(tracking: TrackingSettings, *, into: Path) -> tuple[AudioModel, AudioModel, dict[str, Path], str]:
    """``(tagger, cnn, WMF factor files, source)``: the registry's champions, else the latest pipeline run's."""
    mlflow.set_tracking_uri(tracking.tracking_uri)
    client = client_for(tracking)
    try:
        tagger_v = client.get_model_version_by_alias(TAGGER, CHAMPION)
        cnn_v = client.get_model_version_by_alias(LATENT_FACTOR_CNN, CHAMPION)
        wmf_version = cnn_v.tags[WMF_VERSION_TAG]
        uris = {
            "tagger": f"models:/{TAGGER}/{tagger_v.version}",
            "cnn": f"models:/{LATENT_FACTOR_CNN}/{cnn_v.version}",
            "wmf": f"models:/{WMF}/{wmf_version}",
        }
        source = (
            f"registry: {TAGGER} v{tagger_v.version}, {LATENT_FACTOR_CNN} v{cnn_v.version}, "
            f"{WMF} v{wmf_version} (champions)"
        )
    except Exception:  # no registry, no champion yet, or a CNN that names no WMF version
        runs = MlflowClient(tracking.tracking_uri).search_runs(
            [
                e.experiment_id
                for e in MlflowClient(tracking.tracking_uri).search_experiments()
                if e.name.endswith("-pipeline")
            ],
            filter_string="tags.`mirflow.complete` = 'true'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not runs:
            raise DatasetError(
                "no champion models in the registry and no finished pipeline run: run `make demo` "
                "(or `mirflow pipeline`) first"
            ) from None
        tags = runs[0].data.tags
        uris = {
            "tagger": f"runs:/{tags['tagger_run_id']}/model",
            "cnn": f"runs:/{tags['recommender_run_id']}/model",
            "wmf": f"runs:/{tags['wmf_run_id']}/model",
        }
        source = f"pipeline run {runs[0].info.run_id} (no registry champions)"
        log.warning("serve: no champion models in the registry; using the artifacts of %s", source)
    folders = {name: _download(uri, Path(into) / name) for name, uri in uris.items()}
    tagger = _audio_model(folders["tagger"], TaggerModule, uris["tagger"])
    cnn = _audio_model(folders["cnn"], LatentFactorModule, uris["cnn"])
    wmf = {p.stem: p for p in (folders["wmf"] / "artifacts").glob("*.parquet")}
    return tagger, cnn, wmf, source


def load_catalogue(
    data_dir: Path, tracking: TrackingSettings, *, dataset: str = "synthetic", feature_set: str | None = None
) -> Catalogue:
    """The models and the catalogue of ``dataset``; predictions and map cached under ``<data>/serve/``."""
    layout = Layout(Path(data_dir))
    cache = Path(data_dir) / "serve"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tagger, cnn, wmf_files, source = load_models(tracking, into=Path(tmp))
        users, user_factors = load_factors(wmf_files["user_factors"])
        items, item_factors = load_factors(wmf_files["item_factors"])
        factorized = set(items)
        if "heldout_item_factors" in wmf_files:
            held, held_factors = load_factors(wmf_files["heldout_item_factors"])
            items, item_factors = np.concatenate([items, held]), np.concatenate([item_factors, held_factors])
    tracks = storage.read_frame(layout.tracks(dataset), columns=["track_id", "source_path", "tags"])
    feature_dir = _feature_dir(layout, dataset, cnn.mel, feature_set)
    key = hashlib.sha1(
        f"{cnn.version}|{content_sha1(feature_dir / MANIFEST)}|{content_sha1(layout.tracks(dataset))}".encode()
    ).hexdigest()[:16]
    cached = cache / f"catalogue-{key}.npz"
    loaded = None
    if cached.exists():
        try:
            npz = storage.read_npz(cached)
            loaded = npz["track_ids"].astype(str), npz["predicted"], npz["coordinates"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):  # a damaged cache is computed again
            log.warning("serve: the cache %s is unreadable; computing it again", cached)
            cached.unlink(missing_ok=True)
    if loaded is not None:
        ids, predicted, coordinates = loaded
    else:
        mels = read_features(feature_dir, column=cnn.mel.column)
        ids = np.asarray([t for t in tracks["track_id"].astype(str) if t in mels], dtype=str)
        log.info("serve: predicting the factors of %d catalogue tracks (once; cached in %s)", len(ids), cached)
        predicted = predict_latent_factors(cnn.module, [mels[t] for t in ids], crop=cnn.crop, hop=cnn.hop)
        coordinates = tsne_coordinates(predicted, seed=0).astype(np.float32)
        # A cache (computed again when lost): not fsynced. Two servers on one folder write distinct temporary files.
        storage.write_npz(cached, {"track_ids": ids, "predicted": predicted, "coordinates": coordinates}, durable=False)
    tracks = tracks.set_index("track_id").loc[ids]
    factor_of = dict(zip(items, item_factors))
    nan = np.full(item_factors.shape[1], np.nan, dtype=np.float32)
    wmf = np.stack([factor_of.get(t, nan) for t in ids]).astype(np.float32)
    return Catalogue(
        dataset=dataset,
        track_ids=ids,
        tags=[list(v) for v in tracks["tags"]],
        audio=dict(zip(ids, tracks["source_path"].astype(str))),
        predicted=predicted,
        wmf=wmf,
        factorized=np.asarray([t in factorized for t in ids]),
        users=users,
        user_factors=user_factors,
        coordinates=coordinates,
        tagger=tagger,
        cnn=cnn,
        source=source,
    )


def _feature_dir(layout: Layout, dataset: str, mel: MelSettings, feature_set: str | None) -> Path:
    """The log-mel shards the CNN reads: ``feature_set``, the last pipeline run's, or the one set with its column."""
    if feature_set is None and layout.pipeline_settings().exists():
        from core.settings import PipelineSettings

        feature_set = PipelineSettings.model_validate_json(
            storage.read_text(layout.pipeline_settings())
        ).features.feature_set
    if feature_set is not None:
        return layout.features(dataset, feature_set)
    prefix = f"logmel-sr{mel.sample_rate}-n{mel.n_fft}"
    found = sorted(p for p in (layout.root / "features" / dataset).glob(f"{prefix}*") if (p / MANIFEST).exists())
    if len(found) != 1:
        raise DatasetError(
            f"cannot tell which log-mel shards of {dataset!r} the CNN reads ({len(found)} candidates "
            f"under {layout.root / 'features' / dataset}): pass the feature set"
        )
    return found[0]
