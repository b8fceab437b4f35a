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

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import scipy.sparse as sp
from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from core.errors import DatasetError
from core.layout import Layout
from core.settings import ClusterSettings, TrackingSettings, WMFSettings
from infra.cluster import dask_client, map_batches
from infra.progress import ProgressReporter, run_here
from infra.retries import TRANSIENT_IO_RETRIES
from infra.tracking import DIGEST_LENGTH, RunInput, listening_input, tracked_run
from tasks.events import IngestReport, ListeningSource, batch_record, ingest_sources, ingested_batches
from tasks.listening import (
    PlayMatrix,
    cold_start_split,
    in_matrix_split,
    load_factors,
    load_play_matrix,
    plays_to_frame,
    save_factors,
)
from tasks.metrics import ranking_metrics
from tasks.recommend import cold_start_rows, in_matrix_rows, rows_as_metrics, sample_users
from tasks.report import RankingRow
from tasks.shards import write_table_atomic, write_text_atomic
from tasks.wmf import WMFModel, fit_wmf, fold_in_items, warm_start, wmf_objective

log = logging.getLogger("mirflow")

# Users scored by the early-stopping validation metric (a sample keeps each check cheap).
_VALIDATION_USERS = 20_000
# Listening files this large (together) are ingested on the cluster when the flow is given one,
# in chunks of CLUSTER_CHUNK_BYTES: below it, starting the cluster costs more than it saves.
CLUSTER_MIN_BYTES = 1 << 30
CLUSTER_CHUNK_BYTES = 256 << 20


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


def _split_key(heldout_items: list[str] | None, wmf: WMFSettings) -> dict:
    if heldout_items is None:
        return {"protocol": "in-matrix", "test_fraction": wmf.test_fraction}
    digest = hashlib.sha1("\n".join(sorted(map(str, heldout_items))).encode()).hexdigest()
    return {"protocol": "cold-start", "heldout_sha1": digest}


def _previous_state(out: Path) -> dict | None:
    try:
        return json.loads((out / "state.json").read_text())
    except (OSError, ValueError):
        return None


def factorized_batches(data_dir: Path) -> list[str]:
    """Batches of the factorization on disk (``models/wmf/state.json``) that are still ingested, in its order."""
    layout = Layout(Path(data_dir))
    state = _previous_state(layout.wmf()) or {}
    ingested = set(ingested_batches(layout.listening()))
    return [b for b in state.get("batches", {}) if b in ingested]


def _write_state(out: Path, state: dict) -> None:
    write_text_atomic(out / "state.json", json.dumps(state, indent=1))


def _fit(
    train: PlayMatrix,
    wmf: WMFSettings,
    *,
    k: int,
    label: str,
    init: WMFModel | None = None,
    iterations: int | None = None,
) -> tuple[WMFModel, float]:
    """One fit with progress.

    With early stopping, plays set aside from ``train`` pick the number of sweeps, and
    the returned model is then fitted on all of ``train`` for that many.
    """
    sweeps = iterations or wmf.iterations
    start = time.perf_counter()
    with ProgressReporter(f"WMF {label} (implicit ALS)", total=sweeps, unit="sweeps", every_s=5) as progress:
        if wmf.early_stopping_patience and init is None:
            val = in_matrix_split(train, fraction=wmf.validation_fraction, seed=wmf.seed + 1, keep_all_items=True)
            users = sample_users(val.train.plays.shape[0], _VALIDATION_USERS, seed=wmf.seed)
            seen, held = val.train.plays[users], val.test.plays[users]

            def validate(model: WMFModel) -> float:
                score = ranking_metrics(model.user_factors[users], model.item_factors, held, exclude=seen, k=k)
                log.info("WMF %s: sweep %d, validation mAP@%d %.4f", label, model.iterations, k, score["map_at_k"])
                return score["map_at_k"]

            chosen = fit_wmf(
                val.train.plays, settings=wmf, validate=validate, on_iteration=lambda i, loss: progress.advance()
            )
            # The validation plays only chose the number of sweeps: the model is refitted on
            # all training plays for that many, from the same initial factors.
            log.info(
                "WMF %s: best validation mAP@%d after %d sweeps; refitting on all training plays",
                label,
                k,
                chosen.iterations,
            )
            model = fit_wmf(train.plays, settings=wmf, iterations=chosen.iterations)
            model = WMFModel(
                model.user_factors, model.item_factors, iterations=model.iterations, validation=chosen.validation
            )
        else:
            model = fit_wmf(
                train.plays, settings=wmf, init=init, iterations=sweeps, on_iteration=lambda i, loss: progress.advance()
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
    files are ingested on it (:func:`ingest_listening`).
    """
    layout = Layout(Path(data_dir))
    out = layout.wmf()
    listening = layout.listening()
    sources = [s if isinstance(s, ListeningSource) else ListeningSource(Path(s)) for s in sources]
    if not sources and not ingested:
        raise DatasetError("no listening files given")
    ingest = ingest_listening(sources, listening, layout.quarantine("listening"), cluster)
    batches = list(dict.fromkeys([*(ingested or []), *ingest.batch_ids]))
    # What was factorized is identified by each batch's content hash, not only its name.
    contents = {b: batch_record(listening, b)["sha1"] for b in batches}
    matrix = load_play_matrix(listening, batches=batches)

    split_key = _split_key(heldout_items, wmf)
    inputs = [listening_input(listening, batches), _heldout_input(split_key, heldout_items, out)]
    if heldout_items is not None:
        split = cold_start_split(matrix, heldout_items=np.asarray(heldout_items, dtype=object))
    else:
        split = in_matrix_split(matrix, fraction=wmf.test_fraction, seed=wmf.seed)
    train = split.train

    state = _previous_state(out)
    same_setup = state is not None and state.get("fit_key") == wmf.fit_key() and state.get("split") == split_key
    files = {
        name: out / f"{name}.parquet"
        for name in ("user_factors", "item_factors", "heldout_item_factors", "heldout_plays")
    }
    previous = state.get("batches", {}) if same_setup else {}
    have_factors = all(files[n].exists() for n in ("user_factors", "item_factors")) and (
        heldout_items is None or files["heldout_item_factors"].exists()
    )
    eval_key = {"k": k, "eval_max_users": wmf.eval_max_users}
    if same_setup and previous == contents and have_factors and state.get("model_uri"):
        log.info(
            "WMF: batches %s already factorized with these settings (run %s): reusing the factors",
            batches,
            state["run_id"],
        )
        eval_run_id, rows = state["eval_run_id"], [RankingRow(**r) for r in state.get("rows", [])]
        if state.get("eval_key") != eval_key or not rows:
            model = WMFModel(load_factors(files["user_factors"])[1], load_factors(files["item_factors"])[1])
            heldout = load_factors(files["heldout_item_factors"])[1] if heldout_items is not None else None
            eval_run_id, rows = evaluate(
                split,
                heldout_items is not None,
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
            _write_state(
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
    incremental = same_setup and have_factors and set(previous.items()) < set(contents.items())

    totals = ingest.totals()
    params = {
        **wmf.flat("wmf."),
        "batches": ",".join(batches),
        "protocol": split_key["protocol"],
        "mode": "incremental" if incremental else "full",
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
            previous_users, previous_x = load_factors(files["user_factors"])
            previous_items, previous_y = load_factors(files["item_factors"])
            start = time.perf_counter()  # the warm start's fold-ins are part of the update
            init, counts = warm_start(
                WMFModel(previous_x, previous_y),
                previous_users=previous_users,
                previous_items=previous_items,
                plays=train.plays,
                users=train.users,
                items=train.items,
                settings=wmf,
            )
            model, _ = _fit(train, wmf, k=k, label="update", init=init, iterations=wmf.incremental_sweeps)
            seconds = time.perf_counter() - start
            mlflow.log_metrics({f"incremental/{key}": value for key, value in counts.items()})
            mlflow.log_metrics(
                {
                    "incremental/seconds": seconds,
                    "incremental/sweeps": wmf.incremental_sweeps,
                    "incremental/objective": wmf_objective(train.plays, model, settings=wmf),
                }
            )
            mlflow.set_tag("mirflow.previous_batches", ",".join(previous))
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
        (out / "state.json").unlink(missing_ok=True)
        paths = {
            "user_factors": save_factors(files["user_factors"], train.users, model.user_factors),
            "item_factors": save_factors(files["item_factors"], train.items, model.item_factors),
        }
        heldout = None
        if heldout_items is not None:
            heldout = fold_in_items(model.user_factors, split.test.plays.T.tocsr(), settings=wmf)
            paths["heldout_item_factors"] = save_factors(files["heldout_item_factors"], split.test.items, heldout)
            paths["heldout_plays"] = write_table_atomic(
                pa.Table.from_pandas(plays_to_frame(split.test), preserve_index=False),
                files["heldout_plays"],
                row_group_size=1 << 20,
            )
        else:
            for name in ("heldout_item_factors", "heldout_plays"):
                files[name].unlink(missing_ok=True)
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
        heldout_items is not None,
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
        "split": split_key,
        "batches": contents,
        "run_id": run.info.run_id,
        "eval_run_id": eval_run_id,
        "eval_key": eval_key,
        "rows": [asdict(r) for r in rows],
        "model_uri": model_uri,
        "n_users": len(train.users),
        "n_items": len(train.items),
        "n_heldout": len(split.test.items) if heldout_items is not None else 0,
    }
    # Last: a run killed after its factors were written and before this point finds no
    # state next time, and refits in full.
    _write_state(out, state)
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


def _heldout_input(split_key: dict, heldout_items: list[str] | None, wmf_dir: Path) -> RunInput | None:
    """The held-out items of the cold-start protocol (the tracks table's test split), by the hash of their ids;
    None in-matrix. Where they are recorded: the factorization's ``state.json``."""
    if heldout_items is None:
        return None
    return RunInput(
        name="heldout-items",
        digest=split_key["heldout_sha1"][:DIGEST_LENGTH],
        source=str(wmf_dir),
        context="split",
        profile={"items": len(heldout_items)},
    )


def log_wmf_model(paths: dict[str, Path], *, users: np.ndarray, items: np.ndarray) -> str:
    """The factor tables as the ``mirflow-wmf`` pyfunc model, in the active run; returns its URI."""
    import pandas as pd

    from infra.registry import WMF_SIGNATURE, log_served_model

    artifacts = {n: Path(paths[n]) for n in ("user_factors", "item_factors", "heldout_item_factors") if n in paths}
    n = min(3, len(users), len(items))
    example = pd.DataFrame({"user_id": users[:n].astype(str), "item_id": items[:n].astype(str)})
    return log_served_model(
        code="wmf", artifacts=artifacts, config=None, signature=WMF_SIGNATURE, input_example=example
    )


def evaluate(
    split,
    cold_start: bool,
    model: WMFModel,
    heldout: np.ndarray | None,
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
            test: sp.csr_matrix = split.test.plays
            models = {"WMF factors (upper bound)": (model.user_factors, heldout)}
            if full_model is not None:
                refit = fold_in_items(full_model.user_factors, test.T.tocsr(), settings=wmf)
                models["WMF full refit (upper bound)"] = (full_model.user_factors, refit)
            rows = cold_start_rows(heldout_plays=test, models=models, k=k, seed=wmf.seed)
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
