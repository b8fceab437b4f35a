"""Flows: supervised pre-training, embeddings of any catalogue, and transfer to a labelled target (ISMIR 2014).

    source catalogue ──► log-mel ──► K-means ──► linear / MLP-1 / MLP-2 regressors of tag factors and
                                                 listening factors ──► MLflow models (registered)
                                                         │
    any catalogue ──► log-mel ──► K-means with the model's codebooks ──► hidden activations ──► embeddings Parquet
                                                         │  (mirflow embed)
    labelled target ──► embeddings, its own K-means, log-mel statistics, MFCC-20 ──► logistic regression /
                                                 linear SVM per feature set ──► table (mirflow transfer)

Every step goes through the feature flows on the cluster, incrementally: a second
``mirflow embed`` of the same catalogue and model computes nothing again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow

# The study below still computes with numpy and pandas; the embed and transfer flows above it do not.
import numpy as np
import pandas as pd
from prefect import flow, get_run_logger

from core.errors import DatasetError, ParameterError
from core.layout import Layout
from core.settings import (
    MODEL_LAYERS,
    ClusterSettings,
    FeatureSettings,
    KMeansSettings,
    SourceSettings,
    TrackingSettings,
    TransferSettings,
    TransferStudySettings,
    WorldSettings,
)
from flows.features import extract_features, ingest_catalogue
from flows.kmeans_features import kmeans_features
from flows.listening import factorize
from flows.study import study_cluster
from flows.training import mlflow_logger
from flows.world import synthetic_target
from infra.cluster import dask_client, shared_settings
from infra.pretrained import PRETRAINED, Pretrained, model_uri_of, resolve_pretrained
from infra.registry import (
    CHALLENGER,
    factors_schema,
    log_served_model,
    register,
)
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    child_run,
    features_input,
    file_sha1,
    files_input,
    finished_children,
    log_table_replacing,
    parent_run,
    run_key,
    tracked_run,
    tracks_input,
    wmf_factors_input,
)
from lightning_modules.train import train_factor_regressor
from tasks.datasets import heldout_track_ids, multi_hot, tag_vocabulary
from tasks.embedding import EmbeddingProvenance, embed_vectors, read_embeddings, write_embeddings
from tasks.feature_sets import (
    FEATURE_SET_NAMES,
    feature_vectors,
    read_target_tracks,
    rows_frame,
    target_with_features,
    tracks_without_features,
)
from tasks.kmeans_features import codebook_path, read_kmeans_features
from tasks.listening import load_factors, play_matrix_for
from tasks.pretrain import factorize_tags, nmse, tag_task_scores
from tasks.recommend import cold_start_track_splits, ranking_row
from tasks.report import metric_slug, plot_transfer_bars
from tasks.shards import (
    MANIFEST,
    append_quarantine,
    read_manifest,
    write_text_atomic,
)
from tasks.transfer import check_target, fit_transfer, format_transfer_table

log = logging.getLogger("mirflow")
TARGET_DATASET = "synthetic-target"
# Importable from here as before: the flows' names of the pre-trained model resource and the transfer's inputs.
__all__ = [
    "FEATURE_SET_NAMES",
    "PRETRAINED",
    "EmbedOutput",
    "Pretrained",
    "TransferOutput",
    "embed_catalogue",
    "model_uri_of",
    "read_embeddings",
    "resolve_pretrained",
    "transfer",
]


# ----------------------------------------------------------------------------- embed


def catalogue_ready(layout: Layout, dataset: str, source: SourceSettings | None) -> None:
    """Read the catalogue through its adapter when ``source`` is given; else it must be there from an earlier run."""
    if source is not None:
        ingest_catalogue(source, layout.tracks(dataset))
    elif not layout.tracks(dataset).exists():
        raise DatasetError(
            f"no catalogue {dataset!r} under {layout.root}: give its source (an adapter and the path it reads) "
            "to read it first"
        )


@dataclass(frozen=True)
class EmbedOutput:
    path: str  # the embeddings' Parquet file
    model_uri: str
    run_id: str  # the embed run
    n_tracks: int
    dims: int
    n_quarantined: int
    n_computed: int  # log-mel extractions and K-means encodings this run did (0 when everything was there)
    seconds: float
    clips_per_s: float  # whole catalogue (features, encoding, network) over wall time


def embeddings_path(layout: Layout, dataset: str, model: Pretrained) -> Path:
    return layout.root / "embeddings" / dataset / f"{model.tag}.parquet"


@flow(name="embed")
def embed_catalogue(
    data_dir: Path,
    dataset: str,
    model_ref: str,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    source: SourceSettings | None = None,
) -> EmbedOutput:
    """One embedding per track of a catalogue by a pre-trained model: the model's log-mel and K-means features
    (its codebooks) computed by the feature flows on the cluster, incrementally, then its hidden layers.

    With ``source`` the catalogue is (re)read through its adapter first.
    """
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    catalogue_ready(layout, dataset, source)
    model = resolve_pretrained(model_ref, tracking, cache=layout.root / "models" / "pretrained")
    kmeans = model.kmeans.model_copy(update={"timescales": model.timescales})
    with dask_client(cluster) as client:
        shared = shared_settings(client, cluster)
        features = extract_features(data_dir, dataset, model.features, shared, tracking)
        encoded = kmeans_features(
            data_dir, dataset, model.features, kmeans, shared, tracking, codebooks_from=model.codebooks
        )
    kmeans_dir = Path(encoded.feature_dir)
    track_ids = sorted(read_manifest(kmeans_dir).column("track_id").to_pylist())
    if not track_ids:
        raise DatasetError(f"no track of {dataset!r} could be encoded (see {layout.quarantine(dataset)})")
    embeddings = embed_vectors(
        model.module(), read_kmeans_features(kmeans_dir, timescales=model.timescales, track_ids=track_ids)
    )
    path = write_embeddings(
        embeddings_path(layout, dataset, model),
        track_ids,
        embeddings,
        provenance=EmbeddingProvenance(
            model_uri=model.model_uri,
            model_run_id=model.run_id,
            model_name=model.name,
            kmeans_feature_set=kmeans_dir.name,
            kmeans_manifest_sha1=file_sha1(kmeans_dir / MANIFEST) or "",
        ),
    )
    dims = int(embeddings.shape[1])
    seconds = time.perf_counter() - start
    params = {
        "dataset": dataset,
        "model_uri": model.model_uri,
        "model_run_id": model.run_id,
        "model": model.name,
        "feature_set": model.features.feature_set,
        "kmeans_feature_set": kmeans_dir.name,
    }
    inputs = [
        features_input(kmeans_dir, dataset, context="inference"),
        tracks_input(layout.tracks(dataset), dataset),
        embeddings_input(path, dataset, context="output"),
    ]
    with tracked_run(
        tracking,
        "embed",
        run_name=f"embed-{dataset}-{model.tag}",
        params=params,
        tags={"mirflow.embeddings": str(path), "mirflow.model_run_id": model.run_id},
        inputs=inputs,
    ) as run:
        mlflow.log_metrics(
            {
                "tracks": len(track_ids),
                "dims": dims,
                "seconds": seconds,
                "clips_per_s": len(track_ids) / seconds,
                "quarantined": features.n_quarantined + encoded.n_quarantined,
            }
        )
    log.info(
        "embeddings of %d %s tracks (%d dims) by %s -> %s, %.1f clips/s",
        len(track_ids),
        dataset,
        dims,
        model.name,
        path,
        len(track_ids) / seconds,
    )
    return EmbedOutput(
        path=str(path),
        model_uri=model.model_uri,
        run_id=run.info.run_id,
        n_tracks=len(track_ids),
        dims=dims,
        n_quarantined=features.n_quarantined + encoded.n_quarantined,
        n_computed=features.n_extracted + encoded.n_encoded,
        seconds=seconds,
        clips_per_s=len(track_ids) / seconds,
    )


def embeddings_input(path: Path, dataset: str, *, context: str = "training") -> RunInput:
    """An embeddings file as a run's dataset, by its bytes' hash."""
    return files_input({"embeddings": Path(path)}, name=f"embeddings/{dataset}/{Path(path).stem}", context=context)


# ----------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TransferOutput:
    table: str  # as printed
    rows: tuple[dict, ...]
    run_id: str
    metric: str
    n_tracks: int
    n_dropped: int  # unlabelled, other splits, or without features (failed to decode: quarantined)
    seconds: float


@flow(name="transfer")
def transfer(
    data_dir: Path,
    dataset: str,
    settings: TransferSettings,
    features: FeatureSettings,
    kmeans: KMeansSettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    source: SourceSettings | None = None,
    models: tuple[str, ...] = (),
) -> TransferOutput:
    """A simple classifier per feature set on a labelled target catalogue; one row per feature set.

    ``models`` are pre-trained source models (run ids or registry URIs): each gives a
    ``pretrained`` feature set. The target is checked before any audio is read; tracks
    that fail to decode are quarantined by the feature flow and left out (counted).
    """
    if "pretrained" in settings.feature_sets and not models:
        # Still in the command line's words: tests/test_transfer_flow.py pins "needs --model" in the CLI's
        # output; once the CLI checks this itself, this message can say "models".
        raise ParameterError(
            "the 'pretrained' feature set needs --model (a pre-trained source model); "
            "or leave it out of the feature sets"
        )
    if models and "pretrained" not in settings.feature_sets:
        raise ParameterError(
            f"models given but the feature sets {list(settings.feature_sets)} leave out "
            "'pretrained': add it, or give no models"
        )
    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    catalogue_ready(layout, dataset, source)
    tracks = read_target_tracks(layout.tracks(dataset))
    check_target(tracks, cv=settings.cv)  # a bad target fails here, before any audio
    sets = {name: None for name in settings.feature_sets if name != "pretrained"}
    timescales = tuple(kmeans.timescales) or (features.mel.column,)
    with dask_client(cluster) as client:
        shared = shared_settings(client, cluster)
        if sets:
            extract_features(data_dir, dataset, features, shared, tracking)
        if "kmeans" in sets:
            own = kmeans.model_copy(update={"timescales": timescales})
            sets["kmeans"] = Path(kmeans_features(data_dir, dataset, features, own, shared, tracking).feature_dir)
        embedded = {}
        if "pretrained" in settings.feature_sets:
            for ref in models:
                out = embed_catalogue(data_dir, dataset, ref, shared, tracking)
                embedded[out.path] = out
    vectors = feature_vectors(
        layout, dataset, sets, features=features, timescales=timescales, embeddings=[Path(p) for p in embedded]
    )
    missing = tracks_without_features(tracks, vectors)
    if missing:
        append_quarantine(
            layout.quarantine(dataset),
            [
                {"path": str(t), "stage": "transfer", "reason": "no features (failed to decode, or too short)"}
                for t in missing
            ],
        )
        log.warning(
            "transfer: %d of %d tracks have no features and are left out (quarantine: %s)",
            len(missing),
            len(tracks),
            layout.quarantine(dataset),
        )
    # Again: failed decodes may have emptied a class or a split.
    target = target_with_features(tracks, vectors, cv=settings.cv)
    check, ids = target.check, list(target.track_ids)
    rows, scores = [], {}
    for name, table in vectors.items():
        x = target.matrix(table)
        score = fit_transfer(
            x,
            list(target.labels),
            target.splits,
            classes=check.classes,
            kind=check.kind,
            classifier=settings.classifier,
            cs=settings.cs,
            cv=settings.cv,
            inner_folds=settings.inner_folds,
            seed=settings.seed,
        )
        scores[name] = score
        rows.append({"feature_set": name, "dims": int(x.shape[1]), **score.summary()})
        log.info("transfer %s: %s %s %.4f ± %.4f", dataset, name, score.metric, score.value, score.std)
    text = format_transfer_table(rows)
    seconds = time.perf_counter() - start
    params = {
        **settings.flat("transfer."),
        "dataset": dataset,
        "feature_set": features.feature_set,
        "kmeans_timescales": ",".join(timescales),
        "models": ",".join(models),
        "kind": check.kind,
        "classes": ",".join(check.classes)[:500],
        "n_tracks": len(ids),
    }
    inputs = [
        tracks_input(layout.tracks(dataset), dataset),
        *(embeddings_input(path, dataset) for path in embedded),
        features_input(sets["kmeans"], dataset) if "kmeans" in sets else None,
        features_input(layout.features(dataset, features.feature_set), dataset)
        if {"logmel-stats", "mfcc"} & set(sets)
        else None,
    ]
    with tracked_run(
        tracking,
        "transfer",
        run_name=f"transfer-{dataset}",
        params=params,
        tags={"mirflow.dataset": dataset},
        inputs=inputs,
    ) as run:
        log_table_replacing(rows_frame(rows), "table_transfer.json")
        mlflow.log_metrics(
            {
                **{f"{metric_slug(r['feature_set'])}/{r['metric']}": r["value"] for r in rows},
                "tracks": len(ids),
                "dropped": len(tracks) - len(ids),
                "seconds": seconds,
            }
        )
        for name, score in scores.items():
            log_table_replacing(score.per_class, f"per_class/{metric_slug(name)}.json")
            if score.confusion is not None:
                log_table_replacing(score.confusion.reset_index(), f"confusion/{metric_slug(name)}.json")
        with tempfile.TemporaryDirectory() as tmp:
            plot_transfer_bars(
                rows,
                metric=next(iter(scores.values())).metric,
                path=Path(tmp) / "transfer.png",
                title=f"transfer to {dataset}: one classifier per feature set",
            )
            mlflow.log_artifacts(tmp, artifact_path="plots")
    get_run_logger().info("transfer on %s (%s)\n%s", dataset, next(iter(scores.values())).metric, text)
    return TransferOutput(
        table=text,
        rows=tuple(rows),
        run_id=run.info.run_id,
        metric=next(iter(scores.values())).metric,
        n_tracks=len(ids),
        n_dropped=len(tracks) - len(ids),
        seconds=seconds,
    )


#: The transfer's feature vectors (:func:`tasks.feature_sets.feature_vectors`), under the name tests and the
#: study have used.
_feature_vectors = feature_vectors


# ----------------------------------------------------------------------------- the study


@dataclass(frozen=True)
class TransferStudyOutput:
    source_table: str
    transfer_table: str
    parent_run_id: str
    report_path: str
    n_runs: int
    n_reused: int
    seconds: float


@flow(name="study-transfer")
def transfer_study(
    data_dir: Path,
    dataset: str,
    study: TransferStudySettings,
    cluster: ClusterSettings,
    tracking: TrackingSettings,
    world: WorldSettings | None = None,
    triplets: tuple[Path, ...] = (),
) -> TransferStudyOutput:
    """Pre-train every model on every source task, then transfer each, and the target's own features, to the
    synthetic genre catalogue; one parent run with the source table and the transfer table."""
    from flows.recommendation import listening_files

    start = time.perf_counter()
    layout = Layout(Path(data_dir))
    world = world or WorldSettings()
    kmeans = study.kmeans.model_copy(update={"timescales": study.timescales})
    with study_cluster(layout, dataset, cluster, world=world, n_tags=study.n_tags) as shared:
        extract_features(data_dir, dataset, study.features, shared, tracking)
        kmeans_dir = Path(kmeans_features(data_dir, dataset, study.features, kmeans, shared, tracking).feature_dir)
        target_root = synthetic_target(
            layout.world() / "gtzan", world, shared, n_tracks=study.target_tracks, seed=study.target_seed
        )
    wmf = None
    if "listening" in study.sources:
        wmf = factorize(
            data_dir,
            listening_files(layout, dataset, triplets),
            heldout_track_ids(layout.tracks(dataset)),
            study.wmf,
            tracking,
            k=study.evaluation.k,
        )
    data = source_data(layout, dataset, study, wmf=wmf, kmeans_dir=kmeans_dir)

    key = f"{study.settings_hash}-{dataset}-{data['fingerprint']}"
    params = {
        **study.flat(),
        "dataset": dataset,
        "data_fingerprint": data["fingerprint"],
        "kmeans_feature_set": kmeans_dir.name,
        "wmf_run_id": wmf.run_id if wmf else "",
    }
    runs = [(task, model) for task in study.sources for model in study.models]
    inputs = {
        "kmeans": features_input(kmeans_dir, dataset),
        "tracks": tracks_input(layout.tracks(dataset), dataset),
        "factors": wmf_factors_input(wmf) if wmf is not None else None,
    }
    with parent_run(
        tracking,
        "study",
        key=key,
        run_name=f"study-{study.preset}-{dataset}",
        params=params,
        tags={"mirflow.preset": study.preset, "mirflow.dataset": dataset},
        inputs=inputs.values(),
    ) as (parent, resumed):
        parent_id = parent.info.run_id
        reuse = finished_children(tracking, parent_id) if resumed else {}
        results = []
        for i, (task, model) in enumerate(runs, start=1):
            row = pretrain_model(
                task,
                model,
                study=study,
                data=data,
                kmeans_dir=kmeans_dir,
                reuse=reuse,
                tracking=tracking,
                checkpoint_dir=layout.checkpoints("study") / parent_id,
                inputs=[inputs["kmeans"], inputs["tracks"], inputs["factors"] if task == "listening" else None],
            )
            results.append(row)
            log.info(
                "study %s %d/%d %s · %s: NMSE %.4f, AUC %.4f, mAP %.4f (%s)",
                study.preset,
                i,
                len(runs),
                task,
                model,
                row["nmse"],
                row["auc"],
                row["map"],
                "reused" if row["reused"] else f"{row['seconds']:.0f} s",
            )
    source_table = pd.DataFrame([{k: r[k] for k in ("task", "model", "nmse", "auc", "map")} for r in results])
    # Registered after the parent run closed (the registry calls need no active run).
    # The registry's rule: the newest version is the challenger, the first one the champion until someone
    # promotes another (a study on another world is not comparable by its numbers, so none is promoted here).
    versions = {}
    for row in results:
        version = register(
            tracking,
            f"{PRETRAINED}-{row['task']}-{row['model']}",
            row["model_uri"],
            run_id=row["run_id"],
            tags={"mirflow.study": parent_id},
        )
        versions[(row["task"], row["model"])] = version.version
    target = SourceSettings(adapter="gtzan", path=Path(target_root), split="random", seed=study.target_seed)
    out = transfer(
        data_dir,
        TARGET_DATASET,
        study.transfer,
        study.features,
        study.kmeans,
        cluster,
        tracking,
        source=target,
        models=tuple(r["run_id"] for r in results),
    )
    seconds = time.perf_counter() - start
    n_reused = sum(1 for r in results if r["reused"])
    with parent_run(tracking, "study", key=key, run_name=f"study-{study.preset}-{dataset}", params=params) as (run, _):
        report = _log_transfer_study(
            source_table,
            out,
            results,
            versions,
            study=study,
            dataset=dataset,
            layout=layout,
            run_id=run.info.run_id,
            seconds=seconds,
            n_reused=n_reused,
        )
    text = format_source_table(source_table)
    get_run_logger().info("study %s on %s\n%s\n\n%s", study.preset, dataset, text, out.table)
    return TransferStudyOutput(
        source_table=text,
        transfer_table=out.table,
        parent_run_id=parent_id,
        report_path=str(report),
        n_runs=len(results) - n_reused,
        n_reused=n_reused,
        seconds=seconds,
    )


def source_data(layout: Layout, dataset: str, study: TransferStudySettings, *, wmf, kmeans_dir: Path) -> dict:
    """Inputs, targets and scorers of every source task: ``{task: {...}, "fingerprint": str}``."""
    tracks = pd.read_parquet(layout.tracks(dataset), columns=["track_id", "split", "tags"])
    tracks = tracks[tracks["track_id"].isin(set(read_manifest(kmeans_dir).column("track_id").to_pylist()))]
    tracks = tracks.sort_values("track_id").reset_index(drop=True)
    data: dict = {"tracks": tracks}
    parts = [file_sha1(kmeans_dir / MANIFEST)]
    if "tags" in study.sources:
        tags = tag_vocabulary(tracks, n=study.n_tags)
        ids = {split: list(tracks.loc[tracks["split"] == split, "track_id"]) for split in ("train", "valid", "test")}
        if any(len(v) < 2 for v in ids.values()):
            raise DatasetError(
                f"the tag task needs tracks in train, valid and test: { ({k: len(v) for k, v in ids.items()}) }"
            )
        factors = factorize_tags(
            tracks,
            tags=tags,
            fit_ids=ids["train"],
            fold_ids=ids["valid"] + ids["test"],
            settings=study.wmf.model_copy(update={"factors": study.tag_factors}),
        )
        truth = multi_hot(tracks, tags)
        data["tags"] = {
            "ids": ids,
            "targets": factors.track_factors,
            "factors": factors,
            "truth": np.stack([truth[t] for t in ids["test"]]),
        }
        parts.append((tags, ids, [(t, sorted(v)) for t, v in zip(tracks["track_id"], tracks["tags"])]))
    if "listening" in study.sources:
        users, user_factors = load_factors(wmf.user_factors)
        items, item_factors = load_factors(wmf.item_factors)
        heldout, heldout_factors = load_factors(wmf.heldout_item_factors)
        ids = cold_start_track_splits(tracks, factorized=set(items), heldout=set(heldout))
        if any(len(v) < 2 for v in ids.values()):
            raise DatasetError(
                f"the listening task needs factorized and held-out tracks with features: "
                f"{ ({k: len(v) for k, v in ids.items()}) }"
            )
        relevant = play_matrix_for(
            pd.read_parquet(wmf.heldout_plays), users=users, items=np.asarray(ids["test"], dtype=str)
        )
        data["listening"] = {
            "ids": ids,
            "targets": {**dict(zip(items, item_factors)), **dict(zip(heldout, heldout_factors))},
            "user_factors": user_factors,
            "relevant": relevant,
        }
        parts += [file_sha1(Path(wmf.item_factors)), file_sha1(Path(wmf.heldout_item_factors)), ids]
    data["fingerprint"] = run_key(*parts)
    return data


def pretrain_model(
    task: str,
    model: str,
    *,
    study: TransferStudySettings,
    data: dict,
    kmeans_dir: Path,
    reuse: dict,
    tracking: TrackingSettings,
    checkpoint_dir: Path,
    inputs: Sequence[RunInput | None] = (),
) -> dict:
    """Train one source model in a child run (``inputs``: its datasets), or reuse a completed one: its scores and
    its MLflow model."""
    key = run_key(
        task, model, study.regressor.model_dump(mode="json"), kmeans_dir.name, study.tag_factors, data["fingerprint"]
    )
    row = {"task": task, "model": model, "name": f"{task} · {model}"}
    if key in reuse:
        run = reuse[key]
        m = run.data.metrics
        return {
            **row,
            **{k: m.get(f"test/{k}", float("nan")) for k in ("nmse", "auc", "map")},
            "seconds": 0.0,
            "reused": True,
            "run_id": run.info.run_id,
            "model_uri": run.data.tags["mirflow.model_uri"],
        }
    start = time.perf_counter()
    part = data[task]
    ids = part["ids"]
    features = {s: read_kmeans_features(kmeans_dir, timescales=study.timescales, track_ids=v) for s, v in ids.items()}
    targets = {s: np.stack([part["targets"][t] for t in v]) for s, v in ids.items()}
    layers = MODEL_LAYERS[model]
    params = {
        "task": task,
        "model": model,
        "layers": layers,
        "n_inputs": features["train"].shape[1],
        "n_outputs": targets["train"].shape[1],
        **study.regressor.flat("regressor."),
        **{f"n_{s}": len(v) for s, v in ids.items()},
    }
    with child_run(
        run_name=row["name"],
        params=params,
        settings=tracking,
        inputs=inputs,
        tags={"mirflow.config_key": key, "mirflow.configuration": row["name"]},
    ) as run:
        result = train_factor_regressor(
            callbacks=[ThreadPolicy()],
            features=features,
            targets=targets,
            layers=layers,
            settings=study.regressor,
            checkpoint_dir=checkpoint_dir / key,
            logger=mlflow_logger(tracking, "study", run.info.run_id),
            quiet=True,
        )
        if task == "tags":
            scores = tag_task_scores(result.predicted, part["truth"], part["factors"])
        else:
            ranked = ranking_row(
                row["name"], part["user_factors"], result.predicted, part["relevant"], k=study.evaluation.k
            )
            scores = {"auc": ranked.auc, "map": ranked.map_at_k}
        metrics = {"nmse": nmse(result.predicted, targets["test"]), **scores}
        mlflow.log_metrics({"epochs": result.epochs, **{f"test/{k}": v for k, v in metrics.items() if np.isfinite(v)}})
        model_uri = log_pretrained(
            result.checkpoint,
            name=row["name"],
            study=study,
            kmeans_dir=kmeans_dir,
            n_inputs=features["train"].shape[1],
            dims=result.module.embedding_size,
            example=features["test"][:2],
        )
        mlflow.set_tag("mirflow.model_uri", model_uri)
    return {
        **row,
        **metrics,
        "seconds": time.perf_counter() - start,
        "reused": False,
        "run_id": run.info.run_id,
        "model_uri": model_uri,
    }


def log_pretrained(
    checkpoint: Path,
    *,
    name: str,
    study: TransferStudySettings,
    kmeans_dir: Path,
    n_inputs: int,
    dims: int,
    example: np.ndarray,
) -> str:
    """The source model as an MLflow pyfunc: checkpoint, codebooks and the settings its inputs need."""
    from mlflow.models import ModelSignature

    config = {
        "kind": "pretrained-embedding",
        "name": name,
        "features": study.features.model_dump(mode="json"),
        "kmeans": study.kmeans.model_dump(mode="json"),
        "timescales": list(study.timescales),
        "n_inputs": n_inputs,
        "dims": dims,
    }
    with tempfile.TemporaryDirectory() as tmp:
        codebooks = Path(tmp) / "codebooks"
        codebooks.mkdir()
        for column in study.timescales:
            shutil.copyfile(codebook_path(kmeans_dir, column), codebooks / f"{column}.npz")
        signature = ModelSignature(inputs=factors_schema(n_inputs), outputs=factors_schema(dims))
        return log_served_model(
            code="pretrained_embedding",
            artifacts={"checkpoint": Path(checkpoint), "codebooks": codebooks},
            config=config,
            signature=signature,
            input_example=example.astype(np.float32),
        )


def format_source_table(table: pd.DataFrame) -> str:
    return table.rename(columns={"nmse": "NMSE", "auc": "AUC", "map": "mAP"}).to_string(
        index=False, float_format=lambda v: f"{v:.4f}"
    )


def _log_transfer_study(
    source: pd.DataFrame,
    out: TransferOutput,
    results: list[dict],
    versions: dict,
    *,
    study: TransferStudySettings,
    dataset: str,
    layout: Layout,
    run_id: str,
    seconds: float,
    n_reused: int,
) -> Path:
    log_table_replacing(source, "table_source.json")
    log_table_replacing(pd.DataFrame(out.rows), "table_transfer.json")
    log_table_replacing(pd.DataFrame(results), "study_runs.json")
    mlflow.set_tag("mirflow.transfer_run_id", out.run_id)
    mlflow.log_metrics(
        {
            **{
                f"source/{r['task']}_{metric_slug(r['model'])}/{m}": r[m]
                for r in results
                for m in ("nmse", "auc", "map")
                if np.isfinite(r[m])
            },
            **{f"transfer/{metric_slug(r['feature_set'])}": r["value"] for r in out.rows},
            "study_seconds": seconds,
            "children_reused": n_reused,
        }
    )
    report = layout.reports() / f"study-{study.preset}-{run_id}.md"
    registered = [
        f"- `{PRETRAINED}-{task}-{model}` version {v} (alias `{CHALLENGER}`: the newest)"
        for (task, model), v in versions.items()
    ]
    write_text_atomic(
        report,
        "\n".join(
            [
                f"# Study {study.preset} on {dataset}",
                "",
                f"MLflow parent run `{run_id}`, {len(results)} source models ({n_reused} reused), {seconds:.0f} s.",
                "",
                "## Source tasks (test split)",
                "",
                (
                    "tags: the track × tag matrix reduced by WMF; AUC and mAP of the tags ranked per track, macro over tags. "
                    f"listening: the WMF item factors; AUC and mAP@{study.evaluation.k} of the held-out tracks ranked per user "
                    "(cold start). NMSE: squared error over the targets' variance."
                ),
                "",
                "```",
                format_source_table(source),
                "```",
                "",
                f"## Transfer to the synthetic genre catalogue ({out.n_tracks} tracks, {out.metric})",
                "",
                "```",
                out.table,
                "```",
                "",
                f"Transfer run `{out.run_id}` (experiment mirflow-transfer).",
                "",
                "## Registered models",
                "",
                *registered,
                "",
                "## Settings",
                "",
                "```json",
                study.model_dump_json(indent=1),
                "```",
                "",
            ]
        ),
    )
    mlflow.log_artifact(str(report))
    return report
