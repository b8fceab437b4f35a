"""Flow: listening triplets -> events -> WMF factors, with tracks held out for cold start."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from infra.layout import Layout
from infra.progress import ProgressReporter
from infra.settings import TrackingSettings, WMFSettings
from infra.tracking import tracked_run
from tasks.listening import (
    build_play_matrix,
    cold_start_split,
    ingest_triplet_files,
    plays_to_frame,
    read_events,
    save_factors,
)
from tasks.shards import append_quarantine, write_table_atomic
from tasks.wmf import fit_wmf, fold_in_items, wmf_objective

log = logging.getLogger("mirflow")


@dataclass(frozen=True)
class WMFOutput:
    """Paths of the factorization's products (Parquet) and its MLflow run."""

    user_factors: str
    item_factors: str  # items in the factorization
    heldout_item_factors: str  # held-out items, folded in from their plays: the upper bound
    heldout_plays: str  # users × held-out items, long form: the relevance judgements
    n_users: int
    n_items: int
    n_heldout: int
    run_id: str


@task(cache_policy=NO_CACHE)
def ingest_listening(triplets: list[Path], listening_dir: Path, quarantine_path: Path) -> list[str]:
    batches, quarantined = ingest_triplet_files(triplets, listening_dir=listening_dir)
    append_quarantine(quarantine_path, quarantined)
    if quarantined:
        log.warning("listening: %d malformed rows quarantined in %s", len(quarantined), quarantine_path)
    return batches


@flow(name="wmf")
def factorize(data_dir: Path, triplets: list[Path], heldout_items: list[str], wmf: WMFSettings,
              tracking: TrackingSettings) -> WMFOutput:
    """Ingest listening batches and factorize the play matrix without the held-out items."""
    layout = Layout(Path(data_dir))
    out = layout.wmf()
    batches = ingest_listening(triplets, layout.listening(), layout.quarantine("listening"))
    matrix = build_play_matrix(read_events(layout.listening(), batches=batches))
    split = cold_start_split(matrix, heldout_items=np.asarray(heldout_items, dtype=str))
    params = {**wmf.flat("wmf."), "batches": ",".join(batches)}
    with tracked_run(tracking, "wmf", run_name="wmf", params=params) as run:
        with ProgressReporter("WMF (implicit ALS)", total=wmf.iterations, unit="iterations", every_s=5) as progress:
            model = fit_wmf(split.train.plays, settings=wmf, on_iteration=lambda i, loss: progress.advance())
        heldout = fold_in_items(model.user_factors, split.test.plays.T.tocsr(), settings=wmf)
        paths = {
            "user_factors": save_factors(out / "user_factors.parquet", split.train.users, model.user_factors),
            "item_factors": save_factors(out / "item_factors.parquet", split.train.items, model.item_factors),
            "heldout_item_factors": save_factors(out / "heldout_item_factors.parquet", split.test.items, heldout),
            "heldout_plays": write_table_atomic(pa.Table.from_pandas(plays_to_frame(split.test), preserve_index=False),
                                                out / "heldout_plays.parquet"),
        }
        mlflow.log_metrics({
            "users": len(split.train.users), "items": len(split.train.items), "heldout_items": len(split.test.items),
            "train_plays_nnz": split.train.plays.nnz, "heldout_plays_nnz": split.test.plays.nnz,
            "objective": wmf_objective(split.train.plays, model, settings=wmf),
        })
        for path in paths.values():
            mlflow.log_artifact(str(path), artifact_path="factors")
    return WMFOutput(**{k: str(v) for k, v in paths.items()}, n_users=len(split.train.users),
                     n_items=len(split.train.items), n_heldout=len(split.test.items), run_id=run.info.run_id)

