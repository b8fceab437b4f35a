"""Dataset adapters on small hand-written files and on the real samples in ../shared/data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tasks.audio import decode
from tasks.datasets import (
    mtat_folder_split,
    mtat_tracks,
    read_hetrec_user_artists,
    read_mtat_annotations,
    read_mtat_index,
    read_triplets,
    top_tags,
)
from tasks.errors import DatasetError

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


def test_triplets_quarantine_bad_rows_and_sum_duplicates(tmp_path):
    path = tmp_path / "triplets.txt"
    path.write_text(
        "u1\ts1\t3\n"
        "u1\ts1\t2\n"          # duplicate: summed
        "u2\ts2\tmany\n"       # not an integer
        "u3\ts3\n"             # two fields
        "u4\ts4\t-1\n"         # negative
        "\ts5\t1\n"            # empty user
        "u5\ts5\t1\textra\n"   # four fields
        "u6\ts6\t7\n"
    )
    events, bad = read_triplets(path, batch="b0")
    assert sorted(zip(events["user"], events["item"], events["plays"])) == [("u1", "s1", 5), ("u6", "s6", 7)]
    assert set(events["batch"]) == {"b0"}
    assert [b["path"].rsplit(":", 1)[1] for b in bad] == ["3", "4", "5", "6", "7"]
    assert all(b["stage"] == "listening" and b["reason"] for b in bad)


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


@pytest.mark.realdata
def test_real_hetrec_user_artists_load_as_events(shared_data):
    events = read_hetrec_user_artists(shared_data / "lastfm_hetrec2011_2k" / "user_artists.dat")
    assert len(events) == 92834
    assert events["user"].nunique() == 1892 and events["item"].nunique() == 17632
    assert (events["plays"] > 0).all()
    assert isinstance(events, pd.DataFrame) and list(events.columns) == ["user", "item", "plays", "batch"]


def test_tag_vocabulary_counts_and_breaks_ties_by_name():
    from tasks.datasets import tag_vocabulary

    tracks = pd.DataFrame({"tags": [["rock", "guitar"], ["piano", "rock"], ["guitar"], ["jazz"]]})
    assert tag_vocabulary(tracks, n=3) == ["guitar", "rock", "jazz"]
