"""Dataset adapters: real on-disk formats to the project's tables.

Tracks table (``tracks/<dataset>.parquet``)::

    track_id string, source_path string, split string, tags list<string>

``split`` is ``train``, ``valid`` or ``test``; adapters with a published split list
mark tracks that the list leaves out (the faults a cleaned split removes) ``unused``
instead of dropping them, so nothing disappears silently.

Listening data (Taste Profile triplets, HetRec Last.fm, generic events) is read by
:mod:`tasks.events`. The demo uses exactly these adapters on the synthetic world,
which writes the real MagnaTagATune and Taste Profile formats.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from core import storage
from core.errors import DatasetError, ParameterError
from core.settings import SourceSettings

# The papers' folder split of MagnaTagATune: folders 0-b train, c valid, d-f test.
MTAT_FOLDER_SPLIT = {**{f: "train" for f in "0123456789ab"}, "c": "valid", **{f: "test" for f in "def"}}
TRACK_COLUMNS = ["track_id", "source_path", "split", "tags"]
SPLITS = ("train", "valid", "test")
UNUSED = "unused"
AUDIO_SUFFIXES = frozenset({".wav", ".au", ".flac", ".ogg", ".mp3"})
# GTZAN file names: <genre>.<5 digits>.<ext>; the track id is everything before the extension.
GTZAN_NAME = re.compile(r"^(?P<genre>[^.\s]+)\.(?P<number>\d+)(?:\.[^.]+)?$")


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
        raise DatasetError(
            f"{path}: {int(bad.sum())} rows have tag values other than 0/1, e.g. clip {frame.loc[bad, 'clip_id'].iloc[0]}"
        )
    frame[tag_columns] = frame[tag_columns].astype(np.int8)
    frame["clip_id"] = frame["clip_id"].astype(np.int64)
    return frame


def read_mtat_index(path: Path) -> pd.DataFrame:
    """Read ``index_mtt.tsv`` (``clip_id<TAB>dir/name.mp3``, no header) with the folder split."""
    frame = pd.read_csv(
        path, sep="\t", header=None, names=["clip_id", "mp3_path"], dtype={"clip_id": np.int64, "mp3_path": str}
    )
    frame["split"] = frame["mp3_path"].map(mtat_folder_split)
    return frame


def top_tags(annotations: pd.DataFrame, *, n: int) -> list[str]:
    """The ``n`` most frequent tags (all tags when there are fewer), ties broken by name."""
    tag_columns = [c for c in annotations.columns if c not in ("clip_id", "mp3_path")]
    counts = annotations[tag_columns].sum().sort_index().sort_values(ascending=False, kind="stable")
    return list(counts.index[:n])


def mtat_tracks(
    annotations: pd.DataFrame,
    *,
    audio_root: Path,
    n_tags: int = 50,
    split: Literal["folder", "lists"] = "folder",
    split_lists: Mapping[str, Path] | None = None,
) -> pd.DataFrame:
    """Tracks table from MTAT annotations: top-``n_tags`` tags, a split, absolute paths.

    ``split="folder"`` is the papers' split by mp3 folder (0-b train, c valid, d-f test).
    ``split="lists"`` reads ``split_lists`` (keys among ``train``/``valid``/``test``, one
    text file each, as the cleaned split of later work is distributed): one clip per
    line, written as ``clip_id``, ``clip_id<TAB>mp3_path`` or an mp3 path. Clips no list
    names get split ``unused``.

    Clips whose mp3 is missing under ``audio_root`` are kept: decoding quarantines them
    with a reason, so nothing is dropped silently.
    """
    if split == "folder":
        if split_lists is not None:
            raise ParameterError("split_lists is only read with split='lists'; pass split='lists' or drop split_lists")
        splits = annotations["mp3_path"].map(mtat_folder_split)
    elif split == "lists":
        if not split_lists:
            raise ParameterError("split='lists' needs split_lists={'train': path, 'valid': path, 'test': path}")
        splits = _mtat_list_splits(annotations, split_lists)
    else:
        raise ParameterError(f"MTAT split {split!r} is not one of 'folder', 'lists'")
    tags = top_tags(annotations, n=n_tags)
    tag_matrix = annotations[tags].to_numpy(dtype=bool)
    tag_lists = [[tags[j] for j in np.flatnonzero(row)] for row in tag_matrix]
    audio_root = Path(audio_root).resolve()
    return pd.DataFrame(
        {
            "track_id": annotations["clip_id"].astype(str),
            "source_path": [str(audio_root / p) for p in annotations["mp3_path"]],
            "split": splits,
            "tags": tag_lists,
        }
    )


def _mtat_list_splits(annotations: pd.DataFrame, split_lists: Mapping[str, Path]) -> pd.Series:
    """Split of each annotated clip from MTAT split lists; ``unused`` where no list names it."""
    clip_ids = annotations["clip_id"].astype(np.int64)
    known_ids = set(clip_ids)
    paths = annotations["mp3_path"].map(_path_tail)
    by_path = dict(zip(paths, clip_ids))
    names = paths.map(lambda p: p.rsplit("/", 1)[-1])
    name_counts = names.value_counts()
    by_name = {n: c for n, c in zip(names, clip_ids) if name_counts[n] == 1}

    def clip_of(entry: str) -> int | None:
        first = entry.split("\t", 1)[0].strip()
        if first.isdigit():
            return int(first) if int(first) in known_ids else None
        tail = _path_tail(first)
        if tail in by_path:
            return by_path[tail]
        return by_name.get(tail.rsplit("/", 1)[-1])

    assigned = _read_split_lists(split_lists, key_of=clip_of, what="MTAT clip in the annotations")
    return clip_ids.map(lambda c: assigned.get(c, UNUSED)).rename("split")


def _path_tail(path: str) -> str:
    """The last two components of a path (``"/x/mtat/f/a.mp3"`` -> ``"f/a.mp3"``), slash-separated."""
    parts = [p for p in path.strip().replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:])


def _read_split_lists(
    split_lists: Mapping[str, Path],
    *,
    key_of: Callable[[str], object | None],
    what: str,
    unknown_ok: bool = False,
) -> dict:
    """Read one list file per split into {key: split}.

    ``key_of`` turns a line into the key the adapter matches on (None: the line names
    nothing known, an error unless ``unknown_ok``). Blank lines and ``#`` comments are
    skipped; a key listed in two splits is an error.
    """
    unknown_splits = sorted(set(split_lists) - set(SPLITS))
    if unknown_splits:
        raise ParameterError(f"split list keys {unknown_splits} are not among {list(SPLITS)}")
    assigned: dict = {}
    where: dict = {}
    for split_name in SPLITS:
        if split_name not in split_lists:
            continue
        path = Path(split_lists[split_name])
        if not path.is_file():
            raise DatasetError(
                f"{split_name} split list not found at {path}; check the path or the split_dir/split_lists argument"
            )
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for lineno, line in enumerate(lines, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            key = key_of(entry)
            if key is None:
                if unknown_ok:
                    continue
                raise DatasetError(
                    f"{path}:{lineno}: {entry[:200]!r} names no {what}; "
                    "is this list for the same dataset and annotations file?"
                )
            if key in assigned and assigned[key] != split_name:
                raise DatasetError(
                    f"{path}:{lineno}: {key!r} is already in the {assigned[key]} split ({where[key]}); a track may be in one split only"
                )
            assigned[key] = split_name
            where[key] = f"{path}:{lineno}"
    return assigned


def gtzan_tracks(
    root: Path,
    *,
    split: Literal["random", "filtered"] = "filtered",
    split_dir: Path | None = None,
    seed: int = 0,
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
) -> pd.DataFrame:
    """Tracks table from a GTZAN folder: one tag per track, its genre.

    ``root`` holds ``<genre>/<genre>.000NN.<ext>`` or a flat folder of
    ``<genre>.000NN.<ext>`` (ext in wav, au, flac, ogg, mp3); the genre is the text
    before the first dot and the track id is ``<genre>.000NN``.

    ``split="filtered"`` reads ``train_filtered.txt``, ``valid_filtered.txt`` and
    ``test_filtered.txt`` from ``split_dir`` (default: ``root``); lines such as
    ``blues/blues.00012.wav`` match by ``blues.00012`` whatever the folder or extension.
    Tracks the lists leave out (the faults the filtered split removes) get split
    ``unused``. ``split="random"`` draws a split stratified by genre with
    ``fractions`` (train, valid, test), seeded by ``seed``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"GTZAN root {root} is not a folder; pass the folder holding <genre>/<genre>.000NN.wav files"
        )
    found: dict[str, Path] = {}
    for path in sorted([*root.glob("*.*"), *root.glob("*/*.*")]):
        match = GTZAN_NAME.match(path.name)
        if not path.is_file() or path.suffix.lower() not in AUDIO_SUFFIXES or match is None:
            continue
        track_id = f"{match['genre']}.{match['number']}"
        if path.parent != root and path.parent.name != match["genre"]:
            raise DatasetError(
                f"{path}: file of genre {match['genre']!r} sits in folder {path.parent.name!r}; move it or rename it"
            )
        if track_id in found:
            raise DatasetError(
                f"GTZAN track {track_id} is there twice: {found[track_id]} and {path}; "
                "keep one audio format per root (e.g. point root at the wav or the au files)"
            )
        found[track_id] = path.resolve()
    if not found:
        raise DatasetError(
            f"no GTZAN audio found under {root}: expected <genre>.000NN.<ext> files "
            f"(ext in {sorted(AUDIO_SUFFIXES)}) in it or in its genre folders"
        )
    track_ids = sorted(found)
    genres = [t.split(".", 1)[0] for t in track_ids]
    if split == "filtered":
        split_dir = root if split_dir is None else Path(split_dir)
        lists = {name: split_dir / f"{name}_filtered.txt" for name in SPLITS}
        assigned = _read_split_lists(lists, key_of=_gtzan_stem, what="GTZAN track (<genre>.000NN)")
        splits = [assigned.get(t, UNUSED) for t in track_ids]
    elif split == "random":
        splits = _stratified_split(track_ids, genres, seed=seed, fractions=fractions)
    else:
        raise ParameterError(f"GTZAN split {split!r} is not one of 'filtered', 'random'")
    return pd.DataFrame(
        {
            "track_id": track_ids,
            "source_path": [str(found[t]) for t in track_ids],
            "split": splits,
            "tags": [[g] for g in genres],
        }
    )


def _gtzan_stem(entry: str) -> str | None:
    """``"blues/blues.00012.wav"`` -> ``"blues.00012"``; None when the line is no GTZAN name."""
    match = GTZAN_NAME.match(entry.replace("\\", "/").rsplit("/", 1)[-1].strip())
    return None if match is None else f"{match['genre']}.{match['number']}"


def _stratified_split(
    track_ids: Sequence[str], strata: Sequence[str], *, seed: int, fractions: Sequence[float]
) -> list[str]:
    """Seeded split of ``track_ids`` with ``fractions`` of every stratum in train/valid/test.

    Each stratum is shuffled by its own generator (seed, crc32 of its name), so adding
    a genre does not reshuffle the others.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ParameterError(
            f"fractions {fractions} must be three non-negative numbers (train, valid, test) summing to 1"
        )
    by_stratum: dict[str, list[int]] = {}
    for i, stratum in enumerate(strata):
        by_stratum.setdefault(stratum, []).append(i)
    splits = [""] * len(track_ids)
    for stratum, indices in by_stratum.items():
        rng = np.random.default_rng([seed, zlib.crc32(stratum.encode())])
        order = [indices[j] for j in rng.permutation(len(indices))]
        n_train = round(len(order) * fractions[0])
        n_valid = min(round(len(order) * fractions[1]), len(order) - n_train)
        for rank, i in enumerate(order):
            splits[i] = "train" if rank < n_train else "valid" if rank < n_train + n_valid else "test"
    return splits


def manifest_tracks(path: Path, *, base_dir: Path | None = None) -> pd.DataFrame:
    """Tracks table from a generic manifest (CSV or Parquet).

    Columns: ``track_id``, ``path`` (relative paths resolve against ``base_dir``,
    default the manifest's folder), optional ``tags`` (Parquet list<string>, or a
    string separated by ``|`` or ``,``; ``|`` wins when any cell holds one) and
    optional ``split`` (train/valid/test/unused; default ``train`` when the column is absent).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"manifest not found at {path}")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            frame = storage.read_frame(path)
        elif suffix in (".csv", ".tsv", ".txt"):
            frame = pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
        else:
            raise DatasetError(
                f"manifest {path}: suffix {path.suffix!r} is neither CSV (.csv, .tsv) nor Parquet (.parquet)"
            )
    except DatasetError:
        raise
    except Exception as error:  # pandas/pyarrow parse errors: name the file instead of a deep traceback
        raise DatasetError(f"manifest {path} could not be read as {suffix[1:]}: {error}") from error
    missing = [c for c in ("track_id", "path") if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"manifest {path}: missing required columns {missing} (found {list(frame.columns)}); it needs track_id and path"
        )
    if frame.empty:
        raise DatasetError(f"manifest {path} has no rows; list one track per row")
    track_ids = frame["track_id"].map(_cell_text)
    _check_manifest_ids(path, track_ids)
    paths = frame["path"].map(_cell_text)
    if (paths == "").any():
        raise DatasetError(
            f"manifest {path}: empty path for track ids {_examples(track_ids[paths == ''])}; every track needs an audio path"
        )
    base = (path.parent if base_dir is None else Path(base_dir)).resolve()
    source_paths = [str(Path(p) if Path(p).is_absolute() else (base / p).resolve()) for p in paths]
    if "split" in frame.columns:
        splits = frame["split"].map(_cell_text).str.lower()
        bad = ~splits.isin([*SPLITS, UNUSED])
        if bad.any():
            values = sorted(set(frame.loc[bad, "split"].map(str)))
            raise DatasetError(
                f"manifest {path}: unknown split values {values[:10]} (track ids {_examples(track_ids[bad])}); "
                f"use one of {[*SPLITS, UNUSED]}, or drop the split column for all-train"
            )
    else:
        splits = pd.Series(["train"] * len(frame))
    tags = (
        _manifest_tags(path, frame["tags"], track_ids) if "tags" in frame.columns else [[] for _ in range(len(frame))]
    )
    return pd.DataFrame({"track_id": list(track_ids), "source_path": source_paths, "split": list(splits), "tags": tags})


def _cell_text(value: object) -> str:
    """A manifest cell as stripped text; missing values (None, NaN, NA) as ""."""
    return (
        "" if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) else str(value).strip()
    )


def _check_manifest_ids(path: Path, track_ids: pd.Series) -> None:
    if (track_ids == "").any():
        rows = [int(i) + 2 for i in np.flatnonzero((track_ids == "").to_numpy())[:5]]
        raise DatasetError(
            f"manifest {path}: empty track_id in rows {rows} (counting the header as row 1); every track needs an id"
        )
    duplicated = track_ids[track_ids.duplicated(keep=False)]
    if len(duplicated):
        raise DatasetError(
            f"manifest {path}: duplicate track ids {_examples(duplicated.drop_duplicates())}; track ids must be unique"
        )


def _manifest_tags(path: Path, column: pd.Series, track_ids: pd.Series) -> list[list[str]]:
    """Tags cells as lists of str: list-likes as they are, strings split on ``|`` (or ``,``), empty -> []."""
    strings = [v for v in column if isinstance(v, str)]
    separator = "|" if any("|" in v for v in strings) else ","
    out: list[list[str]] = []
    for track_id, value in zip(track_ids, column):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append([])
        elif isinstance(value, str):
            out.append([t.strip() for t in value.split(separator) if t.strip()])
        elif isinstance(value, (list, tuple, np.ndarray)):
            out.append([str(t).strip() for t in value if t is not None and str(t).strip()])
        else:
            raise DatasetError(
                f"manifest {path}: tags of track {track_id!r} are {type(value).__name__} {value!r}; use a list of strings or a '|'-separated string"
            )
    return out


def _examples(values: Iterable, n: int = 5) -> list:
    values = list(values)
    return values[:n] + ([f"... {len(values) - n} more"] if len(values) > n else [])


def heldout_track_ids(tracks_path: Path) -> list[str]:
    """Tracks of the test split: held out of the factorization in the cold-start protocol, in table order."""
    tracks = storage.read_frame(tracks_path, columns=["track_id", "split"])
    return list(tracks.loc[tracks["split"] == "test", "track_id"])


def tag_vocabulary(tracks: pd.DataFrame, *, n: int) -> list[str]:
    """The ``n`` most frequent tags of a tracks table, ties broken by name (as :func:`top_tags`)."""
    counts = Counter(tag for tags in tracks["tags"] for tag in tags)
    return [tag for tag, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def multi_hot(tracks: pd.DataFrame, tags: Sequence[str]) -> dict[str, np.ndarray]:
    """``{track_id: [shape=(len(tags),), float32]}``, 1 where the track carries the tag (others ignored)."""
    position = {tag: j for j, tag in enumerate(tags)}
    out = {}
    for track_id, track_tags in zip(tracks["track_id"], tracks["tags"]):
        vector = np.zeros(len(position), dtype=np.float32)
        vector[[position[t] for t in track_tags if t in position]] = 1.0
        out[track_id] = vector
    return out


def tracks_from_source(source: SourceSettings) -> pd.DataFrame:
    """The tracks table of a catalogue, through the adapter ``source.adapter`` names."""
    if source.adapter == "mtat":
        split = source.split or "folder"
        lists = None
        if split == "lists":
            if source.split_dir is None:
                raise ParameterError("MTAT split 'lists' needs split_dir: a folder with train.txt, valid.txt, test.txt")
            lists = {name: Path(source.split_dir) / f"{name}.txt" for name in SPLITS}
        annotations = read_mtat_annotations(source.path)
        return mtat_tracks(
            annotations,
            audio_root=source.audio_root or Path(source.path).parent,
            n_tags=source.n_tags,
            split=split,
            split_lists=lists,
        )
    if source.adapter == "gtzan":
        return gtzan_tracks(source.path, split=source.split or "filtered", split_dir=source.split_dir, seed=source.seed)
    if source.adapter == "manifest":
        return manifest_tracks(source.path)
    raise ParameterError(f"unknown adapter {source.adapter!r}; expected mtat, gtzan or manifest")
