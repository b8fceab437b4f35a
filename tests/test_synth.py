"""The synthetic world: formats, determinism, and the structure models must find."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from infra.settings import WorldSettings
from tasks import synth
from tasks.errors import ParameterError

SR = 16000
SECONDS = 3.0


@pytest.fixture(scope="module")
def settings() -> WorldSettings:
    return WorldSettings(n_tracks=24, n_users=30, clip_seconds=SECONDS, sample_rate=SR, mean_tracks_per_user=6.0, seed=7)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, settings: WorldSettings) -> Path:
    root = tmp_path_factory.mktemp("world")
    seen: list[int] = []
    synth.generate_world(root, settings, on_progress=seen.append)
    assert seen[-1] == settings.n_tracks
    return root


def _track(*tags: str, style: str, seed: int = 3) -> synth.TrackPlan:
    true = tuple(t for t in synth.TAGS if t in {style, *tags})
    return synth.TrackPlan(0, "0/x.mp3", style, true, true, seed, 1.0)


def _triplets(root: Path) -> pd.DataFrame:
    frames = [
        pd.read_csv(p, sep="\t", header=None, names=["user", "song", "plays"], dtype={"user": str, "song": str}).assign(batch=b)
        for b, p in enumerate(sorted((root / "taste_profile").glob("train_triplets.batch-*.txt")))
    ]
    return pd.concat(frames, ignore_index=True)


def test_tag_vocabulary() -> None:
    assert len(synth.TAGS) >= 20 and len(set(synth.TAGS)) == len(synth.TAGS)
    assert set(synth.STYLES) <= set(synth.TAGS)


def test_plan_is_deterministic_and_consistent(settings: WorldSettings) -> None:
    plans = synth.plan_world(settings)
    assert plans == synth.plan_world(settings)
    assert plans != synth.plan_world(settings.model_copy(update={"seed": 8}))
    assert len({p.clip_id for p in plans}) == len({p.mp3_path for p in plans}) == settings.n_tracks
    for p in plans:
        assert p.style in p.true_tags
        assert set(p.annotated_tags) <= set(p.true_tags)
        assert ("fast" in p.true_tags) != ("slow" in p.true_tags)
        assert ("major" in p.true_tags) != ("minor" in p.true_tags)
        assert ("loud" in p.true_tags) != ("quiet" in p.true_tags)
        assert set(p.true_tags) & (set(synth.INSTRUMENTS) - {"drums"})
        assert p.mp3_path[0] in "0123456789abcdef" and p.mp3_path[1] == "/"


def test_annotations_are_mtat_format(world: Path, settings: WorldSettings) -> None:
    path = world / "mtat" / "annotations_final.csv"
    first = path.read_text().splitlines()[0]
    assert first.startswith('"clip_id"\t') and first.endswith('\t"mp3_path"')
    rows = list(csv.reader(path.open(), delimiter="\t", quoting=csv.QUOTE_NONE))
    assert all(cell.startswith('"') and cell.endswith('"') for row in rows for cell in row)
    frame = pd.read_csv(path, sep="\t")
    assert list(frame.columns) == ["clip_id", *synth.TAGS, "mp3_path"]
    assert len(frame) == settings.n_tracks
    assert frame["clip_id"].dtype.kind == "i"
    assert set(np.unique(frame[list(synth.TAGS)].to_numpy())) <= {0, 1}
    for mp3 in frame["mp3_path"]:
        assert (world / "mtat" / "audio" / mp3).is_file()


def test_mp3s_decode_at_rate_and_length(world: Path, settings: WorldSettings) -> None:
    frame = pd.read_csv(world / "mtat" / "annotations_final.csv", sep="\t")
    for mp3 in frame["mp3_path"][:4]:
        y, sr = sf.read(world / "mtat" / "audio" / mp3, dtype="float32")
        assert sr == SR and y.ndim == 1
        assert abs(y.size - SR * SECONDS) <= 1152  # one MP3 frame of padding at most
        assert np.abs(y).max() > 0.05
    assert not list((world / "mtat" / "audio").rglob("*.tmp"))


def test_world_is_deterministic(world: Path, settings: WorldSettings, tmp_path: Path) -> None:
    tracks = synth.plan_world(settings)[:2]
    synth.write_annotations(tracks, root=tmp_path)
    synth.write_listening(synth.plan_world(settings), root=tmp_path, settings=settings)
    for path in sorted((world / "taste_profile").glob("*.txt")):
        assert (tmp_path / "taste_profile" / path.name).read_bytes() == path.read_bytes()
    again = synth.plan_world(settings)
    synth.write_annotations(again, root=tmp_path)
    assert (tmp_path / "mtat" / "annotations_final.csv").read_bytes() == (world / "mtat" / "annotations_final.csv").read_bytes()
    a = synth.render_clip(tracks[0], sample_rate=SR, seconds=SECONDS)
    b = synth.render_clip(tracks[0], sample_rate=SR, seconds=SECONDS)
    assert a.dtype == np.float32 and a.shape == (int(SR * SECONDS),)
    np.testing.assert_array_equal(a, b)


def test_render_clips_skips_existing_files(world: Path, settings: WorldSettings) -> None:
    assert synth.render_clips(synth.plan_world(settings)[:3], root=world, settings=settings) == 0


def test_completion_marker(world: Path, settings: WorldSettings) -> None:
    assert synth.world_is_complete(world, settings)
    assert not synth.world_is_complete(world, settings.model_copy(update={"n_users": 31}))
    truth = pq.read_table(world / "truth.parquet").to_pandas()
    assert {"clip_id", "style", "true_tags", "popularity"} <= set(truth.columns)
    assert len(truth) == settings.n_tracks and truth["popularity"].max() == pytest.approx(1.0)


def test_loud_clips_are_louder() -> None:
    def rms(*tags: str) -> float:
        y = synth.render_clip(_track("piano", "drums", "slow", "major", *tags, style="pop"), sample_rate=SR, seconds=SECONDS)
        return float(np.sqrt(np.mean(y**2)))

    assert rms("loud") > 3 * rms("quiet")


def test_fast_clips_have_more_onsets() -> None:
    librosa = pytest.importorskip("librosa")

    def onsets(tempo: str) -> int:
        counts = []
        for seed in range(3):
            track = _track("guitar", "drums", "bass", tempo, "minor", "loud", style="rock", seed=seed)
            y = synth.render_clip(track, sample_rate=SR, seconds=6.0)
            counts.append(len(librosa.onset.onset_detect(y=y, sr=SR)))
        return int(np.mean(counts))

    assert onsets("fast") > 1.4 * onsets("slow")


def test_triplets_are_well_formed(world: Path, settings: WorldSettings) -> None:
    paths = sorted((world / "taste_profile").glob("train_triplets.batch-*.txt"))
    assert [p.name for p in paths] == [f"train_triplets.batch-{b:03d}.txt" for b in range(settings.n_batches)]
    songs = {str(c) for c in pd.read_csv(world / "mtat" / "annotations_final.csv", sep="\t")["clip_id"]}
    for path in paths:
        lines = path.read_text().splitlines()
        assert lines, f"{path.name} is empty"
        for line in lines:
            user, song, plays = line.split("\t")
            assert len(user) == 40 and int(user, 16) >= 0
            assert song in songs
            assert plays.isdigit() and int(plays) > 0


def test_users_play_their_favourite_style(world: Path) -> None:
    plays = _triplets(world)
    truth = pq.read_table(world / "truth.parquet").to_pandas()
    style = dict(zip(truth["clip_id"].astype(str), truth["style"]))
    plays["style"] = plays["song"].map(style)
    per_style = plays.groupby(["user", "style"])["plays"].sum().unstack(fill_value=0)
    top_share = (per_style.max(axis=1) / per_style.sum(axis=1)).mean()
    assert top_share > 2 / len(synth.STYLES)


def test_bad_arguments_raise() -> None:
    track = _track("piano", "slow", "major", "quiet", style="classical")
    with pytest.raises(ParameterError, match="sample_rate"):
        synth.render_clip(track, sample_rate=0, seconds=1.0)
    with pytest.raises(ParameterError, match="unknown"):
        synth.render_clip(_track("piano", style="polka"), sample_rate=SR, seconds=1.0)


def test_a_world_of_other_settings_is_replaced_not_reused(tmp_path: Path, settings: WorldSettings) -> None:
    tiny = settings.model_copy(update={"n_tracks": 16, "n_users": 12})
    synth.generate_world(tmp_path, tiny)
    old_clip = next((tmp_path / "mtat" / "audio").rglob("*.mp3"))
    other = tiny.model_copy(update={"seed": tiny.seed + 1})
    assert synth.begin_world(tmp_path, other) is True
    assert not old_clip.exists() and not synth.world_is_complete(tmp_path, tiny)
    # Same settings again: an interrupted world resumes and nothing is removed.
    assert synth.begin_world(tmp_path, other) is False


def test_every_tag_has_a_type_and_a_timescale(world: Path, settings: WorldSettings) -> None:
    tags = pq.read_table(world / "tags.parquet").to_pandas()
    assert list(tags["tag"]) == list(synth.TAGS)
    assert dict(zip(tags["tag"], tags["type"])) == synth.TAG_TYPES
    assert dict(zip(tags["tag"], tags["timescale_s"])) == synth.tag_timescales(settings)
    scale = synth.tag_timescales(WorldSettings(clip_seconds=15.0))
    assert scale["crescendo"] == 15.0 > scale["breaks"] > scale["major"] > scale["fast"] > scale["piano"]


def test_long_timescale_tags_are_drawn_apart_from_the_style() -> None:
    plans = synth.plan_world(WorldSettings(n_tracks=3000, seed=1))
    for tag in synth.LONG_TAGS:
        share = {style: np.mean([tag in p.true_tags for p in plans if p.style == style]) for style in synth.STYLES}
        assert all(abs(s - synth.LONG_TAG_P[tag]) < 0.08 for s in share.values()), (tag, share)


def _rms_per_second(y: np.ndarray) -> np.ndarray:
    return np.sqrt((y[: len(y) // SR * SR].reshape(-1, SR) ** 2).mean(axis=1))


def test_crescendo_rises_over_the_clip_and_breaks_drop_the_band() -> None:
    seconds = 12.0
    plain = synth.render_clip(_track("drums", "bass", "slow", "minor", style="rock"), sample_rate=SR, seconds=seconds)
    rising = synth.render_clip(_track("drums", "bass", "slow", "minor", "crescendo", style="rock"), sample_rate=SR,
                               seconds=seconds)
    breaks = synth.render_clip(_track("drums", "bass", "slow", "minor", "breaks", style="rock"), sample_rate=SR,
                               seconds=seconds)
    level = {name: _rms_per_second(y) for name, y in {"plain": plain, "rising": rising, "breaks": breaks}.items()}
    # The same notes: without the long-timescale tags the level is steady ...
    assert level["plain"].max() / level["plain"].min() < 2.0
    # ... a crescendo ends ~20 dB above where it starts ...
    assert level["rising"][-2:].mean() / level["rising"][:2].mean() > 5.0
    # ... and with breaks (no lead instrument here) whole seconds fall close to silence between full ones.
    assert level["breaks"].min() / level["breaks"].max() < 0.15
