"""Transfer evaluation on synthetic targets with known answers: separable blobs, random labels."""

from __future__ import annotations

import warnings

import librosa
import numpy as np
import pandas as pd
import pytest

from core.errors import DatasetError, ParameterError
from tasks.transfer import (
    DEFAULT_CS,
    TransferError,
    check_target,
    fit_transfer,
    format_transfer_table,
    log_mel_statistics,
    mfcc_statistics,
)

# ----------------------------------------------------------------------------- baselines


def test_log_mel_statistics_are_band_means_then_stds() -> None:
    n_frames, n_mels = 40, 8
    # band k holds a ramp of slope k around k: mean k, std k * std(ramp)
    ramp = np.arange(n_frames) - (n_frames - 1) / 2
    spectrogram = np.stack([k + k * ramp for k in range(n_mels)], axis=1).astype(np.float16)

    stats = log_mel_statistics(spectrogram)

    assert stats.shape == (2 * n_mels,) and stats.dtype == np.float32
    np.testing.assert_allclose(stats[:n_mels], np.arange(n_mels), atol=1e-3)
    np.testing.assert_allclose(stats[n_mels:], np.arange(n_mels) * ramp.std(), rtol=1e-3)


def test_mfcc_statistics_match_librosa_on_the_same_log_mel() -> None:
    rng = np.random.default_rng(0)
    spectrogram = rng.normal(size=(60, 32)).astype(np.float32)  # (n_frames, n_mels)

    stats = mfcc_statistics(spectrogram)
    mfcc = librosa.feature.mfcc(S=spectrogram.T, n_mfcc=20)

    assert stats.shape == (40,) and stats.dtype == np.float32
    np.testing.assert_allclose(stats[:20], mfcc.mean(axis=1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats[20:], mfcc.std(axis=1), rtol=1e-4, atol=1e-5)
    assert mfcc_statistics(spectrogram, n_mfcc=13).shape == (26,)


def test_mfcc_of_a_flat_log_mel_is_its_scaled_level() -> None:
    # the orthonormal DCT-II of a constant c over n bands is c * sqrt(n) in coefficient 0 only
    spectrogram = np.full((10, 16), 3.0, dtype=np.float32)
    stats = mfcc_statistics(spectrogram, n_mfcc=5)
    np.testing.assert_allclose(stats[:5], [3.0 * 4.0, 0, 0, 0, 0], atol=1e-5)
    np.testing.assert_allclose(stats[5:], 0, atol=1e-6)


def test_statistics_reject_bad_spectrograms() -> None:
    with pytest.raises(ParameterError, match="n_frames"):
        log_mel_statistics(np.zeros(10))
    with pytest.raises(ParameterError, match="n_mfcc=40"):
        mfcc_statistics(np.zeros((5, 32)), n_mfcc=40)
    spectrogram = np.zeros((5, 8))
    spectrogram[2, 3] = np.nan
    with pytest.raises(TransferError, match="1 NaN or infinite"):
        log_mel_statistics(spectrogram)


# ----------------------------------------------------------------------------- the target


def _tracks(rows: list[tuple[str, list[str] | None]]) -> pd.DataFrame:
    """A tracks table from (split, labels) pairs."""
    return pd.DataFrame(
        {
            "track_id": [f"t{i}" for i in range(len(rows))],
            "split": [split for split, _ in rows],
            "labels": [labels for _, labels in rows],
        }
    )


def _balanced(labels: list[str], per_split: dict[str, int]) -> list[tuple[str, list[str]]]:
    return [(split, [label]) for label in labels for split, n in per_split.items() for _ in range(n)]


def test_check_target_single_label_drops_unlabelled_and_unused_tracks() -> None:
    rows = _balanced(["jazz", "rock"], {"train": 4, "valid": 2, "test": 2})
    rows += [("train", []), ("test", None), ("unused", ["rock"])]

    check = check_target(_tracks(rows), cv=None)

    assert check.kind == "single"
    assert check.classes == ("jazz", "rock")
    assert check.n_tracks == 16 == len(check.track_ids)
    unused = "split 'unused' is not one of ['train', 'valid', 'test']"
    assert [d["reason"] for d in check.dropped] == ["no labels", "no labels", unused]
    assert check.class_notes == []


def test_check_target_one_class() -> None:
    rows = _balanced(["rock"], {"train": 5, "valid": 2, "test": 2})
    with pytest.raises(TransferError, match=r"target has one class 'rock' in 9 tracks: a classifier needs two or more"):
        check_target(_tracks(rows), cv=None)


def test_check_target_label_missing_from_the_test_split() -> None:
    rows = _balanced(["jazz"], {"train": 12, "valid": 3, "test": 2})
    rows += _balanced(["rock"], {"train": 12, "valid": 3})
    message = r"label 'rock' has no track in the test split \(train 12, valid 3, test 0\): re-split the target, "
    message += r"or cross-validate instead \(set cv, e.g. cv=10\)"
    with pytest.raises(TransferError, match=message) as caught:
        check_target(_tracks(rows), cv=None)
    assert isinstance(caught.value, DatasetError)
    # the same target is fine for cross-validation
    assert check_target(_tracks(rows), cv=2).classes == ("jazz", "rock")


def test_check_target_cv_larger_than_a_class() -> None:
    rows = _balanced(["jazz"], {"train": 10}) + _balanced(["rock"], {"train": 2, "test": 1})
    with pytest.raises(TransferError, match=r"label 'rock' has 3 track\(s\), fewer than cv=5 folds"):
        check_target(_tracks(rows), cv=5)


def test_check_target_no_labels() -> None:
    rows = [("train", []), ("test", None), ("unused", ["rock"])]
    with pytest.raises(TransferError, match="no labelled track .* 2 unlabelled, 1 in other splits"):
        check_target(_tracks(rows), cv=None)


@pytest.mark.parametrize("cv", [0, 1, 2.5, True])
def test_check_target_rejects_bad_cv(cv) -> None:
    rows = _balanced(["jazz", "rock"], {"train": 4, "valid": 2, "test": 2})
    with pytest.raises(ParameterError, match="cv="):
        check_target(_tracks(rows), cv=cv)


def test_check_target_multi_label_removes_untrainable_tags_with_a_record() -> None:
    rows = [
        ("train", ["a", "b"]),
        ("train", ["a"]),
        ("valid", ["a", "b"]),
        ("test", ["b"]),
        ("test", ["a", "c"]),
        ("valid", ["c"]),
    ]  # 'c' has no training track

    with pytest.warns(UserWarning, match="1 label"):
        check = check_target(_tracks(rows), cv=None)

    assert check.kind == "multi"
    assert check.classes == ("a", "b")
    assert check.class_notes == [
        {"label": "c", "action": "removed", "reason": check.class_notes[0]["reason"], "train": 0, "valid": 1, "test": 1}
    ]
    assert check.track_ids == ("t0", "t1", "t2", "t3", "t4")  # t5 held only 'c'
    assert check.dropped[0]["track_id"] == "t5"


# ----------------------------------------------------------------------------- the classifier


def _blobs(n_per_class: int, n_classes: int, dims: int, *, spread: float, seed: int):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=spread, size=(n_classes, dims))
    y = np.repeat(np.arange(n_classes), n_per_class)
    x = centres[y] + rng.normal(size=(len(y), dims))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def _split_of(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array(["train", "valid", "test"]), size=n, p=[0.6, 0.2, 0.2])


CLASSES = ("blues", "jazz", "metal", "rock")


@pytest.mark.parametrize("classifier", ["logreg", "svm"])
def test_separable_blobs_are_classified_on_the_split(classifier: str) -> None:
    x, y = _blobs(60, 4, 10, spread=4.0, seed=1)
    labels = [[CLASSES[i]] for i in y]
    splits = _split_of(len(y), seed=2)
    splits[:3] = "unused"  # left out

    score = fit_transfer(x, labels, splits, classes=CLASSES, kind="single", classifier=classifier)

    assert score.metric == "accuracy" and score.protocol == "split" and score.classifier == classifier
    assert score.value > 0.9
    assert score.std == 0.0 and score.per_fold == (score.value,)
    assert len(score.chosen_c) == 1 and score.chosen_c[0] in DEFAULT_CS
    assert score.n_test == int((splits == "test").sum())
    assert score.n_train == int(np.isin(splits, ["train", "valid"]).sum())
    assert list(score.per_class["label"]) == list(CLASSES)
    assert score.per_class["n_test"].sum() == score.n_test == score.confusion.to_numpy().sum()
    assert score.per_class["n_correct"].sum() / score.n_test == pytest.approx(score.value)


def test_cross_validation_chooses_c_per_fold_from_the_grid() -> None:
    x, y = _blobs(30, 3, 6, spread=4.0, seed=3)
    labels = [[CLASSES[i]] for i in y]
    cs = (0.01, 1.0, 100.0)

    score = fit_transfer(x, labels, np.full(len(y), "train"), classes=CLASSES[:3], kind="single", cs=cs, cv=5)

    assert score.protocol == "cv=5"
    assert len(score.per_fold) == len(score.chosen_c) == 5
    assert set(score.chosen_c) <= set(cs)
    assert score.value == pytest.approx(np.mean(score.per_fold)) and score.std == pytest.approx(np.std(score.per_fold))
    assert score.value > 0.9
    assert score.n_test == len(y) and score.n_train == len(y) - len(y) // 5


def test_c_is_chosen_from_the_grid_and_ties_go_to_the_smallest() -> None:
    x, y = _blobs(30, 2, 4, spread=3.0, seed=4)
    labels = [[CLASSES[i]] for i in y]
    splits = _split_of(len(y), 5)
    score = fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", cs=(0.5,))
    assert score.chosen_c == (0.5,)
    # far-apart blobs: every C classifies the valid split perfectly, so the smallest wins
    x, y = _blobs(30, 2, 4, spread=20.0, seed=4)
    labels = [[CLASSES[i]] for i in y]
    score = fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", cs=(10.0, 0.1, 1.0))
    assert score.value == 1.0 and score.chosen_c == (0.1,)


def test_random_features_score_at_chance() -> None:
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(4), 100)
    x = rng.normal(size=(len(y), 8))
    labels = [[CLASSES[i]] for i in rng.permutation(y)]

    score = fit_transfer(
        x, labels, np.full(len(y), "test"), classes=CLASSES, kind="single", cs=(0.01, 1.0), cv=5, inner_folds=3
    )

    assert score.value == pytest.approx(0.25, abs=0.1)


def test_fit_transfer_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(size=(120, 5))
    labels = [[CLASSES[i]] for i in rng.integers(0, 3, size=120)]
    splits = np.full(120, "train")
    kwargs = {
        "classes": CLASSES[:3],
        "kind": "single",
        "classifier": "svm",
        "cs": (0.01, 1.0),
        "cv": 3,
        "inner_folds": 3,
    }

    first = fit_transfer(x, labels, splits, seed=11, **kwargs)
    again = fit_transfer(x, labels, splits, seed=11, **kwargs)

    assert first == again
    pd.testing.assert_frame_equal(first.per_class, again.per_class)


def _tags(y: np.ndarray) -> list[list[str]]:
    """Tag 'a' for classes 0 and 1, 'b' for 1 and 2, 'c' for 3: a multi-label target of the blobs."""
    tagging = {0: ["a"], 1: ["a", "b"], 2: ["b"], 3: ["c"]}
    return [tagging[int(i)] for i in y]


def test_multi_label_macro_auc_on_the_split_and_with_cv() -> None:
    x, y = _blobs(40, 4, 8, spread=4.0, seed=8)
    labels = _tags(y)
    tags = ("a", "b", "c")

    on_split = fit_transfer(x, labels, _split_of(len(y), 9), classes=tags, kind="multi", cs=(0.1, 10.0))
    crossed = fit_transfer(
        x,
        labels,
        np.full(len(y), "valid"),
        classes=tags,
        kind="multi",
        classifier="svm",
        cs=(0.1, 10.0),
        cv=3,
        inner_folds=3,
    )

    for score in (on_split, crossed):
        assert score.metric == "macro_roc_auc" and score.confusion is None
        assert score.value > 0.9
        assert score.skipped_classes == ()
        assert list(score.per_class.columns) == ["label", "n_positive", "auc", "n_folds_scored"]
    assert crossed.per_class["n_positive"].tolist() == [80, 80, 40]


def test_multi_label_skips_unscorable_tags_and_random_features_score_half() -> None:
    rng = np.random.default_rng(10)
    n = 300
    x = rng.normal(size=(n, 6))
    labels = [[tag for tag in ("a", "b", "c") if rng.random() < 0.4] for _ in range(n)]
    splits = _split_of(n, 11)
    test_rows = np.flatnonzero(splits == "test")
    for row in test_rows:  # 'c' has no positive in the test split
        labels[row] = [tag for tag in labels[row] if tag != "c"]

    score = fit_transfer(x, labels, splits, classes=("a", "b", "c"), kind="multi", cs=(0.01, 1.0))

    assert score.skipped_classes == ("c",)
    assert np.isnan(score.per_class.set_index("label").loc["c", "auc"])
    assert score.value == pytest.approx(0.5, abs=0.1)


def test_fit_transfer_rejects_bad_inputs() -> None:
    x, y = _blobs(10, 2, 3, spread=3.0, seed=12)
    labels = [[CLASSES[i]] for i in y]
    splits = _split_of(len(y), 13)
    bad = x.copy()
    bad[[1, 4], 0] = np.nan
    bad[4, 2] = np.inf
    with pytest.raises(TransferError, match="3 NaN or infinite values in 2 of 20 tracks"):
        fit_transfer(bad, labels, splits, classes=CLASSES[:2], kind="single")
    with pytest.raises(TransferError, match="exactly one label"):
        fit_transfer(x, [["blues", "jazz"], *labels[1:]], splits, classes=CLASSES[:2], kind="single")
    with pytest.raises(ParameterError, match="classifier="):
        fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", classifier="tree")
    with pytest.raises(ParameterError, match="cs="):
        fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", cs=(0.0, 1.0))
    with pytest.raises(ParameterError, match="cv=1"):
        fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", cv=1)
    with pytest.raises(TransferError, match="fewer than 20 folds"):
        fit_transfer(x, labels, splits, classes=CLASSES[:2], kind="single", cv=20)


def test_fit_transfer_emits_no_warnings_at_large_c() -> None:
    x, y = _blobs(30, 2, 4, spread=8.0, seed=14)  # separable: large C does not converge
    labels = [[CLASSES[i]] for i in y]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = [
            fit_transfer(
                x, labels, _split_of(len(y), 15), classes=CLASSES[:2], kind="single", classifier=classifier, cs=(1e4,)
            )
            for classifier in ("logreg", "svm")
        ]
    assert [str(w.message) for w in caught] == []
    assert all(s.chosen_c == (1e4,) and s.value > 0.9 for s in scores)  # separable blobs, the one C given


# ----------------------------------------------------------------------------- the report


def test_format_transfer_table() -> None:
    x, y = _blobs(20, 2, 4, spread=4.0, seed=16)
    score = fit_transfer(
        x,
        [[CLASSES[i]] for i in y],
        np.full(len(y), "train"),
        classes=CLASSES[:2],
        kind="single",
        cs=(0.1,),
        cv=4,
        inner_folds=2,
    )
    rows = [
        {"feature_set": "mfcc-20", "dims": 40, **score.summary()},
        {
            "feature_set": "log-mel statistics",
            "dims": 256,
            "metric": "macro_roc_auc",
            "value": 0.8766,
            "std": 0.0,
            "chosen_c": 1.0,
        },
    ]

    lines = format_transfer_table(rows).splitlines()

    assert lines[0].split() == ["feature", "set", "dims", "metric", "value", "±", "std", "C"]
    assert set(lines[1]) == {"-", " "}
    assert "mfcc-20" in lines[2] and "accuracy" in lines[2] and "0.1 (4/4 folds)" in lines[2]
    assert lines[3].split()[-4:] == ["0.877", "±", "0.000", "1"]
    assert lines[2].index("±") == lines[3].index("±")  # aligned columns
    with pytest.raises(ParameterError, match=r"lacks key\(s\) \['chosen_c'\]"):
        format_transfer_table([{"feature_set": "x", "dims": 1, "metric": "accuracy", "value": 0.5, "std": 0.0}])
    with pytest.raises(ParameterError, match="at least one row"):
        format_transfer_table([])
