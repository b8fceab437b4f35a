"""The MLflow model registry: every trained family as a registered model with aliases.

    mirflow-tagger              waveforms -> tag probabilities
    mirflow-latent-factor-cnn   waveforms -> predicted WMF item factors
    mirflow-wmf                 (user_id, item_id) -> x_uᵀ y_i

A new version gets the alias ``challenger``; the first version of a model also gets
``champion``. Later promotions of the recommender are decided by
``retrain-on-new-listening``; the tagger's champion moves only by hand
(``MlflowClient().set_registered_model_alias``), as no job compares taggers yet.

The recommender is a pair: a latent-factor CNN and the WMF factors whose item
factors it learned to predict (their user factors rank its predictions). Each CNN
version carries the WMF version it belongs to as the tag ``mirflow.wmf_version``, and
its ``champion`` alias is the commit point of a promotion: the WMF alias moves first,
the CNN alias last. Whoever reads the recommender reads the CNN champion and the WMF
version it names, so a promotion interrupted between the two moves is never seen
half-done, and :func:`repair_recommender_aliases` finishes it or puts the WMF alias
back in step.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, Schema, TensorSpec

from core import storage
from core.errors import DatasetError
from core.settings import TrackingSettings

log = logging.getLogger("mirflow")

TAGGER = "mirflow-tagger"
LATENT_FACTOR_CNN = "mirflow-latent-factor-cnn"
WMF = "mirflow-wmf"
CHAMPION = "champion"
CHALLENGER = "challenger"
WMF_VERSION_TAG = "mirflow.wmf_version"
BATCHES_TAG = "mirflow.batches"  # the listening batches a version was trained on

_PROJECT = Path(__file__).resolve().parents[1]
_MODEL_CODE = _PROJECT / "lightning_modules" / "mlflow_models"
# The packages a served model imports travel with it: one copy of the spectrogram code.
# Every floor the served code imports (core: settings and errors; the floors keep infra out of it),
# so that a model loads without mirflow installed.
_CODE_PATHS = [str(_PROJECT / name) for name in ("core", "tasks", "lightning_modules")]
_REQUIREMENTS = ("torch", "lightning", "numpy", "pandas", "pyarrow", "scipy", "pydantic", "soundfile", "soxr", "mlflow")


def _pip_requirements() -> list[str]:
    """Pinned to what trained the model (given explicitly: MLflow's inference would import the model in a subprocess)."""
    out = []
    for name in _REQUIREMENTS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def client_for(tracking: TrackingSettings) -> MlflowClient:
    mlflow.set_tracking_uri(tracking.tracking_uri)
    mlflow.set_registry_uri(tracking.tracking_uri)
    return MlflowClient(tracking_uri=tracking.tracking_uri, registry_uri=tracking.tracking_uri)


def waveform_signature(outputs: Schema) -> ModelSignature:
    """Input: float32 mono waveforms ``(batch, n_samples)`` of any length."""
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]), outputs=outputs)


def tag_scores_schema(tags: list[str]) -> Schema:
    return Schema([ColSpec("double", tag) for tag in tags])


def factors_schema(n_factors: int) -> Schema:
    return Schema([TensorSpec(np.dtype(np.float32), (-1, n_factors))])


WMF_SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("string", "user_id"), ColSpec("string", "item_id")]),
    outputs=Schema([ColSpec("double", "score")]),
)


def log_served_model(
    *,
    code: str,
    artifacts: Mapping[str, Path],
    config: dict | None,
    signature: ModelSignature,
    input_example,
    name: str = "model",
) -> str:
    """Log a pyfunc model (models from code) into the active run; returns its model URI."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = {key: str(path) for key, path in artifacts.items()}
        if config is not None:
            config_path = Path(tmp) / "config.json"
            storage.write_json(config_path, config, indent=1, durable=False)
            paths["config"] = str(config_path)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(_MODEL_CODE / f"{code}.py"),
            artifacts=paths,
            code_paths=_CODE_PATHS,
            signature=signature,
            input_example=input_example,
            pip_requirements=_pip_requirements(),
        )
    return info.model_uri


class RegistryError(DatasetError, MlflowException):
    """A registered model lacks what mirflow logs with it (a tag, an artifact).

    Also an ``MlflowException``, so callers that handle the registry's own refusals handle it too.
    """


def register(
    tracking: TrackingSettings,
    name: str,
    model_uri: str,
    *,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> ModelVersion:
    """A new version of ``name`` with the alias ``challenger``; the first version is also ``champion``."""
    client = client_for(tracking)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags={"mirflow.family": name})
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    for existing in client.search_model_versions(f"name='{name}'"):
        if existing.source == model_uri or (model_id and getattr(existing, "model_id", None) == model_id):
            return existing  # reused factors, or a retried registration: the same model, not a new version
    created = client.create_model_version(
        name, source=model_uri, run_id=run_id, model_id=model_id, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    client.set_registered_model_alias(name, CHALLENGER, created.version)
    if champion(tracking, name) is None:
        client.set_registered_model_alias(name, CHAMPION, created.version)
        log.info("registry: %s version %s is the first: champion", name, created.version)
    return client.get_model_version(name, created.version)


def champion(tracking: TrackingSettings, name: str) -> ModelVersion | None:
    """The version behind the ``champion`` alias, or None when there is no such model or alias.

    Any other error (a server that does not answer) is raised: "no champion" must not be
    mistaken for "could not ask".
    """
    try:
        return client_for(tracking).get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        missing_alias = err.error_code == "INVALID_PARAMETER_VALUE" and "alias" in str(err)
        if err.error_code == "RESOURCE_DOES_NOT_EXIST" or missing_alias:
            return None
        raise


def newest_version(tracking: TrackingSettings, name: str) -> ModelVersion | None:
    """The highest-numbered version of ``name`` (champion or not), or None."""
    versions = client_for(tracking).search_model_versions(f"name='{name}'")
    return max(versions, key=lambda mv: int(mv.version), default=None)


def tag_version(tracking: TrackingSettings, name: str, version: str, tags: Mapping[str, object]) -> None:
    client = client_for(tracking)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def promote_recommender(tracking: TrackingSettings, *, cnn_version: str, wmf_version: str) -> None:
    """Move both ``champion`` aliases: the WMF one first, the CNN one (the commit point) last."""
    client = client_for(tracking)
    client.set_registered_model_alias(WMF, CHAMPION, str(wmf_version))
    client.set_registered_model_alias(LATENT_FACTOR_CNN, CHAMPION, str(cnn_version))


DECISION_TAG = "mirflow.decision"
PROMOTED = "promoted"


def repair_recommender_aliases(tracking: TrackingSettings) -> str | None:
    """Finish a promotion that was cut short, and keep the WMF champion in step with the CNN champion.

    A retraining run registers its challenger with its decision as a tag, then moves the
    aliases. If it was stopped in between, the newest CNN version says ``promoted`` but is
    not champion: the promotion is completed here. Then the WMF champion is pointed at the
    version the CNN champion names. Returns the WMF version the alias was moved to, or
    None if nothing needed doing.
    """
    newest = newest_version(tracking, LATENT_FACTOR_CNN)
    current = champion(tracking, LATENT_FACTOR_CNN)
    if (
        newest is not None
        and newest.tags.get(DECISION_TAG) == PROMOTED
        and WMF_VERSION_TAG in newest.tags
        and (current is None or int(current.version) < int(newest.version))
    ):
        log.warning(
            "registry: %s version %s was promoted but its alias never moved: finishing the promotion",
            LATENT_FACTOR_CNN,
            newest.version,
        )
        promote_recommender(tracking, cnn_version=str(newest.version), wmf_version=newest.tags[WMF_VERSION_TAG])
    cnn = champion(tracking, LATENT_FACTOR_CNN)
    if cnn is None or WMF_VERSION_TAG not in cnn.tags:
        return None
    wanted = cnn.tags[WMF_VERSION_TAG]
    current = champion(tracking, WMF)
    if current is not None and str(current.version) == wanted:
        return None
    client_for(tracking).set_registered_model_alias(WMF, CHAMPION, wanted)
    log.warning(
        "registry: %s champion was not the version the %s champion names; moved it to %s",
        WMF,
        LATENT_FACTOR_CNN,
        wanted,
    )
    return wanted


@dataclass(frozen=True)
class Recommender:
    """A registered recommender: the CNN checkpoint and its WMF factors, downloaded."""

    cnn_version: str
    wmf_version: str
    checkpoint: Path
    config: dict
    user_factors: Path
    item_factors: Path


def download_recommender(tracking: TrackingSettings, *, cnn_version: str, into: Path) -> Recommender:
    """Fetch a CNN version's checkpoint and config and its WMF version's factor tables into ``into``."""
    client = client_for(tracking)
    cnn = client.get_model_version(LATENT_FACTOR_CNN, cnn_version)
    if WMF_VERSION_TAG not in cnn.tags:
        raise RegistryError(
            f"{LATENT_FACTOR_CNN} version {cnn_version} names no WMF version (its tag {WMF_VERSION_TAG} is missing): "
            "register the CNN with the WMF version it was trained on (the recommender flow tags it), "
            "or use another version"
        )
    wmf_version = str(cnn.tags[WMF_VERSION_TAG])
    cnn_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{LATENT_FACTOR_CNN}/{cnn_version}", dst_path=str(Path(into) / "cnn")
        )
    )
    wmf_dir = Path(
        mlflow.artifacts.download_artifacts(f"models:/{WMF}/{wmf_version}", dst_path=str(Path(into) / "wmf"))
    )
    return Recommender(
        cnn_version=str(cnn_version),
        wmf_version=wmf_version,
        checkpoint=_one(cnn_dir / "artifacts", "*.ckpt"),
        config=storage.read_json(cnn_dir / "artifacts" / "config.json"),
        user_factors=wmf_dir / "artifacts" / "user_factors.parquet",
        item_factors=wmf_dir / "artifacts" / "item_factors.parquet",
    )


def _one(folder: Path, pattern: str) -> Path:
    found = sorted(Path(folder).glob(pattern))
    if len(found) != 1:
        raise RegistryError(
            f"the model's artifacts hold {len(found)} files matching {pattern} in {folder} "
            f"({[p.name for p in found]}), not exactly one: register a model logged by mirflow"
        )
    return found[0]


def versions_frame(tracking: TrackingSettings, name: str) -> pd.DataFrame:
    """Every version of a model with its aliases and tags (for reports and tests)."""
    client = client_for(tracking)
    aliases = client.get_registered_model(name).aliases  # search results do not carry them
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        names = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
        rows.append({"version": int(mv.version), "aliases": ",".join(names), **mv.tags})
    return pd.DataFrame(rows).sort_values("version").reset_index(drop=True) if rows else pd.DataFrame()


def log_wmf_model(paths: Mapping[str, Path], *, users: np.ndarray, items: np.ndarray) -> str:
    """The factor tables as the ``mirflow-wmf`` pyfunc model, in the active run; returns its URI.

    ``paths``: ``user_factors``, ``item_factors`` and (cold start) ``heldout_item_factors``; ``users`` and
    ``items`` the factorization's keys, whose first pairs are the model's input example.
    """
    artifacts = {n: Path(paths[n]) for n in ("user_factors", "item_factors", "heldout_item_factors") if n in paths}
    n = min(3, len(users), len(items))
    example = pd.DataFrame({"user_id": users[:n].astype(str), "item_id": items[:n].astype(str)})
    return log_served_model(
        code="wmf", artifacts=artifacts, config=None, signature=WMF_SIGNATURE, input_example=example
    )
