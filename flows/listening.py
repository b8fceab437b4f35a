"""Flow: listening files -> validated events -> WMF factors -> evaluation, each an MLflow run.

    files ──ingest──► events/batch=<id> ──► play matrix ──► split ──► WMF (implicit ALS) ──► evaluation
                                                           cold start: held-out items
                                                           in-matrix: held-out plays

A run remembers what it factorized (``models/wmf/state.json``: the fit settings, the
split and each batch's id and content hash). Running again on the same batches reuses those factors; with
new batches, the factors are updated from the previous ones by a few ALS sweeps, and
(``compare_full_refit``) a refit from scratch is run beside it so that both the time
and the quality of the two are on record for the retraining schedule to choose.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from core.errors import DatasetError
from core.layout import Layout
from core.settings import ClusterSettings, TrackingSettings, WMFSettings
from infra.cluster import dask_client, map_batches
from infra.progress import ProgressReporter, run_here
from infra.registry import log_wmf_model
from infra.retries import TRANSIENT_IO_RETRIES
from infra.tracking import DIGEST_LENGTH, RunInput, listening_input, tracked_run
from tasks.events import IngestReport, ListeningSource, batch_record, ingest_sources, ingested_batches
from tasks.listening import PlayMatrix, load_play_matrix
from tasks.recommend import cold_start_rows, in_matrix_rows, rows_as_metrics
from tasks.refit import (
    Split,
    clear_state,
    decide_refit,
    factor_files,
    factors_on_disk,
    fit_factorization,
    fold_in_heldout,
    load_model,
    needs_evaluation,
    read_state,
    save_factorization,
    split_key,
    split_plays,
    warm_start_from,
    write_state,
)
from tasks.report import RankingRow
from tasks.wmf import WMFModel, wmf_objective

log = logging.getLogger("mirflow")

# Listening files this large (together) are ingested on the cluster when the flow is given one,
# in chunks of CLUSTER_CHUNK_BYTES: below it, starting the cluster costs more than it saves.
CLUSTER_MIN_BYTES = 1 << 30
CLUSTER_CHUNK_BYTES = 256 << 20
__all__ = ["WMFOutput", "factorize", "factorized_batches", "ingest_listening", "log_wmf_model"]


@dataclass(frozen=True)
class WMFOutput:
    """Paths of the factorization's products (Parquet) and its MLflow runs."""

    user_factors: str
    item_factors: str  # items in the factorization
    heldout_item_factors: str  # cold start: held-out items folded in from their plays (the upper bound); else ""
    heldout_plays: str  # cold start: users × held-out items, long form (the relevance judgements); else ""
    n_users: int
    n_items: int
    n_heldout: int
    run_id: str  # the fit run
    eval_run_id: str
    model_uri: str  # the factors as an MLflow pyfunc model (mirflow-wmf), logged in the fit run
    mode: str  # "full", "incremental" or "reused"
    batches: tuple[str, ...]
    rows: tuple[RankingRow, ...] = ()  # the evaluation table


@task(cache_policy=NO_CACHE, **TRANSIENT_IO_RETRIES)
def ingest_listening(
    sources: list[ListeningSource], listening_dir: Path, quarantine_path: Path, cluster: ClusterSettings | None = None
) -> IngestReport:
    """Ingest in this process; with ``cluster`` and at least ``CLUSTER_MIN_BYTES`` of files, on the Dask cluster."""
    size = sum(Path(s.path).stat().st_size for s in sources if Path(s.path).is_file())
    if cluster is None or size < CLUSTER_MIN_BYTES:
        report = ingest_sources(sources, listening_dir=listening_dir, quarantine_path=quarantine_path, map_fn=run_here)
    else:
        log.info("listening: %.1f GiB of files: ingesting on the Dask cluster", size / 2**30)
        with dask_client(cluster) as client:
            report = ingest_sources(
                sources,
                listening_dir=listening_dir,
                quarantine_path=quarantine_path,
                map_fn=partial(map_batches, client),
                chunk_bytes=CLUSTER_CHUNK_BYTES,
            )
    totals = report.totals()
    log.info(
        "listening: %d batches (%d unchanged), %d rows read, %d malformed, %d new users, %d new items",
        len(report.batches),
        sum(b.skipped for b in report.batches),
        totals["rows"],
        totals["malformed"],
        totals["new_users"],
        totals["new_items"],
    )
    return report


def factorized_batches(data_dir: Path) -> list[str]:
    """Batches of the factorization on disk (``models/wmf/state.json``) that are still ingested, in its order."""
    layout = Layout(Path(data_dir))
    state = read_state(layout.wmf()) or {}
    ingested = set(ingested_batches(layout.listening()))
    return [b for b in state.get("batches", {}) if b in ingested]


def _fit(
    train: PlayMatrix,
    wmf: WMFSettings,
    *,
    k: int,
    label: str,
    init: WMFModel | None = None,
    iterations: int | None = None,
) -> tuple[WMFModel, float]:
    """One fit (:func:`tasks.refit.fit_factorization`) with progress; returns the model and its seconds."""
    start = time.perf_counter()
    with ProgressReporter(
        f"WMF {label} (implicit ALS)", total=iterations or wmf.iterations, unit="sweeps", every_s=5
    ) as progress:
        model = fit_factorization(
            train, wmf, k=k, label=label, init=init, iterations=iterations, on_sweep=progress.advance
        )
    return model, time.perf_counter() - start


@flow(name="wmf")
def factorize(
    data_dir: Path,
    sources: list[ListeningSource | str | Path],
    heldout_items: list[str] | None,
    wmf: WMFSettings,
    tracking: TrackingSettings,
    k: int = 500,
    ingested: list[str] | None = None,
    cluster: ClusterSettings | None = None,
) -> WMFOutput:
    """Ingest listening files, factorize (fully, incrementally, or not at all if nothing changed) and evaluate.

    With ``heldout_items`` the protocol is cold start: those items are left out of the
    factorization, and their factors are folded in from their plays (the upper bound of
    any content-based predictor). Without, a share of each user's plays is held out.
    ``ingested`` names batches already ingested (their files need not be at hand any
    more) that the factorization covers besides ``sources``. With ``cluster``, large listening
    files are ingested on it (:func:`ingest_listening`). Which of the three it does is
    :func:`tasks.refit.decide_refit`'s choice.
    """
    layout = Layout(Path(data_dir))
    out = layout.wmf()
    listening = layout.listening()
    sources = [s if isinstance(s, ListeningSource) else ListeningSource(Path(s)) for s in sources]
    if not sources and not ingested:
        raise DatasetError("no listening files given: name at least one listening file or an ingested batch")
    ingest = ingest_listening(sources, listening, layout.quarantine("listening"), cluster)
    batches = list(dict.fromkeys([*(ingested or []), *ingest.batch_ids]))
    # What was factorized is identified by each batch's content hash, not only its name.
    contents = {b: batch_record(listening, b)["sha1"] for b in batches}
    matrix = load_play_matrix(listening, batches=batches)

    cold_start = heldout_items is not None
    key = split_key(heldout_items, wmf)
    inputs = [listening_input(listening, batches), _heldout_input(key, heldout_items, out)]
    split = split_plays(matrix, heldout_items, wmf)
    train = split.train

    state = read_state(out)
    files = factor_files(out)
    decision = decide_refit(
        state,
        fit_key=wmf.fit_key(),
        split=key,
        contents=contents,
        have_factors=factors_on_disk(files, cold_start=cold_start),
    )
    eval_key = {"k": k, "eval_max_users": wmf.eval_max_users}
    if decision.mode == "reused":
        log.info(
            "WMF: batches %s already factorized with these settings (run %s): reusing the factors",
            batches,
            state["run_id"],
        )
        eval_run_id, rows = state["eval_run_id"], [RankingRow(**r) for r in state.get("rows", [])]
        if needs_evaluation(state, eval_key):
            model, heldout = load_model(files, cold_start=cold_start)
            eval_run_id, rows = evaluate(
                split,
                cold_start,
                model,
                heldout,
                None,
                wmf,
                tracking,
                k=k,
                fit_run_id=state["run_id"],
                batches=batches,
                inputs=inputs,
            )
            write_state(
                out, {**state, "eval_key": eval_key, "eval_run_id": eval_run_id, "rows": [asdict(r) for r in rows]}
            )
        return WMFOutput(
            **{n: str(p) if p.exists() else "" for n, p in files.items()},
            n_users=state["n_users"],
            n_items=state["n_items"],
            n_heldout=state["n_heldout"],
            run_id=state["run_id"],
            eval_run_id=eval_run_id,
            model_uri=state["model_uri"],
            mode="reused",
            batches=tuple(batches),
            rows=tuple(rows),
        )
    incremental = decision.mode == "incremental"
    log.info("WMF: %s fit (%s)", decision.mode, decision.reason)

    totals = ingest.totals()
    params = {
        **wmf.flat("wmf."),
        "batches": ",".join(batches),
        "protocol": key["protocol"],
        "mode": decision.mode,
    }
    with tracked_run(
        tracking,
        "wmf",
        run_name=f"wmf-{params['mode']}",
        params=params,
        tags={"mirflow.batches": ",".join(batches)},
        inputs=inputs,
    ) as run:
        mlflow.log_metrics(
            {
                "ingest/rows": totals["rows"],
                "ingest/malformed": totals["malformed"],
                "ingest/new_users": totals["new_users"],
                "ingest/new_items": totals["new_items"],
                "users": train.plays.shape[0],
                "items": train.plays.shape[1],
                "train_plays_nnz": train.plays.nnz,
                "test_plays_nnz": split.test.plays.nnz,
            }
        )
        full_model = None
        if incremental:
            start = time.perf_counter()  # the warm start's fold-ins are part of the update
            init, counts = warm_start_from(files, train, wmf)
            model, _ = _fit(train, wmf, k=k, label="update", init=init, iterations=wmf.incremental_sweeps)
            seconds = time.perf_counter() - start
            mlflow.log_metrics({f"incremental/{name}": value for name, value in counts.items()})
            mlflow.log_metrics(
                {
                    "incremental/seconds": seconds,
                    "incremental/sweeps": wmf.incremental_sweeps,
                    "incremental/objective": wmf_objective(train.plays, model, settings=wmf),
                }
            )
            mlflow.set_tag("mirflow.previous_batches", ",".join(decision.previous))
            if wmf.compare_full_refit:
                full_model, full_seconds = _fit(train, wmf, k=k, label="full refit")
                mlflow.log_metrics(
                    {
                        "full_refit/seconds": full_seconds,
                        "full_refit/sweeps": full_model.iterations,
                        "full_refit/objective": wmf_objective(train.plays, full_model, settings=wmf),
                        "incremental/time_vs_full_refit": seconds / max(full_seconds, 1e-9),
                    }
                )
        else:
            model, seconds = _fit(train, wmf, k=k, label="fit")
        for step, score in model.validation:
            mlflow.log_metric("validation/map_at_k", score, step=step)
        mlflow.log_metrics(
            {
                "fit_seconds": seconds,
                "sweeps": model.iterations,
                "objective": wmf_objective(train.plays, model, settings=wmf),
            }
        )

        # The factors on disk are about to change: until the new state is written, none holds.
        clear_state(out)
        heldout = fold_in_heldout(model, split, wmf) if cold_start else None
        paths = save_factorization(files, split, model, heldout)
        for path in paths.values():
            mlflow.log_artifact(str(path), artifact_path="factors")
        for name in ("users.parquet", "items.parquet"):
            mlflow.log_artifact(str(listening / name), artifact_path="id_maps")
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "ingest.json"
            report.write_text(json.dumps([asdict(b) for b in ingest.batches], indent=1))
            mlflow.log_artifact(str(report))
        model_uri = log_wmf_model(paths, users=train.users, items=train.items)

    eval_run_id, rows = evaluate(
        split,
        cold_start,
        model,
        heldout,
        full_model,
        wmf,
        tracking,
        k=k,
        fit_run_id=run.info.run_id,
        batches=batches,
        inputs=inputs,
    )
    state = {
        "fit_key": wmf.fit_key(),
        "split": key,
        "batches": contents,
        "run_id": run.info.run_id,
        "eval_run_id": eval_run_id,
        "eval_key": eval_key,
        "rows": [asdict(r) for r in rows],
        "model_uri": model_uri,
        "n_users": len(train.users),
        "n_items": len(train.items),
        "n_heldout": len(split.test.items) if cold_start else 0,
    }
    # Last: a run killed after its factors were written and before this point finds no
    # state next time, and refits in full.
    write_state(out, state)
    return WMFOutput(
        **{n: str(paths.get(n, "")) for n in files},
        n_users=state["n_users"],
        n_items=state["n_items"],
        n_heldout=state["n_heldout"],
        run_id=run.info.run_id,
        eval_run_id=eval_run_id,
        model_uri=model_uri,
        mode=params["mode"],
        batches=tuple(batches),
        rows=tuple(rows),
    )


def _heldout_input(key: dict, heldout_items: list[str] | None, wmf_dir: Path) -> RunInput | None:
    """The held-out items of the cold-start protocol (the tracks table's test split), by the hash of their ids;
    None in-matrix. Where they are recorded: the factorization's ``state.json``."""
    if heldout_items is None:
        return None
    return RunInput(
        name="heldout-items",
        digest=key["heldout_sha1"][:DIGEST_LENGTH],
        source=str(wmf_dir),
        context="split",
        profile={"items": len(heldout_items)},
    )


def evaluate(
    split: Split,
    cold_start: bool,
    model: WMFModel,
    heldout,  # (n_heldout, factors) under cold start, else None
    full_model: WMFModel | None,
    wmf: WMFSettings,
    tracking: TrackingSettings,
    *,
    k: int,
    fit_run_id: str,
    batches: list[str],
    inputs: list[RunInput | None] = (),
) -> tuple[str, list[RankingRow]]:
    """The evaluation run: WMF against random and popularity rankings under the split's protocol.

    ``inputs`` (the fit's) are logged with the context ``evaluation`` (the split keeps its own).
    """
    protocol = "cold-start" if cold_start else "in-matrix"
    scored = [replace(i, context="evaluation") if i is not None and i.context == "training" else i for i in inputs]
    with tracked_run(
        tracking,
        "wmf",
        run_name=f"wmf-eval-{protocol}",
        params={"protocol": protocol, "k": k, "eval_max_users": wmf.eval_max_users, "batches": ",".join(batches)},
        tags={"mirflow.fit_run_id": fit_run_id},
        inputs=scored,
    ) as run:
        start = time.perf_counter()
        if cold_start:
            models = {"WMF factors (upper bound)": (model.user_factors, heldout)}
            if full_model is not None:
                models["WMF full refit (upper bound)"] = (
                    full_model.user_factors,
                    fold_in_heldout(full_model, split, wmf),
                )
            rows = cold_start_rows(heldout_plays=split.test.plays, models=models, k=k, seed=wmf.seed)
        else:
            models = {"WMF": (model.user_factors, model.item_factors)}
            if full_model is not None:
                models["WMF full refit"] = (full_model.user_factors, full_model.item_factors)
            rows = in_matrix_rows(
                models=models,
                train=split.train.plays,
                test=split.test.plays,
                k=k,
                max_users=wmf.eval_max_users,
                seed=wmf.seed,
            )
        mlflow.log_metrics(rows_as_metrics(rows))
        mlflow.log_metrics({"eval_seconds": time.perf_counter() - start, "eval_users": rows[0].n_users})
    for row in rows:
        log.info(
            "WMF %s  %-28s mAP@%d %.4f  AUC %.3f  P@%d %.4f  NDCG@%d %.4f",
            protocol,
            row.name,
            k,
            row.map_at_k,
            row.auc,
            k,
            row.precision_at_k,
            k,
            row.ndcg_at_k,
        )
    return run.info.run_id, rows
