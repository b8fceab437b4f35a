"""Parquet I/O for feature shards, track tables and quarantine records.

The files are read and written through :mod:`core.storage`: each is written under
a unique temporary name in the same folder and renamed into place when complete,
so a killed worker leaves no half-written shard behind (and :func:`remove_unreferenced`
sweeps the temporary files it may leave).

Feature shard schema (one row per track)::

    track_id         string
    content_sha1     string       hash of the source file's bytes
    n_frames         int32        frames of the first (finest) resolution
    mel_<n_fft>, …   large_binary float16 (n_frames, n_mels), C order, little-endian;
                                  field metadata dtype=float16, shape=n,<n_mels>
    source_path      string       the file the features came from
    source_size      int64        its size in bytes and modification time, the cheap
    source_mtime_ns  int64        change check of incremental runs
    duration_s       float32      decoded duration

The manifest ``_manifest.parquet`` beside the shards has one row per track:
``track_id, content_sha1, shard, n_frames, settings_hash, duration_s, sample_rate,
source_path, source_size, source_mtime_ns``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from core import storage
from core.errors import DatasetError, ParameterError

MANIFEST = "_manifest.parquet"
MANIFEST_SCHEMA = pa.schema(
    [
        ("track_id", pa.string()),
        ("content_sha1", pa.string()),
        ("shard", pa.string()),
        ("n_frames", pa.int32()),
        ("settings_hash", pa.string()),
        ("duration_s", pa.float32()),
        ("sample_rate", pa.int32()),
        ("source_path", pa.string()),
        ("source_size", pa.int64()),
        ("source_mtime_ns", pa.int64()),
    ]
)
SOURCE_FIELDS = [
    ("source_path", pa.string()),
    ("source_size", pa.int64()),
    ("source_mtime_ns", pa.int64()),
    ("duration_s", pa.float32()),
]
QUARANTINE_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
    ]
)
# Small row groups keep streaming reads (one group at a time) cheap in memory.
ROW_GROUP_SIZE = 64


def content_sha1(path: str | Path) -> str:
    """SHA-1 hex digest of a file's bytes, read in 1 MiB chunks.

    Recognises audio already featurized and listening files already ingested,
    whatever their path.
    """
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def table_content_sha1(path: str | Path, *, columns: Sequence[str], sort_by: str = "track_id") -> str:
    """SHA-1 hex digest of the values of ``columns`` of a Parquet table, rows ordered by ``sort_by``.

    Unlike :func:`content_sha1` of the file, it ignores what is not data: the file's
    encoding, the row order, and any column left out (paths, sizes, modification times),
    so the same tracks give the same digest in any storage root. Columns the table
    lacks are skipped; the names of those read are part of the digest.
    """
    present = set(storage.parquet_schema(path).names)
    names = [c for c in columns if c in present]
    table = storage.read_parquet(path, columns=names)
    if sort_by in names:
        table = table.sort_by(sort_by)
    digest = hashlib.sha1()
    for name in names:
        digest.update(f"\x1e{name}\x1e".encode())
        digest.update("\x1f".join(map(repr, table.column(name).to_pylist())).encode())
    return digest.hexdigest()


def write_table_atomic(
    table: pa.Table,
    path: Path,
    *,
    compression: str = "zstd",
    use_dictionary: bool | list[str] = True,
    row_group_size: int = ROW_GROUP_SIZE,
) -> Path:
    """Write ``table`` to ``path`` atomically (:func:`core.storage.write_parquet`), in the shards' row groups.

    ``row_group_size`` (rows) defaults to the feature shards' 64; tables of small rows
    (events, factors, id maps) pass a larger one.
    """
    return storage.write_parquet(
        path, table, compression=compression, use_dictionary=use_dictionary, row_group_size=row_group_size
    )


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (markers, state, settings): :func:`core.storage.write_text`."""
    return storage.write_text(path, text)


def tensor_field(name: str, *, dtype: str, inner_shape: Sequence[int]) -> pa.Field:
    """A column of arrays stored as raw little-endian bytes, one value per row.

    The field metadata names the dtype and the shape (``n_frames`` varies per row
    and is the byte length divided by the inner size). Bytes, rather than nested
    Parquet lists, because the nested encoding of 40 million float16 values per
    shard cost more than the spectrograms themselves (benchmarks/bench_features.py
    overhead) and read 20x slower.
    """
    shape = ",".join(["n", *(str(d) for d in inner_shape)])
    return pa.field(name, pa.large_binary(), metadata={b"dtype": dtype.encode(), b"shape": shape.encode()})


def feature_schema(columns: Sequence[str], n_mels: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("track_id", pa.string()),
            pa.field("content_sha1", pa.string()),
            pa.field("n_frames", pa.int32()),
            *(tensor_field(column, dtype="float16", inner_shape=(n_mels,)) for column in columns),
            *(pa.field(name, type) for name, type in SOURCE_FIELDS),
        ]
    )


def tensor_bytes(arrays: Sequence[np.ndarray], dtype: str) -> pa.LargeBinaryArray:
    """One ``large_binary`` value per array: its C-order bytes in ``dtype`` (little-endian)."""
    target = np.dtype(dtype).newbyteorder("<")
    flat = [np.ascontiguousarray(a, dtype=target).reshape(-1) for a in arrays]
    offsets = np.zeros(len(flat) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in flat])
    data = np.concatenate(flat).view(np.uint8) if flat else np.zeros(0, np.uint8)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(flat), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def write_feature_shard(table: pa.Table, path: Path) -> Path:
    """A feature or audio shard: dictionary encoding only for the string columns (never the values)."""
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    return write_table_atomic(table, path, use_dictionary=strings)


def features_to_table(rows: Sequence[tuple[str, str, Mapping[str, np.ndarray], Mapping]], *, n_mels: int) -> pa.Table:
    """Pack ``(track_id, content_sha1, {column: mel [shape=(n_frames, n_mels)]}, source)`` rows into a shard.

    Every row must hold the same columns; ``n_frames`` is that of the first column
    (the finest resolution). ``source`` maps each of ``source_path, source_size,
    source_mtime_ns, duration_s`` to its value.
    """
    if not rows:
        raise ParameterError("a shard needs at least one row: leave empty batches out instead of writing them")
    columns = list(rows[0][2])
    for track_id, _, features, _ in rows:
        if list(features) != columns:
            raise ParameterError(
                f"track {track_id!r} has feature columns {list(features)}, the shard's first track {columns}: "
                "every track of a shard needs the same resolutions"
            )
        for column, mel in features.items():
            if mel.ndim != 2 or mel.shape[1] != n_mels:
                raise ParameterError(
                    f"track {track_id!r}, column {column!r}: a spectrogram of shape {mel.shape}, expected "
                    f"(n_frames, {n_mels}): compute it with n_mels={n_mels} or give the shard that n_mels"
                )
    arrays = [
        pa.array([r[0] for r in rows], pa.string()),
        pa.array([r[1] for r in rows], pa.string()),
        pa.array([r[2][columns[0]].shape[0] for r in rows], pa.int32()),
        *(tensor_bytes([r[2][column] for r in rows], "float16") for column in columns),
        *(pa.array([r[3][name] for r in rows], type) for name, type in SOURCE_FIELDS),
    ]
    return pa.Table.from_arrays(arrays, schema=feature_schema(columns, n_mels))


def audio_to_table(rows: Sequence[tuple[str, np.ndarray]], *, sample_rate: int) -> pa.Table:
    """Raw-audio shard: ``track_id``, ``sample_rate``, ``pcm`` (int16 bytes) from float waveforms in [-1, 1]."""
    pcm = [np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16) for _, y in rows]
    schema = pa.schema(
        [
            pa.field("track_id", pa.string()),
            pa.field("sample_rate", pa.int32()),
            tensor_field("pcm", dtype="int16", inner_shape=()),
        ]
    )
    return pa.Table.from_arrays(
        [
            pa.array([t for t, _ in rows], pa.string()),
            pa.array([sample_rate] * len(rows), pa.int32()),
            tensor_bytes(pcm, "int16"),
        ],
        schema=schema,
    )


def _tensors(table: pa.Table, column: str) -> list[np.ndarray]:
    """The arrays of a tensor column, shaped by its field metadata (views on the Arrow buffers)."""
    field = table.schema.field(column)
    metadata = field.metadata or {}
    if b"dtype" not in metadata:
        raise DatasetError(f"column {column!r} is not a tensor column (no dtype metadata); was it written by mirflow?")
    dtype = np.dtype(metadata[b"dtype"].decode()).newbyteorder("<")
    inner = tuple(int(d) for d in metadata[b"shape"].decode().split(",")[1:])
    values = table.column(column).combine_chunks()
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int64)[values.offset : values.offset + len(values) + 1]
    data = values.buffers()[2]
    return [
        np.frombuffer(data, dtype=dtype, count=(int(stop) - int(start)) // dtype.itemsize, offset=int(start)).reshape(
            -1, *inner
        )
        for start, stop in zip(offsets[:-1], offsets[1:])
    ]


def read_audio(
    audio_dir: Path, *, track_ids: Iterable[str] | None = None, sample_rate: int | None = None
) -> dict[str, np.ndarray]:
    """``{track_id: int16 PCM}`` from the raw-audio shards (all tracks when ``track_ids`` is None).

    With ``sample_rate``, a wanted track stored at another rate is a ``DatasetError``
    (a model must not train on audio at a rate it was not built for).
    """
    wanted = None if track_ids is None else set(track_ids)
    out = {}
    for shard in sorted(Path(audio_dir).glob("part-*.parquet")):
        table = storage.read_parquet(shard, columns=["track_id", "sample_rate", "pcm"])
        rates = table.column("sample_rate").to_pylist()
        for track_id, rate, pcm in zip(table.column("track_id").to_pylist(), rates, _tensors(table, "pcm")):
            if wanted is None or track_id in wanted:
                if sample_rate is not None and rate != sample_rate:
                    raise DatasetError(
                        f"{shard}: track {track_id!r} is stored at {rate} Hz, not {sample_rate} Hz: "
                        "write the PCM shards again at that rate (the feature flow with audio shards)"
                    )
                out[track_id] = pcm
    return out


def table_to_features(table: pa.Table, *, column: str) -> dict[str, np.ndarray]:
    """Inverse of :func:`features_to_table`: ``{track_id: mel [shape=(n_frames, n_mels)] float16}``."""
    return dict(zip(table.column("track_id").to_pylist(), _tensors(table, column)))


def _read_table(path: Path, *, columns: Sequence[str] | None = None) -> pa.Table:
    """A manifest or shard of a feature folder; one that is damaged, gone or lacks ``columns`` is a ``DatasetError``."""
    try:
        return storage.read_parquet(path, columns=columns)
    except (pa.ArrowInvalid, OSError, KeyError) as err:
        wanted = f" (columns {list(columns)})" if columns is not None else ""
        raise DatasetError(
            f"{path} cannot be read{wanted}: {err}. A damaged file, or one not written by mirflow, is deleted "
            "and its features computed again (the feature flow writes it); a missing column means the features "
            "were computed with other settings"
        ) from err


def read_manifest(feature_dir: Path) -> pa.Table:
    """The manifest of a feature folder (empty when there is none); damaged or id-less ones are a ``DatasetError``."""
    path = Path(feature_dir) / MANIFEST
    if not path.exists():
        return MANIFEST_SCHEMA.empty_table()
    table = _read_table(path)
    lacking = [name for name in ("track_id", "shard") if name not in table.column_names]
    if lacking:
        raise DatasetError(
            f"{path} lacks the column(s) {lacking} (it has {table.column_names}): it is no feature manifest; "
            "delete it and compute the features again (the feature flow writes it)"
        )
    # Columns a manifest of an older release lacks read as nulls: those tracks are re-checked.
    columns = [
        table.column(f.name).cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in MANIFEST_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)


def write_manifest(feature_dir: Path, records: Iterable[Mapping]) -> Path:
    """Write the manifest from per-track records (one per track id, last one wins)."""
    by_id = {r["track_id"]: r for r in records}
    table = pa.Table.from_pylist(list(by_id.values()), schema=MANIFEST_SCHEMA)
    return write_table_atomic(table.sort_by("track_id"), Path(feature_dir) / MANIFEST)


def shard_records(feature_dir: Path, *, skip: Iterable[str] = ()) -> list[dict]:
    """Per-track records of the complete shards on disk (except those named in ``skip``).

    Only the id and source columns are read. Used to resume: shards finished before
    an interruption are counted even when the manifest was never rewritten.
    """
    skip = set(skip)
    wanted = ["track_id", "content_sha1", "n_frames", *(n for n, _ in SOURCE_FIELDS)]
    records = []
    for shard in sorted(Path(feature_dir).glob("part-*.parquet")):
        if shard.name in skip:
            continue
        present = set(storage.parquet_schema(shard).names)
        table = storage.read_parquet(shard, columns=[c for c in wanted if c in present])
        for row in table.to_pylist():
            records.append({**dict.fromkeys(wanted), **row, "shard": shard.name})
    return records


def remove_unreferenced(folder: Path, *, keep: Iterable[str]) -> list[str]:
    """Delete ``part-*.parquet`` files not named in ``keep`` and leftover ``.*.tmp`` files; returns the names removed.

    Only safe when no writer is active in ``folder``.
    """
    keep = set(keep)
    removed = []
    for path in [*Path(folder).glob("part-*.parquet"), *Path(folder).glob(".*.tmp")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def read_features(feature_dir: Path, *, column: str, track_ids: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Load features for ``track_ids`` (all tracks when None) as ``{track_id: (n_frames, n_mels) float16}``.

    Only the shards that hold the requested tracks are opened, and only the
    ``track_id`` and ``column`` columns are read.
    """
    feature_dir = Path(feature_dir)
    manifest = read_manifest(feature_dir)
    if manifest.num_rows == 0:
        raise DatasetError(f"no feature manifest in {feature_dir}: run the feature flow first")
    wanted = None if track_ids is None else set(track_ids)
    shards: dict[str, list[str]] = {}
    for track_id, shard in zip(manifest.column("track_id").to_pylist(), manifest.column("shard").to_pylist()):
        if wanted is None or track_id in wanted:
            shards.setdefault(shard, []).append(track_id)
    if wanted is not None:
        missing = wanted - {t for ids in shards.values() for t in ids}
        if missing:
            raise DatasetError(
                f"{len(missing)} track ids have no features in {feature_dir}, e.g. {sorted(missing)[:3]}"
            )
    out: dict[str, np.ndarray] = {}
    for shard, ids in shards.items():
        table = _read_table(feature_dir / shard, columns=["track_id", column])
        features = table_to_features(table, column=column)
        out.update({t: features[t] for t in ids if t in features})
    return out


def append_quarantine(path: Path, records: Sequence[Mapping]) -> int:
    """Append quarantine records (``path, stage, reason``) to ``path``; returns the total count.

    Existing records are kept; the same (path, stage, reason) is stored once.
    """
    path = Path(path)
    old = storage.read_parquet(path, schema=QUARANTINE_SCHEMA).to_pylist() if path.exists() else []
    now = datetime.now(UTC)
    seen = {(r["path"], r["stage"], r["reason"]) for r in old}
    new = []
    for r in records:
        key = (str(r["path"]), r["stage"], r["reason"])
        if key not in seen:
            seen.add(key)
            new.append({"path": key[0], "stage": key[1], "reason": key[2], "time": r.get("time", now)})
    if new or not path.exists():
        write_table_atomic(pa.Table.from_pylist(old + new, schema=QUARANTINE_SCHEMA), path, row_group_size=1 << 16)
    return len(old) + len(new)
