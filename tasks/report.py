"""The run summary: the table the demo prints, the report file and the plots."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a window
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from core import storage


@dataclass(frozen=True)
class RankingRow:
    name: str
    map_at_k: float
    auc: float
    precision_at_k: float = float("nan")
    ndcg_at_k: float = float("nan")
    n_users: int = 0


@dataclass(frozen=True)
class PipelineSummary:
    tagger_roc_auc: float
    tagger_pr_auc: float
    tagger_pr_auc_chance: float  # mean tag frequency: the PR-AUC of a random scorer
    k: int
    ranking: Sequence[RankingRow]
    n_tracks: int
    n_quarantined: int
    n_users: int
    n_heldout_items: int
    tracking_uri: str
    report_path: Path
    registered: Mapping[str, str] = field(default_factory=dict)  # model name -> the version this run registered


def metric_slug(name: str) -> str:
    """``"WMF factors (upper bound)"`` -> ``"wmf_factors_upper_bound"``, for MLflow metric keys."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def summary_text(summary: PipelineSummary) -> str:
    """The fixed-width table printed at the end of a pipeline run."""
    lines = [
        f"tracks {summary.n_tracks} (quarantined {summary.n_quarantined}), users {summary.n_users}, "
        f"held-out tracks {summary.n_heldout_items}",
        f"{'tagger (2014 spectrogram convnet)':<38}test ROC-AUC {summary.tagger_roc_auc:.3f}  "
        f"PR-AUC {summary.tagger_pr_auc:.3f}   (ROC-AUC 0.5 = chance, PR-AUC chance {summary.tagger_pr_auc_chance:.3f})",
    ]
    # With no more held-out tracks than k, every top k holds all of them: P@k is the same for any ranking.
    precision = summary.k < summary.n_heldout_items
    lines.append(
        f"{'recommendation, held-out tracks':<38}{f'mAP@{summary.k}':<10}{'AUC':<8}"
        + (f"{f'P@{summary.k}':<10}" if precision else "")
        + f"NDCG@{summary.k}"
    )
    for row in summary.ranking:
        lines.append(
            f"  {row.name:<36}{row.map_at_k:<10.4f}{row.auc:<8.3f}"
            + (f"{row.precision_at_k:<10.4f}" if precision else "")
            + f"{row.ndcg_at_k:.4f}"
        )
    if summary.registered:
        lines.append(
            "registered: "
            + ", ".join(f"{name} v{version}" for name, version in summary.registered.items())
            + "   (aliases champion/challenger; `make serve` runs it as a service)"
        )
    lines.append(f"MLflow: mlflow ui --backend-store-uri {summary.tracking_uri}   report: {summary.report_path}")
    return "\n".join(lines)


def write_report(path: Path, summary: PipelineSummary, *, per_tag: str, settings: Mapping[str, object]) -> Path:
    """A Markdown report: the summary table, the per-tag table and the settings."""
    settings_lines = "\n".join(f"| `{k}` | `{v}` |" for k, v in sorted(settings.items()))
    return storage.write_text(
        path,
        "# mirflow pipeline report\n\n"
        f"```\n{summary_text(summary)}\n```\n\n"
        f"## Tagger: per-tag test metrics\n\n```\n{per_tag}\n```\n\n"
        f"## Settings\n\n| setting | value |\n|---|---|\n{settings_lines}\n",
    )


def _save(fig, path: Path) -> Path:
    """Lay out, write (110 dpi) and close a figure; its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _roc_auc_axis(ax, *, labels: list[str], scores: np.ndarray, title: str) -> None:
    """The y axis of a study's horizontal ROC-AUC bars: one label per bar, top first, x from just below the lowest."""
    low = np.nanmin(scores) if np.isfinite(scores).any() else 0.5
    ax.set(
        yticks=np.arange(len(labels)),
        yticklabels=labels,
        xlabel="test ROC-AUC (macro over tags)",
        title=title,
        xlim=(max(0.0, low - 0.05), 1.0),
    )
    ax.invert_yaxis()
    ax.legend(fontsize=8, loc="lower right")


def plot_roc_curves(y_true: np.ndarray, y_score: np.ndarray, *, tags: Sequence[str], path: Path) -> Path:
    """One ROC curve per tag (tags with both classes present), with the chance diagonal."""
    fig, ax = plt.subplots(figsize=(7, 6))
    colours = plt.get_cmap("tab20")
    for j, tag in enumerate(tags):
        if 0 < y_true[:, j].sum() < len(y_true):
            fpr, tpr, _ = roc_curve(y_true[:, j], y_score[:, j])
            ax.plot(fpr, tpr, linewidth=1, label=tag, color=colours(j % 20), linestyle="-" if j < 20 else ":")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="Tagger ROC curves, test split")
    ax.legend(fontsize=6, ncol=2, loc="lower right")
    return _save(fig, path)


def plot_factor_scatter(true: np.ndarray, predicted: np.ndarray, *, path: Path, dims: int = 4) -> Path:
    """Predicted against true (fold-in WMF) factors of held-out tracks, first ``dims`` dimensions."""
    dims = min(dims, true.shape[1])
    fig, axes = plt.subplots(1, dims, figsize=(3 * dims, 3), squeeze=False)
    for d, ax in enumerate(axes[0]):
        ax.scatter(true[:, d], predicted[:, d], s=4, alpha=0.5)
        r = np.corrcoef(true[:, d], predicted[:, d])[0, 1] if len(true) > 1 else float("nan")
        ax.set(title=f"factor {d}: r = {r:.2f}", xlabel="WMF", ylabel="CNN")
    return _save(fig, path)


def plot_first_layer_filters(
    weights: np.ndarray, *, path: Path, max_filters: int = 32, title: str = "first-layer filters (mel band × time)"
) -> Path:
    """First-layer filters of a spectrogram convnet, one panel each.

    ``weights [shape=(n_filters, n_mels, length)]``: each panel shows mel band
    (vertical, low at the bottom) against time within the filter.
    """
    n = min(max_filters, weights.shape[0])
    cols = 8
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.3, rows * 2.2), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < n:
            w = weights[i]
            limit = np.abs(w).max() or 1.0
            ax.imshow(w, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit)
            ax.set_title(str(i), fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def tsne_coordinates(points: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """2-D t-SNE of ``points [shape=(n, d)]`` (perplexity 30, or less for few points): ``[shape=(n, 2)]``."""
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (len(points) - 1) // 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)


def plot_tsne(points: np.ndarray, labels: Sequence[str], *, path: Path, title: str, seed: int = 0) -> Path:
    """A 2-D t-SNE map of ``points [shape=(n, d)]``, coloured by ``labels``."""
    xy = tsne_coordinates(points, seed=seed)
    fig, ax = plt.subplots(figsize=(7, 6))
    for label in sorted(set(labels)):
        mask = np.asarray(labels) == label
        ax.scatter(xy[mask, 0], xy[mask, 1], s=10, alpha=0.7, label=label)
    ax.set(title=title, xticks=[], yticks=[])
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return _save(fig, path)


def dominant_labels(tag_lists: Sequence[Sequence[str]], *, candidates: Sequence[str]) -> list[str]:
    """For colouring maps: each track's first tag among ``candidates`` (in their order), else ``"other"``."""
    rank = {tag: i for i, tag in enumerate(candidates)}
    out = []
    for tags in tag_lists:
        present = sorted((rank[t], t) for t in tags if t in rank)
        out.append(present[0][1] if present else "other")
    return out


def plot_study_bars(table, *, path: Path, title: str) -> Path:
    """Test ROC-AUC of each configuration of a study, K-means beside the random-codebook control.

    ``table`` is :func:`tasks.studies.study_table`'s frame.
    """
    labels = list(table["configuration"])
    y = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(labels) + 1.4))
    height = 0.38
    for offset, (column, label, colour) in enumerate(
        (("K-means ROC-AUC", "K-means", "tab:blue"), ("random ROC-AUC", "random means (control)", "tab:gray"))
    ):
        if column in table and table[column].notna().any():
            values = table[column].to_numpy(dtype=float)
            ax.barh(y + (offset - 0.5) * height, values, height=height, color=colour, label=label)
            for yi, v in zip(y + (offset - 0.5) * height, values):
                if np.isfinite(v):
                    ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
    scores = table[[c for c in ("K-means ROC-AUC", "random ROC-AUC") if c in table]].to_numpy(dtype=float)
    _roc_auc_axis(ax, labels=labels, scores=scores, title=title)
    return _save(fig, path)


def plot_end_to_end_bars(results, *, path: Path, title: str) -> Path:
    """Test ROC-AUC of every model of an end-to-end study, coloured by input (spectrogram, raw audio, modern).

    ``results`` has one row per model with ``name``, ``model`` and ``roc_auc``.
    """
    colours = {"spectrogram": "tab:blue", "raw": "tab:orange", "short-chunk-resnet": "tab:green"}
    labels = {"spectrogram": "log-mel spectrogram", "raw": "raw audio", "short-chunk-resnet": "short-chunk ResNet"}
    values = results["roc_auc"].to_numpy(dtype=float)
    y = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(8, 0.36 * len(results) + 1.4))
    for model, colour in colours.items():
        mask = (results["model"] == model).to_numpy()
        if mask.any():
            ax.barh(y[mask], values[mask], color=colour, label=labels[model])
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
    _roc_auc_axis(ax, labels=list(results["name"]), scores=values, title=title)
    return _save(fig, path)


def plot_importance_heatmap(importance, *, group: str, path: Path) -> Path:
    """Tags (by timescale, then type) x left-out timescales: the ROC-AUC each timescale adds to the multiscale model.

    ``importance`` is :func:`tasks.studies.timescale_importance`'s frame (one group is drawn).
    """
    part = importance[importance["group"] == group]
    order = part.drop_duplicates("tag").sort_values(["tag_timescale_s", "type", "tag"], na_position="last")
    timescales = list(dict.fromkeys(part["timescale"]))
    grid = part.pivot_table(index="tag", columns="timescale", values="drop").reindex(
        index=order["tag"], columns=timescales
    )
    limit = float(np.nanmax(np.abs(grid.to_numpy()))) if grid.size else 1.0
    fig, ax = plt.subplots(figsize=(1.1 * len(timescales) + 3.5, 0.28 * len(grid) + 1.6))
    image = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(timescales)), timescales, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(grid)), [f"{tag} ({kind})" for tag, kind in zip(order["tag"], order["type"])], fontsize=7)
    ax.set_title(f"{group}: ROC-AUC lost when a timescale is left out")
    fig.colorbar(image, ax=ax, label="ROC-AUC drop (red: the timescale helped)")
    return _save(fig, path)


def plot_filter_spectra(filters: np.ndarray, *, sample_rate: int, path: Path, title: str) -> Path:
    """Magnitude spectra of raw-audio first-layer filters, sorted by dominant frequency (image: filter x Hz)."""
    from tasks.filters import filter_spectra

    frequencies, magnitudes = filter_spectra(filters, sample_rate=sample_rate)
    order = np.argsort(np.argmax(magnitudes, axis=1), kind="stable")
    db = 20 * np.log10(magnitudes[order] / (magnitudes.max(axis=1, keepdims=True)[order] + 1e-12) + 1e-6)
    fig, ax = plt.subplots(figsize=(7, 5))
    image = ax.imshow(
        db, aspect="auto", origin="lower", cmap="magma", vmin=-40, vmax=0, extent=(0, frequencies[-1], 0, len(filters))
    )
    ax.set(xlabel="frequency (Hz)", ylabel="filter (sorted by dominant frequency)", title=title)
    fig.colorbar(image, ax=ax, label="magnitude (dB below each filter's peak)")
    return _save(fig, path)


def plot_dominant_frequencies(filters: np.ndarray, *, sample_rate: int, path: Path, title: str) -> Path:
    """Each filter's dominant frequency, sorted, against the mel scale and a linear scale over the same range."""
    from tasks.filters import dominant_frequencies, mel_likeness, mel_reference

    dominant = np.sort(dominant_frequencies(filters, sample_rate=sample_rate))
    fmax = sample_rate / 2
    score = mel_likeness(dominant, fmax=fmax)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(dominant, ".", label="learned filters (sorted)")
    ax.plot(mel_reference(len(dominant), fmax=fmax), label=f"mel scale (RMS {score['mel']:.0f} mel)")
    ax.plot(np.linspace(0, fmax, len(dominant)), "--", label=f"linear (RMS {score['linear']:.0f} mel)")
    ax.set(xlabel="filter rank", ylabel="dominant frequency (Hz)", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_pooled_filters(filters: np.ndarray, *, pool_size: int, path: Path, title: str, max_groups: int = 8) -> Path:
    """The filters of each feature-pooling group side by side (the paper finds shifted copies of one another)."""
    n_groups = min(max_groups, len(filters) // pool_size)
    fig, axes = plt.subplots(n_groups, 1, figsize=(8, 1.1 * n_groups + 0.6), squeeze=False, sharex=True)
    for g, ax in enumerate(axes[:, 0]):
        for j in range(pool_size):
            ax.plot(filters[g * pool_size + j], lw=0.8, label=f"filter {g * pool_size + j}")
        ax.set(yticks=[], xlim=(0, filters.shape[1] - 1))
        ax.set_ylabel(f"group {g}", fontsize=7)
    axes[-1, 0].set_xlabel("tap (sample)")
    fig.suptitle(title)
    return _save(fig, path)


def plot_recommendation_bars(table, *, k: int, path: Path, title: str) -> Path:
    """mAP@k and AUC of every row of the recommendation table side by side, top row first."""
    names = list(table["model"])
    y = np.arange(len(names))
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.4 * len(names) + 1.6), sharey=True)
    for ax, column, colour in ((axes[0], f"mAP@{k}", "tab:blue"), (axes[1], "AUC", "tab:orange")):
        values = table[column].to_numpy(dtype=float)
        ax.barh(y, values, color=colour)
        for yi, v in zip(y, values):
            ax.text(v, yi, f" {v:.3f}", va="center", fontsize=7)
        ax.set(xlabel=column, xlim=(0.0, min(1.0, np.nanmax(values) * 1.25 + 1e-3)))
    axes[0].set(yticks=y, yticklabels=names)
    axes[0].invert_yaxis()
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_transfer_bars(rows, *, metric: str, path: Path, title: str) -> Path:
    """One bar per feature set of a transfer table (``feature_set``, ``value``, ``std``), pre-trained ones orange."""
    names = [r["feature_set"] for r in rows]
    values = np.array([r["value"] for r in rows], dtype=float)
    errors = np.array([r["std"] for r in rows], dtype=float)
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.4))
    colours = ["tab:orange" if n.startswith("pretrained") else "tab:blue" for n in names]
    ax.barh(y, values, xerr=errors, color=colours, capsize=3)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3f}", va="bottom", fontsize=7)
    ax.set(yticks=y, yticklabels=names, xlabel=metric, title=title, xlim=(0.0, 1.0))
    ax.invert_yaxis()
    return _save(fig, path)
