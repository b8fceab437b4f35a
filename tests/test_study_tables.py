"""The study tables (tasks/study_tables.py) and the study data helpers of tasks/studies.py: plain
functions of rows and frames, checked on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from core.errors import DatasetError
from core.storage import read_frame, write_frame
from tasks.report import RankingRow
from tasks.studies import (
    ListeningFactors,
    clip_labels,
    clips_with_features,
    end_to_end_clips,
    recommenders,
    split_counts,
)
from tasks.study_tables import (
    filter_metrics,
    finite,
    format_source_table,
    predicted_factors,
    predictions_frame,
    recommendation_metrics,
    runs_table,
    source_table,
    stack_by_id,
    study_report,
    tagging_metrics,
    transfer_study_metrics,
)


def _tracks() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "track_id": ["d", "b", "a", "c", "e", "f"],
            "split": ["train", "valid", "train", "test", "test", "valid"],
            "tags": [["rock"], ["jazz", "calm"], [], ["rock"], ["jazz"], ["calm"]],
        }
    )


def test_the_runs_table_joins_tuples_and_leaves_out_arrays_and_tables():
    rows = [
        {"name": "a", "timescales": ("s0", "s1"), "score": 0.5, "predicted": np.zeros((2, 3)), "reused": False},
        {"name": "b", "timescales": ("s0",), "score": 0.7, "per_tag": pd.DataFrame({"tag": ["x"]}), "reused": True},
    ]
    table = runs_table(rows)
    assert list(table.columns) == ["name", "timescales", "score", "reused"]
    assert table["timescales"].tolist() == ["s0,s1", "s0"]
    assert table["score"].tolist() == pytest.approx([0.5, 0.7])


def test_finite_drops_nan_and_infinite_scores():
    assert finite({"a": 1.0, "b": float("nan"), "c": float("inf"), "d": np.float32(2.5)}) == {"a": 1.0, "d": 2.5}


def test_the_report_is_title_body_and_settings():
    text = study_report("Study x on toy", ["body line", ""], '{"preset": "x"}')
    assert text == '# Study x on toy\n\nbody line\n\n## Settings\n\n```json\n{"preset": "x"}\n```\n'


def test_tagging_metrics_name_every_scored_cell_and_skip_the_missing_control():
    table = pd.DataFrame(
        {"configuration": ["all six", "s0 only"], "K-means ROC-AUC": [0.8, 0.7], "random ROC-AUC": [0.6, np.nan]}
    )
    metrics = tagging_metrics(table)
    assert set(metrics) == {"all_six/kmeans_roc_auc", "all_six/random_roc_auc", "s0_only/kmeans_roc_auc"}
    assert metrics["all_six/random_roc_auc"] == pytest.approx(0.6)


def test_predictions_round_trip_through_parquet_in_the_asked_order(tmp_path):
    ids = ["t1", "t2", "t3"]
    predicted = np.arange(6, dtype=np.float64).reshape(3, 2) / 7
    path = write_frame(tmp_path / "predicted.parquet", predictions_frame(ids, predicted))
    back = predicted_factors(read_frame(path), ["t3", "t1"])
    assert back.dtype == np.float32 and back.shape == (2, 2)
    np.testing.assert_allclose(back, predicted[[2, 0]], rtol=1e-6)


def test_stack_by_id_orders_rows_as_asked():
    values = {"a": np.array([1.0, 2.0]), "b": np.array([3.0, 4.0])}
    np.testing.assert_allclose(stack_by_id(values, ["b", "a"]), [[3.0, 4.0], [1.0, 2.0]])


def test_the_source_table_and_its_metrics():
    rows = [
        {"task": "tags", "model": "mlp-1", "nmse": 0.5, "auc": 0.8, "map": 0.4, "seconds": 3.0},
        {"task": "listening", "model": "linear", "nmse": 0.9, "auc": 0.6, "map": float("nan"), "seconds": 1.0},
    ]
    table = source_table(rows)
    assert list(table.columns) == ["task", "model", "nmse", "auc", "map"]
    text = format_source_table(table)
    assert text.splitlines()[0].split() == ["task", "model", "NMSE", "AUC", "mAP"] and "0.5000" in text
    metrics = transfer_study_metrics(rows, [{"feature_set": "MFCC-20 mean/std", "value": 0.55}])
    assert "source/listening_linear/map" not in metrics  # NaN left out
    assert metrics["source/tags_mlp_1/auc"] == pytest.approx(0.8)
    assert metrics[next(m for m in metrics if m.startswith("transfer/"))] == pytest.approx(0.55)


def test_recommendation_metrics_time_only_the_models_trained_now():
    queries = pd.DataFrame({"query_tags": ["rock, calm"], "wmf_tags": ["rock"], "predicted_tags": ["jazz"]})
    results = [{"name": "MLP (1 hidden)", "reused": False, "seconds": 2.0}, {"name": "CNN (MSE)", "reused": True}]
    metrics = recommendation_metrics([RankingRow("CNN (MSE)", 0.3, 0.7)], results, queries, k=10)
    assert metrics["queries/wmf_tag_jaccard"] == pytest.approx(0.5)
    assert metrics["queries/predicted_tag_jaccard"] == pytest.approx(0.0)
    timed = [m for m in metrics if m.endswith("/seconds")]
    assert len(timed) == 1 and metrics[timed[0]] == pytest.approx(2.0)


def test_filter_metrics_pooling_groups_only_when_pooled():
    rng = np.random.default_rng(0)
    t = np.arange(64) / 8000
    filters = np.stack([np.sin(2 * np.pi * f * t) for f in (200, 400, 800, 1600)]) + 0.01 * rng.normal(size=(4, 64))
    plain = filter_metrics(filters, sample_rate=8000, pool_size=None)
    assert set(plain) == {"filters/mel_rms_mel", "filters/linear_rms_mel"}
    assert all(math.isfinite(v) and v >= 0 for v in plain.values())
    pooled = filter_metrics(filters, sample_rate=8000, pool_size=2)
    assert {"filters/group_cosine_within", "filters/group_cosine_across"} <= set(pooled)


def test_clips_with_features_keep_those_in_every_set_and_sort_when_asked():
    tracks = _tracks()
    kept = clips_with_features(tracks, [{"a", "b", "c", "d"}, {"b", "c", "d", "z"}])
    assert kept["track_id"].tolist() == ["d", "b", "c"]
    assert clips_with_features(tracks, [{"a", "b", "c", "d"}], sort=True)["track_id"].tolist() == list("abcd")


def test_end_to_end_clips_need_every_split():
    clips = end_to_end_clips(_tracks(), [set("abcdef")])
    assert split_counts(clips) == {"train": 2, "valid": 2, "test": 2}
    assert clip_labels(clips)[1] == ("b", "valid", "calm|jazz")
    with pytest.raises(DatasetError, match="none with features in 'test'"):
        end_to_end_clips(_tracks(), [{"a", "b", "d", "f"}])


def test_recommenders_split_for_cold_start_with_factors_and_held_out_plays():
    tracks = pd.DataFrame(
        {
            "track_id": ["a", "b", "c", "d", "e", "f"],
            "split": ["train", "train", "valid", "valid", "test", "test"],
            "tags": [["rock"], [], ["jazz"], [], ["calm"], ["rock", "calm"]],
        }
    )
    factors = ListeningFactors(
        users=np.array(["u1", "u2"]),
        user_factors=np.eye(2),
        items=np.array(["a", "b", "c", "d"]),
        item_factors=np.arange(8, dtype=float).reshape(4, 2),
        heldout=np.array(["e", "f"]),
        heldout_factors=np.ones((2, 2)),
    )
    plays = pd.DataFrame({"user": ["u1", "u2", "u2"], "item": ["e", "f", "e"], "plays": [3, 1, 2]})
    data = recommenders(tracks, factors, plays)
    assert data.track_ids["test"] == ["e", "f"] and set(data.factors) == set("abcdef")
    assert data.relevant.shape == (2, 2) and data.relevant.nnz == 3
    assert data.tags["f"] == ["rock", "calm"] and data.fingerprint == ""
    with pytest.raises(DatasetError, match="needs tracks with features and factors in every split"):
        recommenders(tracks[tracks["track_id"] != "f"], factors, plays)
