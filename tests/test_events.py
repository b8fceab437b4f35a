"""Listening ingestion: every format, every kind of broken row, stable ids, resumable batches."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import DatasetError, ParameterError
from tasks.events import (
    IdMap,
    ListeningSource,
    batch_parts,
    ingest_sources,
    ingested_batches,
    read_batch_events,
    read_id_map,
)
from tasks.listening import load_play_matrix

GOOD = [("u1", "s1", 3), ("u1", "s2", 1), ("u2", "s1", 12), ("u3", "s3", 1), ("u1", "s1", 2), ("u4", "s9", 0)]
BROKEN = [
    ("u2\ts2\tmany", "not a non-negative integer"),
    ("u3\ts3", "expected 3 tab-separated fields, got 2"),
    ("", "empty line"),
    ("u4\ts4\t-1", "negative play count -1"),
    ("\ts5\t1", "missing user id"),
    ("u5\t\t1", "missing item id"),
    ("u5\ts5\t1\textra", "expected 3 tab-separated fields, got 4"),
    ("u6\ts6\t2.5", "'2.5' is not a non-negative integer"),
    ("u7\ts7\t", "missing play count"),
    ("u8\ts8\t99999999999999999999", "not a non-negative integer"),
]


def _ingest(tmp_path, *sources):
    return ingest_sources(
        list(sources),
        listening_dir=tmp_path / "listening",
        quarantine_path=tmp_path / "quarantine" / "listening.parquet",
    )


def _quarantine(tmp_path) -> pd.DataFrame:
    return pq.read_table(tmp_path / "quarantine" / "listening.parquet").to_pandas()


def _events(tmp_path, batches=None) -> dict[tuple[str, str], int]:
    listening = tmp_path / "listening"
    table = read_batch_events(listening, batches).to_pandas()
    users, items = read_id_map(listening / "users.parquet"), read_id_map(listening / "items.parquet")
    out: dict[tuple[str, str], int] = {}
    for u, i, p in zip(table["user"], table["item"], table["plays"]):
        out[(users[u], items[i])] = out.get((users[u], items[i]), 0) + int(p)
    return out


def test_broken_lines_mixed_with_good_ones_every_good_row_lands_every_bad_one_is_quarantined(tmp_path):
    rng = np.random.default_rng(0)
    lines = [(f"{u}\t{i}\t{p}", None) for u, i, p in GOOD] + BROKEN
    lines = [lines[j] for j in rng.permutation(len(lines))]
    path = tmp_path / "train_triplets.txt"
    path.write_text("\n".join(text for text, _ in lines) + "\n")

    report = _ingest(tmp_path, path)

    batch = report.batches[0]
    assert (batch.rows, batch.valid, batch.malformed) == (len(lines), len(GOOD), len(BROKEN))
    want: dict[tuple[str, str], int] = {}
    for u, i, p in GOOD:
        want[(u, i)] = want.get((u, i), 0) + p
    assert _events(tmp_path) == want  # duplicates summed, the zero count kept as a valid row
    assert batch.events == len(want)

    quarantine = _quarantine(tmp_path)
    assert len(quarantine) == len(BROKEN) == report.quarantined
    expected_lines = {j + 1: reason for j, (_, reason) in enumerate(lines) if reason is not None}
    got_lines = {int(p.rsplit(":", 1)[1]): r for p, r in zip(quarantine["path"], quarantine["reason"])}
    assert set(got_lines) == set(expected_lines)
    for line, reason in expected_lines.items():
        assert reason in got_lines[line], (line, got_lines[line])
    assert set(quarantine["stage"]) == {"listening"}


def test_crlf_and_whitespace_around_fields_are_not_errors(tmp_path):
    path = tmp_path / "batch.txt"
    path.write_bytes(b"u1\ts1\t3\r\n u2 \ts2\t 4 \r\n")
    report = _ingest(tmp_path, path)
    assert report.batches[0].malformed == 0
    assert _events(tmp_path) == {("u1", "s1"): 3, ("u2", "s2"): 4}


def test_invalid_utf8_rows_and_empty_files_are_quarantined(tmp_path):
    mixed = tmp_path / "mixed.txt"
    mixed.write_bytes(b"u1\ts1\t3\nu\xff\xfe2\ts2\t4\nu3\ts\xc3\t1\nu4\ts4\t5\n")
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    report = _ingest(tmp_path, mixed, empty)
    assert [(b.valid, b.malformed) for b in report.batches] == [(2, 2), (0, 0)]
    assert _events(tmp_path) == {("u1", "s1"): 3, ("u4", "s4"): 5}
    reasons = dict(zip(_quarantine(tmp_path)["path"], _quarantine(tmp_path)["reason"]))
    assert reasons[f"{mixed}:2"].startswith("not valid UTF-8") and reasons[f"{mixed}:3"].startswith("not valid UTF-8")
    assert reasons[f"{empty}:0"] == "the file holds no data rows"


def test_ids_are_stable_across_batches_and_a_changed_batch_replaces_its_events(tmp_path):
    first, second = tmp_path / "batch-000.txt", tmp_path / "batch-001.txt"
    first.write_text("a\tx\t1\nb\ty\t2\n")
    second.write_text("c\tx\t5\na\tz\t1\n")
    report = _ingest(tmp_path, first, second)
    assert report.batch_ids == ["batch-000", "batch-001"]
    assert [(b.new_users, b.new_items) for b in report.batches] == [(2, 2), (1, 1)]
    listening = tmp_path / "listening"
    assert list(read_id_map(listening / "users.parquet")) == ["a", "b", "c"]
    assert list(read_id_map(listening / "items.parquet")) == ["x", "y", "z"]

    # Unchanged files are skipped; a changed one is re-read, and old ids never move.
    again = _ingest(tmp_path, first, second)
    assert [b.skipped for b in again.batches] == [True, True]
    first.write_text("d\tw\t7\na\tx\t1\n")
    changed = _ingest(tmp_path, first, second)
    assert [b.skipped for b in changed.batches] == [False, True]
    assert list(read_id_map(listening / "users.parquet")) == ["a", "b", "c", "d"]
    assert list(read_id_map(listening / "items.parquet")) == ["x", "y", "z", "w"]
    assert _events(tmp_path, ["batch-000"]) == {("d", "w"): 7, ("a", "x"): 1}
    matrix = load_play_matrix(listening)
    # b and y had plays only in the replaced batch: no row, no column
    assert list(matrix.users) == ["a", "c", "d"] and list(matrix.items) == ["x", "z", "w"]
    assert matrix.plays.toarray().tolist() == [[1, 1, 0], [5, 0, 0], [0, 0, 7]]


def test_a_batch_interrupted_before_its_marker_is_ingested_again(tmp_path):
    path = tmp_path / "b.txt"
    path.write_text("a\tx\t1\n")
    _ingest(tmp_path, path)
    marker = tmp_path / "listening" / "events" / "batch=b" / "_source.json"
    assert json.loads(marker.read_text())["valid"] == 1
    marker.unlink()  # as if killed between writing the events and the marker
    assert ingested_batches(tmp_path / "listening") == []
    with pytest.raises(DatasetError, match="not \\(completely\\) ingested"):
        read_batch_events(tmp_path / "listening", ["b"])
    report = _ingest(tmp_path, path)
    assert not report.batches[0].skipped and ingested_batches(tmp_path / "listening") == ["b"]
    assert list(read_id_map(tmp_path / "listening" / "users.parquet")) == ["a"]


def test_hetrec_layout_and_generic_csv_and_parquet_events(tmp_path):
    hetrec = tmp_path / "user_artists.dat"
    hetrec.write_text("userID\tartistID\tweight\n2\t51\t13883\n2\t52\t11690\n3\t51\tx\n")
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,plays,ts\n7,51,2,2024-01-02T03:04:05Z\n7,53,1,1700000000\n8,51,3,\n9,52,1,yesterday\n")
    parquet = tmp_path / "more.parquet"
    pq.write_table(pa.table({"user": ["7", "8", None], "item": ["53", "54", "51"], "plays": [4, -2, 1]}), parquet)

    report = _ingest(tmp_path, hetrec, csv, ListeningSource(parquet, batch="2024-02"))
    assert [b.batch for b in report.batches] == ["user_artists", "events", "2024-02"]
    assert [b.malformed for b in report.batches] == [1, 1, 2]
    events = _events(tmp_path)
    assert events == {("2", "51"): 13883, ("2", "52"): 11690, ("7", "51"): 2, ("7", "53"): 5, ("8", "51"): 3}
    reasons = dict(zip(_quarantine(tmp_path)["path"], _quarantine(tmp_path)["reason"]))
    assert "not a non-negative integer" in reasons[f"{hetrec}:4"]
    assert "neither ISO 8601 nor Unix seconds" in reasons[f"{csv}:5"]
    assert "negative play count" in reasons[f"{parquet}#row2"] and "missing user id" in reasons[f"{parquet}#row3"]
    ts = read_batch_events(tmp_path / "listening", ["events"], columns=("user", "item", "ts")).to_pandas()
    assert ts["ts"].dropna().dt.year.tolist() == [2024, 2023]


def test_bad_files_and_settings_are_clear_errors(tmp_path):
    wrong = tmp_path / "user_artists.dat"
    wrong.write_text("user\tartist\tcount\n1\t2\t3\n")
    with pytest.raises(DatasetError, match="HetRec"):
        _ingest(tmp_path, wrong)
    no_plays = tmp_path / "events.csv"
    no_plays.write_text("user,item\n1,2\n")
    with pytest.raises(DatasetError, match="missing columns \\['plays'\\]"):
        _ingest(tmp_path, no_plays)
    with pytest.raises(DatasetError, match="not found"):
        _ingest(tmp_path, tmp_path / "missing.txt")
    a, b = tmp_path / "a" / "x.txt", tmp_path / "b" / "x.txt"
    for p in (a, b):
        p.parent.mkdir()
        p.write_text("u\ti\t1\n")
    with pytest.raises(DatasetError, match="same batch ids"):
        _ingest(tmp_path, a, b)
    with pytest.raises(ParameterError, match="format"):
        _ingest(tmp_path, ListeningSource(a, format="json"))  # type: ignore[arg-type]


def test_id_map_appends_in_order_of_first_sight(tmp_path):
    ids = IdMap(tmp_path / "users.parquet")
    assert ids.ids(pa.array(["b", "a", "b"])).tolist() == [0, 1, 0]
    ids.save()
    again = IdMap(tmp_path / "users.parquet")
    assert again.ids(pa.array(["c", "a"])).tolist() == [2, 1]
    assert again.lookup(pa.array(["a", "zz"])).tolist() == [1, -1]
    again.save()
    assert list(read_id_map(tmp_path / "users.parquet")) == ["b", "a", "c"]


@pytest.mark.realdata
def test_real_hetrec_user_artists(shared_data, tmp_path):
    report = _ingest(tmp_path, shared_data / "lastfm_hetrec2011_2k" / "user_artists.dat")
    batch = report.batches[0]
    assert (batch.rows, batch.valid, batch.malformed, batch.events) == (92834, 92834, 0, 92834)
    matrix = load_play_matrix(tmp_path / "listening")
    assert matrix.plays.shape == (1892, 17632) and matrix.plays.nnz == 92834
    assert (
        matrix.plays.data.astype(np.int64).sum()
        == pd.read_csv(shared_data / "lastfm_hetrec2011_2k" / "user_artists.dat", sep="\t")["weight"].sum()
    )


def test_timestamps_out_of_range_and_unusual_parquet_types_become_row_errors(tmp_path):
    csv = tmp_path / "events.csv"
    csv.write_text("user,item,plays,ts\na,x,1,999999999999\nb,x,1,2024-13-45\nc,x,1,1700000000.5\nd,x,1,\n")
    parquet = tmp_path / "typed.parquet"
    pq.write_table(
        pa.table(
            {
                "user": pa.array([1.0, 2.0, None, 4.5]),  # pandas' integer ids with a gap, and a non-integral one
                "item": pa.array(["x", "y", "x", "y"]).dictionary_encode(),
                "plays": pa.array([1.0, 2.0, 3.0, 1.5]),
                "ts": pa.array([1.7e9, None, 1.7e9, 1.7e9]),
            }
        ),
        parquet,
    )
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"user": ["a"], "item": ["x"], "plays": pa.nulls(1)}), nulls)

    report = _ingest(tmp_path, csv, parquet, nulls)
    assert [(b.valid, b.malformed) for b in report.batches] == [(2, 2), (2, 2), (0, 1)]
    events = _events(tmp_path)
    assert events == {("c", "x"): 1, ("d", "x"): 1, ("1", "x"): 1, ("2", "y"): 2}
    reasons = dict(zip(_quarantine(tmp_path)["path"], _quarantine(tmp_path)["reason"]))
    assert "supported range" in reasons[f"{csv}:2"] and "supported range" in reasons[f"{csv}:3"]
    assert "missing user id" in reasons[f"{parquet}#row3"]
    assert "1.5" in reasons[f"{parquet}#row4"]
    assert "missing play count" in reasons[f"{nulls}#row1"]


def _mixed_files(tmp_path, rng) -> list[ListeningSource]:
    """One file of each format with good rows, duplicates, broken rows and ids that recur across files."""
    lines = [(f"u{rng.integers(40)}\ts{rng.integers(60)}\t{rng.integers(1, 9)}", None) for _ in range(400)]
    lines += BROKEN * 3
    order = rng.permutation(len(lines))
    triplets = tmp_path / "in" / "triplets.txt"
    triplets.parent.mkdir()
    triplets.write_text("\n".join(lines[i][0] for i in order) + "\n")
    hetrec = tmp_path / "in" / "user_artists.dat"
    hetrec.write_text(
        "userID\tartistID\tweight\n"
        + "".join(f"u{rng.integers(80)}\ta{rng.integers(30)}\t{rng.integers(1, 500)}\n" for _ in range(300))
        + "u1\ta1\tx\n"
    )
    csv = tmp_path / "in" / "events.csv"
    csv.write_text(
        "user,item,plays,ts\n"
        + "".join(
            f"u{rng.integers(90)},s{rng.integers(70)},{rng.integers(1, 5)},{1_600_000_000 + int(rng.integers(10**6))}\n"
            for _ in range(300)
        )
        + "u1,s1,2,not-a-time\n,s2,1,\n"
    )
    parquet = tmp_path / "in" / "more-events.parquet"
    n = 500
    pq.write_table(
        pa.table(
            {
                "user": [f"u{v}" for v in rng.integers(120, size=n)],
                "item": [f"s{v}" for v in rng.integers(90, size=n)],
                "plays": pa.array(np.where(rng.random(n) < 0.05, -1, rng.integers(1, 7, size=n))),
            }
        ),
        parquet,
        row_group_size=37,
    )
    return [ListeningSource(triplets), ListeningSource(hetrec), ListeningSource(csv), ListeningSource(parquet)]


def _snapshot(root) -> dict:
    listening = root / "listening"
    events = read_batch_events(listening, columns=("user", "item", "plays", "ts")).to_pandas()
    quarantine = pq.read_table(root / "quarantine.parquet").to_pandas()
    return {
        "events": events,
        "users": list(read_id_map(listening / "users.parquet")),
        "items": list(read_id_map(listening / "items.parquet")),
        "quarantine": sorted(zip(quarantine["path"].str.replace(str(root.parent), ""), quarantine["reason"])),
    }


def _same(a: dict, b: dict) -> None:
    pd.testing.assert_frame_equal(a["events"], b["events"])
    assert a["users"] == b["users"] and a["items"] == b["items"]
    assert a["quarantine"] == b["quarantine"]


def test_chunks_and_user_ranges_give_exactly_what_one_pass_gives(tmp_path):
    """Many small chunks (lines, row groups) and many user-id ranges: the same events, ids, quarantine lines."""
    sources = _mixed_files(tmp_path, np.random.default_rng(3))
    results = {}
    for name, chunk_bytes, range_bytes in (("whole", 1 << 30, 1 << 30), ("chunked", 97, 2_000)):
        root = tmp_path / name
        report = ingest_sources(
            sources,
            listening_dir=root / "listening",
            quarantine_path=root / "quarantine.parquet",
            chunk_bytes=chunk_bytes,
            range_bytes=range_bytes,
        )
        results[name] = (report, _snapshot(root))
    whole, chunked = results["whole"], results["chunked"]
    _same(whole[1], chunked[1])
    for a, b in zip(whole[0].batches, chunked[0].batches):
        assert (a.rows, a.valid, a.malformed, a.events) == (b.rows, b.valid, b.malformed, b.events)
    parts = sorted((tmp_path / "chunked" / "listening" / "events" / "batch=triplets").glob("part-*.parquet"))
    assert len(parts) > 3  # several user-id ranges
    # Within each batch (parts in order), events are summed and sorted by (user, item): strictly increasing.
    for batch in ("triplets", "user_artists", "events", "more-events"):
        table = read_batch_events(tmp_path / "chunked" / "listening", [batch]).to_pandas()
        keys = table["user"].to_numpy().astype(np.int64) << 32 | table["item"].to_numpy()
        assert np.all(np.diff(keys) > 0)
    # The line numbers point at the bad lines themselves.
    text = (tmp_path / "in" / "triplets.txt").read_text().split("\n")
    checked = 0
    for path, reason in chunked[1]["quarantine"]:
        if "/in/triplets.txt:" in path and "many" in reason:
            assert "many" in text[int(path.rsplit(":", 1)[1]) - 1]
            checked += 1
    assert checked == 3


def test_a_failed_reingest_keeps_the_batch_ingested_before(tmp_path):
    source = tmp_path / "user_artists.dat"
    source.write_text("userID\tartistID\tweight\nu1\ta1\t3\nu2\ta2\t4\n")
    _ingest(tmp_path, source)
    before = _events(tmp_path)
    source.write_text("user\tartist\tweight\nu1\ta1\t5\n")  # a changed file with a wrong header
    with pytest.raises(DatasetError, match="header"):
        _ingest(tmp_path, source)
    assert _events(tmp_path) == before and ingested_batches(tmp_path / "listening") == ["user_artists"]
    assert not list((tmp_path / "listening" / "events").glob(".staging-*"))


@pytest.mark.integration
def test_the_cluster_path_gives_what_one_process_gives(tmp_path):
    """Chunks parsed, routed and reduced on a Dask cluster of two worker processes: the same batch, bit for bit."""
    from core.settings import ClusterSettings
    from infra.cluster import dask_client, map_batches

    sources = _mixed_files(tmp_path, np.random.default_rng(4))
    here = tmp_path / "here"
    ingest_sources(
        sources,
        listening_dir=here / "listening",
        quarantine_path=here / "quarantine.parquet",
        chunk_bytes=211,
        range_bytes=3_000,
    )
    there = tmp_path / "there"
    with dask_client(ClusterSettings(n_workers=2)) as client:
        report = ingest_sources(
            sources,
            listening_dir=there / "listening",
            quarantine_path=there / "quarantine.parquet",
            chunk_bytes=211,
            range_bytes=3_000,
            map_fn=lambda fn, items, **kw: map_batches(client, fn, items, **kw),
        )
    assert report.totals()["malformed"] > 0
    _same(_snapshot(here), _snapshot(there))


def test_a_later_batch_of_new_users_is_still_cut_into_ranges_of_about_equal_rows(tmp_path):
    """New users get the highest ids: ranges follow this batch's rows, not the width of the whole id space."""
    first = tmp_path / "a.txt"
    first.write_text("".join(f"old{u}\ts{u % 7}\t1\n" for u in range(3000)))
    second = tmp_path / "b.txt"
    second.write_text("".join(f"new{u % 40}\ts{i % 97}\t{1 + i % 3}\n" for u, i in zip(range(4000), range(4000))))
    root = tmp_path / "store"
    ingest_sources([first, second], listening_dir=root, quarantine_path=tmp_path / "q.parquet", range_bytes=60_000)
    parts = batch_parts(root, "b")
    sizes = [pq.read_metadata(p).num_rows for p in parts]
    assert len(parts) >= 4 and max(sizes) <= 3 * sum(sizes) / len(sizes)
    whole = tmp_path / "whole"
    ingest_sources([first, second], listening_dir=whole, quarantine_path=tmp_path / "q2.parquet")
    assert read_batch_events(root, ["b"]).equals(read_batch_events(whole, ["b"]))


def test_empty_files_with_a_header_format_are_refused_and_stale_staging_is_cleared(tmp_path):
    for name in ("user_artists.dat", "events.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(DatasetError, match="header|missing columns"):
            _ingest(tmp_path, tmp_path / name)
    events = tmp_path / "listening" / "events"
    (events / ".staging-t-0badc0de" / "spill").mkdir(parents=True)
    (events / ".old-t-0badc0de").mkdir()
    source = tmp_path / "t.txt"
    source.write_text("u1\ts1\t1\n")
    _ingest(tmp_path, source)
    assert sorted(p.name for p in events.iterdir()) == ["batch=t"]


def test_lone_carriage_returns_are_line_breaks_in_every_chunk(tmp_path):
    source = tmp_path / "cr.txt"
    # Mostly lone CRs, a LF now and then: the chunks are cut at the LFs and hold the CRs.
    lines = [b"u%d\ts%d\t1" % (i, i) + (b"\n" if i % 5 == 4 else b"\r") for i in range(60)]
    source.write_bytes(b"".join(lines) + b"u1\ts1\tbad\r" + b"u2\ts2\t2\n")
    got = {}
    for name, chunk_bytes in (("whole", 1 << 30), ("chunked", 60)):
        root = tmp_path / name
        ingest_sources(
            [source], listening_dir=root / "listening", quarantine_path=root / "q.parquet", chunk_bytes=chunk_bytes
        )
        got[name] = pq.read_table(root / "q.parquet").column("path").to_pylist()
    assert got["whole"] == got["chunked"] == [f"{source}:61"]
