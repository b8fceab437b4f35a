"""The one storage module: atomic writes leave the old file or the new one, never half, and no litter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from core import storage


def _litter(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_a_parquet_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "tracks" / "world.parquet"
    storage.write_parquet(path, pa.table({"track_id": ["a", "b"]}))
    storage.write_parquet(path, pa.table({"track_id": ["c"]}))
    assert storage.read_parquet(path).column("track_id").to_pylist() == ["c"]
    assert storage.parquet_num_rows(path) == 1
    assert _litter(path.parent) == []


def test_a_failed_write_keeps_the_old_content_and_removes_its_temporary_file(tmp_path):
    path = tmp_path / "settings.json"
    storage.write_json(path, {"epochs": 3})
    with pytest.raises(TypeError):
        storage.write_json(path, {"epochs": object()})  # not serializable: fails mid-write
    assert storage.read_json(path) == {"epochs": 3}
    assert _litter(tmp_path) == []

    with pytest.raises(RuntimeError, match="interrupted"):
        with storage.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert storage.read_json(path) == {"epochs": 3}
    assert _litter(tmp_path) == []


def test_two_writers_never_share_a_temporary_name(tmp_path):
    names = {storage.temporary_name(tmp_path / "part-0.parquet") for _ in range(100)}
    assert len(names) == 100
    assert all(n.parent == tmp_path and n.name.startswith(".part-0.parquet.") for n in names)


def test_npz_round_trip_refuses_pickled_objects(tmp_path):
    path = tmp_path / "catalogue.npz"
    storage.write_npz(path, {"factors": np.arange(6, dtype=np.float32).reshape(2, 3)})
    np.testing.assert_array_equal(storage.read_npz(path)["factors"], np.arange(6).reshape(2, 3))
    np.savez(tmp_path / "evil.npz", obj=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        storage.read_npz(tmp_path / "evil.npz")


def test_a_file_written_in_parts_appears_only_when_complete(tmp_path):
    path = tmp_path / "events.parquet"
    schema = pa.schema([("user", pa.int64())])
    with storage.parquet_writer(path, schema) as writer:
        writer.write_table(pa.table({"user": [1, 2]}, schema=schema))
        assert not path.exists()
        writer.write_table(pa.table({"user": [3]}, schema=schema))
    assert storage.read_parquet(path).column("user").to_pylist() == [1, 2, 3]
    assert _litter(tmp_path) == []


def test_text_is_written_byte_for_byte_as_utf8(tmp_path):
    path = storage.write_text(tmp_path / "annotations.csv", '"clip_id"\t"rock"\r\n"1"\t"é"\n')
    assert path.read_bytes() == '"clip_id"\t"rock"\r\n"1"\t"é"\n'.encode()  # no newline translation
    assert storage.read_text(path) == '"clip_id"\t"rock"\r\n"1"\t"é"\n'


def test_a_copy_replaces_the_target_whole_or_not_at_all(tmp_path):
    source, target = tmp_path / "given.npz", tmp_path / "store" / "mel_1024.npz"
    source.write_bytes(b"new codebook")
    storage.write_bytes(target, b"old codebook")
    with pytest.raises(FileNotFoundError):
        storage.copy_file(tmp_path / "absent.npz", target)
    assert target.read_bytes() == b"old codebook" and _litter(target.parent) == []
    storage.copy_file(source, target)
    assert target.read_bytes() == b"new codebook" and _litter(target.parent) == []


def test_dictionary_encoding_only_for_the_columns_named(tmp_path):
    table = pa.table({"track_id": ["a", "a", "b"], "pcm": pa.array([b"\x00\x01"] * 3, pa.large_binary())})
    path = storage.write_parquet(tmp_path / "part-0.parquet", table, use_dictionary=["track_id"])
    columns = storage.parquet_file(path).metadata.row_group(0)
    encodings = {columns.column(i).path_in_schema: columns.column(i).encodings for i in range(columns.num_columns)}
    assert "RLE_DICTIONARY" in encodings["track_id"] and "RLE_DICTIONARY" not in encodings["pcm"]
    assert storage.read_parquet(path).equals(table)
