"""Dataset adapters on small hand-written files and on the real samples in ../shared/data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.errors import DatasetError, ParameterError
from tasks.audio import decode
from tasks.datasets import (
    gtzan_tracks,
    manifest_tracks,
    mtat_folder_split,
    mtat_tracks,
    read_mtat_annotations,
    read_mtat_index,
    top_tags,
)

ANNOTATIONS = (
    '"clip_id"\t"guitar"\t"piano"\t"rock"\t"mp3_path"\n'
    '"2"\t"1"\t"0"\t"1"\t"f/american_bach_soloists-bwv54-30-59.mp3"\n'
    '"6"\t"0"\t"1"\t"0"\t"0/artist-album-01-track-0-29.mp3"\n'
    '"10"\t"1"\t"1"\t"0"\t"c/x-y-02-z-30-59.mp3"\n'
)


def test_mtat_annotations_and_folder_split(tmp_path):
    path = tmp_path / "annotations_final.csv"
    path.write_text(ANNOTATIONS)
    annotations = read_mtat_annotations(path)
    assert list(annotations["clip_id"]) == [2, 6, 10]
    assert top_tags(annotations, n=2) == ["guitar", "piano"]
    tracks = mtat_tracks(annotations, audio_root=tmp_path, n_tags=2)
    assert list(tracks["split"]) == ["test", "train", "valid"]
    assert list(tracks["tags"].map(list)) == [["guitar"], ["piano"], ["guitar", "piano"]]
    assert tracks["source_path"][1] == str(tmp_path.resolve() / "0/artist-album-01-track-0-29.mp3")


def test_malformed_annotations_are_named(tmp_path):
    path = tmp_path / "annotations_final.csv"
    path.write_text('"clip_id"\t"rock"\t"mp3_path"\n"2"\t"yes"\t"0/a.mp3"\n')
    with pytest.raises(DatasetError, match="other than 0/1"):
        read_mtat_annotations(path)
    with pytest.raises(DatasetError, match="not found"):
        read_mtat_annotations(tmp_path / "missing.csv")
    with pytest.raises(DatasetError, match="MTAT folder"):
        mtat_folder_split("g/x.mp3")


@pytest.mark.realdata
def test_real_mtat_index_and_clip(shared_data):
    index = read_mtat_index(shared_data / "mtat" / "index_mtt.tsv")
    assert len(index) == 25863
    counts = index["split"].value_counts()
    assert counts["train"] > counts["test"] > counts["valid"] > 0
    assert index.loc[index["clip_id"] == 37386, "split"].item() == "test"
    clip = shared_data / "mtat" / "audio" / "e" / "joram-moments_of_clarity-08-solipsism-59-88.mp3"
    y = decode(clip, sample_rate=16000)
    assert 28.0 < len(y) / 16000 < 31.0 and np.isfinite(y).all()


@pytest.mark.realdata
@pytest.mark.parametrize("fmt", ["wav", "au"])
def test_real_gtzan_clips_decode(shared_data, fmt):
    for path in sorted((shared_data / "gtzan" / fmt).glob(f"*.{fmt}"))[:3]:
        y = decode(path, sample_rate=22050)
        assert 29.0 < len(y) / 22050 < 31.0 and y.dtype == np.float32


@pytest.mark.realdata
def test_real_gtzan_wav_and_au_hold_the_same_samples(shared_data):
    wav = decode(shared_data / "gtzan" / "wav" / "blues.00000.wav", sample_rate=22050)
    au = decode(shared_data / "gtzan" / "au" / "blues.00000.au", sample_rate=22050)
    n = min(len(wav), len(au))
    assert np.corrcoef(wav[:n], au[:n])[0, 1] > 0.99


@pytest.mark.realdata
def test_real_msd_preview_decodes_to_mono(shared_data):
    y = decode(shared_data / "msd" / "TRWJAZW128F42760DD.mp3", sample_rate=22050)
    assert y.ndim == 1 and len(y) / 22050 > 20


def test_tag_vocabulary_counts_and_breaks_ties_by_name():
    from tasks.datasets import tag_vocabulary

    tracks = pd.DataFrame({"tags": [["rock", "guitar"], ["piano", "rock"], ["guitar"], ["jazz"]]})
    assert tag_vocabulary(tracks, n=3) == ["guitar", "rock", "jazz"]


# ---------------------------------------------------------------- MTAT split lists


def _annotations(tmp_path):
    path = tmp_path / "annotations_final.csv"
    path.write_text(ANNOTATIONS)
    return read_mtat_annotations(path)


def _write_lists(tmp_path, **contents):
    lists = {}
    for name, text in contents.items():
        lists[name] = tmp_path / f"{name}.txt"
        lists[name].write_text(text)
    return lists


def test_mtat_split_lists_accept_ids_id_tab_path_and_paths(tmp_path):
    annotations = _annotations(tmp_path)
    lists = _write_lists(
        tmp_path,
        train="/data/mtat/f/american_bach_soloists-bwv54-30-59.mp3\n\n# a comment\n",
        valid="6\t0/artist-album-01-track-0-29.mp3\n",
        test="",
    )
    tracks = mtat_tracks(annotations, audio_root=tmp_path, n_tags=2, split="lists", split_lists=lists)
    # clip 2 by its path, clip 6 by id<TAB>path; clip 10 in no list is kept as unused
    assert list(tracks["split"]) == ["train", "valid", "unused"]
    assert list(tracks.columns) == ["track_id", "source_path", "split", "tags"]
    lists = _write_lists(tmp_path, train="10\n2\n", test="6\n")
    tracks = mtat_tracks(annotations, audio_root=tmp_path, split="lists", split_lists=lists)
    assert list(tracks["split"]) == ["train", "test", "train"]


def test_mtat_split_list_errors_are_named(tmp_path):
    annotations = _annotations(tmp_path)
    with pytest.raises(DatasetError, match=r"train.txt:2: '999' names no MTAT clip"):
        mtat_tracks(
            annotations, audio_root=tmp_path, split="lists", split_lists=_write_lists(tmp_path, train="2\n999\n")
        )
    with pytest.raises(DatasetError, match=r"test.txt:1: 2 is already in the train split"):
        mtat_tracks(
            annotations, audio_root=tmp_path, split="lists", split_lists=_write_lists(tmp_path, train="2\n", test="2\n")
        )
    with pytest.raises(DatasetError, match="valid split list not found"):
        mtat_tracks(annotations, audio_root=tmp_path, split="lists", split_lists={"valid": tmp_path / "nope.txt"})
    with pytest.raises(ParameterError, match=r"split list keys \['validation'\]"):
        mtat_tracks(annotations, audio_root=tmp_path, split="lists", split_lists={"validation": tmp_path / "x.txt"})
    with pytest.raises(ParameterError, match="needs split_lists"):
        mtat_tracks(annotations, audio_root=tmp_path, split="lists")
    with pytest.raises(ParameterError, match="only read with split='lists'"):
        mtat_tracks(annotations, audio_root=tmp_path, split_lists={"train": tmp_path / "train.txt"})
    with pytest.raises(ParameterError, match="'cleaned' is not one of"):
        mtat_tracks(annotations, audio_root=tmp_path, split="cleaned")


# ---------------------------------------------------------------- GTZAN


GENRES = ("blues", "jazz", "rock")


def _gtzan_tree(root, *, n=10, ext="wav", flat=False):
    for genre in GENRES:
        folder = root if flat else root / genre
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (folder / f"{genre}.{i:05d}.{ext}").write_bytes(b"")
    return root


def test_gtzan_filtered_split_matches_by_stem_and_keeps_unlisted_as_unused(tmp_path):
    root = _gtzan_tree(tmp_path / "genres", n=3)
    (root / "blues" / "README.txt").write_text("not audio")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "train_filtered.txt").write_text("blues/blues.00000.wav\njazz/jazz.00001.au\nrock.00002\n")
    (splits / "valid_filtered.txt").write_text("blues/blues.00001.wav\nblues/blues.00099.wav\n")  # 00099: absent, fine
    (splits / "test_filtered.txt").write_text("rock/rock.00000.wav\n")
    tracks = gtzan_tracks(root, split_dir=splits)
    assert list(tracks.columns) == ["track_id", "source_path", "split", "tags"]
    assert len(tracks) == 9
    got = dict(zip(tracks["track_id"], tracks["split"]))
    assert got == {
        "blues.00000": "train",
        "blues.00001": "valid",
        "blues.00002": "unused",
        "jazz.00000": "unused",
        "jazz.00001": "train",
        "jazz.00002": "unused",
        "rock.00000": "test",
        "rock.00001": "unused",
        "rock.00002": "train",
    }
    row = tracks.set_index("track_id").loc["jazz.00001"]
    assert row["tags"] == ["jazz"] and row["source_path"] == str((root / "jazz" / "jazz.00001.wav").resolve())


def test_gtzan_random_split_is_seeded_and_stratified(tmp_path):
    root = _gtzan_tree(tmp_path, n=10, ext="au", flat=True)
    tracks = gtzan_tracks(root, split="random", seed=3)
    counts = tracks.groupby(tracks["tags"].str[0])["split"].value_counts().unstack()
    assert (counts["train"] == 8).all() and (counts["valid"] == 1).all() and (counts["test"] == 1).all()
    assert tracks.equals(gtzan_tracks(root, split="random", seed=3))
    assert not tracks["split"].equals(gtzan_tracks(root, split="random", seed=4)["split"])
    halves = gtzan_tracks(root, split="random", fractions=(0.5, 0.0, 0.5))
    assert set(halves["split"].value_counts().items()) == {("train", 15), ("test", 15)}


def test_gtzan_errors_are_named(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        gtzan_tracks(tmp_path / "missing", split="random")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("")
    with pytest.raises(DatasetError, match="no GTZAN audio found under"):
        gtzan_tracks(tmp_path / "empty", split="random")
    root = _gtzan_tree(tmp_path / "g", n=2, flat=True)
    with pytest.raises(DatasetError, match="train split list not found at .*train_filtered.txt"):
        gtzan_tracks(root)  # split_dir defaults to root, which holds no lists
    (root / "train_filtered.txt").write_text("blues/blues.00000.wav\n")
    (root / "valid_filtered.txt").write_text("not a gtzan name\n")
    (root / "test_filtered.txt").write_text("")
    with pytest.raises(DatasetError, match=r"valid_filtered.txt:1: 'not a gtzan name' names no GTZAN track"):
        gtzan_tracks(root)
    (root / "valid_filtered.txt").write_text("blues/blues.00000.au\n")
    with pytest.raises(DatasetError, match="'blues.00000' is already in the train split"):
        gtzan_tracks(root)
    (root / "blues.00000.au").write_bytes(b"")
    with pytest.raises(DatasetError, match="blues.00000 is there twice"):
        gtzan_tracks(root, split="random")
    with pytest.raises(ParameterError, match="fractions"):
        gtzan_tracks(_gtzan_tree(tmp_path / "h", n=1), split="random", fractions=(0.8, 0.3, 0.1))
    with pytest.raises(ParameterError, match="'kfold' is not one of"):
        gtzan_tracks(tmp_path / "h", split="kfold")
    (tmp_path / "h" / "blues" / "jazz.00007.wav").write_bytes(b"")
    with pytest.raises(DatasetError, match="genre 'jazz' sits in folder 'blues'"):
        gtzan_tracks(tmp_path / "h", split="random")


# ---------------------------------------------------------------- generic manifest


def test_manifest_csv_resolves_paths_and_splits_tags(tmp_path):
    (tmp_path / "m").mkdir()
    manifest = tmp_path / "m" / "manifest.csv"
    manifest.write_text(
        "track_id,path,tags,split\n"
        "a,audio/a.mp3,rock|guitar,train\n"
        "b,/abs/b.wav,,Test\n"
        'c,c.flac,"jazz, piano|sax",valid\n'
    )
    tracks = manifest_tracks(manifest)
    assert list(tracks.columns) == ["track_id", "source_path", "split", "tags"]
    assert list(tracks["source_path"]) == [
        str((tmp_path / "m" / "audio" / "a.mp3").resolve()),
        "/abs/b.wav",
        str((tmp_path / "m" / "c.flac").resolve()),
    ]
    assert list(tracks["split"]) == ["train", "test", "valid"]
    assert list(tracks["tags"]) == [["rock", "guitar"], [], ["jazz, piano", "sax"]]  # '|' in any cell: '|' separates
    other = tmp_path / "commas.csv"
    other.write_text('track_id,path,tags\n7,x.wav,"rock, pop"\n')
    tracks = manifest_tracks(other, base_dir=tmp_path / "audio")
    assert tracks["track_id"].tolist() == ["7"] and tracks["tags"].tolist() == [["rock", "pop"]]
    assert tracks["split"].tolist() == ["train"]  # no split column: all train
    assert tracks["source_path"][0] == str((tmp_path / "audio" / "x.wav").resolve())


def test_manifest_parquet_with_list_tags(tmp_path):
    path = tmp_path / "manifest.parquet"
    frame = pd.DataFrame(
        {"track_id": ["x", "y"], "path": ["x.ogg", "y.ogg"], "tags": [["a", "b"], []], "split": ["valid", "unused"]}
    )
    frame.to_parquet(path)
    tracks = manifest_tracks(path)
    assert [list(t) for t in tracks["tags"]] == [["a", "b"], []]
    assert list(tracks["split"]) == ["valid", "unused"]
    assert tracks["source_path"][1] == str((tmp_path / "y.ogg").resolve())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("track_id,path\na,a.wav\nb,b.wav\na,c.wav\n", r"duplicate track ids \['a'\]"),
        ("track_id,file\na,a.wav\n", r"missing required columns \['path'\]"),
        ("id,file\na,a.wav\n", r"missing required columns \['track_id', 'path'\]"),
        (
            "track_id,path,split\na,a.wav,train\nb,b.wav,validation\nc,c.wav,\n",
            r"unknown split values \['', 'validation'\] \(track ids \['b', 'c'\]\)",
        ),
        ("track_id,path\na,\n", r"empty path for track ids \['a'\]"),
        ("track_id,path\n,a.wav\n", r"empty track_id in rows \[2\]"),
        ("track_id,path\n", "has no rows"),
    ],
)
def test_manifest_errors_are_named(tmp_path, text, message):
    path = tmp_path / "manifest.csv"
    path.write_text(text)
    with pytest.raises(DatasetError, match=message):
        manifest_tracks(path)


def test_manifest_file_errors_are_named(tmp_path):
    with pytest.raises(DatasetError, match="manifest not found"):
        manifest_tracks(tmp_path / "nope.csv")
    (tmp_path / "m.json").write_text("{}")
    with pytest.raises(DatasetError, match="neither CSV"):
        manifest_tracks(tmp_path / "m.json")
    (tmp_path / "m.parquet").write_text("not parquet")
    with pytest.raises(DatasetError, match="could not be read as parquet"):
        manifest_tracks(tmp_path / "m.parquet")


# ---------------------------------------------------------------- real samples

# The ten GTZAN sample clips (<genre>.00000) in the fault-filtered split, read from
# ../shared/data/gtzan/splits: none of them is a known fault.
GTZAN_00000_FILTERED_SPLIT = {
    "blues.00000": "valid",
    "classical.00000": "valid",
    "country.00000": "valid",
    "disco.00000": "valid",
    "hiphop.00000": "test",
    "jazz.00000": "train",
    "metal.00000": "valid",
    "pop.00000": "test",
    "reggae.00000": "train",
    "rock.00000": "train",
}


@pytest.mark.realdata
@pytest.mark.parametrize("fmt", ["wav", "au"])
def test_real_gtzan_samples_load_with_the_filtered_split(shared_data, fmt):
    tracks = gtzan_tracks(shared_data / "gtzan" / fmt, split="filtered", split_dir=shared_data / "gtzan" / "splits")
    assert len(tracks) == 10
    assert dict(zip(tracks["track_id"], tracks["split"])) == GTZAN_00000_FILTERED_SPLIT
    assert sorted(t[0] for t in tracks["tags"]) == sorted(t.split(".")[0] for t in GTZAN_00000_FILTERED_SPLIT)
    assert all(p.endswith(f".{fmt}") and Path(p).is_file() for p in tracks["source_path"])


@pytest.mark.realdata
def test_real_gtzan_filtered_split_over_all_1000_names(shared_data, tmp_path):
    # empty stand-ins for the full collection: the filtered lists give 443/197/290, the other 70 are unused
    genres = sorted(p.stem.split(".")[0] for p in (shared_data / "gtzan" / "wav").glob("*.wav"))
    for genre in genres:
        (tmp_path / genre).mkdir()
        for i in range(100):
            (tmp_path / genre / f"{genre}.{i:05d}.wav").touch()
    tracks = gtzan_tracks(tmp_path, split_dir=shared_data / "gtzan" / "splits")
    assert tracks["split"].value_counts().to_dict() == {"train": 443, "test": 290, "valid": 197, "unused": 70}


@pytest.mark.realdata
def test_real_mtat_index_as_split_lists(shared_data, tmp_path):
    index = read_mtat_index(shared_data / "mtat" / "index_mtt.tsv")
    # annotations shaped like annotations_final.csv over the real ids and paths, one made-up tag
    annotations = pd.DataFrame({"clip_id": index["clip_id"], "techno": np.int8(0), "mp3_path": index["mp3_path"]})
    lines = (shared_data / "mtat" / "index_mtt.tsv").read_text().splitlines()
    lists = {"train": tmp_path / "train.tsv", "valid": tmp_path / "valid.txt", "test": tmp_path / "test.txt"}
    lists["train"].write_text("\n".join(lines[:100]) + "\n")  # clip_id<TAB>mp3_path, as the cleaned split ships
    lists["valid"].write_text("\n".join(str(c) for c in index["clip_id"][100:150]) + "\n")  # bare ids
    lists["test"].write_text("\n".join(f"/mnt/mtat/{p}" for p in index["mp3_path"][150:175]) + "\n")  # mp3 paths
    tracks = mtat_tracks(
        annotations, audio_root=shared_data / "mtat" / "audio", n_tags=1, split="lists", split_lists=lists
    )
    assert len(tracks) == 25863
    assert tracks["split"].value_counts().to_dict() == {"unused": 25863 - 175, "train": 100, "valid": 50, "test": 25}
    assert list(tracks["split"][:175]) == ["train"] * 100 + ["valid"] * 50 + ["test"] * 25
    folder = mtat_tracks(annotations, audio_root=shared_data / "mtat" / "audio", n_tags=1)
    assert folder.loc[folder["track_id"] == "37386", "split"].item() == "test"
