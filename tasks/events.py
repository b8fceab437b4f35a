"""Listening events: validated, streaming ingestion into Parquet partitions with stable ids.

Source formats (:class:`ListeningSource`):

``triplets``
    Echo Nest Taste Profile ``train_triplets.txt``: ``user<TAB>song<TAB>plays``, no header.
``hetrec``
    HetRec 2011 Last.fm ``user_artists.dat``: header ``userID<TAB>artistID<TAB>weight``.
``events``
    Generic CSV (comma; tab for ``.tsv``) with a header, or Parquet: columns ``user``,
    ``item``, ``plays`` and an optional ``ts`` (ISO 8601 or Unix seconds).

Every row is checked: wrong column count, missing ids, play counts that are not
non-negative integers and unparsable timestamps become quarantine records with the file,
the line (for Parquet: the row) and the reason; everything else is kept. Duplicate
(user, item) rows of one batch are summed (their latest ``ts`` kept).

Layout under ``listening/``::

    events/batch=<id>/part-<r>.parquet user int32, item int32, plays int64, ts timestamp[s, UTC]; one
                                       part per user-id range r, sorted by (user, item)
    events/batch=<id>/_source.json     sha1 and counts of the source file; written last
    users.parquet, items.parquet       key string, id int32: ids in order of first sight,
                                       appended, never renumbered

Files are read in chunks with pyarrow, parsed, routed by user-id range and reduced one
range at a time (see "ingestion" below), so memory is one chunk or one range, not the file:
the 48M-row Taste Profile peaks at about 0.9 GiB (6.7 GiB when it was read whole). The same
steps run on a Dask cluster for logs that outgrow one machine.
"""

from __future__ import annotations

import glob
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from core import storage
from core.errors import DatasetError, ParameterError
from tasks.shards import append_quarantine, content_sha1

log = logging.getLogger("mirflow")

Format = Literal["auto", "triplets", "hetrec", "events"]
EVENT_SCHEMA = pa.schema(
    [
        pa.field("user", pa.int32(), nullable=False),
        pa.field("item", pa.int32(), nullable=False),
        pa.field("plays", pa.int64(), nullable=False),
        pa.field("ts", pa.timestamp("s", tz="UTC")),
    ]
)
ID_MAP_SCHEMA = pa.schema([pa.field("key", pa.string(), nullable=False), pa.field("id", pa.int32(), nullable=False)])
HETREC_HEADER = ["userID", "artistID", "weight"]
# Text read per block: bounds the memory of one parse step.
_BLOCK_BYTES = 64 << 20
_COUNT = r"^[0-9]{1,18}$"  # fits int64
_NEGATIVE = r"^-[0-9]+$"
_TEXT_LIMIT = 200  # characters of a bad line kept in its quarantine record


@dataclass(frozen=True)
class ListeningSource:
    """One listening file; its batch id defaults to the file name without its suffix."""

    path: Path
    format: Format = "auto"
    batch: str | None = None

    def resolved(self) -> ListeningSource:
        path = Path(self.path)
        fmt = self.format
        if fmt == "auto":
            if path.suffix.lower() in {".parquet", ".csv", ".tsv"}:
                fmt = "events"
            elif path.name == "user_artists.dat":
                fmt = "hetrec"
            else:
                fmt = "triplets"
        if fmt not in ("triplets", "hetrec", "events"):
            raise ParameterError(f"listening format {self.format!r} is unknown: use triplets, hetrec, events or auto")
        batch = (self.batch or path.stem).replace("=", "-").replace("/", "-")
        if not batch:
            raise ParameterError(f"{path}: empty batch id")
        return ListeningSource(path=path, format=fmt, batch=batch)


@dataclass
class BatchReport:
    """What one source contributed."""

    batch: str
    path: str
    skipped: bool = False  # unchanged since it was ingested
    rows: int = 0  # data rows read (header excluded)
    valid: int = 0
    malformed: int = 0
    events: int = 0  # distinct (user, item) pairs after summing duplicates
    new_users: int = 0
    new_items: int = 0
    seconds: float = 0.0


@dataclass
class IngestReport:
    batches: list[BatchReport] = field(default_factory=list)
    quarantined: int = 0  # total records in the quarantine file afterwards

    @property
    def batch_ids(self) -> list[str]:
        return [b.batch for b in self.batches]

    def totals(self) -> dict[str, int]:
        keys = ("rows", "valid", "malformed", "events", "new_users", "new_items")
        return {k: int(sum(getattr(b, k) for b in self.batches)) for k in keys}


# ---------------------------------------------------------------- id maps


class IdMap:
    """Stable key -> int32 id map stored as Parquet (``key``, ``id`` = row position)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists():
            table = storage.read_parquet(self.path, schema=ID_MAP_SCHEMA)
            ids = table.column("id").to_numpy()
            if not np.array_equal(ids, np.arange(len(ids))):
                raise DatasetError(f"{self.path}: ids are not 0..n-1 in order; the id map is damaged")
            self._keys = table.column("key").combine_chunks()
        else:
            self._keys = pa.array([], pa.string())
        self._saved = len(self._keys)
        self._new: list[pa.Array] = []

    def __len__(self) -> int:
        return len(self._keys) + sum(len(a) for a in self._new)

    @property
    def keys(self) -> pa.Array:
        if self._new:
            self._keys = pa.concat_arrays([self._keys, *self._new])
            self._new = []
        return self._keys

    def lookup(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids of ``keys``; -1 where a key is unknown. Nothing is added."""
        ids = pc.index_in(keys, value_set=self.keys)
        return ids.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)

    def ids(self, keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Ids of ``keys`` (non-null strings), appending the unseen ones in order of first sight."""
        # One hash lookup against the known keys; only the unseen ones are looked up again.
        found = pc.index_in(keys, value_set=self.keys)
        missing = pc.is_null(found)
        if not pc.any(missing).as_py():
            return found.to_numpy(zero_copy_only=False).astype(np.int32)
        unseen = pc.unique(pc.filter(keys, missing))
        if isinstance(unseen, pa.ChunkedArray):
            unseen = unseen.combine_chunks()
        unseen = unseen.cast(pa.string())
        start = len(self)
        if start + len(unseen) > np.iinfo(np.int32).max:
            raise DatasetError(f"{self.path}: more than 2^31 - 1 ids")
        self._new.append(unseen)
        ids = found.to_numpy(zero_copy_only=False)  # float with NaN where missing
        fresh = pc.index_in(pc.filter(keys, missing), value_set=unseen).to_numpy(zero_copy_only=False) + start
        mask = missing.to_numpy(zero_copy_only=False)
        out = np.where(mask, 0, np.nan_to_num(ids, nan=0)).astype(np.int32)
        out[mask] = fresh
        return out

    @property
    def added(self) -> int:
        return len(self) - self._saved

    def save(self) -> None:
        if self.added or not self.path.exists():
            keys = self.keys
            table = pa.table({"key": keys, "id": pa.array(np.arange(len(keys), dtype=np.int32))}, schema=ID_MAP_SCHEMA)
            storage.write_parquet(self.path, table, row_group_size=1 << 20)
            self._saved = len(keys)


def read_id_map(path: Path) -> np.ndarray:
    """Keys of an id map in id order (object array of str); empty when there is none."""
    if not Path(path).exists():
        return np.asarray([], dtype=object)
    return storage.read_parquet(path, columns=["key"]).column("key").to_numpy(zero_copy_only=False)


# ---------------------------------------------------------------- readers


@dataclass
class _Malformed:
    """Bad rows of one file, located by position until all line numbers are known."""

    path: Path
    unit: str  # "line" or "row"
    header_lines: int = 0
    by_line: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, text): column-count errors
    by_position: list[tuple[int, str, str]] = field(default_factory=list)  # (1-based parsed row, reason, text)
    lines: int = 0  # physical lines (Parquet: rows) of the part read, to number the next part's lines

    def __len__(self) -> int:
        return len(self.by_line) + len(self.by_position)

    def located(self) -> list[tuple[int, str, str]]:
        """(line or row number, reason, text) of every bad row, in order; numbers count from this part's start."""
        lines = sorted(line for line, _, _ in self.by_line)
        # Parsed row p sits on line header + p + (rows skipped before it); the j-th skipped
        # line (0-based, sorted) is preceded by (line_j - header - j - 1) parsed rows.
        before = np.asarray(lines, dtype=np.int64) - self.header_lines - np.arange(len(lines)) - 1
        out = []
        for position, reason, text in self.by_position:
            line = self.header_lines + position + int(np.searchsorted(before, position, side="left"))
            out.append((line, reason, text))
        out.extend(self.by_line)
        out.sort()
        return out

    def records(self) -> list[dict]:
        """Quarantine records, each with the file's physical line (or Parquet row) number."""
        return quarantine_records(self.path, self.unit, self.located())


def quarantine_records(path: Path, unit: str, located: Sequence[tuple[int, str, str]], offset: int = 0) -> list[dict]:
    """Quarantine records of bad rows located in a file (``offset`` lines or rows before the part they count from)."""
    return [
        {
            "path": f"{path}:{line + offset}" if unit == "line" else f"{path}#row{line + offset}",
            "stage": "listening",
            "reason": f"{reason}: {text[:_TEXT_LIMIT]!r}" if text else reason,
        }
        for line, reason, text in located
    ]


def _csv_blocks(
    source: Path | pa.NativeFile, *, delimiter: str, names: list[str], header: bool, bad: _Malformed
) -> Iterator[pa.RecordBatch]:
    """Blocks of string columns; rows with the wrong column count go to ``bad`` with their line."""

    def invalid(row) -> str:
        text = row.text or ""
        if row.actual_columns == 1 and not text.strip():
            reason = "empty line"
        else:
            reason = f"expected {row.expected_columns} {'tab' if delimiter == chr(9) else repr(delimiter)}-separated fields, got {row.actual_columns}"
        bad.by_line.append((int(row.number) if row.number is not None else -1, reason, text))
        return "skip"

    reader = pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(
            column_names=names, skip_rows=1 if header else 0, use_threads=False, block_size=_BLOCK_BYTES
        ),
        parse_options=pacsv.ParseOptions(
            delimiter=delimiter,
            quote_char=False if delimiter == "\t" else '"',
            ignore_empty_lines=False,
            invalid_row_handler=invalid,
        ),
        convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            check_utf8=False,
        ),
    )
    yield from reader


def _header(path: Path, delimiter: str) -> list[str]:
    with open(path, "rb") as handle:
        first = handle.readline().decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r\n")
    return [name.strip() for name in first.split(delimiter)]


def _raw_blocks(source: ListeningSource, bad: _Malformed, chunk: Chunk | None = None) -> Iterator[pa.RecordBatch]:
    """String (or, for Parquet, typed) blocks with columns user, item, plays[, ts]: of the whole file, or of ``chunk``.

    Bad rows go to ``bad`` numbered from the chunk's first line (or row).
    """
    path = source.path
    if source.format == "events" and path.suffix.lower() == ".parquet":
        bad.unit = "row"
        file = _parquet_file(path)
        names = file.schema_arrow.names
        _check_event_columns(path, names)
        columns = [c for c in ("user", "item", "plays", "ts") if c in names]
        groups = list(range(file.metadata.num_row_groups) if chunk is None else range(chunk.start, chunk.end))
        bad.lines = sum(file.metadata.row_group(g).num_rows for g in groups)
        if groups:
            yield from file.iter_batches(batch_size=1 << 20, columns=columns, row_groups=groups)
        return
    delimiter, names, header = _text_layout(source)
    header = header and (chunk is None or chunk.start == 0)
    bad.header_lines = 1 if header else 0
    if chunk is None:
        if path.stat().st_size == 0:
            return
        yield from _csv_blocks(path, delimiter=delimiter, names=names, header=header, bad=bad)
        return
    with open(path, "rb") as handle:
        handle.seek(chunk.start)
        text = handle.read(chunk.end - chunk.start)
    # Line breaks as the CSV reader sees them: \n, \r\n, and a lone \r.
    bad.lines = text.count(b"\n") + text.count(b"\r") - text.count(b"\r\n")
    bad.lines += 0 if not text or text.endswith((b"\n", b"\r")) else 1
    if text:
        yield from _csv_blocks(pa.BufferReader(text), delimiter=delimiter, names=names, header=header, bad=bad)


def _text_layout(source: ListeningSource) -> tuple[str, list[str], bool]:
    """(delimiter, column names, has a header) of a text format, its header checked: HetRec's, or an events
    file's columns."""
    path = source.path
    if source.format == "triplets":
        return "\t", ["user", "item", "plays"], False
    if source.format == "hetrec":
        found = _header(path, "\t")
        if found != HETREC_HEADER:
            raise DatasetError(f"{path}: header {found} is not HetRec user_artists.dat's {HETREC_HEADER}")
        return "\t", ["user", "item", "plays"], True
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    names = _header(path, delimiter)
    _check_event_columns(path, names)
    return delimiter, names, True


def _parquet_file(path: Path):
    try:
        return storage.parquet_file(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DatasetError(f"{path}: not a readable Parquet file: {exc}") from exc


def _check_event_columns(path: Path, names: Sequence[str]) -> None:
    missing = [c for c in ("user", "item", "plays") if c not in names]
    if missing:
        raise DatasetError(
            f"{path}: missing columns {missing} (found {list(names)}); "
            "listening events need user, item, plays and optionally ts"
        )


# ---------------------------------------------------------------- validation


def _invalid_utf8(column: pa.Array) -> np.ndarray | None:
    """Rows of a string column (read without UTF-8 checks) that are not valid UTF-8; None when all are."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    try:
        column.validate(full=True)
        return None
    except pa.ArrowInvalid:
        raw = column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary()).to_pylist()
        bad = np.zeros(len(raw), dtype=bool)
        for i, value in enumerate(raw):
            try:
                value is None or value.decode("utf-8")
            except UnicodeDecodeError:
                bad[i] = True
        return bad


def _as_trimmed_strings(column: pa.Array) -> pa.Array:
    """Ids as trimmed strings (null where missing) from string, integer, integral float,
    dictionary or all-null columns."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return pa.nulls(len(column), pa.string())
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return pc.utf8_trim_whitespace(column).cast(pa.string())
    if pa.types.is_integer(column.type):
        return column.cast(pa.string())
    if pa.types.is_floating(column.type):
        # pandas writes integer ids with gaps as floats: 123.0 -> "123"; other floats stay as written
        values = column.to_numpy(zero_copy_only=False)
        integral = np.isfinite(values) & (np.floor(values) == values) & (np.abs(values) < 2.0**62)
        text = [str(int(v)) if i else (None if np.isnan(v) else repr(float(v))) for v, i in zip(values, integral)]
        return pa.array(text, pa.string())
    raise DatasetError(f"ids must be strings or numbers, got {column.type}")


def _parse_counts(column: pa.Array) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(counts int64, ok mask, reason per bad row) for a plays column of any supported type."""
    n = len(column)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        text = pc.utf8_trim_whitespace(column)
        ok = pc.fill_null(pc.match_substring_regex(text, _COUNT), False).to_numpy(zero_copy_only=False)
        counts = np.zeros(n, dtype=np.int64)
        if ok.any():
            counts[ok] = pc.cast(text.filter(pa.array(ok)), pa.int64()).to_numpy()
        reasons: list[str | None] = [None] * n
        if not ok.all():
            negative = pc.fill_null(pc.match_substring_regex(text, _NEGATIVE), False).to_numpy(zero_copy_only=False)
            values = text.to_pylist()
            for i in np.flatnonzero(~ok):
                value = values[i]
                if not value:
                    reasons[i] = "missing play count"
                elif negative[i]:
                    reasons[i] = f"negative play count {value}"
                else:
                    reasons[i] = f"play count {value!r} is not a non-negative integer"
        return counts, ok, reasons
    if pa.types.is_null(column.type):
        return np.zeros(n, dtype=np.int64), np.zeros(n, dtype=bool), ["missing play count"] * n
    if pa.types.is_dictionary(column.type):
        return _parse_counts(column.cast(column.type.value_type))
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        values = column.cast(pa.float64()).to_numpy(zero_copy_only=False)  # nulls -> nan
        ok = np.isfinite(values) & (values >= 0) & (np.floor(values) == values) & (values < 2.0**62)
        counts = np.where(ok, values, 0).astype(np.int64)
        if pa.types.is_integer(column.type):  # exact, without the float round trip
            counts[ok] = column.filter(pa.array(ok)).to_numpy(zero_copy_only=False).astype(np.int64)
        reasons = [None] * n
        for i in np.flatnonzero(~ok):
            v = values[i]
            reasons[i] = (
                "missing play count"
                if np.isnan(v)
                else f"negative play count {v:g}"
                if v < 0
                else f"play count {v!r} is not a non-negative integer"
            )
        return counts, ok, reasons
    raise DatasetError(f"plays must be integers or strings of integers, got {column.type}")


# Unix seconds accepted as timestamps: years 1 to 9999.
_TS_RANGE = (-62_135_596_800, 253_402_300_799)


def _parse_ts(column: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Timestamps (seconds, UTC) and an ok mask; empty values are null and fine.

    Accepted: timestamp columns, integer or float Unix seconds (years 1 to 9999), and
    strings holding either Unix seconds or ISO 8601; anything else, or out of that range, is a row error.
    """
    n = len(column)
    if pa.types.is_null(column.type):
        return pa.nulls(n, pa.timestamp("s", tz="UTC")), np.ones(n, dtype=bool)
    if pa.types.is_timestamp(column.type):
        ts = column.cast(pa.timestamp("s", tz=column.type.tz or "UTC"), safe=False)
        return ts.cast(pa.timestamp("s", tz="UTC")), np.ones(n, dtype=bool)
    seconds = np.full(n, np.nan)
    ok = np.ones(n, dtype=bool)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        seconds = column.cast(pa.float64()).to_numpy(zero_copy_only=False)
        ok = np.isnan(seconds) | np.isfinite(seconds)
    else:
        text = pd.Series(column.to_pylist(), dtype=object).fillna("").astype(str).str.strip()
        empty = (text == "").to_numpy()
        numeric = text.str.fullmatch(r"-?[0-9]{1,12}(\.[0-9]*)?").to_numpy()
        seconds[numeric] = text[numeric].astype(np.float64).to_numpy()
        rest = ~numeric & ~empty
        if rest.any():
            parsed = pd.to_datetime(text[rest], utc=True, errors="coerce", format="ISO8601")
            good = parsed.notna().to_numpy()
            index = np.flatnonzero(rest)
            seconds[index[good]] = parsed[good].dt.tz_convert(None).to_numpy().astype("datetime64[s]").astype(np.int64)
            ok[index[~good]] = False
    finite = np.isfinite(seconds)
    in_range = finite & (seconds >= _TS_RANGE[0]) & (seconds <= _TS_RANGE[1])
    ok &= ~finite | in_range
    values = np.where(in_range, np.floor(np.where(in_range, seconds, 0)), 0).astype(np.int64)
    return pa.array(values, type=pa.int64(), mask=~in_range).cast(pa.timestamp("s", tz="UTC")), ok


def _row_text(block: pa.RecordBatch, rows: np.ndarray, delimiter: str) -> list[str]:
    columns = [block.column(i).take(pa.array(rows)).to_pylist() for i in range(block.num_columns)]
    return [delimiter.join("" if v is None else str(v) for v in values) for values in zip(*columns)]


def _validate(block: pa.RecordBatch, *, first_position: int, bad: _Malformed, delimiter: str) -> pa.Table:
    """Valid rows of ``block`` as (user str, item str, plays int64, ts); bad ones go to ``bad``."""
    n = block.num_rows
    not_utf8 = np.zeros(n, dtype=bool)
    columns = {name: block.column(name) for name in block.schema.names}
    for column in columns.values():
        bad_rows = _invalid_utf8(column)
        if bad_rows is not None:
            not_utf8 |= bad_rows
    if not_utf8.any():
        # Blank the undecodable values so that the checks below can run, then report the rows as such.
        raw = {name: columns[name] for name in columns}
        for name, column in columns.items():
            if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
                column = column.cast(pa.binary() if pa.types.is_string(column.type) else pa.large_binary())
                columns[name] = pc.if_else(pa.array(not_utf8), pa.scalar(b"", column.type), column).cast(pa.string())
        block = pa.RecordBatch.from_pydict(columns)
        texts = [
            repr(b)
            for b in zip(
                *(raw[name].cast(pa.binary()).take(pa.array(np.flatnonzero(not_utf8))).to_pylist() for name in raw)
            )
        ]
        for row, text in zip(np.flatnonzero(not_utf8), texts):
            bad.by_position.append((first_position + int(row), "not valid UTF-8", text))
    user = _as_trimmed_strings(block.column("user"))
    item = _as_trimmed_strings(block.column("item"))
    counts, ok, reasons = _parse_counts(block.column("plays"))
    user_missing = pc.fill_null(pc.equal(user, ""), True).to_numpy(zero_copy_only=False)
    item_missing = pc.fill_null(pc.equal(item, ""), True).to_numpy(zero_copy_only=False)
    names = block.schema.names
    if "ts" in names:
        ts, ts_ok = _parse_ts(block.column("ts"))
    else:
        ts, ts_ok = pa.nulls(n, pa.timestamp("s", tz="UTC")), np.ones(n, dtype=bool)
    good = ok & ~user_missing & ~item_missing & ts_ok & ~not_utf8
    if not (good | not_utf8).all():
        rows = np.flatnonzero(~good & ~not_utf8)
        texts = _row_text(block, rows, delimiter)
        for row, text in zip(rows, texts):
            if user_missing[row] and item_missing[row] and not text.strip(delimiter + " "):
                reason = "empty line"
            elif user_missing[row]:
                reason = "missing user id"
            elif item_missing[row]:
                reason = "missing item id"
            elif not ok[row]:
                reason = reasons[row]
            else:
                reason = (
                    f"timestamp {block.column('ts')[int(row)].as_py()!r} is neither ISO 8601 nor Unix seconds "
                    "in a supported range"
                )
            bad.by_position.append((first_position + int(row), reason, "" if reason == "empty line" else text))
    mask = pa.array(good)
    return pa.table(
        {
            "user": user.filter(mask),
            "item": item.filter(mask),
            "plays": pa.array(counts[good]),
            "ts": ts.filter(mask),
        }
    )


# ---------------------------------------------------------------- ingestion
#
# One file is ingested in three steps, each a map over independent parts, so that a
# Dask cluster can run them (``map_fn``) and memory stays bounded by a part:
#
#   1. parse_chunk   a chunk of the file (whole lines, or Parquet row groups): validation,
#                    and the chunk's keys encoded in order of first sight; rows spilled
#                    with those chunk-local codes.
#   2. (here)        the chunks' keys, in chunk order, extend the id maps: the one writer
#                    of ids, so ids are the order of first sight in the file whatever ran
#                    where and when.
#      route_chunk   a chunk's rows with their global ids, cut into user-id ranges.
#   3. reduce_range  one user-id range of every chunk: duplicates summed, sorted, written
#                    as one Parquet part; parts in range order are sorted by (user, item).
#
# Everything is written under a staging folder beside the batch and swapped in at the end,
# so a batch that fails part-way leaves the batch ingested before it untouched.

# Bytes of text (or Parquet row groups) per chunk: one chunk's parse is the step's memory.
CHUNK_BYTES = _BLOCK_BYTES
# Events per user-id range are chosen so that one range's reduce (about six copies of its
# 24-byte rows: the concatenation, the hash group-by and the sort) stays near this.
RANGE_BYTES = 256 << 20
_REDUCE_BYTES_PER_ROW = 24 * 6
Mapper = Callable[..., list]


def run_here(fn: Callable, items: Sequence, *, description: str, unit: str, **kwargs) -> list:
    """The plain ``map_fn``: ``fn(item, **kwargs)`` for each item, in order, in this process.

    The flows hand down ``infra.progress.run_here`` instead (the same, with progress in ``unit``/s).
    """
    return [fn(item, **kwargs) for item in items]


@dataclass(frozen=True)
class Chunk:
    """Part of one listening file: bytes [start, end) of a text file (whole lines), or Parquet row groups."""

    index: int
    start: int
    end: int


def plan_chunks(source: ListeningSource, chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut a file into chunks of about ``chunk_bytes``: at line ends for text, at row groups for Parquet."""
    source = source.resolved()
    path = source.path
    if source.format == "events" and path.suffix.lower() == ".parquet":
        meta = _parquet_file(path).metadata
        cuts, size = [0], 0
        for group in range(meta.num_row_groups):
            size += meta.row_group(group).total_byte_size
            if size >= chunk_bytes and group + 1 < meta.num_row_groups:
                cuts.append(group + 1)
                size = 0
        cuts.append(meta.num_row_groups)
    else:
        _text_layout(source)  # an empty file with a wrong (or no) header is refused as before
        total = path.stat().st_size
        if total == 0:
            return []
        cuts = [0]
        with open(path, "rb") as handle:
            while cuts[-1] + chunk_bytes < total:
                handle.seek(cuts[-1] + chunk_bytes - 1)
                while (piece := handle.readline(1 << 20)) and not piece.endswith(b"\n"):
                    pass  # to the end of the line that holds the nominal cut, 1 MiB at a time
                if handle.tell() >= total:
                    break
                cuts.append(handle.tell())
        cuts.append(total)
    return [Chunk(i, a, b) for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:]))]


@dataclass
class ParsedChunk:
    """What step 1 made of a chunk: counts, its bad rows and its spilled rows and keys."""

    index: int
    lines: int  # physical lines (text) or rows (Parquet) of the chunk, to number the next chunk's lines
    rows: int  # data rows parsed
    skipped: int  # lines dropped by the parser (wrong column count), not among ``rows``
    bad: list[tuple[int, str, str]]  # (line or row from the chunk's start, reason, text)
    unit: str
    valid: int
    rows_path: str
    users_path: str
    items_path: str


def _write_ipc(path: Path, table: pa.Table) -> str:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return str(path)


def _read_ipc(path: str | Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def _encode(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """(codes int32, keys in order of first sight) of a string column."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    encoded = column.dictionary_encode()
    return encoded.indices.cast(pa.int32()), encoded.dictionary


def parse_chunk(chunk: Chunk, *, source: ListeningSource, spill_dir: str | Path) -> ParsedChunk:
    """Step 1: validate a chunk; spill its rows with chunk-local key codes, and its keys."""
    source = source.resolved()
    spill = Path(spill_dir)
    bad = _Malformed(path=source.path, unit="line")
    delimiter = "," if source.format == "events" and source.path.suffix.lower() == ".csv" else "\t"
    parts = []
    position = 1
    for block in _raw_blocks(source, bad, chunk):
        valid = _validate(block, first_position=position, bad=bad, delimiter=delimiter)
        position += block.num_rows
        if valid.num_rows:
            parts.append(valid)
    valid = (
        pa.concat_tables(parts)
        if parts
        else pa.table(
            {
                "user": pa.array([], pa.string()),
                "item": pa.array([], pa.string()),
                "plays": pa.array([], pa.int64()),
                "ts": pa.array([], pa.timestamp("s", tz="UTC")),
            }
        )
    )
    del parts
    user_codes, user_keys = _encode(valid.column("user"))
    item_codes, item_keys = _encode(valid.column("item"))
    stem = spill / f"chunk-{chunk.index:06d}"
    rows_path = _write_ipc(
        stem.with_suffix(".rows.arrow"),
        pa.table({"user": user_codes, "item": item_codes, "plays": valid.column("plays"), "ts": valid.column("ts")}),
    )
    rows_per_user = np.bincount(user_codes.to_numpy(), minlength=len(user_keys)).astype(np.int64)
    users_path = _write_ipc(
        stem.with_suffix(".users.arrow"), pa.table({"key": user_keys.cast(pa.string()), "rows": rows_per_user})
    )
    items_path = _write_ipc(stem.with_suffix(".items.arrow"), pa.table({"key": item_keys.cast(pa.string())}))
    return ParsedChunk(
        index=chunk.index,
        lines=int(bad.lines),
        rows=position - 1,
        skipped=len(bad.by_line),
        bad=bad.located(),
        unit=bad.unit,
        valid=valid.num_rows,
        rows_path=rows_path,
        users_path=users_path,
        items_path=items_path,
    )


@dataclass
class RoutedChunk:
    """A chunk's rows with global ids, one IPC record batch per user-id range present."""

    path: str
    ranges: dict[int, int]  # range -> record batch in the file


def route_chunk(job: tuple[ParsedChunk, str], *, edges: np.ndarray) -> RoutedChunk:
    """Step 2: a chunk's rows with global ids (``job``: the chunk, and the ``.npz`` of its user and item
    code -> id arrays), cut into user-id ranges: range r holds ids in [edges[r-1], edges[r]).

    Its inputs stay where they are (the driver removes the spill folder), so that Dask can run it again.
    """
    parsed, ids_path = job
    ids = storage.read_npz(ids_path)
    user_ids, item_ids = ids["users"], ids["items"]
    table = _read_ipc(parsed.rows_path)
    users = np.asarray(user_ids, dtype=np.int32)[table.column("user").to_numpy()]
    items = np.asarray(item_ids, dtype=np.int32)[table.column("item").to_numpy()]
    ranges = np.searchsorted(np.asarray(edges, dtype=np.int64), users, side="right")
    order = np.argsort(ranges, kind="stable")
    ranges = ranges[order]
    routed = pa.table(
        {
            "user": pa.array(users[order], pa.int32()),
            "item": pa.array(items[order], pa.int32()),
            "plays": table.column("plays").take(order),
            "ts": table.column("ts").take(order),
        },
        schema=EVENT_SCHEMA,
    )
    starts = np.flatnonzero(np.r_[True, ranges[1:] != ranges[:-1]]) if len(ranges) else np.array([], np.int64)
    ends = np.r_[starts[1:], len(ranges)]
    path = Path(parsed.rows_path).with_suffix("").with_suffix(".routed.arrow")
    index = {}
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, EVENT_SCHEMA) as writer:
        for i, (a, b) in enumerate(zip(starts, ends)):
            writer.write_batch(routed.slice(int(a), int(b - a)).combine_chunks().to_batches()[0])
            index[int(ranges[a])] = i
    return RoutedChunk(path=str(path), ranges=index)


def reduce_range(job: tuple[int, list[tuple[str, int]]], *, out_dir: str | Path) -> tuple[str, int]:
    """Step 3: one user-id range of every chunk, duplicates summed (latest ts kept), sorted by (user, item),
    written as ``part-<range>.parquet``; returns (file name, events)."""
    number, pieces = job
    if not Path(out_dir).is_dir():  # the ingestion was abandoned (a cancelled task still running): write nothing
        raise DatasetError(f"{out_dir} is gone: the ingestion it belonged to was given up")
    batches = []
    for path, batch in pieces:
        with pa.memory_map(path) as source:
            batches.append(pa.ipc.open_file(source).get_batch(batch))
    events = pa.Table.from_batches(batches, schema=EVENT_SCHEMA)
    events = events.group_by(["user", "item"], use_threads=True).aggregate([("plays", "sum"), ("ts", "max")])
    events = events.rename_columns(["user", "item", "plays", "ts"]).cast(EVENT_SCHEMA)
    events = events.sort_by([("user", "ascending"), ("item", "ascending")])
    name = f"part-{number:05d}.parquet"
    storage.write_parquet(Path(out_dir) / name, events, row_group_size=1 << 20)
    return name, events.num_rows


def _batch_dir(listening_dir: Path, batch: str) -> Path:
    return Path(listening_dir) / "events" / f"batch={batch}"


def batch_parts(listening_dir: Path, batch: str) -> list[Path]:
    """The Parquet parts of a batch in user-id order (``part-0.parquet`` for batches ingested whole)."""
    return sorted(_batch_dir(listening_dir, batch).glob("part-*.parquet"), key=lambda p: int(p.stem.split("-")[1]))


def ingested_batches(listening_dir: Path) -> list[str]:
    """Batch ids whose ingestion completed (their ``_source.json`` exists), sorted."""
    root = Path(listening_dir) / "events"
    return sorted(p.name.split("=", 1)[1] for p in root.glob("batch=*") if (p / "_source.json").exists())


def batch_record(listening_dir: Path, batch: str) -> dict:
    """The ``_source.json`` of an ingested batch."""
    try:
        return storage.read_json(_batch_dir(listening_dir, batch) / "_source.json")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"batch {batch!r} is not ingested under {listening_dir}: {exc}") from exc


def _range_edges(ids: list[np.ndarray], rows: list[np.ndarray], *, n_ranges: int) -> np.ndarray:
    """First ids of user-id ranges 1..n-1 holding about equal numbers of this batch's rows.

    Cut by rows, not by id width: a later batch's users are mostly new (the highest ids),
    and a few users can hold many rows.
    """
    ids = np.concatenate(ids) if ids else np.array([], np.int64)
    if n_ranges <= 1 or len(ids) == 0:
        return np.array([], np.int64)
    low = int(ids.min())
    per_id = np.bincount(ids - low, weights=np.concatenate(rows).astype(np.float64))
    cumulative = np.cumsum(per_id)
    targets = cumulative[-1] * np.arange(1, n_ranges) / n_ranges
    return np.unique(np.searchsorted(cumulative, targets, side="right") + low).astype(np.int64)


def ingest_source(
    source: ListeningSource,
    *,
    listening_dir: Path,
    users: IdMap,
    items: IdMap,
    quarantine_path: Path,
    map_fn: Mapper = run_here,
    chunk_bytes: int = CHUNK_BYTES,
    range_bytes: int = RANGE_BYTES,
) -> BatchReport:
    """Ingest one file as one batch in three mapped steps (see above); unchanged sources are skipped.

    ``map_fn(fn, items, description=, unit=, **kwargs)`` runs a step's parts: in this
    process by default, or on a Dask cluster (``infra.cluster.map_batches``), with the
    same result. The id maps are extended here, by the caller's process only.
    """
    source = source.resolved()
    path = source.path
    if not path.is_file():
        raise DatasetError(f"listening file not found: {path}")
    report = BatchReport(batch=source.batch, path=str(path))
    out = _batch_dir(listening_dir, source.batch)
    marker = out / "_source.json"
    sha1 = content_sha1(path)
    try:
        if storage.read_json(marker)["sha1"] == sha1 and batch_parts(listening_dir, source.batch):
            report.skipped = True
            return report
    except (OSError, ValueError, KeyError):
        pass

    start = time.perf_counter()
    for stale in [
        *out.parent.glob(f".staging-{glob.escape(source.batch)}-*"),
        *out.parent.glob(f".old-{glob.escape(source.batch)}-*"),
    ]:
        shutil.rmtree(stale, ignore_errors=True)  # left by an ingestion of this batch that was killed
    # Absolute paths: the parts may run in processes (Dask workers) started in another folder.
    staging = out.parent.absolute() / f".staging-{source.batch}-{uuid.uuid4().hex[:8]}"
    spill = staging / "spill"
    spill.mkdir(parents=True)
    try:
        chunks = plan_chunks(source, chunk_bytes)
        parsed = map_fn(
            parse_chunk,
            chunks,
            description=f"ingest {path.name}: parse",
            unit="chunks",
            source=ListeningSource(path.absolute(), source.format, source.batch),
            spill_dir=str(spill),
        )
        # The one writer of ids: the chunks' keys in chunk order, so ids follow first sight in the file.
        jobs, seen_ids, seen_rows = [], [], []
        for chunk in parsed:  # each chunk's code -> id arrays go to the spill folder, not into the task graph
            ids_path = spill / f"chunk-{chunk.index:06d}.ids.npz"
            chunk_users = _read_ipc(chunk.users_path)
            user_ids = users.ids(chunk_users.column("key"))
            item_ids = items.ids(_read_ipc(chunk.items_path).column("key"))
            # Scratch of this ingestion (the staging folder goes with it): no fsync.
            storage.write_npz(ids_path, {"users": user_ids, "items": item_ids}, durable=False)
            jobs.append((chunk, str(ids_path)))
            seen_ids.append(user_ids)
            seen_rows.append(chunk_users.column("rows").to_numpy())
        report.valid = sum(c.valid for c in parsed)
        edges = _range_edges(
            seen_ids, seen_rows, n_ranges=max(1, -(-report.valid * _REDUCE_BYTES_PER_ROW // range_bytes))
        )
        del seen_ids, seen_rows
        routed = map_fn(route_chunk, jobs, description=f"ingest {path.name}: route", unit="chunks", edges=edges)
        del jobs
        pieces: dict[int, list[tuple[str, int]]] = {}
        for chunk in routed:
            for number, batch in chunk.ranges.items():
                pieces.setdefault(number, []).append((chunk.path, batch))
        written = map_fn(
            reduce_range,
            sorted(pieces.items()),
            description=f"ingest {path.name}: reduce",
            unit="ranges",
            out_dir=str(staging),
        )
        if not written:  # no valid rows: an empty part keeps the batch readable
            empty = EVENT_SCHEMA.empty_table()
            storage.write_parquet(staging / "part-00000.parquet", empty, row_group_size=1 << 20)
            written = [("part-00000.parquet", 0)]
        shutil.rmtree(spill)

        report.rows = sum(c.rows + c.skipped for c in parsed)
        offsets = np.cumsum([0] + [c.lines for c in parsed])
        records = [
            record
            for c, offset in zip(parsed, offsets)
            for record in quarantine_records(path, c.unit, c.bad, int(offset))
        ]
        report.malformed = len(records)
        if report.rows == 0:
            unit = "row" if source.format == "events" and path.suffix.lower() == ".parquet" else "line"
            records += quarantine_records(path, unit, [(0, "the file holds no data rows", "")])
        report.events = sum(n for _, n in written)
        report.new_users, report.new_items = users.added, items.added

        # Ids first (events refer to them), then the events swapped in, the quarantine, and the
        # marker last: a crash anywhere before the marker re-ingests this batch next time.
        users.save()
        items.save()
        marker.unlink(missing_ok=True)
        if out.exists():
            old = out.parent / f".old-{source.batch}-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            try:
                staging.rename(out)
            except OSError:
                old.rename(out)  # the batch as it was (without its marker: ingested again next time)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    append_quarantine(quarantine_path, records)
    report.seconds = time.perf_counter() - start
    storage.write_json(
        marker,
        {**asdict(report), "sha1": sha1, "format": source.format, "parts": [name for name, _ in written]},
        indent=1,
    )
    if records:
        log.warning(
            "listening %s: %d malformed rows quarantined in %s (first: %s)",
            path.name,
            len(records),
            quarantine_path,
            records[0]["reason"],
        )
    return report


def ingest_sources(
    sources: Sequence[ListeningSource | str | Path],
    *,
    listening_dir: Path,
    quarantine_path: Path,
    map_fn: Mapper = run_here,
    chunk_bytes: int = CHUNK_BYTES,
    range_bytes: int = RANGE_BYTES,
) -> IngestReport:
    """Ingest listening files, one batch each, extending the stable user and item id maps.

    A batch already ingested from a file with the same content hash is skipped; a file
    whose content changed replaces its batch (ids are never renumbered). ``map_fn`` runs
    each file's steps on a cluster (see :func:`ingest_source`).
    """
    listening_dir = Path(listening_dir)
    resolved = [(s if isinstance(s, ListeningSource) else ListeningSource(Path(s))).resolved() for s in sources]
    names = [s.batch for s in resolved]
    duplicated = sorted({b for b in names if names.count(b) > 1})
    if duplicated:
        raise DatasetError(f"listening files map to the same batch ids {duplicated}; give them distinct names")
    missing = [str(s.path) for s in resolved if not s.path.is_file()]
    if missing:
        raise DatasetError(f"listening files not found: {missing}")
    users = IdMap(listening_dir / "users.parquet")
    items = IdMap(listening_dir / "items.parquet")
    report = IngestReport()
    for source in resolved:
        report.batches.append(
            ingest_source(
                source,
                listening_dir=listening_dir,
                users=users,
                items=items,
                quarantine_path=quarantine_path,
                map_fn=map_fn,
                chunk_bytes=chunk_bytes,
                range_bytes=range_bytes,
            )
        )
    report.quarantined = storage.parquet_num_rows(quarantine_path) if Path(quarantine_path).exists() else 0
    return report


def read_batch_events(
    listening_dir: Path, batches: Sequence[str] | None = None, columns: Sequence[str] = ("user", "item", "plays")
) -> pa.Table:
    """Events of the given batches (all ingested ones when None), concatenated; not summed."""
    names = ingested_batches(listening_dir) if batches is None else list(batches)
    if not names:
        raise DatasetError(f"no listening batches under {Path(listening_dir) / 'events'}: ingest some first")
    tables = []
    for batch in names:
        parts = batch_parts(listening_dir, batch)
        if not (_batch_dir(listening_dir, batch) / "_source.json").exists() or not parts:
            raise DatasetError(f"listening batch {batch!r} is not (completely) ingested under {listening_dir}")
        tables.extend(storage.read_parquet(part, columns=columns) for part in parts)
    return pa.concat_tables(tables)


__all__ = [
    "EVENT_SCHEMA",
    "BatchReport",
    "Chunk",
    "IdMap",
    "IngestReport",
    "ListeningSource",
    "ParsedChunk",
    "RoutedChunk",
    "batch_parts",
    "batch_record",
    "ingest_source",
    "ingest_sources",
    "ingested_batches",
    "parse_chunk",
    "plan_chunks",
    "read_batch_events",
    "read_id_map",
    "reduce_range",
    "route_chunk",
    "run_here",
]
