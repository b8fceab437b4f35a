"""Dataset adapters: real on-disk formats to the project's tables.

Tracks table (``tracks/<dataset>.parquet``)::

    track_id string, source_path string, split string, tags list<string>

Events (``listening/events/batch=<id>/``)::

    user string, item string, plays int64, batch string

The demo uses exactly these adapters on the synthetic world, which writes the
real MagnaTagATune and Taste Profile formats.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import DatasetError

# The papers' folder split of MagnaTagATune: folders 0-b train, c valid, d-f test.
MTAT_FOLDER_SPLIT = {**{f: "train" for f in "0123456789ab"}, "c": "valid", **{f: "test" for f in "def"}}
EVENT_COLUMNS = ["user", "item", "plays", "batch"]


def mtat_folder_split(mp3_path: str) -> str:
    """Split of an MTAT clip from the first character of its mp3 path (``"c/x.mp3"`` -> valid)."""
    folder = mp3_path.strip()[:1].lower()
    if folder not in MTAT_FOLDER_SPLIT:
        raise DatasetError(f"mp3 path {mp3_path!r} does not start with an MTAT folder 0-9 or a-f")
    return MTAT_FOLDER_SPLIT[folder]


def read_mtat_annotations(path: Path) -> pd.DataFrame:
    """Read ``annotations_final.csv``: tab-separated, quoted, ``clip_id``, tag columns of 0/1, ``mp3_path``.

    Returns a frame with ``clip_id`` (int), one int8 column per tag and ``mp3_path``.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"MTAT annotations not found at {path}")
    frame = pd.read_csv(path, sep="\t", quotechar='"', dtype=str, keep_default_na=False)
    for required in ("clip_id", "mp3_path"):
        if required not in frame.columns:
            raise DatasetError(f"{path}: no {required!r} column; is this MTAT's annotations_final.csv?")
    tag_columns = [c for c in frame.columns if c not in ("clip_id", "mp3_path")]
    if not tag_columns:
        raise DatasetError(f"{path}: no tag columns between clip_id and mp3_path")
    bad = ~frame[tag_columns].isin(["0", "1"]).all(axis=1)
    if bad.any():
        raise DatasetError(f"{path}: {int(bad.sum())} rows have tag values other than 0/1, e.g. clip {frame.loc[bad, 'clip_id'].iloc[0]}")
    frame[tag_columns] = frame[tag_columns].astype(np.int8)
    frame["clip_id"] = frame["clip_id"].astype(np.int64)
    return frame


def read_mtat_index(path: Path) -> pd.DataFrame:
    """Read ``index_mtt.tsv`` (``clip_id<TAB>dir/name.mp3``, no header) with the folder split."""
    frame = pd.read_csv(path, sep="\t", header=None, names=["clip_id", "mp3_path"], dtype={"clip_id": np.int64, "mp3_path": str})
    frame["split"] = frame["mp3_path"].map(mtat_folder_split)
    return frame


def top_tags(annotations: pd.DataFrame, *, n: int) -> list[str]:
    """The ``n`` most frequent tags (all tags when there are fewer), ties broken by name."""
    tag_columns = [c for c in annotations.columns if c not in ("clip_id", "mp3_path")]
    counts = annotations[tag_columns].sum().sort_index().sort_values(ascending=False, kind="stable")
    return list(counts.index[:n])


def mtat_tracks(annotations: pd.DataFrame, *, audio_root: Path, n_tags: int = 50) -> pd.DataFrame:
    """Tracks table from MTAT annotations: top-``n_tags`` tags, the folder split, absolute paths.

    Clips whose mp3 is missing under ``audio_root`` are kept: decoding quarantines them
    with a reason, so nothing is dropped silently.
    """
    tags = top_tags(annotations, n=n_tags)
    tag_matrix = annotations[tags].to_numpy(dtype=bool)
    tag_lists = [[tags[j] for j in np.flatnonzero(row)] for row in tag_matrix]
    audio_root = Path(audio_root).resolve()
    return pd.DataFrame(
        {
            "track_id": annotations["clip_id"].astype(str),
            "source_path": [str(audio_root / p) for p in annotations["mp3_path"]],
            "split": annotations["mp3_path"].map(mtat_folder_split),
            "tags": tag_lists,
        }
    )


def read_triplets(path: Path, *, batch: str) -> tuple[pd.DataFrame, list[dict]]:
    """Read Taste Profile triplets ``user<TAB>song<TAB>plays``; returns (events, quarantine records).

    Rows with the wrong number of fields, empty ids, or a play count that is not a
    positive integer are returned as quarantine records with their line number and
    reason; duplicates of the same (user, song) are summed. Nothing valid is dropped.
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"listening file not found: {path}")
    users, items, plays, bad = [], [], [], []
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            fields = line.split("\t")
            reason = None
            if len(fields) != 3:
                reason = f"expected 3 tab-separated fields, got {len(fields)}"
            elif not fields[0] or not fields[1]:
                reason = "empty user or song id"
            else:
                try:
                    count = int(fields[2])
                except ValueError:
                    reason = f"play count {fields[2]!r} is not an integer"
                else:
                    if count <= 0:
                        reason = f"play count {count} is not positive"
            if reason is not None:
                bad.append({"path": f"{path}:{lineno}", "stage": "listening", "reason": f"{reason}: {line[:200]!r}"})
                continue
            users.append(fields[0])
            items.append(fields[1])
            plays.append(count)
    events = pd.DataFrame({"user": users, "item": items, "plays": np.asarray(plays, dtype=np.int64)})
    events = events.groupby(["user", "item"], as_index=False, sort=False)["plays"].sum()
    events["batch"] = batch
    return events[EVENT_COLUMNS], bad


def read_hetrec_user_artists(path: Path, *, batch: str = "hetrec") -> pd.DataFrame:
    """Read HetRec 2011 Last.fm ``user_artists.dat`` (``userID artistID weight``, header) as events."""
    frame = pd.read_csv(path, sep="\t", dtype={"userID": str, "artistID": str, "weight": np.int64})
    missing = {"userID", "artistID", "weight"} - set(frame.columns)
    if missing:
        raise DatasetError(f"{path}: missing columns {sorted(missing)}; expected HetRec user_artists.dat")
    frame = frame[frame["weight"] > 0]
    events = frame.rename(columns={"userID": "user", "artistID": "item", "weight": "plays"})
    events = events.groupby(["user", "item"], as_index=False, sort=False)["plays"].sum()
    events["batch"] = batch
    return events[EVENT_COLUMNS]


def tag_vocabulary(tracks: pd.DataFrame, *, n: int) -> list[str]:
    """The ``n`` most frequent tags of a tracks table, ties broken by name (as :func:`top_tags`)."""
    counts = Counter(tag for tags in tracks["tags"] for tag in tags)
    return [tag for tag, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]
