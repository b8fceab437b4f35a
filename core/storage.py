"""The one storage module: every Parquet, JSON, NPZ and text file under the storage root is read and
written here, and every write is atomic.

A write goes to a temporary file of a unique name beside its target (so two writers never share
one), is flushed and fsynced, then renamed over the target; the folder is fsynced after the rename
where durability matters (manifests, id maps, settings). On any failure the temporary file is
removed and the target is left as it was: a reader sees the old file or the new one, never half
of one. ``core.layout`` says where each file lives; this module says how it is written.

Only this module imports ``pyarrow.parquet`` (ruff's banned-api rule TID251 enforces it).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

#: Parquet compression for everything mirflow writes (float16 spectrograms compress well with it).
COMPRESSION = "zstd"


def temporary_name(path: Path) -> Path:
    """A unique temporary name beside ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems do not open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path | str, *, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path``.

    ``durable``: fsync the file before the rename and the folder after it, so that the new content
    survives a power loss once this returns. On an exception the temporary file is removed, the
    exception propagates and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        if durable and tmp.is_file():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def write_bytes(path: Path | str, data: bytes, *, durable: bool = True) -> Path:
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: Path | str, text: str, *, durable: bool = True) -> Path:
    """``text`` as UTF-8, newlines written as given (no translation: the same bytes on every platform)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    return Path(path)


def read_text(path: Path | str) -> str:
    """A UTF-8 file's text as written (no newline translation, like :func:`write_text`)."""
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def copy_file(source: Path | str, target: Path | str, *, durable: bool = True) -> Path:
    """A copy of ``source`` at ``target``, atomically (``target`` is the old file or the whole copy)."""
    with atomic_path(target, durable=durable) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)


def write_json(path: Path | str, obj: Any, *, durable: bool = True, indent: int | None = 2) -> Path:
    """``obj`` as JSON (keys sorted, so that equal content gives equal bytes)."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n", durable=durable)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_parquet(
    path: Path | str,
    table: pa.Table,
    *,
    durable: bool = True,
    row_group_size: int | None = None,
    compression: str = COMPRESSION,
    use_dictionary: bool | Sequence[str] = True,
) -> Path:
    """``table`` as one Parquet file at ``path``, atomically.

    ``row_group_size`` (rows; pyarrow's default when None) bounds what a streaming reader holds at once;
    ``use_dictionary``: all columns, none, or the names of those to dictionary-encode (string columns of
    tensor shards: dictionary pages of raw float bytes only cost space).
    """
    if not isinstance(use_dictionary, bool):
        use_dictionary = list(use_dictionary)
    with atomic_path(path, durable=durable) as tmp:
        pq.write_table(
            table, tmp, compression=compression, row_group_size=row_group_size, use_dictionary=use_dictionary
        )
    return Path(path)


def write_frame(
    path: Path | str,
    frame,
    *,
    durable: bool = True,
    preserve_index: bool | None = False,
    compression: str = COMPRESSION,
) -> Path:
    """A pandas DataFrame as Parquet, atomically (its index dropped unless asked for; None: as pandas does,
    a range index kept as metadata only)."""
    return write_parquet(
        path, pa.Table.from_pandas(frame, preserve_index=preserve_index), durable=durable, compression=compression
    )


def read_parquet(
    path: Path | str, *, columns: Sequence[str] | None = None, filters: Any = None, schema: pa.Schema | None = None
) -> pa.Table:
    """One Parquet file (or a folder of them) as an Arrow table."""
    return pq.read_table(path, columns=list(columns) if columns is not None else None, filters=filters, schema=schema)


def read_frame(path: Path | str, *, columns: Sequence[str] | None = None):
    """One Parquet file as a pandas DataFrame."""
    return read_parquet(path, columns=columns).to_pandas()


def parquet_file(path: Path | str) -> pq.ParquetFile:
    """An open Parquet file for reading by row group (metadata, schema, ``iter_batches``)."""
    return pq.ParquetFile(path)


def parquet_schema(path: Path | str) -> pa.Schema:
    return pq.read_schema(path)


def parquet_num_rows(path: Path | str) -> int:
    return pq.ParquetFile(path).metadata.num_rows


@contextmanager
def parquet_writer(
    path: Path | str, schema: pa.Schema, *, compression: str = COMPRESSION
) -> Iterator[pq.ParquetWriter]:
    """A Parquet writer for a file written in parts (row group by row group), atomic as a whole."""
    with atomic_path(path) as tmp:
        writer = pq.ParquetWriter(tmp, schema, compression=compression)
        try:
            yield writer
        finally:
            writer.close()


def write_npz(path: Path | str, arrays: Mapping[str, np.ndarray], *, durable: bool = True) -> Path:
    """Arrays in one uncompressed ``.npz`` file, atomically (no pickled objects: see :func:`read_npz`)."""
    with atomic_path(path, durable=durable) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return Path(path)


def read_npz(path: Path | str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, loaded eagerly; object arrays are refused (``allow_pickle=False``)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
