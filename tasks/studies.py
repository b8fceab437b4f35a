"""Studies: presets as data, the configurations they expand to, and the tables they end in (DESIGN.md §8).

A preset is a plain dict of settings (:data:`PRESETS`, or a JSON file of the same
shape) validated into :class:`~core.settings.StudySettings`. A later study adds a
preset, not a code path. :func:`configurations` expands the settings into the runs
of the study. :func:`study_table` and :func:`timescale_importance` shape their
results like the paper's tables.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ValidationError

from core import storage
from core.errors import DatasetError, ParameterError, settings_message
from core.settings import (
    EndToEndStudySettings,
    RecommendationStudySettings,
    StudySettings,
    TransferStudySettings,
)

_PAPER_FEATURES = {
    # Hamel et al. 2012 via Dieleman & Schrauwen 2013: windows 1024..8192 at half-window hops,
    # so each resolution also spans a longer time; pyramids of the finest one, as many levels.
    "mel": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 128},
    "extra_windows": [2048, 4096, 8192],
    "hop_policy": "half",
    "pyramid": "both",
    "pyramid_levels": 4,
}

PRESETS: dict[str, dict[str, Any]] = {
    # ISMIR 2013, "Multiscale approaches to music audio feature learning": every timescale alone,
    # the four resolutions, the Gaussian and the Laplacian pyramid; K-means against random means.
    "ismir2013": {
        "features": _PAPER_FEATURES,
        "kmeans": {
            "k": 200,
            "context": 4,
            "epsilon": 0.01,
            "sample_windows": 50_000,
            "iterations": 10,
            "batch_size": 1000,
            "activation": "linear",
            "pooling": "max",
        },
        "mlp": {
            "n_tags": 50,
            "hidden": 1000,
            "layers": 1,
            "dropout": 0.5,
            "train": {"max_epochs": 200, "patience": 20, "batch_size": 64, "learning_rate": 1e-3, "weight_decay": 1e-5},
        },
        "single_timescales": True,
        "groups": ["multiresolution", "gaussian", "laplacian"],
        "codebooks": ["kmeans", "random"],
        "importance": ["multiresolution", "laplacian"],
    },
    # ICASSP 2014, "End-to-end learning for music audio": raw audio against spectrograms at five
    # filter lengths/strides, then the first-layer nonlinearity and feature pooling of the raw model.
    # The variants sit at 256/256 (the best raw row of the paper's first table).
    "icassp2014": {
        "kind": "end-to-end",
        "tagger": {
            "pool_ceil": True,
            "train": {"max_epochs": 100, "patience": 10, "crops_per_clip": 8, "batch_size": 64, "learning_rate": 1e-3},
        },
    },
    # The short-chunk CNN with residual blocks (Won et al. 2020) beside the 2014 convnet on the same
    # 128-band, 512/256 log-mel: how far a 2020 model moves the 2014 one.
    "modern": {
        "kind": "end-to-end",
        "filters": [[512, 256]],
        "inputs": ["spectrogram"],
        "nonlinearities": [],
        "feature_pooling": [],
        "modern": True,
    },
    # The same study in miniature, for tests and a first look (seconds, not minutes).
    "smoke": {
        "features": {
            "mel": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 32},
            "extra_windows": [2048],
            "hop_policy": "half",
            "pyramid": "both",
            "pyramid_levels": 3,
        },
        "kmeans": {
            "k": 16,
            "context": 3,
            "sample_windows": 3000,
            "iterations": 5,
            "batch_size": 256,
            "tracks_per_task": 32,
        },
        "mlp": {"hidden": 64, "train": {"max_epochs": 30, "patience": 8, "batch_size": 32}},
        "groups": ["multiresolution", "laplacian"],
        "importance": ["laplacian"],
    },
    # The end-to-end study in miniature: every table, small filters and few epochs.
    "icassp2014-smoke": {
        "kind": "end-to-end",
        "n_mels": 64,
        "n_filters": 32,
        "filters": [[512, 512], [256, 256]],
        "variants_at": [256, 256],
        "feature_pooling": [["l2", 2], ["max", 2]],
        "modern": True,
        "tagger": {
            "pool_ceil": True,
            "hidden": 32,
            "train": {"max_epochs": 2, "patience": 2, "crops_per_clip": 2, "batch_size": 32},
        },
        "resnet": {
            "model": "short-chunk-resnet",
            "resnet_channels": 8,
            "train": {"crop_seconds": 2.0, "max_epochs": 1, "patience": 1, "crops_per_clip": 1, "batch_size": 16},
        },
        "resnet_window": 256,
        "resnet_hop": 128,
    },
    # NIPS 2013, "Deep content-based music recommendation": cold start on the held-out tracks; the
    # paper's baselines (linear regression, MLP on bag-of-words audio features) beside the CNN trained
    # with MSE and with WPE, between random/popularity and the WMF upper bound. The log-mel features
    # are the pipeline's (a study after `mirflow demo` reuses them).
    "nips2013": {
        "kind": "recommendation",
        "kmeans": {"k": 200, "context": 4, "sample_windows": 50_000, "iterations": 10, "pooling": "max+mean"},
        "regressor": {"hidden": 500, "dropout": 0.25},
        "evaluation": {"k": 500},
    },
    "nips2013-smoke": {
        "kind": "recommendation",
        "kmeans": {
            "k": 16,
            "context": 3,
            "sample_windows": 3000,
            "iterations": 5,
            "batch_size": 256,
            "pooling": "max+mean",
            "tracks_per_task": 32,
        },
        "regressor": {"hidden": 32, "train": {"max_epochs": 10, "patience": 3, "batch_size": 32}},
        "cnn": {
            "channels": [16, 16, 32],
            "hidden": 32,
            "train": {"max_epochs": 2, "patience": 2, "crops_per_clip": 2, "batch_size": 32},
        },
        "wmf": {"iterations": 5},
        "queries": 2,
    },
    # ISMIR 2014, "Transfer learning by supervised pre-training for audio-based music classification":
    # linear regression and MLPs with 1 and 2 hidden layers learn tag factors and listening factors from
    # multiscale K-means features (four resolutions); their embeddings transfer to a genre catalogue.
    "ismir2014": {
        "kind": "transfer",
        "kmeans": {
            "k": 200,
            "context": 4,
            "sample_windows": 50_000,
            "iterations": 10,
            "timescales": ["mel_1024", "mel_2048", "mel_4096", "mel_8192"],
        },
        "regressor": {"hidden": 500, "dropout": 0.25},
    },
    "ismir2014-smoke": {
        "kind": "transfer",
        "kmeans": {
            "k": 16,
            "context": 3,
            "sample_windows": 3000,
            "iterations": 5,
            "batch_size": 256,
            "tracks_per_task": 32,
            "timescales": ["mel_1024", "mel_4096"],
        },
        "regressor": {"hidden": 32, "train": {"max_epochs": 15, "patience": 4, "batch_size": 32}},
        "models": ["linear", "mlp-1"],
        "wmf": {"iterations": 5},
        "target_tracks": 60,
        "transfer": {"cs": [0.01, 0.1, 1.0]},
    },
}
KINDS = ("multiscale", "end-to-end", "recommendation", "transfer")
AnyStudySettings = StudySettings | EndToEndStudySettings | RecommendationStudySettings | TransferStudySettings
FAMILIES = {
    "multiscale": ("mlp",),
    "end-to-end": ("tagger", "resnet"),
    "recommendation": ("regressor", "cnn"),
    "transfer": ("regressor",),
}  # the models whose training options the command line sets


def load_preset(name_or_path: str, *, overrides: Mapping[str, Any] | None = None) -> AnyStudySettings:
    """A preset by name (:data:`PRESETS`) or from a JSON file, with ``overrides`` merged in (nested dicts merge).

    The preset's ``kind`` (``multiscale``, the default, ``end-to-end``, ``recommendation``
    or ``transfer``) picks the settings class. Raises ``ParameterError`` naming the preset and the bad value.
    """
    name, preset = _preset(name_or_path)
    kind = preset.get("kind", "multiscale")
    if kind not in KINDS:
        raise ParameterError(f"preset {name!r}: kind {kind!r} is not one of {KINDS}")
    cls = {
        "multiscale": StudySettings,
        "end-to-end": EndToEndStudySettings,
        "recommendation": RecommendationStudySettings,
        "transfer": TransferStudySettings,
    }[kind]
    # The preset and the overrides merge into each nested field's default, so that a partial
    # override (e.g. only ``train.devices``) keeps the rest of that field's defaults.
    defaults = {
        field: info.default.model_dump()
        for field, info in cls.model_fields.items()
        if isinstance(info.default, BaseModel)
    }
    merged = merge(merge(defaults, preset), overrides or {})
    merged.pop("kind", None)
    try:
        return cls(preset=name, **{k: v for k, v in merged.items() if k != "preset"})
    except ValidationError as err:
        raise ParameterError(f"preset {name!r}: {settings_message(err)}") from err


def preset_kind(name_or_path: str) -> str:
    return _preset(name_or_path)[1].get("kind", "multiscale")


def load_study(preset: str, kind: str, *, overrides: Mapping[str, Any] | None = None) -> AnyStudySettings:
    """:func:`load_preset` for a runner of one kind of study: a preset of another kind is refused by name."""
    found = preset_kind(preset)
    if found != kind:
        raise ParameterError(f"preset {preset!r} is a {found} study, not a {kind} one: run it as a {found} study")
    return load_preset(preset, overrides=overrides)


def _preset(name_or_path: str) -> tuple[str, dict[str, Any]]:
    if name_or_path in PRESETS:
        return name_or_path, PRESETS[name_or_path]
    if Path(name_or_path).suffix == ".json" and Path(name_or_path).is_file():
        try:
            return Path(name_or_path).stem, storage.read_json(name_or_path)
        except ValueError as err:
            raise ParameterError(f"preset file {name_or_path} is not valid JSON: {err}") from err
    raise ParameterError(f"unknown preset {name_or_path!r}: use one of {sorted(PRESETS)} or a .json file")


def preset_overrides(
    *, kind: str = "multiscale", k: int | None = None, epochs: int | None = None, train: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The overrides the command line and the deployment offer: K, a cap on epochs, training options
    (``devices``, ``precision``, ``compile``) for every model the study trains."""
    train = dict(train or {})
    if epochs is not None:
        train["max_epochs"] = epochs
    overrides: dict[str, Any] = {}
    if k is not None:
        if kind == "end-to-end":
            raise ParameterError(
                "k sets the size of a study's K-means codebooks, and an end-to-end study has none: leave k unset"
            )
        overrides["kmeans"] = {"k": k}
    if train:
        for family in FAMILIES[kind]:
            overrides[family] = {"train": train}
    return overrides


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in; nested dicts merge key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


@dataclass(frozen=True)
class StudyData:
    """What every configuration of a tagging study trains on: one split, one tag vocabulary, one seed."""

    tags: list[str]
    split_ids: dict[str, list[str]]  # train / valid / test
    targets: dict[str, np.ndarray]  # split -> multi-hot [shape=(n_clips, n_tags)]
    vectors: dict[str, dict[str, dict[str, np.ndarray]]]  # codebook -> timescale -> split -> [shape=(n, width)]
    fingerprint: str  # of the clips, their splits, tags and content, and of the encodings

    def inputs(self, config: Configuration) -> dict[str, np.ndarray]:
        """The configuration's input per split: its timescales' vectors side by side."""
        by_timescale = self.vectors[config.codebook]
        return {
            split: np.concatenate([by_timescale[t][split] for t in config.timescales], axis=1)
            for split in self.split_ids
        }

    def width(self, config: Configuration) -> int:
        """The width of the configuration's input: its timescales' vector widths summed."""
        by_timescale = self.vectors[config.codebook]
        return sum(by_timescale[t]["train"].shape[1] for t in config.timescales)


def load_study_data(
    tracks: pd.DataFrame, kmeans_dirs: Mapping[str, Path], *, timescales: Sequence[str], n_tags: int
) -> StudyData:
    """Read the K-means features of every clip that has them in every codebook kind.

    ``tracks`` needs ``track_id``, ``split`` and ``tags``. Raises ``DatasetError`` when a
    split is empty (the study compares test scores: it needs train, valid and test).
    """
    from tasks.datasets import multi_hot, tag_vocabulary
    from tasks.kmeans_features import read_kmeans_features
    from tasks.shards import read_manifest

    encodings = []
    for codebook, path in sorted(kmeans_dirs.items()):
        manifest = read_manifest(path).to_pandas()
        tracks = tracks[tracks["track_id"].isin(set(manifest["track_id"]))]
        encodings.append(f"{codebook}:{','.join(sorted(set(manifest['settings_hash'])))}")
    tracks = tracks.sort_values("track_id").reset_index(drop=True)
    split_ids = {split: list(tracks.loc[tracks["split"] == split, "track_id"]) for split in ("train", "valid", "test")}
    empty = [split for split, ids in split_ids.items() if not ids]
    if empty:
        raise DatasetError(f"the study needs clips in train, valid and test; none with features in {empty}")
    tags = tag_vocabulary(tracks, n=n_tags)
    targets_of = multi_hot(tracks, tags)
    targets = {split: np.stack([targets_of[t] for t in ids]) for split, ids in split_ids.items()}
    # One read per codebook and timescale (all clips, in split order), then cut into the splits.
    ordered = [t for ids in split_ids.values() for t in ids]
    bounds = np.cumsum([0, *(len(ids) for ids in split_ids.values())])
    vectors = {}
    for codebook, path in kmeans_dirs.items():
        vectors[codebook] = {}
        for column in timescales:
            matrix = read_kmeans_features(path, timescales=[column], track_ids=ordered)
            vectors[codebook][column] = {split: matrix[lo:hi] for split, lo, hi in zip(split_ids, bounds, bounds[1:])}
    # Same clips, splits, tags and encodings (the codebooks' content included) = same fingerprint.
    digest = hashlib.sha1("\n".join(encodings).encode())
    for row in tracks[["track_id", "split"]].itertuples(index=False):
        digest.update(f"{row.track_id}\t{row.split}\n".encode())
    digest.update(json.dumps([tags, [t.tolist() for t in targets.values()]]).encode())
    return StudyData(
        tags=tags, split_ids=split_ids, targets=targets, vectors=vectors, fingerprint=digest.hexdigest()[:16]
    )


def world_tag_types(world_root: Path) -> tuple[dict[str, str], dict[str, float]]:
    """The synthetic world's tag types and timescales (its ``tags.parquet``); empty when it has none."""
    path = Path(world_root) / "tags.parquet"
    if not path.exists():
        return {}, {}
    frame = storage.read_frame(path)
    return dict(zip(frame["tag"], frame["type"])), dict(zip(frame["tag"], frame["timescale_s"]))


@dataclass(frozen=True)
class Configuration:
    """One run of a study: an MLP on the pooled features of ``timescales`` from one codebook kind."""

    name: str
    group: str  # "single", a timescale group, or "without" (a group with one timescale left out)
    timescales: tuple[str, ...]
    codebook: str
    base: str  # the group of a "without" configuration; else the name without the codebook
    left_out: str | None = None

    def key(self, study: StudySettings, data_fingerprint: str) -> str:
        """Identifies this configuration of these settings on this data across re-runs (finished children are reused)."""
        payload = json.dumps([study.settings_hash, data_fingerprint, self.name, self.timescales, self.codebook])
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def configurations(study: StudySettings) -> list[Configuration]:
    """Every run of the study, in the order of the table: single timescales, groups, then leave-one-out."""
    groups = study.timescale_groups()
    out = []
    for codebook in study.codebooks:
        for column in study.single_timescale_columns:
            out.append(Configuration(f"{column} · {codebook}", "single", (column,), codebook, column))
        for group in study.groups:
            out.append(Configuration(f"{group} · {codebook}", group, groups[group], codebook, group))
    if "kmeans" in study.codebooks:
        for group in study.importance:
            if group not in study.groups:
                out.append(Configuration(f"{group} · kmeans", group, groups[group], "kmeans", group))
            for column in groups[group]:
                kept = tuple(c for c in groups[group] if c != column)
                if kept:
                    out.append(
                        Configuration(
                            f"{group} without {column} · kmeans", "without", kept, "kmeans", group, left_out=column
                        )
                    )
    return out


def study_table(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The paper-shaped table: one row per configuration, K-means and control side by side.

    ``results`` rows need ``name, group, base, codebook, timescales, n_inputs, roc_auc, pr_auc``;
    leave-one-out rows (group ``without``) are left to :func:`timescale_importance`.
    """
    frame = pd.DataFrame([r for r in results if r["group"] != "without"])
    if frame.empty:
        raise ParameterError("no results to tabulate")
    rows = []
    for base, part in frame.groupby("base", sort=False):
        row: dict[str, Any] = {
            "configuration": base,
            "group": part["group"].iloc[0],
            "timescales": len(part["timescales"].iloc[0]),
        }
        for codebook, label in (("kmeans", "K-means"), ("random", "random")):
            match = part[part["codebook"] == codebook]
            row[f"{label} inputs"] = int(match["n_inputs"].iloc[0]) if len(match) else np.nan
            row[f"{label} ROC-AUC"] = float(match["roc_auc"].iloc[0]) if len(match) else np.nan
            row[f"{label} PR-AUC"] = float(match["pr_auc"].iloc[0]) if len(match) else np.nan
        row["gain ROC-AUC"] = row["K-means ROC-AUC"] - row["random ROC-AUC"]
        rows.append(row)
    return pd.DataFrame(rows)


def format_table(table: pd.DataFrame) -> str:
    """The study table as fixed-width text, for the terminal and the report."""
    columns = [
        "configuration",
        "timescales",
        "K-means ROC-AUC",
        "K-means PR-AUC",
        "random ROC-AUC",
        "random PR-AUC",
        "gain ROC-AUC",
    ]
    shown = table[[c for c in columns if c in table.columns]]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-")


def timescale_importance(
    full: Mapping[str, pd.DataFrame],
    without: Mapping[tuple[str, str], pd.DataFrame],
    tag_types: Mapping[str, str],
    tag_timescales: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Per-tag ROC-AUC drop when one timescale is left out of a multiscale model.

    Parameters
    ----------
    full : ``{group: per-tag table of the model on all the group's timescales}``
    without : ``{(group, left-out timescale): per-tag table of the model without it}``
        Per-tag tables have columns ``tag`` and ``roc_auc`` (as :func:`tasks.metrics.tag_metrics`).
    tag_types : ``{tag: type}``; tags without one are typed ``other``
    tag_timescales : ``{tag: seconds}`` the tag lives at, when known (NaN otherwise)

    Returns
    -------
    pd.DataFrame with columns ``group, timescale, tag, type, tag_timescale_s, roc_auc_full,
    roc_auc_without, drop``; ``drop > 0`` means the timescale helped that tag.
    """
    tag_timescales = tag_timescales or {}
    rows = []
    for (group, timescale), table in without.items():
        base = full[group].set_index("tag")["roc_auc"]
        left = table.set_index("tag")["roc_auc"]
        for tag in base.index:
            if tag in left.index and np.isfinite(base[tag]) and np.isfinite(left[tag]):
                rows.append(
                    {
                        "group": group,
                        "timescale": timescale,
                        "tag": tag,
                        "type": tag_types.get(tag, "other"),
                        "tag_timescale_s": float(tag_timescales.get(tag, np.nan)),
                        "roc_auc_full": float(base[tag]),
                        "roc_auc_without": float(left[tag]),
                        "drop": float(base[tag] - left[tag]),
                    }
                )
    return pd.DataFrame(
        rows,
        columns=["group", "timescale", "tag", "type", "tag_timescale_s", "roc_auc_full", "roc_auc_without", "drop"],
    )


def importance_by_type(importance: pd.DataFrame) -> pd.DataFrame:
    """Mean ROC-AUC drop per (group, tag type) and left-out timescale: rows types, columns timescales.

    Types are ordered by the median timescale of their tags (shortest first) where known.
    """
    if importance.empty:
        return pd.DataFrame()
    order = importance.groupby("type")["tag_timescale_s"].median().sort_values(na_position="last", kind="stable")
    ranked = importance.assign(_rank=importance["type"].map({t: i for i, t in enumerate(order.index)}))
    ranked = ranked.sort_values(["_rank"], kind="stable")
    return ranked.pivot_table(index=["group", "type"], columns="timescale", values="drop", aggfunc="mean", sort=False)


def format_importance(importance: pd.DataFrame) -> str:
    by_type = importance_by_type(importance)
    if by_type.empty:
        return "(no leave-one-out runs)"
    return by_type.to_string(float_format=lambda v: f"{v:+.4f}", na_rep="-")


# --- End-to-end studies (ICASSP 2014) -------------------------------------------------------------

END_TO_END_TABLES = {
    "length_stride": "filter length / stride: spectrogram against raw audio",
    "nonlinearity": "first-layer nonlinearity (raw audio)",
    "feature_pooling": "feature pooling over groups of first-layer filters (raw audio)",
    "modern": "a modern baseline on the same data",
}
_POOLING_NAMES = {"l2": "L2", "max": "max"}
_NONLINEARITY_NAMES = {"relu": "ReLU", "log1p_square": "log(1 + C x²)", "log1p_abs": "log(1 + C |x|)"}


@dataclass(frozen=True)
class ModelRun:
    """One model of an end-to-end study; one run can fill cells of several tables."""

    name: str
    model: str  # spectrogram | raw | short-chunk-resnet
    length: int  # raw filter length = spectrogram window
    stride: int  # raw stride = spectrogram hop
    nonlinearity: str = "relu"
    feature_pooling: str = "none"
    pool_size: int = 1

    def key(self, study: EndToEndStudySettings, data_fingerprint: str) -> str:
        payload = json.dumps(
            [
                study.settings_hash,
                data_fingerprint,
                self.model,
                self.length,
                self.stride,
                self.nonlinearity,
                self.feature_pooling,
                self.pool_size,
            ]
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]


def end_to_end_runs(study: EndToEndStudySettings) -> list[ModelRun]:
    """Every distinct model of the study, in table order (a model shared by tables appears once)."""
    runs: dict[tuple, ModelRun] = {}

    def add(
        model: str, length: int, stride: int, nonlinearity: str = "relu", pooling: str = "none", size: int = 1
    ) -> None:
        key = (model, length, stride, nonlinearity, pooling, size)
        if key in runs:
            return
        name = f"{model} {length}/{stride}"
        if model == "raw" and nonlinearity != "relu":
            name += f" {nonlinearity}"
        if pooling != "none":
            name += f" {pooling}×{size}"
        runs[key] = ModelRun(name, model, length, stride, nonlinearity, pooling, size)

    for length, stride in study.filters:
        for model in study.inputs:
            add(model, length, stride)
    for nonlinearity in study.nonlinearities:
        add("raw", *study.variants_at, nonlinearity=nonlinearity)
    if study.feature_pooling:
        add("raw", *study.variants_at)
    for kind, size in study.feature_pooling:
        add("raw", *study.variants_at, pooling=kind, size=size)
    if study.modern:
        add("spectrogram", study.resnet_window, study.resnet_hop)
        add("short-chunk-resnet", study.resnet_window, study.resnet_hop)
    return list(runs.values())


def end_to_end_tables(study: EndToEndStudySettings, results: Sequence[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
    """The paper's tables from the runs' results (rows need the :class:`ModelRun` fields, ``roc_auc``, ``pr_auc``).

    Returns ``{table: frame}`` for the tables the study has (see :data:`END_TO_END_TABLES`).
    """
    frame = pd.DataFrame(list(results))
    if frame.empty:
        raise ParameterError("no results to tabulate")

    def cell(**match: Any) -> tuple[float, float]:
        rows = frame
        for column, value in match.items():
            rows = rows[rows[column] == value]
        if rows.empty:
            return np.nan, np.nan
        return float(rows["roc_auc"].iloc[0]), float(rows["pr_auc"].iloc[0])

    plain = {"nonlinearity": "relu", "feature_pooling": "none"}
    tables: dict[str, pd.DataFrame] = {}
    if study.filters:
        rows = []
        for length, stride in study.filters:
            row: dict[str, Any] = {"filter length": length, "stride": stride}
            for model, label in (("spectrogram", "spectrogram"), ("raw", "raw audio")):
                if model in study.inputs:
                    row[f"{label} ROC-AUC"], row[f"{label} PR-AUC"] = cell(
                        model=model, length=length, stride=stride, **plain
                    )
            rows.append(row)
        tables["length_stride"] = pd.DataFrame(rows)
    length, stride = study.variants_at
    at = {"model": "raw", "length": length, "stride": stride}
    if study.nonlinearities:
        tables["nonlinearity"] = pd.DataFrame(
            [
                {
                    "nonlinearity": _NONLINEARITY_NAMES[n],
                    "filter length": length,
                    "stride": stride,
                    **dict(zip(("ROC-AUC", "PR-AUC"), cell(**at, nonlinearity=n, feature_pooling="none"))),
                }
                for n in study.nonlinearities
            ]
        )
    if study.feature_pooling:
        options = [("none", 1), *study.feature_pooling]
        tables["feature_pooling"] = pd.DataFrame(
            [
                {
                    "feature pooling": "none" if kind == "none" else f"{_POOLING_NAMES[kind]} over {size}",
                    "filter length": length,
                    "stride": stride,
                    **dict(
                        zip(
                            ("ROC-AUC", "PR-AUC"), cell(**at, nonlinearity="relu", feature_pooling=kind, pool_size=size)
                        )
                    ),
                }
                for kind, size in options
            ]
        )
    if study.modern:
        window, hop = study.resnet_window, study.resnet_hop
        tables["modern"] = pd.DataFrame(
            [
                {
                    "model": label,
                    "input": f"log-mel {study.n_mels} bands, {window}/{hop}",
                    **dict(zip(("ROC-AUC", "PR-AUC"), cell(model=model, length=window, stride=hop, **plain))),
                }
                for model, label in (("spectrogram", "convnet 2014"), ("short-chunk-resnet", "short-chunk ResNet 2020"))
            ]
        )
    return tables


def format_end_to_end(tables: Mapping[str, pd.DataFrame]) -> str:
    """The tables as fixed-width text under their titles."""
    parts = []
    for name, table in tables.items():
        parts += [
            f"{END_TO_END_TABLES[name]}:",
            table.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"),
            "",
        ]
    return "\n".join(parts).rstrip()


# --- The data the studies train on ----------------------------------------------------------------

SPLITS = ("train", "valid", "test")


def manifest_ids(feature_dir: Path) -> set[str]:
    """The tracks a feature set has (its manifest's ``track_id``); empty when it has none yet."""
    from tasks.shards import read_manifest

    return set(read_manifest(feature_dir).column("track_id").to_pylist())


def clips_with_features(tracks: pd.DataFrame, present: Sequence[set[str]], *, sort: bool = False) -> pd.DataFrame:
    """The tracks that are in every one of the ``present`` id sets (the feature sets a study reads), in table
    order or sorted by ``track_id``."""
    for ids in present:
        tracks = tracks[tracks["track_id"].isin(ids)]
    return tracks.sort_values("track_id").reset_index(drop=True) if sort else tracks


def end_to_end_clips(tracks: pd.DataFrame, present: Sequence[set[str]]) -> pd.DataFrame:
    """The clips every model of an end-to-end study can use: in every feature set, sorted by ``track_id``.

    Raises ``DatasetError`` when a split has none (the study compares test scores of trained models).
    """
    tracks = clips_with_features(tracks, present, sort=True)
    for split in SPLITS:
        if not (tracks["split"] == split).any():
            raise DatasetError(f"the study needs clips in train, valid and test; none with features in {split!r}")
    return tracks


def clip_labels(tracks: pd.DataFrame) -> list[tuple[str, str, str]]:
    """``(track_id, split, "tag|tag|...")`` of every clip: what a study's data fingerprint covers."""
    return [(t, split, "|".join(sorted(labels))) for t, split, labels in tracks.itertuples(index=False)]


def split_counts(tracks: pd.DataFrame) -> dict[str, int]:
    """Clips per split: ``{"train": n, "valid": n, "test": n}``."""
    return {split: int((tracks["split"] == split).sum()) for split in SPLITS}


@dataclass(frozen=True)
class ListeningFactors:
    """A factorization's factors as a study reads them (``tasks.listening.load_factors`` of each file)."""

    users: np.ndarray  # [shape=(n_users,)] user ids
    user_factors: np.ndarray  # [shape=(n_users, n_factors)]
    items: np.ndarray  # [shape=(n_items,)] factorized track ids
    item_factors: np.ndarray  # [shape=(n_items, n_factors)]
    heldout: np.ndarray  # [shape=(n_heldout,)] held-out track ids, folded in afterwards
    heldout_factors: np.ndarray  # [shape=(n_heldout, n_factors)]

    @property
    def track_factors(self) -> dict[str, np.ndarray]:
        """Every track's factors, the held-out tracks' folded in."""
        return {**dict(zip(self.items, self.item_factors)), **dict(zip(self.heldout, self.heldout_factors))}


def read_listening_factors(user_factors: Path, item_factors: Path, heldout_item_factors: Path) -> ListeningFactors:
    """The three factor files of a factorization (users, items, the held-out items folded in)."""
    from tasks.listening import load_factors

    users, by_user = load_factors(user_factors)
    items, by_item = load_factors(item_factors)
    heldout, by_heldout = load_factors(heldout_item_factors)
    return ListeningFactors(users, by_user, items, by_item, heldout, by_heldout)


def _cold_start_ids(tracks: pd.DataFrame, factors: ListeningFactors) -> dict[str, list[str]]:
    """Train / valid (factorized) and test (held out) ids of the tracks that have factors."""
    from tasks.recommend import cold_start_track_splits

    return cold_start_track_splits(tracks, factorized=set(factors.items), heldout=set(factors.heldout))


def _heldout_plays(heldout_plays: pd.DataFrame, factors: ListeningFactors, test_ids: list[str]):
    """The held-out plays of the test tracks as a matrix [sp.csr_matrix, shape=(n_users, n_test)]."""
    from tasks.listening import play_matrix_for

    return play_matrix_for(heldout_plays, users=factors.users, items=np.asarray(test_ids, dtype=str))


@dataclass(frozen=True)
class Recommenders:
    """What every model of the recommendation study learns from and is scored on."""

    track_ids: dict[str, list[str]]  # train / valid (factorized) and test (held out), with features
    factors: dict[str, np.ndarray]  # WMF item factors; the held-out tracks' folded in
    users: np.ndarray
    user_factors: np.ndarray
    relevant: object  # sp.csr_matrix (n_users, n_test): the held-out plays
    tags: dict[str, list[str]]
    fingerprint: str = ""  # of the features, factors and splits (the flow sets it: it hashes the files)


def recommenders(tracks: pd.DataFrame, factors: ListeningFactors, heldout_plays: pd.DataFrame) -> Recommenders:
    """The tracks (already those with features) split for cold start, with their factors and plays."""
    track_ids = _cold_start_ids(tracks, factors)
    for split, ids in track_ids.items():
        if len(ids) < 2:
            raise DatasetError(
                f"the recommendation study needs tracks with features and factors in every split; "
                f"{split!r} has {len(ids)}"
            )
    relevant = _heldout_plays(heldout_plays, factors, track_ids["test"])
    return Recommenders(
        track_ids=track_ids,
        factors=factors.track_factors,
        users=factors.users,
        user_factors=factors.user_factors,
        relevant=relevant,
        tags={str(t): list(v) for t, v in zip(tracks["track_id"], tracks["tags"])},
    )


def source_data(
    tracks: pd.DataFrame,
    study: TransferStudySettings,
    *,
    listening: ListeningFactors | None = None,
    heldout_plays: pd.DataFrame | None = None,
) -> tuple[dict, list]:
    """Inputs, targets and scorers of every source task of a transfer study: ``{"tracks": frame, task: {...}}``,
    and the parts of its data fingerprint that are not file digests (the tag task's vocabulary, splits and
    labels; the listening task's splits). ``tracks``: those with K-means features, sorted by ``track_id``."""
    from tasks.datasets import multi_hot, tag_vocabulary
    from tasks.pretrain import factorize_tags

    data: dict = {"tracks": tracks}
    parts: dict[str, Any] = {}
    if "tags" in study.sources:
        tags = tag_vocabulary(tracks, n=study.n_tags)
        ids = {split: list(tracks.loc[tracks["split"] == split, "track_id"]) for split in SPLITS}
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
        parts["tags"] = (tags, ids, [(t, sorted(v)) for t, v in zip(tracks["track_id"], tracks["tags"])])
    if "listening" in study.sources:
        if listening is None or heldout_plays is None:
            raise ParameterError("the listening source task needs the factorization's factors and held-out plays")
        ids = _cold_start_ids(tracks, listening)
        if any(len(v) < 2 for v in ids.values()):
            raise DatasetError(
                f"the listening task needs factorized and held-out tracks with features: "
                f"{ ({k: len(v) for k, v in ids.items()}) }"
            )
        relevant = _heldout_plays(heldout_plays, listening, ids["test"])
        data["listening"] = {
            "ids": ids,
            "targets": listening.track_factors,
            "user_factors": listening.user_factors,
            "relevant": relevant,
        }
        parts["listening"] = ids
    return data, parts
