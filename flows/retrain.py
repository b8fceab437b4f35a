"""Flow: retrain the recommender when new listening data lands, and promote it only if it is better.

    inbox/listening/*  ──ingest──►  WMF update from the previous factors  ──►  fine-tune the champion CNN
                                                                                    │
        champion (CNN + its WMF factors)  ──┬── same held-out tracks, same users ──┤
                                            ▼                                       ▼
                                    register the challenger (new versions)  ──►  move `champion` last, if better

New data is any inbox file whose batch the last registered recommender did not
cover (its ``mirflow.batches`` tag), so a run killed before registering is simply
run again: ingestion and the WMF update are then found done and reused, and only
the fine-tuning is repeated. The decision, both scores and the batch ids go on the
new model version (tags), into a Prefect markdown artifact, an MLflow run
(``mirflow-retrain``) and the flow's return value.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from core.errors import DatasetError
from core.layout import Layout
from core.settings import PipelineSettings, PromotionSettings, TrackingSettings, TrainSettings
from flows.listening import WMFOutput, factorize, ingest_listening
from flows.registry import register_recommender
from flows.training import train_recommender_flow
from infra.locks import try_lock
from infra.registry import (
    BATCHES_TAG,
    DECISION_TAG,
    LATENT_FACTOR_CNN,
    PROMOTED,
    WMF,
    Recommender,
    champion,
    download_recommender,
    newest_version,
    promote_recommender,
    repair_recommender_aliases,
)
from infra.tracking import features_input, listening_input, tracked_run
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.served import predict_latent_factors
from tasks.datasets import heldout_track_ids
from tasks.events import ListeningSource, batch_record, ingested_batches
from tasks.heldout import heldout_clips
from tasks.listening import load_factors
from tasks.recommend import compare_recommenders, rows_as_metrics
from tasks.report import RankingRow
from tasks.shards import content_sha1

log = logging.getLogger("mirflow")
CHALLENGER_ROW = "challenger"
CHAMPION_ROW = "champion"


@dataclass(frozen=True)
class RetrainOutcome:
    """What a retraining run did and why."""

    status: str  # "busy", "no-champion", "nothing-new", "no-valid-rows", "promoted" or "kept-champion"
    message: str
    new_batches: tuple[str, ...] = ()
    metric: str = ""
    challenger_score: float | None = None
    champion_score: float | None = None
    challenger_version: str | None = None  # the new mirflow-latent-factor-cnn version
    champion_version: str | None = None  # the champion after this run
    rows: tuple[RankingRow, ...] = field(default_factory=tuple)


def load_pipeline_settings(data_dir: Path, tracking: TrackingSettings) -> PipelineSettings:
    """The settings of the last finished pipeline run, with this run's data folder and tracking."""
    path = Layout(Path(data_dir)).pipeline_settings()
    if not path.exists():
        raise DatasetError(
            f"no finished pipeline run under {data_dir} ({path} is missing): run `mirflow pipeline` "
            "or `make demo` first, so that there is a champion to retrain"
        )
    settings = PipelineSettings.model_validate_json(path.read_text())
    return settings.model_copy(update={"data_dir": Path(data_dir).resolve(), "tracking": tracking})


def inbox_sources(inbox: Path) -> list[ListeningSource]:
    """Every listening file in the inbox (any supported format), oldest name first; hidden files are ignored."""
    if not inbox.is_dir():
        return []
    files = sorted(p for p in inbox.iterdir() if p.is_file() and not p.name.startswith("."))
    return [ListeningSource(p).resolved() for p in files]


def covered_batches(tracking: TrackingSettings) -> list[str]:
    """Batches the newest registered recommender (champion or not) was trained on."""
    newest = newest_version(tracking, LATENT_FACTOR_CNN)
    return [b for b in newest.tags.get(BATCHES_TAG, "").split(",") if b] if newest is not None else []


def new_sources(sources: list[ListeningSource], *, covered: list[str], listening_dir: Path) -> list[ListeningSource]:
    """Inbox files not covered yet, or covered but changed since they were ingested."""
    out = []
    for source in sources:
        if source.batch not in covered:
            out.append(source)
            continue
        try:
            recorded = batch_record(listening_dir, source.batch)["sha1"]
        except DatasetError:
            recorded = None
        if recorded != content_sha1(source.path):
            out.append(source)
    return out


def score_recommenders(
    *,
    feature_dir: Path,
    column: str,
    heldout_plays: Path,
    recommenders: dict[str, tuple],
    crop: int,
    hop: int,
    k: int,
    seed: int,
) -> list[RankingRow]:
    """Cold-start table of CNN recommenders on the held-out tracks with features, for the users they all know.

    ``recommenders``: name -> (CNN checkpoint, the WMF user factors it ranks with). Every
    CNN sees the same windows (``crop``, ``hop``); the held-out tracks and the relevance
    judgements are those of ``heldout_plays`` (long form ``user, item, plays``).
    """
    held = heldout_clips(heldout_plays, feature_dir, column=column)
    scored = {}
    for name, (checkpoint, user_factors_path) in recommenders.items():
        module = LatentFactorModule.load_from_checkpoint(checkpoint, weights_only=True, map_location="cpu")
        users, user_factors = load_factors(Path(user_factors_path))
        scored[name] = (users, user_factors, predict_latent_factors(module, held.clips, crop=crop, hop=hop))
    return compare_recommenders(heldout_plays=held.plays, track_ids=held.track_ids, recommenders=scored, k=k, seed=seed)


@task(cache_policy=NO_CACHE)
def evaluate_against_champion(
    settings: PipelineSettings, *, wmf: WMFOutput, challenger_checkpoint: Path, old: Recommender
) -> list[RankingRow]:
    """Champion and challenger on the same held-out tracks and users, with the champion's windowing for both."""
    feature_dir = Layout(settings.data_dir).features(settings.dataset, settings.features.feature_set)
    return score_recommenders(
        feature_dir=feature_dir,
        column=settings.features.mel.column,
        heldout_plays=Path(wmf.heldout_plays),
        recommenders={
            CHAMPION_ROW: (old.checkpoint, old.user_factors),
            CHALLENGER_ROW: (challenger_checkpoint, Path(wmf.user_factors)),
        },
        crop=old.config["crop_frames"],
        hop=old.config["hop_frames"],
        k=settings.evaluation.k,
        seed=settings.evaluation.seed,
    )


def decide(rows: list[RankingRow], promotion: PromotionSettings) -> tuple[bool, float, float, str]:
    """(promote?, challenger score, champion score, reason): promoted when better, by at least the margin."""
    by_name = {r.name: r for r in rows}
    new, old = getattr(by_name[CHALLENGER_ROW], promotion.metric), getattr(by_name[CHAMPION_ROW], promotion.metric)
    gain = new - old
    if not math.isfinite(gain):
        return False, new, old, f"{promotion.metric} is undefined on these held-out tracks; the champion stays"
    scores = f"challenger {promotion.metric} {new:.4f} vs champion {old:.4f}: gain {gain:+.4f}"
    # 1e-9: a margin written in decimals, not float noise, decides.
    if gain > 0 and gain >= promotion.margin - 1e-9:
        return True, new, old, f"{scores} > 0 and >= margin {promotion.margin:.4f}, promoted"
    return False, new, old, f"{scores}, not above 0 and the margin {promotion.margin:.4f}: the champion stays"


@task(cache_policy=NO_CACHE)
def report_outcome(outcome: RetrainOutcome) -> None:
    """The decision as a Prefect markdown artifact (and one log line)."""
    lines = [f"# retrain-on-new-listening: {outcome.status}", "", outcome.message, ""]
    if outcome.new_batches:
        lines += [f"new batches: {', '.join(outcome.new_batches)}", ""]
    if outcome.rows:
        lines += ["| ranking | mAP@k | AUC | NDCG@k | users |", "|---|---|---|---|---|"]
        lines += [
            f"| {r.name} | {r.map_at_k:.4f} | {r.auc:.3f} | {r.ndcg_at_k:.4f} | {r.n_users} |" for r in outcome.rows
        ]
    create_markdown_artifact("\n".join(lines), key="retrain-on-new-listening", description="retraining decision")
    log.info("retrain: %s: %s", outcome.status, outcome.message)


@flow(name="retrain-on-new-listening")
def retrain_on_new_listening(
    data_dir: Path,
    tracking: TrackingSettings,
    metric: str | None = None,
    margin: float | None = None,
    max_epochs: int | None = None,
) -> RetrainOutcome:
    """Ingest new inbox files, update WMF, fine-tune the champion CNN, register it, promote it if better.

    ``metric``, ``margin`` and ``max_epochs`` override the promotion rule and the
    fine-tuning length of the pipeline settings the champion was trained with. One
    retraining runs at a time per storage root: a second one finds the lock and ends
    at once with the status ``busy``.
    """
    lock = try_lock(Layout(Path(data_dir)).retrain_lock())
    if lock is None:
        outcome = RetrainOutcome(
            "busy",
            f"another retrain-on-new-listening is running on {data_dir}; "
            "this run does nothing (the next one will see the same inbox)",
        )
        report_outcome(outcome)
        return outcome
    with lock:
        return _retrain(Path(data_dir), tracking, metric=metric, margin=margin, max_epochs=max_epochs)


def _retrain(
    data_dir: Path, tracking: TrackingSettings, *, metric: str | None, margin: float | None, max_epochs: int | None
) -> RetrainOutcome:
    if not Layout(data_dir).pipeline_settings().exists() or champion(tracking, LATENT_FACTOR_CNN) is None:
        outcome = RetrainOutcome(
            "no-champion",
            f"no registered recommender to retrain under {data_dir} "
            f"({tracking.tracking_uri}): run the pipeline first (`make demo`, `mirflow pipeline` "
            "or the 'mirflow/pipeline' deployment)",
        )
        report_outcome(outcome)
        return outcome
    settings = load_pipeline_settings(data_dir, tracking)
    overrides = {key: value for key, value in {"metric": metric, "margin": margin}.items() if value is not None}
    promotion = PromotionSettings.model_validate({**settings.retrain.promotion.model_dump(), **overrides})
    finetune = settings.retrain.finetune
    if max_epochs is not None:
        finetune = TrainSettings.model_validate({**finetune.model_dump(), "max_epochs": max_epochs})
    layout = Layout(settings.data_dir)
    repair_recommender_aliases(tracking)
    old = champion(tracking, LATENT_FACTOR_CNN)

    covered = covered_batches(tracking)
    fresh = new_sources(inbox_sources(layout.inbox()), covered=covered, listening_dir=layout.listening())
    if not fresh:
        outcome = RetrainOutcome(
            "nothing-new",
            f"no new listening files in {layout.inbox()}; nothing to do",
            champion_version=str(old.version),
        )
        report_outcome(outcome)
        return outcome

    ingest = ingest_listening(fresh, layout.listening(), layout.quarantine("listening"))
    # From the batch records, not this run's report: a batch ingested by an interrupted run is skipped now.
    empty = [b for b in ingest.batch_ids if batch_record(layout.listening(), b)["valid"] == 0]
    usable = [s for s in fresh if s.batch not in empty]
    if not usable:
        outcome = RetrainOutcome(
            "no-valid-rows",
            f"the new batches {', '.join(empty)} hold no valid rows (see "
            f"{layout.quarantine('listening')}); no retraining, the champion stays",
            new_batches=tuple(empty),
            champion_version=str(old.version),
        )
        report_outcome(outcome)
        return outcome
    if empty:
        log.warning("retrain: batches %s hold no valid rows and are left out", empty)

    heldout = heldout_track_ids(layout.tracks(settings.dataset))
    previous = [b for b in covered if b in ingested_batches(layout.listening()) and b not in {s.batch for s in usable}]
    wmf = factorize(
        settings.data_dir, usable, heldout, settings.wmf, tracking, k=settings.evaluation.k, ingested=previous
    )
    with tempfile.TemporaryDirectory() as tmp:
        current = download_recommender(tracking, cnn_version=str(old.version), into=Path(tmp))
        challenger = train_recommender_flow(
            settings.data_dir,
            settings.dataset,
            settings.features.feature_set,
            settings.features.mel,
            wmf,
            settings.recommender,
            settings.evaluation,
            tracking,
            init_checkpoint=current.checkpoint,
            finetune=finetune,
            confidence=settings.wmf,
        )
        rows = evaluate_against_champion(
            settings, wmf=wmf, challenger_checkpoint=Path(challenger.checkpoint), old=current
        )
    champion_wmf = current.wmf_version
    promote, new_score, old_score, reason = decide(rows, promotion)
    now = champion(tracking, LATENT_FACTOR_CNN)
    if promote and (now is None or str(now.version) != str(old.version)):  # moved by hand during this run
        promote, reason = (
            False,
            (f"{reason}; but the champion is no longer v{old.version}, the version compared with: not promoted"),
        )
    new_batches = tuple(s.batch for s in usable)
    decision = {
        DECISION_TAG: PROMOTED if promote else "kept-champion",
        "mirflow.reason": reason,
        "mirflow.metric": promotion.metric,
        "mirflow.margin": str(promotion.margin),
        "mirflow.challenger_score": f"{new_score:.6f}",
        "mirflow.champion_score": f"{old_score:.6f}",
        "mirflow.compared_with": f"{LATENT_FACTOR_CNN} v{old.version} + {WMF} v{champion_wmf}",
        "mirflow.new_batches": ",".join(new_batches),
    }
    with tracked_run(
        tracking,
        "retrain",
        run_name="retrain-on-new-listening",
        params={
            **promotion.flat("promotion."),
            **finetune.flat("finetune."),
            "new_batches": ",".join(new_batches),
            "champion_version": str(old.version),
        },
        tags={"mirflow.recommender_run_id": challenger.run_id, **decision},
        inputs=[
            listening_input(layout.listening(), wmf.batches),
            features_input(
                layout.features(settings.dataset, settings.features.feature_set), settings.dataset, context="evaluation"
            ),
        ],
    ):
        mlflow.log_metrics(rows_as_metrics(rows, k=settings.evaluation.k))
        # Every artifact exists before any alias moves; the CNN's champion alias moves last.
        wmf_version, cnn_version = register_recommender(
            tracking, wmf=wmf, recommender=challenger, dataset=settings.dataset, tags=decision
        )
        if promote:
            promote_recommender(tracking, cnn_version=cnn_version.version, wmf_version=wmf_version.version)
            log.info(
                "registry: %s v%s and %s v%s are the champions",
                LATENT_FACTOR_CNN,
                cnn_version.version,
                WMF,
                wmf_version.version,
            )
    outcome = RetrainOutcome(
        "promoted" if promote else "kept-champion",
        reason,
        new_batches=new_batches,
        metric=promotion.metric,
        challenger_score=new_score,
        champion_score=old_score,
        challenger_version=str(cnn_version.version),
        champion_version=str(cnn_version.version if promote else old.version),
        rows=tuple(rows),
    )
    report_outcome(outcome)
    return outcome
