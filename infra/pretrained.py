"""Pre-trained source models (ISMIR 2014) as a resource: found in MLflow, downloaded once, validated.

A reference is a run id or a registry URI; :func:`resolve_pretrained` downloads the model's files into a
cache folder (atomically: a folder is moved into place whole, so an interrupted download is never mistaken
for a model), then :func:`read_pretrained` checks that they describe a source model this mirflow can use:
a ``config.json`` of kind ``pretrained-embedding`` with valid feature and K-means settings, a checkpoint and
its codebooks. Every failure a user can cause (an unknown run, an alias that points elsewhere, a model of
another kind, a truncated checkpoint) is a :class:`~core.errors.ParameterError` naming the reference.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow

from core.errors import ParameterError
from core.settings import FeatureSettings, KMeansSettings, TrackingSettings
from infra.registry import CHAMPION
from lightning_modules.mlp import FactorRegressorModule
from tasks.kmeans import pooled_size

PRETRAINED = "mirflow-pretrained"  # registered as mirflow-pretrained-<task>-<model>
#: What ``config.json`` of a pre-trained source model says it is.
PRETRAINED_KIND = "pretrained-embedding"

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class Pretrained:
    """A pre-trained source model, downloaded: what an embedding of a catalogue needs of it."""

    model_uri: str
    run_id: str
    name: str  # e.g. "tags · mlp-1"
    features: FeatureSettings
    kmeans: KMeansSettings
    timescales: tuple[str, ...]
    checkpoint: Path
    codebooks: Path  # a folder of <timescale>.npz

    @property
    def tag(self) -> str:
        """A file-name-safe label of the model: task, architecture, run."""
        return f"{re.sub(r'[^a-z0-9]+', '-', self.name.lower()).strip('-')}-{self.run_id[:8]}"

    def module(self) -> FactorRegressorModule:
        """The network, loaded with ``weights_only=True`` (nothing is unpickled), in eval mode on the CPU."""
        try:
            module = FactorRegressorModule.load_from_checkpoint(self.checkpoint, weights_only=True, map_location="cpu")
        except Exception as err:  # a truncated or foreign file: torch raises several types
            raise ParameterError(f"the checkpoint of {self.model_uri} could not be loaded ({err})") from None
        n_inputs = len(self.timescales) * pooled_size(self.kmeans.k, self.kmeans.pooling)
        if module.hparams.n_inputs != n_inputs:
            raise ParameterError(
                f"{self.model_uri}: the network takes {module.hparams.n_inputs} inputs, but its "
                f"K-means settings make {n_inputs}"
            )
        return module.eval()


def model_uri_of(ref: str) -> str:
    """``runs:/<id>/model`` for a run id; ``models:/name@alias`` or ``models:/name/version`` as given."""
    ref = ref.strip()
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if _RUN_ID.match(ref):
        return f"runs:/{ref}/model"
    raise ParameterError(
        f"model {ref!r}: give a run id (32 hex digits) or models:/<name>@<alias>, e.g. "
        f"models:/{PRETRAINED}-tags-mlp-1@{CHAMPION}"
    )


def resolve_pretrained(ref: str, tracking: TrackingSettings, *, cache: Path) -> Pretrained:
    """Download a pre-trained model (by run id or registry URI) into ``cache`` and read its settings.

    The files land in ``cache/<run id>/<artifact path>``; a model already there (its ``MLmodel`` present)
    is not downloaded again.
    """
    uri = model_uri_of(ref)
    mlflow.set_tracking_uri(tracking.tracking_uri)
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as err:  # MLflow raises several types for an unknown run, name or alias
        raise ParameterError(f"model {ref!r}: no such model in {tracking.tracking_uri} ({err})") from None
    target = Path(cache) / (info.run_id or "model") / info.artifact_path
    if not (target / "MLmodel").exists():
        download_model(uri, target, ref=ref)
    return read_pretrained(target, model_uri=uri, run_id=info.run_id, ref=ref)


def download_model(uri: str, target: Path, *, ref: str | None = None) -> Path:
    """The artifacts of ``uri`` as the folder ``target``, replacing what is there.

    Downloaded into a temporary folder beside ``target`` and moved into place whole, so that ``target`` is
    either absent or complete.
    """
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except Exception as err:  # an artifact store that is gone or unreadable
            raise ParameterError(f"model {ref or uri!r}: its files could not be downloaded ({err})") from None
        shutil.move(str(local), str(target))
    return target


def read_pretrained(folder: Path, *, model_uri: str, run_id: str, ref: str | None = None) -> Pretrained:
    """The pre-trained source model in a downloaded model folder (``folder/artifacts/config.json`` and the rest).

    Raises :class:`~core.errors.ParameterError` when the folder holds another kind of model, or a config,
    checkpoint or codebooks this mirflow cannot use.
    """
    ref = model_uri if ref is None else ref
    artifacts = Path(folder) / "artifacts"
    config_path = artifacts / "config.json"
    if not config_path.exists():
        raise ParameterError(f"model {ref!r} is not a pre-trained source model of mirflow (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise ParameterError(f"model {ref!r}: its config.json is not JSON ({err})") from None
    if not isinstance(config, dict) or config.get("kind") != PRETRAINED_KIND:
        kind = config.get("kind", "different") if isinstance(config, dict) else "different"
        raise ParameterError(
            f"model {ref!r} is a {kind} model, not a pre-trained source model: run the transfer study "
            "(`mirflow study transfer`) to make one"
        )
    checkpoint = next(artifacts.glob("*.ckpt"), None)
    if checkpoint is None:
        raise ParameterError(f"model {ref!r}: its checkpoint is missing from {artifacts}")
    try:
        return Pretrained(
            model_uri=model_uri,
            run_id=run_id,
            name=str(config["name"]),
            features=FeatureSettings.model_validate(config["features"]),
            kmeans=KMeansSettings.model_validate(config["kmeans"]),
            timescales=tuple(config["timescales"]),
            checkpoint=checkpoint,
            codebooks=artifacts / "codebooks",
        )
    except (KeyError, TypeError, ValueError) as err:  # pydantic's ValidationError is a ValueError
        raise ParameterError(
            f"model {ref!r}: its config.json does not describe a model this mirflow can "
            f"use ({type(err).__name__}: {err})"
        ) from None
