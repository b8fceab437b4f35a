"""Registration of trained models: the tagger, and the recommender (WMF factors + latent-factor CNN)."""

from __future__ import annotations

from collections.abc import Mapping

from mlflow.entities.model_registry import ModelVersion
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.settings import TrackingSettings
from flows.listening import WMFOutput
from flows.training import RecommenderOutput, TaggerOutput
from infra.registry import BATCHES_TAG, LATENT_FACTOR_CNN, TAGGER, WMF, WMF_VERSION_TAG, register
from infra.retries import TRANSIENT_IO_RETRIES


def register_recommender(
    tracking: TrackingSettings,
    *,
    wmf: WMFOutput,
    recommender: RecommenderOutput,
    dataset: str,
    tags: Mapping[str, str] | None = None,
) -> tuple[ModelVersion, ModelVersion]:
    """New versions of the WMF factors, then of the CNN that names them; returns (wmf, cnn).

    The WMF version is registered first, so the CNN's ``mirflow.wmf_version`` tag always
    names a version that exists. Factors that were reused, not refitted, are found by
    their source and get no second version.
    """
    common = {"mirflow.dataset": dataset, BATCHES_TAG: ",".join(wmf.batches)}
    wmf_version = register(tracking, WMF, wmf.model_uri, run_id=wmf.run_id, tags=common)
    cnn_version = register(
        tracking,
        LATENT_FACTOR_CNN,
        recommender.model_uri,
        run_id=recommender.run_id,
        tags={**common, WMF_VERSION_TAG: str(wmf_version.version), **(tags or {})},
    )
    return wmf_version, cnn_version


def register_tagger(tracking: TrackingSettings, tagger: TaggerOutput, *, dataset: str) -> ModelVersion:
    return register(
        tracking,
        TAGGER,
        tagger.model_uri,
        run_id=tagger.run_id,
        tags={"mirflow.dataset": dataset, "test_roc_auc": f"{tagger.roc_auc:.4f}"},
    )


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def register_pipeline_models(
    tracking: TrackingSettings, *, tagger: TaggerOutput, wmf: WMFOutput, recommender: RecommenderOutput, dataset: str
) -> dict[str, str]:
    """New versions (alias ``challenger``; ``champion`` for a first version); returns ``{model: version}``.

    A retried registration finds the versions it already made by their source.
    """
    tagger_version = register_tagger(tracking, tagger, dataset=dataset)
    wmf_version, cnn_version = register_recommender(tracking, wmf=wmf, recommender=recommender, dataset=dataset)
    versions = {
        TAGGER: str(tagger_version.version),
        WMF: str(wmf_version.version),
        LATENT_FACTOR_CNN: str(cnn_version.version),
    }
    return versions
