"""A seeded synthetic music world in the real dataset formats (DESIGN.md section 6).

Six latent styles decide each track's tags (instruments, tempo, mode, loudness);
the audio is rendered from those tags by additive synthesis, so everything a tag
says can be heard in a log-mel spectrogram. Two tags, drawn independently of the
style, live only at long timescales: ``crescendo`` (the level rises by 20 dB over
the whole clip) and ``breaks`` (the band drops out every other two bars, leaving
the lead line). Every tag has a type and the timescale it lives at
(:data:`TAG_TYPES`, :func:`tag_timescales`), written to ``tags.parquet``.
Listeners have tastes over the styles (plus a mild tempo preference) and a
popularity effect; play counts follow from taste. The world is written as:

- ``mtat/annotations_final.csv`` and ``mtat/audio/<folder>/<name>.mp3``, exactly
  the MagnaTagATune layout (tab-separated, every field double-quoted);
- ``taste_profile/train_triplets.batch-NNN.txt``, Taste Profile triplets
  ``user<TAB>song<TAB>plays`` in time-ordered batches. In the synthetic world the
  song id *is* the MTAT clip id (as a string), so audio and plays join directly;
- ``truth.parquet`` (style, true tags, popularity per clip), ``tags.parquet``
  (each tag's type and timescale in seconds) and ``world.json``
  (the settings plus ``"complete": true``, written last).

A second, disjoint catalogue serves transfer learning (van den Oord et al., ISMIR
2014): :func:`plan_target` draws a GTZAN-like genre collection from
:data:`TARGET_GENRES`, balanced over genres, some of them shared with the source
styles in name and recipe and some new, with their own instrument mixtures and
their own sound (drum patterns, guitar and bass parts). :func:`render_target`
writes it as ``<genre>/<genre>.000NN.wav``, the GTZAN layout, so the GTZAN adapter
reads it unchanged; ``genres.parquet`` and ``target.json`` sit beside the folders.

All functions are pure and seeded; :func:`render_clips` and :func:`render_target`
are the units an orchestrator maps over batches of :class:`TrackPlan`.
"""

from __future__ import annotations

import functools
import hashlib
import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import soundfile as sf

from core import storage
from core.errors import ParameterError
from core.settings import WorldSettings

STYLES: tuple[str, ...] = ("classical", "rock", "techno", "ambient", "pop", "jazz")
INSTRUMENTS: tuple[str, ...] = ("piano", "strings", "flute", "guitar", "drums", "bass", "synth", "vocal")
LONG_TAGS: tuple[str, ...] = ("crescendo", "breaks")
TAGS: tuple[str, ...] = STYLES + INSTRUMENTS + ("fast", "slow", "major", "minor", "loud", "quiet") + LONG_TAGS

#: What kind of musical property each tag is; the per-timescale analysis groups tags by it.
TAG_TYPES: dict[str, str] = {
    **{s: "style" for s in STYLES},
    **{i: "instrument/timbre" for i in INSTRUMENTS},
    "fast": "tempo/rhythm",
    "slow": "tempo/rhythm",
    "major": "mode",
    "minor": "mode",
    "loud": "dynamics",
    "quiet": "dynamics",
    "crescendo": "build-up",
    "breaks": "sections",
}
#: Chance of each long-timescale tag, independent of the style (so no short-timescale cue predicts it).
LONG_TAG_P = {"crescendo": 0.35, "breaks": 0.35}
_BREAK_BARS = 2  # bars of full band, then bars of the lead alone, alternating
_CRESCENDO_DB = 20.0

#: Bumped whenever the generator's output changes, so old worlds are regenerated.
SYNTH_VERSION = 2
# pyarrow's default, which worlds were always written with: the same settings give the same bytes.
_WORLD_COMPRESSION = "snappy"

_PITCHED = tuple(i for i in INSTRUMENTS if i != "drums")
_FOLDERS = "0123456789abcdef"
# Independent random streams, so that e.g. changing n_users leaves the catalogue alone.
_PLAN_STREAM, _LISTEN_STREAM, _TARGET_STREAM = 1, 2, 3


@dataclass(frozen=True)
class _Style:
    weight: float  # share of the source catalogue; unused by the (balanced) target catalogue
    instruments: tuple[float, ...]  # probability of each of INSTRUMENTS
    p_fast: float
    p_major: float
    p_loud: float


#                      piano strings flute guitar drums bass synth vocal
_STYLE_TABLE: dict[str, _Style] = {
    "classical": _Style(0.18, (0.60, 0.80, 0.50, 0.05, 0.02, 0.10, 0.02, 0.15), 0.30, 0.60, 0.10),
    "rock": _Style(0.20, (0.10, 0.05, 0.02, 0.92, 0.95, 0.85, 0.10, 0.70), 0.75, 0.50, 0.88),
    "techno": _Style(0.13, (0.05, 0.05, 0.02, 0.02, 0.98, 0.90, 0.95, 0.12), 0.92, 0.40, 0.92),
    "ambient": _Style(0.12, (0.35, 0.50, 0.20, 0.05, 0.04, 0.15, 0.85, 0.10), 0.05, 0.50, 0.06),
    "pop": _Style(0.25, (0.50, 0.20, 0.05, 0.40, 0.85, 0.80, 0.50, 0.90), 0.50, 0.80, 0.60),
    "jazz": _Style(0.12, (0.80, 0.10, 0.20, 0.30, 0.70, 0.90, 0.05, 0.35), 0.40, 0.40, 0.35),
}

#: Genres of the target (GTZAN-like) catalogue. The first three are source styles with
#: the source's recipe and sound; the others are new: a recipe no source style has, and
#: their own drum pattern and guitar or bass part in :func:`render_clip`.
#                      piano strings flute guitar drums bass synth vocal
TARGET_GENRES: dict[str, _Style] = {
    "classical": _STYLE_TABLE["classical"],
    "rock": _STYLE_TABLE["rock"],
    "jazz": _STYLE_TABLE["jazz"],
    "metal": _Style(1.0, (0.02, 0.03, 0.01, 0.98, 0.98, 0.92, 0.05, 0.55), 0.90, 0.10, 0.95),
    "folk": _Style(1.0, (0.10, 0.15, 0.60, 0.95, 0.00, 0.20, 0.00, 0.85), 0.20, 0.80, 0.25),
    "disco": _Style(1.0, (0.25, 0.75, 0.05, 0.30, 0.98, 0.95, 0.60, 0.85), 0.92, 0.85, 0.75),
}


@dataclass(frozen=True)
class TrackPlan:
    """Everything needed to render and describe one clip.

    ``true_tags`` are what the audio carries; ``annotated_tags`` are what the
    annotations file says (true tags with some missing, as in MTAT). ``seed``
    alone decides the rendered audio given the true tags. ``popularity`` is the
    Zipf weight ``rank ** -popularity_exponent`` (1.0 for the most popular clip).
    """

    clip_id: int
    mp3_path: str
    style: str
    true_tags: tuple[str, ...]
    annotated_tags: tuple[str, ...]
    seed: int
    popularity: float


# --------------------------------------------------------------------------- plan


def plan_world(settings: WorldSettings) -> list[TrackPlan]:
    """Draw the catalogue: style, tags, file name and popularity of every clip.

    Cheap (no audio) and deterministic in ``settings.seed`` and ``settings.n_tracks``.

    Parameters
    ----------
    settings : WorldSettings

    Returns
    -------
    list of TrackPlan [length = settings.n_tracks], ordered by ``clip_id``.
        Clip ids are ``2, 6, 10, ...`` (gapped, like MTAT's), never row numbers.
    """
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, _PLAN_STREAM]))
    n = settings.n_tracks
    table = [_STYLE_TABLE[s] for s in STYLES]
    weights = np.array([s.weight for s in table])
    style = rng.choice(len(STYLES), size=n, p=weights / weights.sum())
    has, fast, major, loud = _draw_sound(rng, style, table)
    dropped = rng.random((n, len(TAGS))) < settings.tag_dropout
    folders = rng.integers(0, len(_FOLDERS), size=n)
    albums = rng.integers(0, max(1, n // 40), size=n)
    track_numbers = rng.integers(1, 13, size=n)
    seeds = rng.integers(0, 2**62, size=n)
    rank = rng.permutation(n) + 1
    popularity = rank.astype(np.float64) ** -settings.popularity_exponent
    long_tags = rng.random((n, len(LONG_TAGS))) < np.array(
        [LONG_TAG_P[t] for t in LONG_TAGS]
    )  # drawn last: older draws stay

    seconds = int(round(settings.clip_seconds))
    plans = []
    for i in range(n):
        name = STYLES[style[i]]
        true = {name, "fast" if fast[i] else "slow", "major" if major[i] else "minor", "loud" if loud[i] else "quiet"}
        true.update(inst for inst, on in zip(INSTRUMENTS, has[i]) if on)
        true.update(tag for tag, on in zip(LONG_TAGS, long_tags[i]) if on)
        true_tags = tuple(t for t in TAGS if t in true)
        annotated = tuple(t for j, t in enumerate(TAGS) if t in true and not dropped[i, j])
        clip_id = 2 + 4 * i
        mp3_path = (
            f"{_FOLDERS[folders[i]]}/synthetic_{name}-album_{albums[i]:02d}-{track_numbers[i]:02d}"
            f"-track_{clip_id:04d}-0-{seconds}.mp3"
        )
        plans.append(TrackPlan(clip_id, mp3_path, name, true_tags, annotated, int(seeds[i]), float(popularity[i])))
    return plans


def _draw_sound(
    rng: np.random.Generator, style: np.ndarray, table: Sequence[_Style]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw instruments, tempo, mode and loudness of each clip from its style's recipe.

    Parameters
    ----------
    rng : np.random.Generator
    style : np.ndarray [shape=(n,), dtype=int]
        Index into ``table`` per clip.
    table : sequence of _Style

    Returns
    -------
    has : np.ndarray [shape=(n, len(INSTRUMENTS)), dtype=bool]
        Always at least one pitched instrument per clip.
    fast, major, loud : np.ndarray [shape=(n,), dtype=bool]
    """
    n = style.size
    inst_p = np.array([s.instruments for s in table])
    has = rng.random((n, len(INSTRUMENTS))) < inst_p[style]
    # Every clip needs a pitched instrument, or its mode tag could not be heard.
    pitched_cols = [INSTRUMENTS.index(i) for i in _PITCHED]
    extra_draw = rng.random(n)
    for row in np.flatnonzero(~has[:, pitched_cols].any(axis=1)):
        p = inst_p[style[row], pitched_cols]
        has[row, pitched_cols[int(np.searchsorted(np.cumsum(p / p.sum()), extra_draw[row]))]] = True
    fast = rng.random(n) < np.array([s.p_fast for s in table])[style]
    major = rng.random(n) < np.array([s.p_major for s in table])[style]
    loud = rng.random(n) < np.array([s.p_loud for s in table])[style]
    return has, fast, major, loud


# ------------------------------------------------------------------------- render

_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
_MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
_GAIN = {
    "piano": 0.5,
    "strings": 0.22,
    "flute": 0.45,
    "guitar": 0.35,
    "bass": 0.6,
    "synth": 0.22,
    "vocal": 0.4,
    "drums": 0.8,
}
_VOWELS = ((700.0, 1200.0, 2600.0), (600.0, 1000.0, 2500.0), (750.0, 1300.0, 2700.0))


@dataclass(frozen=True)
class _Voice:
    """A line of notes: note ``k`` sounds from ``onsets[k]`` to ``onsets[k+1]`` (samples).

    ``midi`` is one pitch per note, or ``(n_notes, n_tones)`` for chords.
    """

    onsets: np.ndarray  # int64, sorted, first >= 0
    midi: np.ndarray  # float64 pitch per note [shape=(n_notes,) or (n_notes, n_tones)]
    velocity: np.ndarray  # float32 per note


def _midi_hz(midi: np.ndarray) -> np.ndarray:
    return 440.0 * 2.0 ** ((np.asarray(midi, dtype=np.float64) - 69.0) / 12.0)


def _note_clock(voice: _Voice, n: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample note index, seconds since that note's onset and note length in seconds."""
    bounds = np.append(voice.onsets, n)
    lengths = np.diff(bounds)
    idx = np.repeat(np.arange(len(voice.onsets)), lengths)
    lead = n - idx.size  # silence before the first onset
    idx = np.concatenate([np.zeros(lead, dtype=idx.dtype), idx])
    t = (np.arange(n) - voice.onsets[idx]).astype(np.float32) / sample_rate
    t[:lead] = 0.0
    note_len = (lengths / sample_rate).astype(np.float32)[idx]
    return idx, t, note_len


_TABLE_SIZE = 2048  # samples per wavetable period; lookup error stays below the added noise


@functools.lru_cache(maxsize=8)
def _sine_basis(n_harmonics: int) -> np.ndarray:
    """``sin(2 pi k j / L)`` for k = 1..K, j = 0..L-1 [shape=(K, L), dtype=float32]."""
    k = np.arange(1, n_harmonics + 1)[:, None]
    j = np.arange(_TABLE_SIZE)[None, :]
    return np.sin(2 * np.pi * k * j / _TABLE_SIZE).astype(np.float32)


def _wavetables(harmonics: np.ndarray, f0: np.ndarray, *, sample_rate: int) -> np.ndarray:
    """One period per pitch with the given harmonic levels, silent above 0.45 * sample_rate.

    Parameters
    ----------
    harmonics : np.ndarray [shape=(K,) or (n_pitches, K)]
        Level of harmonic k = 1..K, for all pitches or per pitch.
    f0 : np.ndarray [shape=(n_pitches,)], Hz

    Returns
    -------
    np.ndarray [shape=(n_pitches * L,), dtype=float32], the tables laid end to end.
    """
    n_harm = np.shape(harmonics)[-1]
    levels = np.broadcast_to(np.asarray(harmonics, dtype=np.float32), (f0.size, n_harm))
    audible = np.outer(f0, np.arange(1, n_harm + 1)) < 0.45 * sample_rate  # no aliasing
    # einsum, not @: a multithreaded BLAS call per voice thrashes when Dask workers share cores.
    return np.einsum("pk,kl->pl", (levels * audible).astype(np.float32), _sine_basis(n_harm)).ravel()


def _render_voice(
    voice: _Voice,
    instrument: str,
    *,
    n: int,
    sample_rate: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Render one monophonic line with the timbre of ``instrument``.

    Wavetable synthesis: each note reads a one-period table built from its
    harmonic levels, so the cost does not grow with the number of harmonics.
    Plucked and struck instruments crossfade from a bright to a dull table,
    which is how their upper harmonics die faster than the fundamental.
    """
    idx, t, note_len = _note_clock(voice, n, sample_rate)
    f_note = _midi_hz(voice.midi).reshape(len(voice.onsets), -1)  # (n_notes, n_tones)
    f0, pitch_of = np.unique(f_note, return_inverse=True)  # one table per distinct pitch
    pitch_of = pitch_of.reshape(f_note.shape)
    vibrato = None
    if instrument in ("strings", "vocal", "flute"):
        rate, depth = {"strings": (5.5, 0.005), "vocal": (5.0, 0.012), "flute": (4.5, 0.003)}[instrument]
        time = np.arange(n, dtype=np.float32) / sample_rate
        # Vibrato sets in after the attack, as players do.
        vibrato = 1.0 + depth * np.minimum(t / 0.25, 1.0) * np.sin(2 * np.pi * rate * time + rng.uniform(0, 6.28))
    where = []
    for tone in range(f_note.shape[1]):
        step = (f_note[:, tone] / sample_rate)[idx]
        cycles = np.cumsum(step if vibrato is None else step * vibrato) + rng.uniform()
        where.append(
            pitch_of[:, tone][idx] * _TABLE_SIZE + ((cycles * _TABLE_SIZE).astype(np.int64) & (_TABLE_SIZE - 1))
        )

    def read(harmonics: Sequence[float] | np.ndarray) -> np.ndarray:
        table = _wavetables(np.asarray(harmonics), f0, sample_rate=sample_rate)
        out = table[where[0]]
        for w in where[1:]:
            out += table[w]
        return out

    release = np.clip((note_len - t) / 0.03, 0.0, 1.0)
    if instrument in ("piano", "guitar"):
        k = np.arange(1, 13 if instrument == "guitar" else 9)
        bright = k**-0.6 if instrument == "guitar" else 1.0 / k
        dull = np.where(k == 1, 1.0, np.where(k == 2, 0.3 * bright, 0.0))  # what is left after the decay
        tau, tau_bright = (0.35, 0.12) if instrument == "guitar" else (0.9, 0.35)
        env = np.minimum(t / 0.003, 1.0) * np.exp(-t / tau) * release
        lo = read(dull)
        y = lo + np.exp(-t / tau_bright) * (read(bright) - lo)
    elif instrument == "bass":
        env = np.minimum(t / 0.005, 1.0) * np.exp(-t / 0.45) * release
        y = read([1.0, 0.5, 0.3, 0.15, 0.08])
    elif instrument == "strings":
        k = np.arange(1, 13)
        env = np.minimum(t / 0.18, 1.0) * np.clip((note_len - t) / 0.12, 0.0, 1.0)
        y = read(1.0 / k)
    elif instrument == "synth":
        k = np.arange(1, 14)
        env = np.minimum(t / 0.01, 1.0) * (0.6 + 0.4 * np.exp(-t / 0.15)) * np.clip((note_len - t) / 0.02, 0.0, 1.0)
        y = read(np.where(k % 2 == 1, 1.0 / k, 0.0))
    elif instrument == "flute":
        env = np.minimum(t / 0.06, 1.0) * np.clip((note_len - t) / 0.05, 0.0, 1.0)
        breath = rng.standard_normal(n, dtype=np.float32)
        breath[1:] -= breath[:-1].copy()  # first difference: a bright hiss
        y = read([1.0, 0.22, 0.07, 0.03]) + 0.05 * breath
    elif instrument == "vocal":
        k = np.arange(1, 21)
        formants = np.array(_VOWELS[int(rng.integers(len(_VOWELS)))])
        # Each harmonic's level is the vowel's formant envelope at k * f0, per note.
        hk = np.outer(f0, k)
        shape = sum(
            g / (1.0 + ((hk - fc) / bw) ** 2) for fc, bw, g in zip(formants, (110.0, 140.0, 220.0), (1.0, 0.7, 0.35))
        )
        env = np.minimum(t / 0.05, 1.0) * np.clip((note_len - t) / 0.06, 0.0, 1.0)
        y = read((0.12 / k + shape) / np.sqrt(k))
    else:  # pragma: no cover - callers pass names from _PITCHED
        raise ParameterError(f"unknown pitched instrument {instrument!r}; expected one of {_PITCHED}")
    return (y * env * voice.velocity[idx]).astype(np.float32)


def _drum_kit(sample_rate: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One-shot kick (sine sweep), snare (noise + body tone), closed and open hi-hat (high noise)."""
    t = np.arange(int(0.25 * sample_rate), dtype=np.float32) / sample_rate
    sweep = 45.0 + 110.0 * np.exp(-t / 0.03)
    kick = np.sin(2 * np.pi * np.cumsum(sweep) / sample_rate) * np.exp(-t / 0.09)
    noise = rng.standard_normal(t.size).astype(np.float32)
    snare = (0.6 * noise + 0.5 * np.sin(2 * np.pi * 185.0 * t)) * np.exp(-t / 0.07)
    hiss = rng.standard_normal(t.size).astype(np.float32)
    hiss = np.diff(np.diff(hiss, prepend=0.0), prepend=0.0)  # two differences: mostly above ~5 kHz
    hat = 0.25 * hiss * np.exp(-t / 0.018)
    # The open hat reuses the hiss (no new draws, so the source styles' audio stays as it was).
    open_hat = 0.2 * hiss * np.exp(-t / 0.1) * np.minimum((t[-1] - t) / 0.02, 1.0)
    return {
        "kick": kick.astype(np.float32),
        "snare": snare.astype(np.float32),
        "hat": hat.astype(np.float32),
        "open_hat": open_hat.astype(np.float32),
    }


def _drum_pattern(style: str, *, fast: bool) -> dict[str, list[float]]:
    """Hit positions within one 4-beat bar, in beats, per drum."""
    eighths = [i / 2 for i in range(8)]
    if style == "techno":
        return {"kick": [0, 1, 2, 3], "snare": [1, 3], "hat": [0.5, 1.5, 2.5, 3.5]}
    if style == "jazz":
        return {"kick": [0], "snare": [2.67], "hat": [0, 1, 1.67, 2, 3, 3.67]}  # swung ride
    if style in ("ambient", "classical", "folk"):
        return {"kick": [0, 2], "snare": [], "hat": [1, 3]}
    if style == "metal":  # double kick: sixteenths (eighths when slow) under a backbeat and a quarter-note ride
        return {"kick": [i / 4 for i in range(16)] if fast else eighths, "snare": [1, 3], "hat": [0, 1, 2, 3]}
    if style == "disco":  # four on the floor, closed hats on the beat, open hats on the off-beats
        return {"kick": [0, 1, 2, 3], "snare": [1, 3], "hat": [0, 1, 2, 3], "open_hat": [0.5, 1.5, 2.5, 3.5]}
    hats = [i / 4 for i in range(16)] if fast and style == "rock" else eighths
    return {"kick": [0, 2, 2.5], "snare": [1, 3], "hat": hats}


def _place(out: np.ndarray, template: np.ndarray, onsets: np.ndarray, gains: np.ndarray) -> None:
    for start, gain in zip(onsets, gains):
        stop = min(out.size, start + template.size)
        out[start:stop] += gain * template[: stop - start]


def render_clip(track: TrackPlan, *, sample_rate: int, seconds: float) -> np.ndarray:
    """Render the audio a track's true tags describe.

    A chord progression and a melody in the track's mode (major or natural minor,
    random tonic), at a tempo drawn from its tempo tag (fast: 130-170 bpm, slow:
    60-85 bpm), played by the instruments among its tags, each with its own timbre;
    mixed, lightly noised and scaled to the loudness tag (peak ~0.9 or ~0.15).
    ``breaks`` mutes the band (all but the melody line) every other two bars;
    ``crescendo`` raises the level by 20 dB from the first sample to the last.
    The style (a source style or a genre of :data:`TARGET_GENRES`) also sets the
    drum pattern, and for the new genres the guitar or bass part: metal chugs
    overdriven power chords over a double kick, folk fingerpicks triplet
    arpeggios, disco plays an octave bass over four-on-the-floor and open hats.

    Parameters
    ----------
    track : TrackPlan
    sample_rate : int > 0, Hz
    seconds : float > 0

    Returns
    -------
    y : np.ndarray [shape=(round(sample_rate * seconds),), dtype=float32]
        Mono waveform in [-1, 1]; identical for identical ``track.seed`` and tags.
    """
    if sample_rate <= 0:
        raise ParameterError(f"sample_rate={sample_rate} must be a positive number of Hz")
    if seconds <= 0:
        raise ParameterError(f"seconds={seconds} must be positive")
    if track.style not in STYLES and track.style not in TARGET_GENRES:
        raise ParameterError(
            f"clip {track.clip_id}: unknown style {track.style!r}; expected one of STYLES {STYLES} "
            f"or TARGET_GENRES {tuple(TARGET_GENRES)}"
        )
    unknown = set(track.true_tags) - set(TAGS) - {track.style}
    if unknown:
        raise ParameterError(
            f"clip {track.clip_id}: unknown tags {sorted(unknown)}; expected names from TAGS or the style"
        )
    rng = np.random.default_rng(track.seed)
    tags = set(track.true_tags)
    n = int(round(sample_rate * seconds))
    fast = "fast" in tags
    bpm = rng.uniform(130.0, 170.0) if fast else rng.uniform(60.0, 85.0)
    beat = 60.0 / bpm * sample_rate  # samples per beat
    scale = _MAJOR if "major" in tags else _MINOR
    tonic = int(rng.integers(45, 57))  # A2 .. G#3

    def pitch(degree: np.ndarray) -> np.ndarray:
        degree = np.asarray(degree)
        return tonic + 12 * (degree // 7) + scale[degree % 7]

    n_bars = int(np.ceil(n / (4 * beat))) + 1
    # I-IV-V-vi style progression on scale degrees, starting on the tonic.
    roots = rng.choice([0, 3, 4, 5], size=n_bars)
    roots[0] = 0
    seventh = track.style == "jazz"

    def grid(step_beats: float) -> np.ndarray:
        onsets = np.round(np.arange(0.0, n, step_beats * beat)).astype(np.int64)
        return onsets[onsets < n]

    def bar_of(onsets: np.ndarray) -> np.ndarray:
        return np.minimum((onsets / (4 * beat)).astype(np.int64), n_bars - 1)

    def chord_tone(bars: np.ndarray, which: np.ndarray) -> np.ndarray:
        return roots[bars] + 2 * which  # degrees of root, third, fifth(, seventh)

    n_tones = 4 if seventh else 3
    # The lead line (the melody) and the band are mixed apart, so that a break can mute the band alone.
    lead = np.zeros(n, dtype=np.float32)
    band = np.zeros(n, dtype=np.float32)

    # Melody: a random walk on the scale, landing on chord tones on strong beats.
    mel_step = 0.5 if fast else 1.0
    mel_on = grid(mel_step)
    walk = np.clip(np.cumsum(rng.integers(-2, 3, size=mel_on.size)) + 9, 7, 15)
    strong = np.arange(mel_on.size) % int(round(2 / mel_step)) == 0  # beats 1 and 3
    tones = chord_tone(bar_of(mel_on), np.zeros(mel_on.size, dtype=np.int64)) + 7
    snapped = tones + 2 * np.round((walk - tones) / 2)
    mel_deg = np.where(strong, snapped, walk).astype(np.int64)
    mel_vel = rng.uniform(0.75, 1.0, size=mel_on.size).astype(np.float32)
    melody = _Voice(mel_on, pitch(mel_deg).astype(np.float64), mel_vel)
    lead_sung = "vocal" in tags

    for inst in _PITCHED:
        if inst not in tags:
            continue
        voices: list[_Voice] = []
        leads: list[_Voice] = []
        if inst == "vocal":
            leads.append(melody)
        elif inst == "flute":
            leads.append(_Voice(melody.onsets, melody.midi + 12.0, melody.velocity))
        elif inst == "strings":
            on = grid(4.0)
            chord = np.stack([pitch(chord_tone(bar_of(on), np.full(on.size, j))) for j in range(n_tones)], axis=1)
            voices.append(_Voice(on, chord + 12.0, np.full(on.size, 0.8, np.float32)))
        elif inst == "piano":
            on = grid(0.5)
            which = np.arange(on.size) % n_tones
            voices.append(
                _Voice(
                    on, pitch(chord_tone(bar_of(on), which)) + 12.0, rng.uniform(0.6, 1.0, on.size).astype(np.float32)
                )
            )
            if not lead_sung:
                leads.append(_Voice(melody.onsets, melody.midi + 12.0, melody.velocity * 0.8))
        elif inst == "guitar" and track.style == "metal":
            # Palm-muted power chords (root and fifth, an octave down), chugged on sixteenths when fast.
            on = grid(0.25 if fast else 0.5)
            chord = np.stack([pitch(chord_tone(bar_of(on), np.full(on.size, j))) for j in (0, 2)], axis=1)
            voices.append(_Voice(on, chord - 12.0, rng.uniform(0.8, 1.0, on.size).astype(np.float32)))
        elif inst == "guitar" and track.style == "folk":
            # Fingerpicked arpeggio in triplets (root, fifth, third, fifth, ...): a lilt no source style has.
            on = grid(1.0 / 3.0)
            which = np.array([0, 2, 1, 2, 1, 2])[np.arange(on.size) % 6]
            voices.append(
                _Voice(
                    on,
                    pitch(chord_tone(bar_of(on), which)).astype(np.float64),
                    rng.uniform(0.6, 0.9, on.size).astype(np.float32),
                )
            )
        elif inst == "guitar":
            on = grid(0.5)
            which = np.array([0, 2, 1, 2])[np.arange(on.size) % 4] if not seventh else np.arange(on.size) % 4
            voices.append(
                _Voice(
                    on,
                    pitch(chord_tone(bar_of(on), which)).astype(np.float64),
                    rng.uniform(0.7, 1.0, on.size).astype(np.float32),
                )
            )
        elif inst == "bass" and track.style == "disco":
            # Octave bass: the chord root on eighths, jumping between two octaves.
            on = grid(0.5)
            octave = np.where(np.arange(on.size) % 2 == 1, 0.0, -12.0)
            voices.append(
                _Voice(
                    on,
                    pitch(chord_tone(bar_of(on), np.zeros(on.size, dtype=np.int64))) + octave,
                    np.full(on.size, 0.9, np.float32),
                )
            )
        elif inst == "bass":
            on = grid(1.0)
            which = np.where(np.arange(on.size) % 4 == 2, 2, 0)
            voices.append(_Voice(on, pitch(chord_tone(bar_of(on), which)) - 12.0, np.full(on.size, 0.9, np.float32)))
        elif inst == "synth":
            on = grid(0.25 if fast else 0.5)
            which = np.arange(on.size) % n_tones
            voices.append(_Voice(on, pitch(chord_tone(bar_of(on), which)) + 12.0, np.full(on.size, 0.8, np.float32)))
        distorted = inst == "guitar" and track.style == "metal"
        for voice in voices + leads:  # the order the generator always used: the random streams stay put
            target = lead if any(voice is v for v in leads) else band
            y = _render_voice(voice, inst, n=n, sample_rate=sample_rate, rng=rng)
            if distorted:  # overdrive: hard clipping fills the spectrum with odd harmonics
                y = 0.6 * np.tanh(4.0 * y)
            target += _GAIN[inst] * y

    if "drums" in tags:
        kit = _drum_kit(sample_rate, rng)
        for drum, positions in _drum_pattern(track.style, fast=fast).items():
            bar_starts = np.arange(n_bars) * 4.0
            hits = (
                (bar_starts[:, None] + np.asarray(positions, dtype=np.float64)[None, :]).ravel()
                if positions
                else np.zeros(0)
            )
            on = np.round(hits * beat).astype(np.int64)
            on = np.sort(on[on < n])
            gains = _GAIN["drums"] * rng.uniform(0.8, 1.0, on.size).astype(np.float32)
            _place(band, kit[drum], on, gains)

    mix = lead + (band * _break_gain(n, bar=4 * beat, sample_rate=sample_rate) if "breaks" in tags else band)
    loud = "loud" in tags
    if loud:
        mix = np.tanh(2.0 * mix / (np.abs(mix).max() + 1e-9))  # denser, compressed master
    if "crescendo" in tags:  # after the compressor, which would flatten it
        mix = mix * 10.0 ** (_CRESCENDO_DB / 20.0 * (np.arange(n, dtype=np.float32) / n - 1.0))
    peak = np.abs(mix).max() + 1e-9
    target = rng.uniform(0.85, 0.92) if loud else rng.uniform(0.13, 0.17)
    mix = mix * (target / peak) + target * 0.004 * rng.standard_normal(n, dtype=np.float32)
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


def _break_gain(n: int, *, bar: float, sample_rate: int) -> np.ndarray:
    """Gain of the band under ``breaks``: 1 for two bars, 0.05 for the next two, and so on.

    Changes take 20 ms ramps (no clicks, so the break is heard as arrangement, not as a pop).
    """
    section = np.floor(np.arange(n) / (_BREAK_BARS * bar)).astype(np.int64)
    gain = np.where(section % 2 == 0, 1.0, 0.05).astype(np.float32)
    ramp = max(1, int(0.02 * sample_rate))
    kernel = np.full(ramp, 1.0 / ramp, dtype=np.float32)
    return np.convolve(gain, kernel, mode="same").astype(np.float32)


def tag_timescales(settings: WorldSettings) -> dict[str, float]:
    """The timescale (seconds) at which each tag can be heard, for a world's settings.

    Timbre and level show in one frame (50 ms); tempo in a beat (0.5 s); mode in a
    bar of chords (2 s); a style in a few bars of its instruments and rhythm (4 s);
    ``breaks`` in a full cycle of band and break (four bars at the median tempo,
    about 9 s); ``crescendo`` only over the whole clip.
    """
    median_bar = 4 * 60.0 / 110.0
    by_type = {
        "instrument/timbre": 0.05,
        "dynamics": 0.05,
        "tempo/rhythm": 0.5,
        "mode": 2.0,
        "style": 4.0,
        "sections": 2 * _BREAK_BARS * median_bar,
        "build-up": float(settings.clip_seconds),
    }
    return {tag: round(by_type[TAG_TYPES[tag]], 2) for tag in TAGS}


def render_clips(tracks: Sequence[TrackPlan], *, root: Path, settings: WorldSettings) -> int:
    """Render and write the MP3 of every track whose file is not there yet.

    Each file is written under a temporary name and moved into place, so a killed
    worker never leaves a truncated MP3 behind. This is the unit an orchestrator
    maps over batches of tracks.

    Parameters
    ----------
    tracks : sequence of TrackPlan
    root : Path
        World root; files go to ``root/mtat/audio/<mp3_path>``.
    settings : WorldSettings
        ``sample_rate`` and ``clip_seconds`` are used.

    Returns
    -------
    int
        Number of MP3 files written (existing ones are skipped).
    """
    return _write_clips(
        tracks, Path(root) / "mtat" / "audio", settings=settings, format="MP3", subtype="MPEG_LAYER_III"
    )


def _write_clips(
    tracks: Sequence[TrackPlan], folder: Path, *, settings: WorldSettings, format: str, subtype: str
) -> int:
    """Render each track to ``folder / track.mp3_path`` unless it is there: temporary name, then moved into place."""
    written = 0
    for track in tracks:
        path = folder / track.mp3_path
        if path.exists():
            continue
        y = render_clip(track, sample_rate=settings.sample_rate, seconds=settings.clip_seconds)
        # Not fsynced one by one (hundreds of clips): world.json, written durably last, says the world is whole.
        with storage.atomic_path(path, durable=False) as tmp:
            sf.write(tmp, y, settings.sample_rate, format=format, subtype=subtype)
        written += 1
    return written


# -------------------------------------------------------------------------- files


def write_annotations(tracks: Sequence[TrackPlan], *, root: Path) -> Path:
    """Write ``root/mtat/annotations_final.csv`` in the exact MTAT format.

    Tab-separated, every field double-quoted; header ``"clip_id"``, one column per
    tag of :data:`TAGS`, ``"mp3_path"``; tag cells ``"0"`` or ``"1"`` from the
    *annotated* (not the true) tags.

    Returns
    -------
    Path of the written file.
    """
    header = "\t".join(f'"{c}"' for c in ("clip_id", *TAGS, "mp3_path"))
    lines = [header]
    for track in sorted(tracks, key=lambda t: t.clip_id):
        present = set(track.annotated_tags)
        cells = [str(track.clip_id), *("1" if tag in present else "0" for tag in TAGS), track.mp3_path]
        lines.append("\t".join(f'"{c}"' for c in cells))
    return storage.write_text(Path(root) / "mtat" / "annotations_final.csv", "\n".join(lines) + "\n")


def _user_ids(seed: int, n_users: int) -> list[str]:
    return [hashlib.sha1(f"mirflow-synthetic-user-{seed}-{u}".encode()).hexdigest() for u in range(n_users)]


def write_listening(tracks: Sequence[TrackPlan], *, root: Path, settings: WorldSettings) -> list[Path]:
    """Write Taste Profile triplets in ``settings.n_batches`` time-ordered files.

    Each user has a Dirichlet(``taste_concentration``) taste over the styles and a
    mild preference for fast or slow tracks; the affinity of user ``u`` for track
    ``t`` is ``(0.98 * taste[u, style_t] + 0.02 / 6) * tempo_factor``. A user picks a
    lognormal number of distinct tracks (mean ``mean_tracks_per_user``, at least 3,
    at most ``n_tracks // 2``) without replacement with probability proportional to
    ``affinity * popularity``; plays are ``1 + NegBin`` with a mean rising with
    affinity, then spread over the batches by a multinomial. Zero cells are not
    written.

    Returns
    -------
    list of Path
        ``root/taste_profile/train_triplets.batch-NNN.txt``, oldest first. Rows are
        ``user<TAB>song<TAB>plays`` with no header; song = MTAT clip id.
    """
    if not tracks:
        raise ParameterError("write_listening needs at least one track; got an empty catalogue")
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, _LISTEN_STREAM]))
    n_tracks, n_users, n_batches = len(tracks), settings.n_users, settings.n_batches
    style = np.array([STYLES.index(t.style) for t in tracks])
    tempo_sign = np.array([1.0 if "fast" in t.true_tags else -1.0 for t in tracks])
    log_pop = np.log(np.array([t.popularity for t in tracks]))
    songs = np.array([str(t.clip_id) for t in tracks])
    users = np.array(_user_ids(settings.seed, n_users))

    taste = rng.dirichlet(np.full(len(STYLES), settings.taste_concentration), size=n_users)
    taste = np.nan_to_num(taste, nan=1.0 / len(STYLES))  # tiny concentrations can underflow
    taste = 0.98 * taste / taste.sum(axis=1, keepdims=True) + 0.02 / len(STYLES)
    tempo_pref = rng.uniform(-0.4, 0.4, size=n_users)
    sigma = 0.6
    counts = np.round(rng.lognormal(np.log(settings.mean_tracks_per_user) - sigma**2 / 2, sigma, size=n_users))
    counts = np.clip(counts, 3, max(3, n_tracks // 2)).astype(np.int64)
    counts = np.minimum(counts, n_tracks)

    paths = [Path(root) / "taste_profile" / f"train_triplets.batch-{b:03d}.txt" for b in range(n_batches)]
    # Every batch file appears whole, or (on an error) none is replaced and no temporary file stays.
    with ExitStack() as files:
        tmps = [files.enter_context(storage.atomic_path(p)) for p in paths]
        handles = [files.enter_context(open(tmp, "w", encoding="utf-8", newline="")) for tmp in tmps]
        chunk = 512  # bounds the (users x tracks) matrices at MSD scale
        for lo in range(0, n_users, chunk):
            hi = min(n_users, lo + chunk)
            affinity = taste[lo:hi][:, style] * (1.0 + tempo_pref[lo:hi, None] * tempo_sign[None, :])
            # Gumbel top-k = sampling without replacement, proportional to the weights.
            keys = np.log(affinity) + log_pop[None, :] + rng.gumbel(size=affinity.shape)
            order = np.argsort(-keys, axis=1, kind="stable")
            user_rows, item_cols = [], []
            for r in range(hi - lo):
                picked = np.sort(order[r, : counts[lo + r]])
                user_rows.append(np.full(picked.size, lo + r))
                item_cols.append(picked)
            u = np.concatenate(user_rows)
            t = np.concatenate(item_cols)
            rel = affinity[u - lo, t] / affinity[u - lo].max(axis=1)
            mean_extra = 0.5 + 12.0 * rel**2
            r_shape = 0.7
            plays = 1 + rng.negative_binomial(r_shape, r_shape / (r_shape + mean_extra))
            remaining = plays.copy()
            for b in range(n_batches):
                share = remaining if b == n_batches - 1 else rng.binomial(remaining, 1.0 / (n_batches - b))
                remaining = remaining - share
                keep = share > 0
                if keep.any():
                    handles[b].write(
                        "".join(
                            f"{uid}\t{sid}\t{p}\n" for uid, sid, p in zip(users[u[keep]], songs[t[keep]], share[keep])
                        )
                    )
    return paths


def _settings_record(settings: WorldSettings) -> dict:
    return {**settings.model_dump(mode="json"), "synth_version": SYNTH_VERSION}


def write_truth(tracks: Sequence[TrackPlan], *, root: Path, settings: WorldSettings) -> None:
    """Write ``truth.parquet``, ``tags.parquet`` and then ``world.json`` with ``"complete": true``.

    Call last: ``world.json`` is the marker that the whole world is on disk.
    ``truth.parquet`` columns: ``clip_id`` int64, ``mp3_path``, ``style`` string,
    ``true_tags`` and ``annotated_tags`` list<string>, ``popularity`` float64.
    ``tags.parquet`` columns: ``tag``, ``type`` (:data:`TAG_TYPES`) and
    ``timescale_s`` float64 (:func:`tag_timescales`).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "clip_id": pa.array([t.clip_id for t in tracks], pa.int64()),
            "mp3_path": pa.array([t.mp3_path for t in tracks], pa.string()),
            "style": pa.array([t.style for t in tracks], pa.string()),
            "true_tags": pa.array([list(t.true_tags) for t in tracks], pa.list_(pa.string())),
            "annotated_tags": pa.array([list(t.annotated_tags) for t in tracks], pa.list_(pa.string())),
            "popularity": pa.array([t.popularity for t in tracks], pa.float64()),
        }
    )
    storage.write_parquet(root / "truth.parquet", table, compression=_WORLD_COMPRESSION)
    timescales = tag_timescales(settings)
    tags = pa.table(
        {
            "tag": pa.array(TAGS, pa.string()),
            "type": pa.array([TAG_TYPES[t] for t in TAGS], pa.string()),
            "timescale_s": pa.array([timescales[t] for t in TAGS], pa.float64()),
        }
    )
    storage.write_parquet(root / "tags.parquet", tags, compression=_WORLD_COMPRESSION)
    storage.write_json(root / "world.json", {**_settings_record(settings), "complete": True})


def world_is_complete(root: Path, settings: WorldSettings) -> bool:
    """True when ``root/world.json`` says complete and was made with these settings (and this generator version)."""
    path = Path(root) / "world.json"
    try:
        record = storage.read_json(path)
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.pop("complete", False) is not True:
        return False
    return record == _settings_record(settings)


def begin_world(root: Path, settings: WorldSettings) -> bool:
    """Prepare ``root`` for rendering a world with ``settings``; returns True when old files were removed.

    A world left by other settings (or by an unknown run: files but no
    ``world.json``) is deleted first, so that clips rendered for other tags are
    never reused. Then ``world.json`` records the settings with ``"complete": false``,
    which lets an interrupted run with the same settings resume its clips.
    """
    root = Path(root)
    record = None
    try:
        record = storage.read_json(root / "world.json")
    except (OSError, ValueError):
        pass
    same = isinstance(record, dict) and {k: v for k, v in record.items() if k != "complete"} == _settings_record(
        settings
    )
    removed = False
    if not same:
        for name in ("mtat", "taste_profile", "truth.parquet", "tags.parquet", "world.json"):
            target = root / name
            if target.is_dir():
                shutil.rmtree(target)
                removed = True
            elif target.exists():
                target.unlink()
                removed = True
        root.mkdir(parents=True, exist_ok=True)
        storage.write_json(root / "world.json", {**_settings_record(settings), "complete": False})
    return removed


def generate_world(root: Path, settings: WorldSettings, *, on_progress: Callable[[int], None] | None = None) -> None:
    """Write the whole world serially (plan, audio, annotations, listening, truth).

    Does nothing when :func:`world_is_complete`; otherwise MP3s already present
    are kept. ``on_progress(k)`` is called with the number of clips done so far.
    """
    root = Path(root)
    if world_is_complete(root, settings):
        return
    begin_world(root, settings)
    tracks = plan_world(settings)
    for done, track in enumerate(tracks, start=1):
        render_clips([track], root=root, settings=settings)
        if on_progress is not None:
            on_progress(done)
    write_annotations(tracks, root=root)
    write_listening(tracks, root=root, settings=settings)
    write_truth(tracks, root=root, settings=settings)


# ------------------------------------------------------------- target catalogue

#: Files of the target catalogue besides its genre folders.
_TARGET_FILES = ("genres.parquet", "target.json")
_GENRE_NAME = re.compile(r"[A-Za-z0-9_-]+")


def plan_target(settings: WorldSettings, *, n_tracks: int, seed: int) -> list[TrackPlan]:
    """Draw the target (GTZAN-like) catalogue: genre, tags and file name of every clip.

    Genres are balanced: ``n_tracks`` slots are dealt round-robin over
    :data:`TARGET_GENRES` and then shuffled, so every genre has at least
    ``n_tracks // len(TARGET_GENRES)`` clips. Each clip's instruments, tempo, mode,
    loudness and long-timescale tags are drawn from its genre's recipe, as
    :func:`plan_world` does for the source styles, from a random stream of its own:
    the source catalogue does not change with ``n_tracks`` or ``seed``, and no clip
    of the target is a clip of the source.

    Parameters
    ----------
    settings : WorldSettings
        ``seed`` is used here (``sample_rate`` and ``clip_seconds`` by :func:`render_target`).
    n_tracks : int >= len(TARGET_GENRES)
    seed : int >= 0
        Seed of this catalogue, next to ``settings.seed``.

    Returns
    -------
    list of TrackPlan [length = n_tracks], ordered by ``clip_id``.
        ``style`` is the genre; ``mp3_path`` holds the GTZAN path
        ``<genre>/<genre>.000NN.wav`` (numbered per genre from 0); ``clip_id`` is
        ``1, 3, 5, ...`` (odd, so never a source clip id); ``annotated_tags`` equal
        ``true_tags``, the genre first; ``popularity`` is 1.0.
    """
    genres = tuple(TARGET_GENRES)
    if n_tracks < len(genres):
        raise ParameterError(f"n_tracks={n_tracks} is too few for {len(genres)} genres; pass at least {len(genres)}")
    if seed < 0:
        raise ParameterError(f"seed={seed} must be a non-negative integer")
    rng = np.random.default_rng(np.random.SeedSequence([settings.seed, seed, _TARGET_STREAM]))
    genre = rng.permutation(np.arange(n_tracks) % len(genres))
    has, fast, major, loud = _draw_sound(rng, genre, [TARGET_GENRES[g] for g in genres])
    long_tags = rng.random((n_tracks, len(LONG_TAGS))) < np.array([LONG_TAG_P[t] for t in LONG_TAGS])
    seeds = rng.integers(0, 2**62, size=n_tracks)

    numbered = dict.fromkeys(genres, 0)
    plans = []
    for i in range(n_tracks):
        name = genres[genre[i]]
        true = {"fast" if fast[i] else "slow", "major" if major[i] else "minor", "loud" if loud[i] else "quiet"}
        true.update(inst for inst, on in zip(INSTRUMENTS, has[i]) if on)
        true.update(tag for tag, on in zip(LONG_TAGS, long_tags[i]) if on)
        tags = (name, *(t for t in TAGS if t in true))
        path = f"{name}/{name}.{numbered[name]:05d}.wav"
        numbered[name] += 1
        plans.append(TrackPlan(2 * i + 1, path, name, tags, tags, int(seeds[i]), 1.0))
    return plans


def render_target(root: Path, tracks: Sequence[TrackPlan], *, settings: WorldSettings) -> int:
    """Render and write the WAV of every target track whose file is not there yet.

    Each file is written under a temporary name and moved into place, so a killed
    worker never leaves a truncated WAV behind. This is the unit an orchestrator
    maps over batches of tracks (bind ``root`` first, e.g. with :func:`functools.partial`).

    Parameters
    ----------
    root : Path
        Target root (the GTZAN folder); files go to ``root/<mp3_path>``.
    tracks : sequence of TrackPlan
        From :func:`plan_target`.
    settings : WorldSettings
        ``sample_rate`` and ``clip_seconds`` are used.

    Returns
    -------
    int
        Number of WAV files written (16-bit PCM, mono; existing ones are skipped).
    """
    return _write_clips(tracks, Path(root), settings=settings, format="WAV", subtype="PCM_16")


def _target_record(settings: WorldSettings, *, n_tracks: int, seed: int) -> dict:
    """What decides the target's files: only the world settings it uses, not e.g. ``n_users``."""
    return {
        "world": {
            k: v
            for k, v in _settings_record(settings).items()
            if k in ("seed", "sample_rate", "clip_seconds", "synth_version")
        },
        "genres": list(TARGET_GENRES),
        "n_tracks": n_tracks,
        "seed": seed,
    }


def _write_target_json(root: Path, record: dict, *, complete: bool) -> Path:
    return storage.write_json(root / "target.json", {**record, "complete": complete})


def _read_json(path: Path) -> dict | None:
    try:
        record = storage.read_json(path)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def target_is_complete(root: Path, settings: WorldSettings, *, n_tracks: int, seed: int) -> bool:
    """True when ``root/target.json`` says complete and was made with these settings (and this generator version)."""
    record = _read_json(Path(root) / "target.json")
    if record is None or record.pop("complete", False) is not True:
        return False
    return record == _target_record(settings, n_tracks=n_tracks, seed=seed)


def begin_target(root: Path, settings: WorldSettings, *, n_tracks: int, seed: int) -> bool:
    """Prepare ``root`` for rendering a target catalogue; returns True when old files were removed.

    A catalogue left by other settings (or by an unknown run: no ``target.json``)
    loses its genre folders, ``genres.parquet`` and ``target.json``, so that clips
    drawn for other tags are never reused; other files under ``root`` are left alone.
    Then ``target.json`` records the settings with ``"complete": false``, which
    lets an interrupted run with the same settings resume its clips.
    """
    root = Path(root)
    wanted = _target_record(settings, n_tracks=n_tracks, seed=seed)
    old = _read_json(root / "target.json")
    if old is not None and {k: v for k, v in old.items() if k != "complete"} == wanted:
        return False
    old_genres = old.get("genres") if old is not None else None
    # Only plain folder names: a hand-edited target.json must not reach outside root.
    named = [
        g
        for g in (old_genres if isinstance(old_genres, list) else [])
        if isinstance(g, str) and _GENRE_NAME.fullmatch(g)
    ]
    removed = False
    for name in dict.fromkeys([*TARGET_GENRES, *named]):
        if (root / name).is_dir():
            shutil.rmtree(root / name)
            removed = True
    for name in _TARGET_FILES:
        if (root / name).exists():
            (root / name).unlink()
            removed = True
    root.mkdir(parents=True, exist_ok=True)
    _write_target_json(root, wanted, complete=False)
    return removed


def write_target_truth(
    tracks: Sequence[TrackPlan], *, root: Path, settings: WorldSettings, n_tracks: int, seed: int
) -> None:
    """Write ``genres.parquet`` and then ``target.json`` with ``"complete": true``.

    Call last: ``target.json`` saying complete is the marker that the whole target
    catalogue is on disk. ``genres.parquet`` columns: ``track_id`` (``<genre>.000NN``,
    as :func:`tasks.datasets.gtzan_tracks` names it), ``path`` (relative to
    ``root``), ``genre``, ``style_is_new`` bool (the genre is not a source style)
    and ``true_tags`` list<string>.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "track_id": pa.array([Path(t.mp3_path).stem for t in tracks], pa.string()),
            "path": pa.array([t.mp3_path for t in tracks], pa.string()),
            "genre": pa.array([t.style for t in tracks], pa.string()),
            "style_is_new": pa.array([t.style not in STYLES for t in tracks], pa.bool_()),
            "true_tags": pa.array([list(t.true_tags) for t in tracks], pa.list_(pa.string())),
        }
    )
    storage.write_parquet(root / "genres.parquet", table, compression=_WORLD_COMPRESSION)
    _write_target_json(root, _target_record(settings, n_tracks=n_tracks, seed=seed), complete=True)


def generate_target(root: Path, settings: WorldSettings, *, n_tracks: int, seed: int) -> None:
    """Write the whole target catalogue serially (plan, audio, ``genres.parquet``, ``target.json``).

    Does nothing when :func:`target_is_complete`; otherwise WAVs already present
    (from an interrupted run with the same settings) are kept.
    """
    root = Path(root)
    if target_is_complete(root, settings, n_tracks=n_tracks, seed=seed):
        return
    begin_target(root, settings, n_tracks=n_tracks, seed=seed)
    tracks = plan_target(settings, n_tracks=n_tracks, seed=seed)
    render_target(root, tracks, settings=settings)
    write_target_truth(tracks, root=root, settings=settings, n_tracks=n_tracks, seed=seed)
