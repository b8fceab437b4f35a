"""Transfer evaluation: a simple classifier on a target catalogue's features, and its score.

van den Oord, Dieleman & Schrauwen (ISMIR 2014) judge a feature set (pre-trained embeddings,
K-means features, log-mel statistics, MFCC statistics) by how well a linear classifier fitted
on it classifies a target catalogue. This module holds the pieces, all pure functions:

* :func:`log_mel_statistics` and :func:`mfcc_statistics`, the two baselines computed
  from one clip's log-mel spectrogram;
* :func:`check_target`, which reads a target's tracks table (``track_id``, ``split``,
  ``labels``), decides single- or multi-label and refuses targets a classifier cannot
  be scored on, with a message that says what to do;
* :func:`fit_transfer`, which standardizes the features, chooses the regularization C
  (on the valid split, or by nested cross-validation) and scores the classifier on
  held-out tracks (accuracy, or macro ROC-AUC for multi-label targets);
* :func:`format_transfer_table`, one text row per feature set.

Protocols
---------
``cv=None``
    Fit on ``train`` for every C of the grid, choose C by the score on ``valid``, refit
    on ``train`` + ``valid`` with that C and score once on ``test``.
``cv=k``
    Pool the ``train``, ``valid`` and ``test`` tracks; outer k-fold (stratified for
    single-label targets, seeded); in every outer fold C is chosen by an inner
    ``inner_folds``-fold cross-validation of the outer training part, the classifier is
    refitted on the whole outer training part and scored on the held-out fold.

Tracks of any other split (``unused``: the faults a cleaned split leaves out) take part
in neither protocol.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import librosa
import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from core.errors import DatasetError, ParameterError

SPLITS = ("train", "valid", "test")
DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
CLASSIFIERS = ("logreg", "svm")
KINDS = ("single", "multi")
# lbfgs on standardized features converges in a few hundred steps except for the
# largest C on separable data, where the optimum is at infinity and no budget suffices.
LOGREG_MAX_ITER = 2000
SVM_MAX_ITER = 10000
_MAX_NAMED = 5  # labels named in one message before "and N more"


class TransferError(DatasetError):
    """A target catalogue or its features cannot be used to score a transfer classifier."""


@dataclass(frozen=True)
class TargetCheck:
    """What :func:`check_target` found in a target's tracks table.

    Attributes
    ----------
    kind : {"single", "multi"}
        ``single`` when every labelled track has exactly one label, else ``multi``.
    classes : tuple of str
        The labels the classifier is fitted on, sorted.
    n_tracks : int
        Tracks kept: labelled (with at least one label among ``classes``) and in a
        ``train``, ``valid`` or ``test`` split.
    track_ids : tuple of str
        The kept tracks, in table order.
    dropped : list of dict
        One record ``{track_id, reason}`` per track left out.
    class_notes : list of dict
        Multi-label targets only: one record ``{label, action, reason, train, valid,
        test}`` per label that is removed (``action="removed"``: no training track, so
        it cannot be learnt), left out of the test score (``"not scored"``), or left out
        of the choice of C (``"not used for C"``). Empty for single-label targets,
        where these cases are errors.
    """

    kind: Literal["single", "multi"]
    classes: tuple[str, ...]
    n_tracks: int
    track_ids: tuple[str, ...]
    dropped: list[dict] = field(default_factory=list)
    class_notes: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class TransferScore:
    """The score of one transfer classifier on one feature set.

    Attributes
    ----------
    metric : {"accuracy", "macro_roc_auc"}
        Accuracy for single-label targets; for multi-label targets the mean over labels
        of the per-label ROC-AUC, each label's classifier scored by its decision function.
    value : float
        The metric on the test split, or its mean over the outer folds.
    std : float
        Standard deviation (``ddof=0``) of the metric over the outer folds; 0 for a split.
    per_fold : tuple of float
        The metric of every outer fold (one entry for a split).
    chosen_c : tuple of float
        The C chosen in every outer fold (one entry for a split).
    n_train : int
        Tracks the scored classifier was fitted on (``train`` + ``valid`` for a split;
        the smallest outer training part for cross-validation).
    n_test : int
        Tracks scored (``test`` for a split; all pooled tracks, each scored once, for
        cross-validation).
    protocol : str
        ``"split"`` or ``"cv=<k>"``.
    classifier : {"logreg", "svm"}
    per_class : pd.DataFrame
        Single-label: one row per label with ``n_test``, ``n_correct``, ``recall``
        (the per-class accuracy) and ``precision`` (NaN where never predicted), from the
        test predictions of all folds. Multi-label: one row per label with
        ``n_positive`` (test positives over all folds), ``auc`` (mean over the folds that
        scored it; NaN if none) and ``n_folds_scored``.
    confusion : pd.DataFrame or None
        Single-label: counts, true label per row and predicted label per column, over
        all folds. None for multi-label targets.
    skipped_classes : tuple of str
        Multi-label: labels left out of the macro ROC-AUC of at least one fold because
        the fold's test part had no positive or no negative track for them.
    """

    metric: str
    value: float
    std: float
    per_fold: tuple[float, ...]
    chosen_c: tuple[float, ...]
    n_train: int
    n_test: int
    protocol: str
    classifier: str
    per_class: pd.DataFrame = field(compare=False, repr=False)
    confusion: pd.DataFrame | None = field(default=None, compare=False, repr=False)
    skipped_classes: tuple[str, ...] = ()

    def summary(self) -> dict:
        """The fields :func:`format_transfer_table` reads: metric, value, std, chosen_c."""
        return {"metric": self.metric, "value": self.value, "std": self.std, "chosen_c": self.chosen_c}


# --------------------------------------------------------------------------- baselines


def log_mel_statistics(spectrogram: np.ndarray) -> np.ndarray:
    """Mean and standard deviation over time of every mel band of one clip.

    Parameters
    ----------
    spectrogram : np.ndarray [shape=(n_frames, n_mels)]
        The clip's log-compressed mel power, as :func:`tasks.shards.read_features`
        returns it (any float dtype; float16 is read in float64).

    Returns
    -------
    np.ndarray [shape=(2 * n_mels,), dtype=float32]
        The per-band means, then the per-band standard deviations (``ddof=0``), in the
        units of the log-mel (``log1p`` or dB).

    Raises
    ------
    ParameterError
        If ``spectrogram`` is not 2-D or has no frame or no band.
    TransferError
        If it holds NaN or infinite values.
    """
    frames = _check_spectrogram(spectrogram)
    return np.concatenate([frames.mean(axis=0), frames.std(axis=0)]).astype(np.float32)


def mfcc_statistics(spectrogram: np.ndarray, *, n_mfcc: int = 20) -> np.ndarray:
    """Mean and standard deviation over time of one clip's MFCCs: the "two-stage" baseline.

    The MFCCs are the DCT (type II, orthonormal, as :func:`librosa.feature.mfcc`
    computes them) of the pipeline's own log-mel bands, not of a separately computed
    mel spectrogram, so that this baseline shares its front end (sample rate, STFT, mel
    filters, log compression) with the other feature sets.

    Parameters
    ----------
    spectrogram : np.ndarray [shape=(n_frames, n_mels)]
        The clip's log-compressed mel power, as :func:`tasks.shards.read_features`
        returns it.
    n_mfcc : int, 1 <= n_mfcc <= n_mels
        Coefficients kept (20 in the paper).

    Returns
    -------
    np.ndarray [shape=(2 * n_mfcc,), dtype=float32]
        The per-coefficient means, then the standard deviations (``ddof=0``).

    Raises
    ------
    ParameterError
        If ``spectrogram`` is not 2-D or empty, or ``n_mfcc`` is outside ``[1, n_mels]``.
    TransferError
        If the spectrogram holds NaN or infinite values.
    """
    frames = _check_spectrogram(spectrogram)
    n_mels = frames.shape[1]
    if not 1 <= n_mfcc <= n_mels:
        raise ParameterError(f"n_mfcc={n_mfcc} must be between 1 and the spectrogram's n_mels={n_mels}")
    mfcc = librosa.feature.mfcc(S=frames.T, n_mfcc=n_mfcc)  # (n_mfcc, n_frames)
    return np.concatenate([mfcc.mean(axis=1), mfcc.std(axis=1)]).astype(np.float32)


def _check_spectrogram(spectrogram: np.ndarray) -> np.ndarray:
    frames = np.asarray(spectrogram)
    if frames.ndim != 2 or frames.shape[0] < 1 or frames.shape[1] < 1:
        raise ParameterError(f"spectrogram must have shape (n_frames >= 1, n_mels >= 1), got {frames.shape}")
    frames = frames.astype(np.float64)  # float16 sums over thousands of frames lose digits
    n_bad = int(np.size(frames) - np.count_nonzero(np.isfinite(frames)))
    if n_bad:
        raise TransferError(f"spectrogram of shape {frames.shape} holds {n_bad} NaN or infinite values")
    return frames


# --------------------------------------------------------------------------- the target


def check_target(tracks: pd.DataFrame, *, cv: int | None) -> TargetCheck:
    """Check that a target catalogue can be classified and scored under a protocol.

    Parameters
    ----------
    tracks : pd.DataFrame
        One row per track with ``track_id`` (unique), ``split`` (``train``, ``valid``,
        ``test``, or another value such as ``unused``, which is left out) and ``labels``
        (a list of label strings; empty, None or NaN for an unlabelled track).
    cv : int >= 2 or None
        None for the train/valid/test protocol, else the number of outer folds.

    Returns
    -------
    TargetCheck
        The target's kind and classes, the kept tracks and a record per dropped track
        (unlabelled, or in another split) and, for multi-label targets, per label that
        is removed or not scored.

    Raises
    ------
    ParameterError
        If ``cv`` is neither None nor an integer >= 2.
    TransferError
        If the table lacks a column, repeats a track, holds a label that is not a list of
        strings, has no labelled track or only one class; for single-label targets, if
        with ``cv=None`` a label is missing from one of the three splits, or with
        ``cv=k`` a label has fewer than k tracks; for multi-label targets, if fewer than
        two labels have a training track.

    Notes
    -----
    Single-label targets must be complete: accuracy over classes the classifier never
    saw, or C chosen without some class, would misstate the score, so these are errors.
    Multi-label targets (tags) are scored label by label, and a rare tag missing from a
    split is common and harmless to the others: a label with no training track is
    removed (with the tracks left with no label), a label missing from ``test`` or from
    ``valid`` is kept for training but not scored, or not used to choose C; each case
    gets a ``class_notes`` record and one :class:`UserWarning` sums them up. With
    ``cv=k``, a tag with fewer than k tracks is kept with a ``"not scored"`` note: folds
    without it skip it.
    """
    _check_cv(cv)
    missing = [c for c in ("track_id", "split", "labels") if c not in tracks.columns]
    if missing:
        raise TransferError(f"target tracks table lacks column(s) {missing}; it has {list(tracks.columns)}")
    track_ids = tracks["track_id"].astype(str).tolist()
    repeated = [t for t, n in Counter(track_ids).items() if n > 1]
    if repeated:
        raise TransferError(f"target tracks table repeats {len(repeated)} track_id(s), e.g. {repeated[:3]}")

    dropped: list[dict] = []
    kept: list[tuple[str, str, tuple[str, ...]]] = []
    n_other_split = 0
    for track_id, split, raw in zip(track_ids, tracks["split"].astype(str), tracks["labels"], strict=True):
        labels = clean_labels(raw, track_id)
        if split not in SPLITS:
            n_other_split += 1
            dropped.append({"track_id": track_id, "reason": f"split {split!r} is not one of {list(SPLITS)}"})
        elif not labels:
            dropped.append({"track_id": track_id, "reason": "no labels"})
        else:
            kept.append((track_id, split, labels))
    if not kept:
        raise TransferError(
            f"target has no labelled track in the train/valid/test splits ({len(track_ids)} tracks: "
            f"{len(dropped) - n_other_split} unlabelled, {n_other_split} in other splits)"
        )

    kind: Literal["single", "multi"] = "single" if all(len(labels) == 1 for _, _, labels in kept) else "multi"
    counts = _split_counts(kept)
    classes = sorted(counts)
    if len(classes) == 1:
        raise TransferError(
            f"target has one class {classes[0]!r} in {len(kept)} tracks: a classifier needs two or more"
        )

    class_notes: list[dict] = []
    if kind == "single":
        _check_single_label_counts(counts, cv)
    else:
        class_notes = _multi_label_notes(counts, cv)
        removed = {note["label"] for note in class_notes if note["action"] == "removed"}
        classes = [c for c in classes if c not in removed]
        if len(classes) < 2:
            raise TransferError(
                f"multi-label target has {len(classes)} label(s) with a training track "
                f"({_name_labels(sorted(removed))} have none): a classifier needs two or more; re-split the target"
            )
        if removed:
            still: list[tuple[str, str, tuple[str, ...]]] = []
            for track_id, split, labels in kept:
                if any(label not in removed for label in labels):
                    still.append((track_id, split, labels))
                else:
                    reason = f"its labels {list(labels)} have no training track and were removed"
                    dropped.append({"track_id": track_id, "reason": reason})
            kept = still
        if class_notes:
            by_action = Counter(note["action"] for note in class_notes)
            summary = ", ".join(f"{n} {action}" for action, n in sorted(by_action.items()))
            warnings.warn(
                f"check_target: {len(class_notes)} label(s) miss a split ({summary}); see TargetCheck.class_notes",
                UserWarning,
                stacklevel=2,
            )

    return TargetCheck(
        kind=kind,
        classes=tuple(classes),
        n_tracks=len(kept),
        track_ids=tuple(track_id for track_id, _, _ in kept),
        dropped=dropped,
        class_notes=class_notes,
    )


def clean_labels(raw: object, track_id: str) -> tuple[str, ...]:
    """A track's labels as a tuple of distinct non-empty strings, in their order."""
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return ()
    if isinstance(raw, str) or not isinstance(raw, Iterable):
        raise TransferError(
            f"labels of track {track_id!r} is {raw!r}, not a list of strings; write one list per track, e.g. ['rock']"
        )
    labels: list[str] = []
    for label in raw:
        if not isinstance(label, str):
            raise TransferError(f"labels of track {track_id!r} hold {label!r}, not a string")
        label = label.strip()
        if label and label not in labels:
            labels.append(label)
    return tuple(labels)


def _split_counts(kept: list[tuple[str, str, tuple[str, ...]]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for _, split, labels in kept:
        for label in labels:
            counts.setdefault(label, dict.fromkeys(SPLITS, 0))[split] += 1
    return counts


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{split} {counts[split]}" for split in SPLITS)


def _name_labels(labels: Sequence[str]) -> str:
    named = ", ".join(repr(label) for label in labels[:_MAX_NAMED])
    return named + (f" and {len(labels) - _MAX_NAMED} more" if len(labels) > _MAX_NAMED else "")


def _check_single_label_counts(counts: dict[str, dict[str, int]], cv: int | None) -> None:
    if cv is None:
        gaps = [(label, split) for label in sorted(counts) for split in SPLITS if counts[label][split] == 0]
        if gaps:
            label, split = gaps[0]
            others = sorted({g for g, _ in gaps} - {label})
            more = f"; {_name_labels(others)} also miss a split" if others else ""
            raise TransferError(
                f"label {label!r} has no track in the {split} split ({_format_counts(counts[label])}){more}: "
                "re-split the target, or cross-validate instead (set cv, e.g. cv=10)"
            )
        return
    totals = {label: sum(c.values()) for label, c in counts.items()}
    small = sorted((label for label, n in totals.items() if n < cv), key=lambda label: (totals[label], label))
    if small:
        listed = ", ".join(f"{label!r} {totals[label]}" for label in small[:_MAX_NAMED])
        more = f" and {len(small) - _MAX_NAMED} more" if len(small) > _MAX_NAMED else ""
        raise TransferError(
            f"label {small[0]!r} has {totals[small[0]]} track(s), fewer than cv={cv} folds "
            f"(labels under {cv} tracks: {listed}{more}): lower cv, or drop or merge the label"
        )


def _multi_label_notes(counts: dict[str, dict[str, int]], cv: int | None) -> list[dict]:
    notes = []
    for label in sorted(counts):
        c = counts[label]
        if cv is None:
            if c["train"] == 0:
                action, reason = "removed", "no track in the train split: it cannot be learnt"
            elif c["test"] == 0:
                action, reason = "not scored", "no track in the test split: trained on, left out of the ROC-AUC"
            elif c["valid"] == 0:
                action, reason = "not used for C", "no track in the valid split: C is chosen on the other labels"
            else:
                continue
        elif sum(c.values()) < cv:
            action = "not scored"
            reason = f"{sum(c.values())} track(s), fewer than cv={cv}: folds without a positive skip it"
        else:
            continue
        notes.append({"label": label, "action": action, "reason": reason, **c})
    return notes


def _check_cv(cv: int | None) -> None:
    if cv is not None and (isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2):
        raise ParameterError(f"cv={cv!r} must be None (use the train/valid/test split) or an integer >= 2")


# --------------------------------------------------------------------------- the classifier


def fit_transfer(
    features: np.ndarray,
    labels: Sequence[Sequence[str]],
    splits: np.ndarray,
    *,
    classes: Sequence[str],
    kind: Literal["single", "multi"],
    classifier: Literal["logreg", "svm"] = "logreg",
    cs: Sequence[float] = DEFAULT_CS,
    cv: int | None = None,
    inner_folds: int = 5,
    seed: int = 0,
) -> TransferScore:
    """Fit a linear classifier on a target's features, choosing C, and score it.

    Parameters
    ----------
    features : np.ndarray [shape=(n_tracks, n_dims)]
        One feature vector per track, any float dtype. Standardized with the mean and
        variance of each fit's training part only.
    labels : sequence of sequence of str [length n_tracks]
        Each track's labels (exactly one per track for ``kind="single"``); labels not in
        ``classes`` are ignored for ``kind="multi"`` (see :func:`check_target`).
    splits : np.ndarray of str [shape=(n_tracks,)]
        ``train``, ``valid``, ``test``, or another value for tracks to leave out.
    classes : sequence of str
        The labels to classify, e.g. :attr:`TargetCheck.classes`.
    kind : {"single", "multi"}
        Single-label (multinomial logistic regression or one-vs-rest SVM, scored by
        accuracy) or multi-label (one-vs-rest, scored by macro ROC-AUC).
    classifier : {"logreg", "svm"}
        L2 logistic regression (lbfgs) or linear SVM (squared hinge; its decision
        function ranks tracks for the ROC-AUC).
    cs : sequence of float > 0
        The grid of inverse regularization strengths C. Ties in the selection score go
        to the smallest C.
    cv : int >= 2 or None
        None: choose C on ``valid``, refit on ``train`` + ``valid``, score on ``test``.
        k: nested cross-validation over the pooled train/valid/test tracks, k outer
        folds (stratified for single-label targets) and C chosen in each by
        ``inner_folds``-fold cross-validation of its training part.
    inner_folds : int >= 2
        Folds of the inner cross-validation (used only with ``cv``).
    seed : int
        Seeds the fold assignments and the SVM's coordinate descent; a fixed seed gives
        the same result.

    Returns
    -------
    TransferScore

    Raises
    ------
    ParameterError
        For an unknown ``kind`` or ``classifier``, an empty or non-positive C grid, or
        ``cv`` / ``inner_folds`` below 2.
    TransferError
        If the features are not 2-D or hold NaN or infinite values, the inputs disagree
        in length, a single-label track does not have exactly one label among
        ``classes``, a split or fold is too small to fit or score, or no label can be
        scored in multi-label mode.
    """
    if kind not in KINDS:
        raise ParameterError(f"kind={kind!r} is not one of {list(KINDS)}")
    if classifier not in CLASSIFIERS:
        raise ParameterError(f"classifier={classifier!r} is not one of {list(CLASSIFIERS)}")
    grid = tuple(float(c) for c in cs)
    if not grid or not all(np.isfinite(c) and c > 0 for c in grid):
        raise ParameterError(f"cs={tuple(cs)!r} must be a non-empty sequence of finite C > 0")
    _check_cv(cv)
    if inner_folds < 2:
        raise ParameterError(f"inner_folds={inner_folds} must be >= 2")
    classes = tuple(classes)
    if len(classes) < 2 or len(set(classes)) != len(classes):
        raise ParameterError(f"classes={classes!r} must name two or more distinct labels")

    x = np.asarray(features)
    if x.ndim != 2:
        raise TransferError(f"features must have shape (n_tracks, n_dims), got {x.shape}")
    x = x.astype(np.float64)
    n_bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    if n_bad:
        bad_rows = int(np.count_nonzero(~np.isfinite(x).all(axis=1)))
        raise TransferError(
            f"features hold {n_bad} NaN or infinite values in {bad_rows} of {len(x)} tracks; "
            "recompute or drop those tracks"
        )
    split_arr = np.asarray(splits).astype(str)
    if not len(x) == len(labels) == len(split_arr):
        raise TransferError(
            f"features ({len(x)} rows), labels ({len(labels)}) and splits ({len(split_arr)}) differ in length"
        )
    y = _encode_labels(labels, classes, kind)

    used = np.isin(split_arr, SPLITS)
    x, y, split_arr = x[used], y[used], split_arr[used]
    if cv is None:
        return _fit_on_split(x, y, split_arr, classes, kind, classifier, grid, seed)
    return _fit_cross_validated(x, y, classes, kind, classifier, grid, cv, inner_folds, seed)


def _encode_labels(labels: Sequence[Sequence[str]], classes: tuple[str, ...], kind: str) -> np.ndarray:
    """Class indices (single-label) or a (n_tracks, n_classes) 0/1 matrix (multi-label)."""
    index = {label: i for i, label in enumerate(classes)}
    if kind == "single":
        y = np.empty(len(labels), dtype=np.int64)
        for row, track_labels in enumerate(labels):
            track_labels = list(track_labels)
            if len(track_labels) != 1 or track_labels[0] not in index:
                raise TransferError(
                    f"row {row} has labels {track_labels!r}: a single-label target needs exactly one label "
                    f"among the {len(classes)} classes; pass the tracks check_target kept"
                )
            y[row] = index[track_labels[0]]
        return y
    y = np.zeros((len(labels), len(classes)), dtype=np.int64)
    for row, track_labels in enumerate(labels):
        for label in track_labels:
            if label in index:
                y[row, index[label]] = 1
    return y


def _model(classifier: str, kind: str, c: float, seed: int) -> Pipeline:
    if classifier == "logreg":
        estimator = LogisticRegression(C=c, solver="lbfgs", max_iter=LOGREG_MAX_ITER)
    elif classifier == "svm":
        estimator = LinearSVC(C=c, dual="auto", max_iter=SVM_MAX_ITER, random_state=seed)
    else:
        raise ParameterError(f"classifier={classifier!r} is not one of {list(CLASSIFIERS)}")
    if kind == "multi":
        estimator = OneVsRestClassifier(estimator)
    return make_pipeline(StandardScaler(), estimator)


def _fit(classifier: str, kind: str, c: float, seed: int, x: np.ndarray, y: np.ndarray) -> Pipeline:
    model = _model(classifier, kind, c, seed)
    with warnings.catch_warnings():
        # The largest Cs of the grid do not converge on (nearly) separable data; that is
        # what the grid is for, and the selection score judges them.
        warnings.simplefilter("ignore", ConvergenceWarning)
        # One-vs-rest fits a constant predictor for a tag with no positive in a fold's
        # training part; the fold's score skips that tag (see _evaluate).
        warnings.filterwarnings("ignore", message="Label .* is present in all training examples", category=UserWarning)
        model.fit(x, y)
    return model


@dataclass(frozen=True)
class _Evaluation:
    value: float
    predictions: np.ndarray | None  # single-label class indices
    auc: np.ndarray | None  # multi-label per-class ROC-AUC, NaN where not scorable


def _evaluate(model: Pipeline, x: np.ndarray, y: np.ndarray, kind: str) -> _Evaluation:
    if kind == "single":
        predicted = model.predict(x)
        return _Evaluation(float(np.mean(predicted == y)), predicted, None)
    scores = np.asarray(model.decision_function(x)).reshape(len(x), -1)
    auc = np.full(y.shape[1], np.nan)
    for k in range(y.shape[1]):
        positives = int(y[:, k].sum())
        if 0 < positives < len(y):
            auc[k] = roc_auc_score(y[:, k], scores[:, k])
    value = float(np.nanmean(auc)) if np.isfinite(auc).any() else float("nan")
    return _Evaluation(value, None, auc)


def _best_c(grid: tuple[float, ...], scores: list[float], where: str) -> float:
    """The C with the highest score; ties to the smallest C."""
    finite = [(score, -c) for c, score in zip(grid, scores, strict=True) if np.isfinite(score)]
    if not finite:
        raise TransferError(f"no C could be scored on {where}: no label has both positive and negative tracks there")
    return -max(finite)[1]


def _fit_on_split(
    x: np.ndarray,
    y: np.ndarray,
    splits: np.ndarray,
    classes: tuple[str, ...],
    kind: str,
    classifier: str,
    grid: tuple[float, ...],
    seed: int,
) -> TransferScore:
    parts = {split: splits == split for split in SPLITS}
    sizes = {split: int(mask.sum()) for split, mask in parts.items()}
    if min(sizes.values()) == 0:
        raise TransferError(
            f"the train/valid/test protocol needs tracks in every split, got {sizes}: re-split the target, or cross-validate instead (set cv)"
        )
    train, valid, test = parts["train"], parts["valid"], parts["test"]
    if kind == "single" and len(np.unique(y[train])) < 2:
        raise TransferError("the train split holds only one class; a classifier needs two or more")
    valid_scores = [
        _evaluate(_fit(classifier, kind, c, seed, x[train], y[train]), x[valid], y[valid], kind).value for c in grid
    ]
    c = _best_c(grid, valid_scores, "the valid split")
    fit_part = train | valid
    evaluation = _evaluate(_fit(classifier, kind, c, seed, x[fit_part], y[fit_part]), x[test], y[test], kind)
    return _score(
        [evaluation],
        [y[test]],
        [c],
        classes,
        kind,
        classifier,
        n_train=int(fit_part.sum()),
        n_test=sizes["test"],
        protocol="split",
    )


def _folds(y: np.ndarray, kind: str, n_splits: int, seed: int, where: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    if kind == "single":
        counts = np.bincount(y)
        present = counts[counts > 0]
        if present.min() < n_splits:
            raise TransferError(
                f"{where}: a class has {present.min()} track(s), fewer than {n_splits} folds; "
                "lower cv or inner_folds, or drop or merge the class"
            )
        return StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
    if len(y) < n_splits:
        raise TransferError(f"{where}: {len(y)} tracks cannot be split into {n_splits} folds")
    return KFold(n_splits, shuffle=True, random_state=seed).split(np.zeros(len(y)))


def _fit_cross_validated(
    x: np.ndarray,
    y: np.ndarray,
    classes: tuple[str, ...],
    kind: str,
    classifier: str,
    grid: tuple[float, ...],
    cv: int,
    inner_folds: int,
    seed: int,
) -> TransferScore:
    evaluations, truths, chosen, n_train = [], [], [], []
    for fold, (outer_train, outer_test) in enumerate(_folds(y, kind, cv, seed, f"cv={cv}")):
        x_fit, y_fit = x[outer_train], y[outer_train]
        inner = list(_folds(y_fit, kind, inner_folds, seed + 1 + fold, f"inner cross-validation of outer fold {fold}"))
        scores = []
        for c in grid:
            fold_scores = [
                _evaluate(_fit(classifier, kind, c, seed, x_fit[tr], y_fit[tr]), x_fit[te], y_fit[te], kind).value
                for tr, te in inner
            ]
            scores.append(float(np.nanmean(fold_scores)) if np.isfinite(fold_scores).any() else float("nan"))
        c = _best_c(grid, scores, f"the inner folds of outer fold {fold}")
        evaluations.append(_evaluate(_fit(classifier, kind, c, seed, x_fit, y_fit), x[outer_test], y[outer_test], kind))
        truths.append(y[outer_test])
        chosen.append(c)
        n_train.append(len(outer_train))
    return _score(
        evaluations,
        truths,
        chosen,
        classes,
        kind,
        classifier,
        n_train=min(n_train),
        n_test=len(y),
        protocol=f"cv={cv}",
    )


def _score(
    evaluations: list[_Evaluation],
    truths: list[np.ndarray],
    chosen: list[float],
    classes: tuple[str, ...],
    kind: str,
    classifier: str,
    *,
    n_train: int,
    n_test: int,
    protocol: str,
) -> TransferScore:
    """The metric per fold and pooled per-class tables from the folds' test predictions."""
    per_fold = tuple(e.value for e in evaluations)
    if kind == "single":
        truth = np.concatenate(truths)
        predicted = np.concatenate([e.predictions for e in evaluations])
        confusion = pd.DataFrame(
            confusion_matrix(truth, predicted, labels=np.arange(len(classes))),
            index=pd.Index(classes, name="true"),
            columns=pd.Index(classes, name="predicted"),
        )
        n_test_class = confusion.sum(axis=1).to_numpy()
        n_predicted = confusion.sum(axis=0).to_numpy()
        correct = np.diag(confusion.to_numpy())
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class = pd.DataFrame(
                {
                    "label": classes,
                    "n_test": n_test_class,
                    "n_correct": correct,
                    "recall": np.where(n_test_class > 0, correct / n_test_class, np.nan),
                    "precision": np.where(n_predicted > 0, correct / n_predicted, np.nan),
                }
            )
        return TransferScore(
            metric="accuracy",
            value=float(np.mean(per_fold)),
            std=float(np.std(per_fold)),
            per_fold=per_fold,
            chosen_c=tuple(chosen),
            n_train=n_train,
            n_test=n_test,
            protocol=protocol,
            classifier=classifier,
            per_class=per_class,
            confusion=confusion,
        )

    if not all(np.isfinite(v) for v in per_fold):
        raise TransferError(
            f"{protocol}: a test part has no label with both positive and negative tracks; no ROC-AUC can be computed"
        )
    auc = np.vstack([e.auc for e in evaluations])
    scored = np.isfinite(auc)
    n_folds_scored = scored.sum(axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mean of an all-NaN column is NaN, as documented
        mean_auc = np.nanmean(auc, axis=0)
    per_class = pd.DataFrame(
        {
            "label": classes,
            "n_positive": np.vstack([t.sum(axis=0) for t in truths]).sum(axis=0),
            "auc": mean_auc,
            "n_folds_scored": n_folds_scored,
        }
    )
    skipped = tuple(label for label, n in zip(classes, n_folds_scored, strict=True) if n < len(evaluations))
    return TransferScore(
        metric="macro_roc_auc",
        value=float(np.mean(per_fold)),
        std=float(np.std(per_fold)),
        per_fold=per_fold,
        chosen_c=tuple(chosen),
        n_train=n_train,
        n_test=n_test,
        protocol=protocol,
        classifier=classifier,
        per_class=per_class,
        confusion=None,
        skipped_classes=skipped,
    )


# --------------------------------------------------------------------------- the report


TABLE_KEYS = ("feature_set", "dims", "metric", "value", "std", "chosen_c")


def format_transfer_table(rows: list[dict]) -> str:
    """A plain-text table of transfer scores, one row per feature set.

    Parameters
    ----------
    rows : list of dict
        Each with ``feature_set`` (str), ``dims`` (int), ``metric`` (str), ``value``
        and ``std`` (float) and ``chosen_c`` (a float or a tuple of the per-fold Cs);
        ``{"feature_set": name, "dims": d, **score.summary()}`` builds one from a
        :class:`TransferScore`.

    Returns
    -------
    str
        Columns ``feature set``, ``dims``, ``metric``, ``value ± std`` (3 decimals) and
        ``C`` (the chosen C; with several folds, the most frequent one and in how many
        folds it was chosen), a header and a rule, no trailing newline.

    Raises
    ------
    ParameterError
        If ``rows`` is empty or a row lacks a key.
    """
    if not rows:
        raise ParameterError("format_transfer_table needs at least one row")
    header = ("feature set", "dims", "metric", "value ± std", "C")
    body = []
    for i, row in enumerate(rows):
        missing = [key for key in TABLE_KEYS if key not in row]
        if missing:
            raise ParameterError(f"row {i} lacks key(s) {missing}; a row needs {list(TABLE_KEYS)}")
        body.append(
            (
                str(row["feature_set"]),
                str(int(row["dims"])),
                str(row["metric"]),
                f"{float(row['value']):.3f} ± {float(row['std']):.3f}",
                _format_chosen_c(row["chosen_c"]),
            )
        )
    widths = [max(len(line[col]) for line in [header, *body]) for col in range(len(header))]
    right = {1, 3}  # numbers align right

    def render(cells: Sequence[str]) -> str:
        padded = [cell.rjust(w) if col in right else cell.ljust(w) for col, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(padded).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(header), rule, *(render(line) for line in body)])


def _format_chosen_c(chosen: float | Sequence[float]) -> str:
    values = [float(chosen)] if np.isscalar(chosen) else [float(c) for c in chosen]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:g}"
    # most frequent C; ties to the smallest, the same rule as the selection
    c, n = min(Counter(values).items(), key=lambda item: (-item[1], item[0]))
    return f"{c:g} ({n}/{len(values)} folds)"
