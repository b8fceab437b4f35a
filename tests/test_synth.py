"""The synthetic world: formats, determinism, and the structure models must find."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from core.errors import ParameterError
from core.settings import WorldSettings
from tasks import synth

SR = 16000
SECONDS = 3.0


@pytest.fixture(scope="module")
def settings() -> WorldSettings:
    return WorldSettings(
        n_tracks=24, n_users=30, clip_seconds=SECONDS, sample_rate=SR, mean_tracks_per_user=6.0, seed=7
    )


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
        pd.read_csv(p, sep="\t", header=None, names=["user", "song", "plays"], dtype={"user": str, "song": str}).assign(
            batch=b
        )
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
    assert (tmp_path / "mtat" / "annotations_final.csv").read_bytes() == (
        world / "mtat" / "annotations_final.csv"
    ).read_bytes()
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
        y = synth.render_clip(
            _track("piano", "drums", "slow", "major", *tags, style="pop"), sample_rate=SR, seconds=SECONDS
        )
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
    rising = synth.render_clip(
        _track("drums", "bass", "slow", "minor", "crescendo", style="rock"), sample_rate=SR, seconds=seconds
    )
    breaks = synth.render_clip(
        _track("drums", "bass", "slow", "minor", "breaks", style="rock"), sample_rate=SR, seconds=seconds
    )
    level = {name: _rms_per_second(y) for name, y in {"plain": plain, "rising": rising, "breaks": breaks}.items()}
    # The same notes: without the long-timescale tags the level is steady ...
    assert level["plain"].max() / level["plain"].min() < 2.0
    # ... a crescendo ends ~20 dB above where it starts ...
    assert level["rising"][-2:].mean() / level["rising"][:2].mean() > 5.0
    # ... and with breaks (no lead instrument here) whole seconds fall close to silence between full ones.
    assert level["breaks"].min() / level["breaks"].max() < 0.15


# ------------------------------------------------------ target (GTZAN-like) catalogue

NEW_GENRES = [g for g in synth.TARGET_GENRES if g not in synth.STYLES]
N_TARGET = 60  # 10 per genre: a stratified 0.8/0.1/0.1 split puts each genre in every split


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory, settings: WorldSettings) -> Path:
    root = tmp_path_factory.mktemp("world") / "gtzan"
    synth.generate_target(root, settings, n_tracks=N_TARGET, seed=1)
    return root


def _genre_track(*tags: str, style: str, seed: int = 3) -> synth.TrackPlan:
    true = (style, *(t for t in synth.TAGS if t in set(tags) and t != style))
    return synth.TrackPlan(1, f"{style}/{style}.00000.wav", style, true, true, seed, 1.0)


def test_target_genres_share_some_styles_and_add_new_ones() -> None:
    shared = [g for g in synth.TARGET_GENRES if g in synth.STYLES]
    assert len(synth.TARGET_GENRES) >= 5 and len(shared) >= 2 and len(NEW_GENRES) >= 2
    for genre in shared:  # same name, same recipe
        assert synth.TARGET_GENRES[genre] == synth._STYLE_TABLE[genre]
    assert not set(NEW_GENRES) & set(synth.TAGS)


def test_plan_target_is_deterministic_balanced_and_disjoint_from_the_source(settings: WorldSettings) -> None:
    plans = synth.plan_target(settings, n_tracks=40, seed=1)
    assert plans == synth.plan_target(settings, n_tracks=40, seed=1)
    assert plans != synth.plan_target(settings, n_tracks=40, seed=2)
    assert plans != synth.plan_target(settings.model_copy(update={"seed": 8}), n_tracks=40, seed=1)
    # Its own random stream: the source world's size does not move the target.
    assert plans == synth.plan_target(settings.model_copy(update={"n_tracks": 99, "n_users": 11}), n_tracks=40, seed=1)
    counts = pd.Series([p.style for p in plans]).value_counts()
    assert set(counts.index) == set(synth.TARGET_GENRES)
    assert counts.min() >= 40 // len(synth.TARGET_GENRES) and counts.max() - counts.min() <= 1
    source = synth.plan_world(settings)
    assert not {p.clip_id for p in plans} & {p.clip_id for p in source}
    assert not {p.seed for p in plans} & {p.seed for p in source}
    for genre in synth.TARGET_GENRES:
        paths = [p.mp3_path for p in plans if p.style == genre]
        assert paths == [f"{genre}/{genre}.{k:05d}.wav" for k in range(len(paths))]
    for p in plans:
        assert p.true_tags == p.annotated_tags and p.true_tags[0] == p.style and p.popularity == 1.0
        assert set(p.true_tags[1:]) <= set(synth.TAGS) - set(synth.STYLES)
        assert ("fast" in p.true_tags) != ("slow" in p.true_tags)
        assert set(p.true_tags) & (set(synth.INSTRUMENTS) - {"drums"})


def test_plan_target_follows_each_genre_recipe() -> None:
    settings = WorldSettings(seed=1)
    plans = synth.plan_target(settings, n_tracks=1200, seed=0)

    def share(genre: str, tag: str, of: list[synth.TrackPlan] = plans) -> float:
        return float(np.mean([tag in p.true_tags for p in of if p.style == genre]))

    assert share("folk", "drums") == 0.0 and share("folk", "guitar") > 0.85
    assert share("metal", "minor") > 0.8 and share("metal", "loud") > 0.85 and share("metal", "guitar") > 0.9
    assert share("disco", "fast") > 0.8 and share("disco", "major") > 0.75
    # A shared genre is drawn like the source style of that name.
    source = synth.plan_world(WorldSettings(n_tracks=3000, seed=1))
    for tag in ("drums", "guitar", "fast", "loud"):
        assert abs(share("rock", tag) - share("rock", tag, source)) < 0.1, tag


def test_plan_target_rejects_bad_arguments(settings: WorldSettings) -> None:
    with pytest.raises(ParameterError, match="n_tracks"):
        synth.plan_target(settings, n_tracks=len(synth.TARGET_GENRES) - 1, seed=0)
    with pytest.raises(ParameterError, match="seed"):
        synth.plan_target(settings, n_tracks=12, seed=-1)
    rock_tagged_metal = synth.TrackPlan(
        1, "rock/rock.00000.wav", "rock", ("rock", "metal", "guitar"), ("rock",), 3, 1.0
    )
    with pytest.raises(ParameterError, match="unknown tags"):  # a genre name is a tag of its own clips only
        synth.render_clip(rock_tagged_metal, sample_rate=SR, seconds=1.0)


def test_render_target_writes_a_gtzan_folder(target: Path, settings: WorldSettings) -> None:
    from tasks.datasets import gtzan_tracks

    assert synth.target_is_complete(target, settings, n_tracks=N_TARGET, seed=1)
    tracks = gtzan_tracks(target, split="random", seed=0)
    assert len(tracks) == N_TARGET
    tracks["genre"] = [tags[0] for tags in tracks["tags"]]
    per_split = tracks.groupby(["genre", "split"]).size().unstack(fill_value=0)
    assert set(per_split.index) == set(synth.TARGET_GENRES)
    assert (per_split["train"] == 8).all() and (per_split["valid"] == 1).all() and (per_split["test"] == 1).all()
    for path in tracks["source_path"][:3]:
        info = sf.info(path)
        assert info.format == "WAV" and info.subtype == "PCM_16" and info.samplerate == SR
        y, _ = sf.read(path, dtype="float32")
        assert y.ndim == 1 and y.size == int(SR * SECONDS) and np.abs(y).max() > 0.05
    genres = pq.read_table(target / "genres.parquet").to_pandas()
    assert sorted(genres["track_id"]) == sorted(tracks["track_id"])
    assert (genres["style_is_new"] == ~genres["genre"].isin(synth.STYLES)).all() and genres["style_is_new"].any()
    assert all(tags[0] == genre for tags, genre in zip(genres["true_tags"], genres["genre"]))
    assert not list(target.rglob("*.tmp"))
    plans = synth.plan_target(settings, n_tracks=N_TARGET, seed=1)
    assert synth.render_target(target, plans[:3], settings=settings) == 0


def test_target_resumes_and_is_replaced_when_settings_change(tmp_path: Path, settings: WorldSettings) -> None:
    synth.generate_target(tmp_path, settings, n_tracks=6, seed=1)
    assert synth.target_is_complete(tmp_path, settings, n_tracks=6, seed=1)
    assert synth.target_is_complete(tmp_path, settings.model_copy(update={"n_users": 31}), n_tracks=6, seed=1)
    assert not synth.target_is_complete(tmp_path, settings, n_tracks=6, seed=2)
    assert not synth.target_is_complete(
        tmp_path, settings.model_copy(update={"sample_rate": 22050}), n_tracks=6, seed=1
    )
    (tmp_path / "notes.txt").write_text("not ours")
    old_clip = next(tmp_path.rglob("*.wav"))
    assert synth.begin_target(tmp_path, settings, n_tracks=6, seed=2) is True
    assert not old_clip.exists() and not (tmp_path / "genres.parquet").exists()
    assert (tmp_path / "notes.txt").exists() and not synth.target_is_complete(tmp_path, settings, n_tracks=6, seed=2)
    # Interrupted after one clip: the same settings resume it and render the rest.
    plans = synth.plan_target(settings, n_tracks=6, seed=2)
    assert synth.render_target(tmp_path, plans[:1], settings=settings) == 1
    assert synth.begin_target(tmp_path, settings, n_tracks=6, seed=2) is False
    assert synth.render_target(tmp_path, plans, settings=settings) == 5
    synth.write_target_truth(plans, root=tmp_path, settings=settings, n_tracks=6, seed=2)
    assert synth.target_is_complete(tmp_path, settings, n_tracks=6, seed=2)


def _low_band_peaks(y: np.ndarray, *, cutoff: float = 120.0) -> int:
    """Peaks of the 10 ms envelope below ``cutoff`` Hz above 30 % of its maximum: kick drum hits, roughly."""
    spectrum = np.fft.rfft(y)
    spectrum[np.fft.rfftfreq(y.size, 1 / SR) > cutoff] = 0
    low = np.fft.irfft(spectrum, n=y.size)
    hop = SR // 100
    envelope = np.sqrt((low[: low.size // hop * hop].reshape(-1, hop) ** 2).mean(axis=1))
    rising = np.diff(envelope) > 0
    peaks = np.flatnonzero(rising[:-1] & ~rising[1:]) + 1
    return int((envelope[peaks] > 0.3 * envelope.max()).sum())


def _power_share_above(y: np.ndarray, hz: float) -> float:
    power = np.abs(np.fft.rfft(y)) ** 2
    return float(power[np.fft.rfftfreq(y.size, 1 / SR) > hz].sum() / power.sum())


def _spectral_flatness(y: np.ndarray, *, n_fft: int = 1024) -> float:
    """Median over frames of geometric / arithmetic mean power: 1 for noise, near 0 for a few harmonics."""
    frames = y[: y.size // n_fft * n_fft].reshape(-1, n_fft) * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-12
    return float(np.median(np.exp(np.log(power).mean(axis=1)) / power.mean(axis=1)))


@pytest.mark.parametrize("seed", [0, 1])
def test_new_genres_sound_different_from_shared_ones_with_the_same_tags(seed: int) -> None:
    def render(*tags: str, style: str) -> np.ndarray:
        return synth.render_clip(_genre_track(*tags, style=style, seed=seed), sample_rate=SR, seconds=SECONDS)

    drums = ("drums", "fast", "minor", "loud")
    # Metal's double kick plays sixteenths where rock's kick plays three hits a bar.
    assert _low_band_peaks(render(*drums, style="metal")) > 3 * _low_band_peaks(render(*drums, style="rock"))
    # Disco's open hats ring on the off-beats where techno's closed hats (same positions) are short ticks.
    disco = ("drums", "fast", "major", "loud")
    assert _power_share_above(render(*disco, style="disco"), 4000.0) > 1.5 * _power_share_above(
        render(*disco, style="techno"), 4000.0
    )
    # Metal's overdriven guitar is far noisier in spectrum than rock's clean one.
    guitar = ("guitar", "fast", "minor", "loud")
    assert _spectral_flatness(render(*guitar, style="metal")) > 5 * _spectral_flatness(render(*guitar, style="rock"))


# The source world must not change when target genres are added. Each source clip is compared with a
# stored low-resolution reference rendering (tests/data/source_world_reference.json, rendered with the
# code from before the target genres existed; rebuild it with `python -m tests.test_synth`) in three
# coarse views: the loudness envelope, the spectral envelope and a few samples. Float32 rendering
# differs in its last bits between CPUs (AVX2 against AVX-512 kernels: about 1e-7 relative), so the
# tolerances sit far above that noise and far below any real change of a note, an instrument, a
# level or a seed (each moves these views by whole percent).
SOURCE_CLIPS = {2: "pop, drums", 6: "classical", 10: "rock, drums", 18: "techno, drums", 26: "jazz, drums"}
REFERENCE = Path(__file__).with_name("data") / "source_world_reference.json"


def coarse_view(y: np.ndarray) -> dict[str, np.ndarray]:
    """A clip seen coarsely: RMS of 48 equal blocks, the level of 24 equal FFT bands (dB), 64 samples."""
    y = np.asarray(y, dtype=np.float64)
    blocks = np.array_split(y, 48)
    power = np.abs(np.fft.rfft(y)) ** 2
    bands = np.array_split(power[1:], 24)
    return {
        "block_rms": np.array([np.sqrt(np.mean(b**2)) for b in blocks]),
        "band_db": np.array([10 * np.log10(np.sum(b) + 1e-12) for b in bands]),
        "samples": y[:: max(1, len(y) // 64)][:64],
    }


def _source_world() -> WorldSettings:
    return WorldSettings(
        n_tracks=24, n_users=30, clip_seconds=SECONDS, sample_rate=SR, mean_tracks_per_user=6.0, seed=7
    )


def test_source_world_audio_is_unchanged_by_the_target_genres() -> None:
    reference = json.loads(REFERENCE.read_text())
    plans = {p.clip_id: p for p in synth.plan_world(_source_world())}
    for clip_id, style in SOURCE_CLIPS.items():
        got = coarse_view(synth.render_clip(plans[clip_id], sample_rate=SR, seconds=SECONDS))
        want = {key: np.asarray(values) for key, values in reference[str(clip_id)].items()}
        # 0.1 % of each block's loudness, 0.01 dB of each band, 1e-4 of full scale per sample.
        np.testing.assert_allclose(got["block_rms"], want["block_rms"], rtol=1e-3, atol=1e-6, err_msg=style)
        np.testing.assert_allclose(got["band_db"], want["band_db"], atol=0.01, err_msg=style)
        np.testing.assert_allclose(got["samples"], want["samples"], atol=1e-4, err_msg=style)


def _write_reference() -> None:
    plans = {p.clip_id: p for p in synth.plan_world(_source_world())}
    views = {}
    for clip_id in SOURCE_CLIPS:
        view = coarse_view(synth.render_clip(plans[clip_id], sample_rate=SR, seconds=SECONDS))
        views[str(clip_id)] = {key: [float(f"{v:.9g}") for v in values] for key, values in view.items()}
    REFERENCE.parent.mkdir(exist_ok=True)
    REFERENCE.write_text(json.dumps(views, indent=1) + "\n")


@pytest.mark.integration
def test_synthetic_target_flow_renders_and_then_skips(
    prefect_server, dask_cluster, tmp_path: Path, settings: WorldSettings
) -> None:
    from flows.world import synthetic_target
    from tasks.datasets import gtzan_tracks

    root = tmp_path / "gtzan"
    cluster = dask_cluster
    assert synthetic_target(root, settings, cluster, n_tracks=12, seed=3) == root
    assert synth.target_is_complete(root, settings, n_tracks=12, seed=3)
    assert len(gtzan_tracks(root, split="random")) == 12
    written = {path: path.stat().st_mtime_ns for path in root.rglob("*")}
    synthetic_target(root, settings, cluster, n_tracks=12, seed=3)  # complete: nothing is touched
    assert {path: path.stat().st_mtime_ns for path in root.rglob("*")} == written


if __name__ == "__main__":
    _write_reference()
