"""Registration of what a pipeline run trained: the tagger, the WMF factors and the latent-factor CNN."""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.listening import WMFOutput
from flows.training import RecommenderOutput, TaggerOutput
from infra.registry import LATENT_FACTOR_CNN, TAGGER, WMF, WMF_VERSION_TAG, register
from infra.settings import TrackingSettings

log = logging.getLogger("mirflow")


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def register_pipeline_models(tracking: TrackingSettings, *, tagger: TaggerOutput, wmf: WMFOutput,
                             recommender: RecommenderOutput, dataset: str) -> dict[str, str]:
    """New versions (alias ``challenger``; ``champion`` for a first version); returns ``{model: version}``.

    The WMF factors are registered before the CNN that names them, so the CNN's tag
    always points at a version that exists. A retried registration finds a version it
    already made by its source and does not make another one.
    """
    tags = {"mirflow.dataset": dataset}
    tagger_version = register(tracking, TAGGER, tagger.model_uri, run_id=tagger.run_id,
                              tags={**tags, "test_roc_auc": f"{tagger.roc_auc:.4f}"})
    wmf_version = register(tracking, WMF, wmf.model_uri, run_id=wmf.run_id,
                           tags={**tags, "mirflow.batches": ",".join(wmf.batches)})
    cnn_version = register(tracking, LATENT_FACTOR_CNN, recommender.model_uri, run_id=recommender.run_id,
                           tags={**tags, WMF_VERSION_TAG: str(wmf_version.version), "mirflow.batches": ",".join(wmf.batches)})
    versions = {TAGGER: str(tagger_version.version), WMF: str(wmf_version.version),
                LATENT_FACTOR_CNN: str(cnn_version.version)}
    log.info("registry: %s", ", ".join(f"{name} v{v}" for name, v in versions.items()))
    return versions
