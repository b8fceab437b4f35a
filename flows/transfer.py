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
from core.storage import read_frame
from flows.features import extract_features, ingest_catalogue
from flows.kmeans_features import kmeans_features
from flows.listening import factorize
from flows.study_runner import Child, Findings, StudyKind, StudyParent, listening_files, run_study, study_cluster
from flows.training import mlflow_logger
from flows.world import synthetic_target
from infra.cluster import dask_client, shared_settings
from infra.pretrained import PRETRAINED, Pretrained, resolve_pretrained
from infra.registry import (
    CHALLENGER,
    factors_schema,
    log_served_model,
    register,
)
from infra.threads import ThreadPolicy
from infra.tracking import (
    RunInput,
    features_input,
    file_sha1,
    files_input,
    log_table_replacing,
    run_key,
    tracked_run,
    tracks_input,
    wmf_factors_input,
)
from lightning_modules.train import train_factor_regressor
from tasks.datasets import heldout_track_ids
from tasks.embedding import EmbeddingProvenance, embed_vectors, write_embeddings
from tasks.feature_sets import (
    feature_vectors,
    read_target_tracks,
    rows_frame,
    target_with_features,
    tracks_without_features,
)
from tasks.kmeans_features import codebook_path, read_kmeans_features
from tasks.pretrain import nmse, tag_task_scores
from tasks.recommend import ranking_row
from tasks.report import metric_slug, plot_transfer_bars
from tasks.shards import (
    MANIFEST,
    append_quarantine,
    read_manifest,
)
from tasks.studies import clips_with_features, manifest_ids, read_listening_factors, source_data
from tasks.study_tables import (
    SOURCE_SCORES,
    finite,
    format_source_table,
    frame,
    source_table,
    stack_by_id,
    transfer_study_metrics,
    transfer_study_report,
)
from tasks.transfer import check_target, fit_transfer, format_transfer_table

log = logging.getLogger("mirflow")
TARGET_DATASET = "synthetic-target"


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
    data = source_data_of(layout, dataset, study, wmf=wmf, kmeans_dir=kmeans_dir)
    inputs = {
        "kmeans": features_input(kmeans_dir, dataset),
        "tracks": tracks_input(layout.tracks(dataset), dataset),
        "factors": wmf_factors_input(wmf) if wmf is not None else None,
    }
    parent = StudyParent(
        key=f"{study.settings_hash}-{dataset}-{data['fingerprint']}",
        params={
            **study.flat(),
            "dataset": dataset,
            "data_fingerprint": data["fingerprint"],
            "kmeans_feature_set": kmeans_dir.name,
            "wmf_run_id": wmf.run_id if wmf else "",
        },
        inputs=inputs.values(),
    )

    def conclude(rows: list[dict], parent_id: str) -> Findings:
        """Registered and transferred with no run active (the registry calls need none; the transfer flow
        opens its own run). The registry's rule: the newest version is the challenger, the first one the
        champion until someone promotes another (a study on another world is not comparable by its numbers,
        so none is promoted here)."""
        versions = {}
        for row in rows:
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
            models=tuple(r["run_id"] for r in rows),
        )
        source = source_table(rows)
        registered = [
            f"- `{PRETRAINED}-{task}-{model}` version {v} (alias `{CHALLENGER}`: the newest)"
            for (task, model), v in versions.items()
        ]
        return Findings(
            tables={"table_source.json": source, "table_transfer.json": frame(out.rows)},
            text=f"{format_source_table(source)}\n\n{out.table}",
            metrics=transfer_study_metrics(rows, out.rows),
            tags={"mirflow.transfer_run_id": out.run_id},
            report=lambda s: transfer_study_report(
                source,
                transfer_table=out.table,
                transfer_run_id=out.run_id,
                n_target=out.n_tracks,
                metric=out.metric,
                registered=registered,
                k=study.evaluation.k,
                run_id=s.run_id,
                n=s.n_rows,
                n_reused=s.n_reused,
                seconds=s.seconds,
            ),
            values={"source_table": format_source_table(source), "transfer_table": out.table},
        )

    kind = StudyKind(
        configurations=[(task, model) for task in study.sources for model in study.models],
        name=lambda config: f"{config[0]} · {config[1]}",
        key=lambda config: run_key(
            *config, study.regressor.model_dump(mode="json"), kmeans_dir.name, study.tag_factors, data["fingerprint"]
        ),
        reuse=reused_source_model,
        run_one=lambda config, child: pretrain_model(
            *config,
            child,
            study=study,
            data=data,
            kmeans_dir=kmeans_dir,
            inputs=[inputs["kmeans"], inputs["tracks"], inputs["factors"] if config[0] == "listening" else None],
        ),
        conclude=conclude,
        progress=lambda row: f"NMSE {row['nmse']:.4f}, AUC {row['auc']:.4f}, mAP {row['map']:.4f}",
    )
    out = run_study(kind, study=study, dataset=dataset, parent=parent, layout=layout, tracking=tracking, start=start)
    get_run_logger().info("study %s on %s\n%s", study.preset, dataset, out.findings.text)
    return TransferStudyOutput(
        source_table=out.findings.values["source_table"],
        transfer_table=out.findings.values["transfer_table"],
        parent_run_id=out.parent_run_id,
        report_path=str(out.report_path),
        n_runs=out.n_runs,
        n_reused=out.n_reused,
        seconds=out.seconds,
    )


def source_data_of(layout: Layout, dataset: str, study: TransferStudySettings, *, wmf, kmeans_dir: Path) -> dict:
    """Inputs, targets and scorers of every source task (:func:`tasks.studies.source_data`) and the data's
    fingerprint: ``{"tracks": frame, task: {...}, "fingerprint": str}``."""
    tracks = clips_with_features(
        read_frame(layout.tracks(dataset), columns=["track_id", "split", "tags"]), [manifest_ids(kmeans_dir)], sort=True
    )
    listening = read_listening_factors(wmf.user_factors, wmf.item_factors, wmf.heldout_item_factors) if wmf else None
    plays = read_frame(wmf.heldout_plays) if wmf and "listening" in study.sources else None
    data, own = source_data(tracks, study, listening=listening, heldout_plays=plays)
    parts: list = [file_sha1(kmeans_dir / MANIFEST)]
    if "tags" in own:
        parts.append(own["tags"])
    if "listening" in own:
        parts += [file_sha1(Path(wmf.item_factors)), file_sha1(Path(wmf.heldout_item_factors)), own["listening"]]
    return {**data, "fingerprint": run_key(*parts)}


def reused_source_model(config: tuple[str, str], run) -> dict:
    """A finished source model's row: its test scores (NaN where its task has none) and its MLflow model."""
    task, model = config
    m = run.data.metrics
    return {
        "task": task,
        "model": model,
        "name": f"{task} · {model}",
        **{k: m.get(f"test/{k}", float("nan")) for k in SOURCE_SCORES},
        "run_id": run.info.run_id,
        "model_uri": run.data.tags["mirflow.model_uri"],
    }


def pretrain_model(
    task: str,
    model: str,
    child: Child,
    *,
    study: TransferStudySettings,
    data: dict,
    kmeans_dir: Path,
    inputs: Sequence[RunInput | None] = (),
) -> dict:
    """Train one source model in its child run (``inputs``: its datasets): its scores and its MLflow model."""
    row = {"task": task, "model": model, "name": f"{task} · {model}"}
    part = data[task]
    ids = part["ids"]
    features = {s: read_kmeans_features(kmeans_dir, timescales=study.timescales, track_ids=v) for s, v in ids.items()}
    targets = {s: stack_by_id(part["targets"], v) for s, v in ids.items()}
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
    with child.run(params=params, inputs=inputs) as run:
        result = train_factor_regressor(
            callbacks=[ThreadPolicy()],
            features=features,
            targets=targets,
            layers=layers,
            settings=study.regressor,
            checkpoint_dir=child.checkpoint_dir,
            logger=mlflow_logger(child.tracking, "study", run.info.run_id),
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
        mlflow.log_metrics({"epochs": result.epochs, **finite({f"test/{k}": v for k, v in metrics.items()})})
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
    return {**row, **metrics, "run_id": run.info.run_id, "model_uri": model_uri}


def log_pretrained(
    checkpoint: Path,
    *,
    name: str,
    study: TransferStudySettings,
    kmeans_dir: Path,
    n_inputs: int,
    dims: int,
    example,
) -> str:
    """The source model as an MLflow pyfunc: checkpoint, codebooks and the settings its inputs need.

    ``example``: two input vectors [ndarray, shape=(2, n_inputs)], the model's input example."""
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
            input_example=example.astype("float32"),
        )
