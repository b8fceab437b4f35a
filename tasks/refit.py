"""When and how the listening factorization is refitted, and the fits themselves.

The factorization on disk (``models/wmf``) is described by its state (``state.json``): the fit settings'
key, the split's key, each factorized batch's content hash, the runs and the evaluation table. Given that
state and the batches at hand, :func:`decide_refit` chooses one of three modes, with its reason:

    reused       same settings, same split, the same batches with the same content, factors and model there
    incremental  same settings and split, factors there, and the batches a strict superset of the previous
                 ones (every previous batch unchanged): a few ALS sweeps from the previous factors
    full         anything else (no state, other settings or split, a batch changed or dropped, factors gone)

:func:`fit_factorization` is one fit, with early stopping when the settings ask for it; the factors and
the held-out plays are read and written here too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from core.settings import WMFSettings
from core.storage import write_parquet, write_text
from tasks.listening import (
    ColdStartSplit,
    InMatrixSplit,
    PlayMatrix,
    cold_start_split,
    in_matrix_split,
    load_factors,
    plays_to_frame,
    save_factors,
)
from tasks.metrics import ranking_metrics
from tasks.recommend import sample_users
from tasks.wmf import WMFModel, fit_wmf, fold_in_items, warm_start

log = logging.getLogger("mirflow")

#: The factorization's state file, in its folder.
STATE_FILE = "state.json"
#: Its Parquet products, by name (``<name>.parquet``); the last two only under the cold-start protocol.
FACTOR_FILES = ("user_factors", "item_factors", "heldout_item_factors", "heldout_plays")
# Users scored by the early-stopping validation metric (a sample keeps each check cheap).
VALIDATION_USERS = 20_000
# Rows per row group of the held-out plays (small rows: one group per million plays).
_PLAYS_ROW_GROUP = 1 << 20

Mode = Literal["reused", "incremental", "full"]
Split = ColdStartSplit | InMatrixSplit


# ----------------------------------------------------------------------------- state


def split_key(heldout_items: Sequence[str] | None, wmf: WMFSettings) -> dict:
    """What identifies a split: in-matrix by its test fraction, cold start by the hash of the held-out ids."""
    if heldout_items is None:
        return {"protocol": "in-matrix", "test_fraction": wmf.test_fraction}
    digest = hashlib.sha1("\n".join(sorted(map(str, heldout_items))).encode()).hexdigest()
    return {"protocol": "cold-start", "heldout_sha1": digest}


def read_state(wmf_dir: Path) -> dict | None:
    """The state of the factorization in ``wmf_dir``; None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(wmf_dir) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_state(wmf_dir: Path, state: Mapping[str, Any]) -> Path:
    """Atomically; the batches keep their order (the order they were factorized in)."""
    return write_text(Path(wmf_dir) / STATE_FILE, json.dumps(state, indent=1))


def clear_state(wmf_dir: Path) -> None:
    """Forget the factorization (its factors are about to change: until a new state is written, none holds)."""
    (Path(wmf_dir) / STATE_FILE).unlink(missing_ok=True)


def factor_files(wmf_dir: Path) -> dict[str, Path]:
    """``{name: wmf_dir/<name>.parquet}`` for every product of :data:`FACTOR_FILES`."""
    return {name: Path(wmf_dir) / f"{name}.parquet" for name in FACTOR_FILES}


def factors_on_disk(files: Mapping[str, Path], *, cold_start: bool) -> bool:
    """Whether the factors a reuse or an update starts from are all there."""
    needed = (
        ("user_factors", "item_factors", "heldout_item_factors") if cold_start else ("user_factors", "item_factors")
    )
    return all(Path(files[name]).exists() for name in needed)


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class RefitDecision:
    """What to do with the factorization, and why (the reason is logged)."""

    mode: Mode
    reason: str
    previous: dict[str, str]  # batch -> content hash of the previous factorization of the same setup; {} if none


def decide_refit(
    state: Mapping[str, Any] | None,
    *,
    fit_key: Mapping[str, Any],
    split: Mapping[str, Any],
    contents: Mapping[str, str],
    have_factors: bool,
) -> RefitDecision:
    """Reuse, update incrementally or refit in full (see the module's docstring).

    Parameters
    ----------
    state : mapping or None
        The previous factorization's state (:func:`read_state`).
    fit_key : mapping
        ``WMFSettings.fit_key()`` of this run.
    split : mapping
        :func:`split_key` of this run.
    contents : mapping
        ``{batch id: content hash}`` of every batch to factorize.
    have_factors : bool
        :func:`factors_on_disk`.
    """
    contents = dict(contents)
    if state is None:
        return RefitDecision("full", "no previous factorization", {})
    if state.get("fit_key") != dict(fit_key):
        return RefitDecision("full", "the fit settings differ from the previous factorization's", {})
    if state.get("split") != dict(split):
        return RefitDecision("full", "the split differs from the previous factorization's", {})
    previous = dict(state.get("batches", {}))
    if not have_factors:
        return RefitDecision("full", "the previous factors are missing", previous)
    if previous == contents:
        if state.get("model_uri"):
            return RefitDecision("reused", "the same batches were factorized with these settings", previous)
        return RefitDecision("full", "the previous factorization logged no model", previous)
    if set(previous.items()) < set(contents.items()):
        new = sorted(set(contents) - set(previous))
        return RefitDecision("incremental", f"{len(new)} new batch(es) beside the factorized ones: {new}", previous)
    changed = sorted(b for b in previous if contents.get(b) != previous[b])
    return RefitDecision("full", f"batches factorized before were dropped or changed: {changed}", previous)


def needs_evaluation(state: Mapping[str, Any], eval_key: Mapping[str, Any]) -> bool:
    """Whether reused factors must be evaluated again: another ``k`` or user cap, or no table recorded."""
    return state.get("eval_key") != dict(eval_key) or not state.get("rows")


# ----------------------------------------------------------------------------- fits


def split_plays(matrix: PlayMatrix, heldout_items: Sequence[str] | None, wmf: WMFSettings) -> Split:
    """Cold start (``heldout_items`` leave the factorization) or in-matrix (a share of each user's plays)."""
    if heldout_items is not None:
        return cold_start_split(matrix, heldout_items=np.asarray(heldout_items, dtype=object))
    return in_matrix_split(matrix, fraction=wmf.test_fraction, seed=wmf.seed)


def fit_factorization(
    train: PlayMatrix,
    wmf: WMFSettings,
    *,
    k: int,
    label: str = "fit",
    init: WMFModel | None = None,
    iterations: int | None = None,
    on_sweep: Callable[[], None] | None = None,
) -> WMFModel:
    """One fit of ``train`` (``iterations`` sweeps, ``wmf.iterations`` when None; from ``init`` if given).

    With early stopping (``wmf.early_stopping_patience``, and no ``init``), a share of the training plays
    (``validation_fraction``) is set aside; mAP@``k`` on them, for at most :data:`VALIDATION_USERS` users,
    picks the number of sweeps, and the returned model is then fitted on all of ``train`` for that many, from
    the same initial factors, carrying the validation history. ``on_sweep()`` is called after each sweep of
    the (first) fit; each validation is logged, under ``label``.
    """
    sweep = (lambda i, loss: on_sweep()) if on_sweep is not None else None
    if not (wmf.early_stopping_patience and init is None):
        return fit_wmf(
            train.plays, settings=wmf, init=init, iterations=iterations or wmf.iterations, on_iteration=sweep
        )
    val = in_matrix_split(train, fraction=wmf.validation_fraction, seed=wmf.seed + 1, keep_all_items=True)
    users = sample_users(val.train.plays.shape[0], VALIDATION_USERS, seed=wmf.seed)
    seen, held = val.train.plays[users], val.test.plays[users]

    def validate(model: WMFModel) -> float:
        score = ranking_metrics(model.user_factors[users], model.item_factors, held, exclude=seen, k=k)
        log.info("WMF %s: sweep %d, validation mAP@%d %.4f", label, model.iterations, k, score["map_at_k"])
        return score["map_at_k"]

    chosen = fit_wmf(val.train.plays, settings=wmf, validate=validate, on_iteration=sweep)
    log.info(
        "WMF %s: best validation mAP@%d after %d sweeps; refitting on all training plays", label, k, chosen.iterations
    )
    # The validation plays only chose the number of sweeps: the model is refitted on
    # all training plays for that many, from the same initial factors.
    model = fit_wmf(train.plays, settings=wmf, iterations=chosen.iterations)
    return WMFModel(model.user_factors, model.item_factors, iterations=model.iterations, validation=chosen.validation)


def warm_start_from(files: Mapping[str, Path], train: PlayMatrix, wmf: WMFSettings) -> tuple[WMFModel, dict[str, int]]:
    """Initial factors for ``train`` from the factors on disk (:func:`tasks.wmf.warm_start`), and its counts."""
    previous_users, previous_x = load_factors(files["user_factors"])
    previous_items, previous_y = load_factors(files["item_factors"])
    return warm_start(
        WMFModel(previous_x, previous_y),
        previous_users=previous_users,
        previous_items=previous_items,
        plays=train.plays,
        users=train.users,
        items=train.items,
        settings=wmf,
    )


def fold_in_heldout(model: WMFModel, split: ColdStartSplit, wmf: WMFSettings) -> np.ndarray:
    """Factors of the held-out items from their plays and the model's user factors: (n_heldout, factors)."""
    return fold_in_items(model.user_factors, split.test.plays.T.tocsr(), settings=wmf)


def load_model(files: Mapping[str, Path], *, cold_start: bool) -> tuple[WMFModel, np.ndarray | None]:
    """The factorization on disk and, under cold start, the held-out items' factors."""
    model = WMFModel(load_factors(files["user_factors"])[1], load_factors(files["item_factors"])[1])
    heldout = load_factors(files["heldout_item_factors"])[1] if cold_start else None
    return model, heldout


def save_factorization(
    files: Mapping[str, Path], split: Split, model: WMFModel, heldout: np.ndarray | None
) -> dict[str, Path]:
    """The factors (and, with ``heldout``, the held-out items' factors and plays) as Parquet; returns the paths.

    Without ``heldout`` (in-matrix), held-out files of an earlier cold-start factorization are removed.
    """
    train = split.train
    paths = {
        "user_factors": save_factors(files["user_factors"], train.users, model.user_factors),
        "item_factors": save_factors(files["item_factors"], train.items, model.item_factors),
    }
    if heldout is not None:
        paths["heldout_item_factors"] = save_factors(files["heldout_item_factors"], split.test.items, heldout)
        paths["heldout_plays"] = save_heldout_plays(files["heldout_plays"], split.test)
    else:
        for name in ("heldout_item_factors", "heldout_plays"):
            Path(files[name]).unlink(missing_ok=True)
    return paths


def save_heldout_plays(path: Path, plays: PlayMatrix) -> Path:
    """Held-out plays in long form (``user, item, plays``): the relevance judgements of the evaluation."""
    table = pa.Table.from_pandas(plays_to_frame(plays), preserve_index=False)
    return write_parquet(path, table, row_group_size=_PLAYS_ROW_GROUP)
