"""Typed settings, one object per concern, validated at the boundary.

Everything numeric that a run depends on lives here, so that it can be logged to
MLflow as params, hashed into feature-set names, and passed down explicitly.
Nothing in ``tasks/`` or ``lightning_modules/`` reads the environment; the CLI in
``mirflow/cli.py`` builds these objects once and hands them over.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.errors import ParameterError


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def flat(self, prefix: str = "") -> dict[str, Any]:
        """Flatten into ``{"a.b": value}`` pairs, the form MLflow params take."""
        out: dict[str, Any] = {}
        for key, value in self.model_dump(mode="json").items():
            _flatten_into(out, f"{prefix}{key}", value)
        return out


def _flatten_into(out: dict[str, Any], key: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten_into(out, f"{key}.{k}", v)
    else:
        out[key] = value


class WorldSettings(_Settings):
    """Size and character of the synthetic world (DESIGN.md section 6)."""

    n_tracks: int = Field(1200, ge=16, description="clips in the MTAT-style tree")
    n_users: int = Field(3000, ge=10, description="listeners in the Taste Profile triplets")
    clip_seconds: float = Field(15.0, ge=3.0, le=60.0)
    sample_rate: int = Field(16000, ge=8000, le=48000, description="rate the MP3s are written at")
    n_batches: int = Field(3, ge=1, description="time-ordered listening batch files")
    mean_tracks_per_user: float = Field(40.0, gt=1.0)
    popularity_exponent: float = Field(0.3, ge=0.0, description="Zipf exponent of track popularity")
    taste_concentration: float = Field(0.25, gt=0.0, description="Dirichlet concentration of user tastes over styles")
    tag_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="chance a present tag is missing from the annotations")
    seed: int = 0


class MelSettings(_Settings):
    """Log-mel spectrogram settings; one resolution (multiresolution comes later)."""

    sample_rate: int = Field(16000, ge=4000, le=96000)
    n_fft: int = Field(1024, ge=64)
    hop_length: int = Field(512, ge=16)
    n_mels: int = Field(128, ge=8, le=512)
    fmin: float = Field(0.0, ge=0.0)
    fmax: float | None = None
    mel_scale: Literal["slaney", "htk"] = "slaney"
    compression: Literal["log1p", "db"] = "log1p"
    log_c: float = Field(10000.0, gt=0.0, description="C in log(1 + C*x), as in the papers")

    @model_validator(mode="after")
    def _check(self) -> MelSettings:
        nyquist = self.sample_rate / 2
        fmax = self.fmax if self.fmax is not None else nyquist
        if not self.fmin < fmax <= nyquist:
            raise ValueError(f"need fmin < fmax <= sample_rate/2 = {nyquist}, got fmin={self.fmin}, fmax={fmax}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length={self.hop_length} > n_fft={self.n_fft} would skip samples")
        return self

    @property
    def column(self) -> str:
        """Name of the shard column holding this resolution, e.g. ``mel_1024``."""
        return f"mel_{self.n_fft}"


class FeatureSettings(_Settings):
    """What the feature flow computes for every track (DESIGN.md §3 I).

    ``mel`` is the first (finest) resolution; ``extra_windows`` add one column each
    (``mel_<n_fft>``) with the same bands and compression. With ``hop_policy``
    ``fixed`` every resolution uses ``mel.hop_length`` (frames line up across
    columns); with ``half`` each uses window/2 (Hamel et al. 2012). ``pyramid``
    adds Gaussian and/or Laplacian pyramids in time of the first resolution:
    columns ``mel_<n_fft>_g<k>`` (k = 1..levels-1) and ``mel_<n_fft>_l<k>``
    (k = 0..levels-1, the last one equal to the top Gaussian level).
    """

    mel: MelSettings = MelSettings()
    extra_windows: tuple[int, ...] = Field((2048, 4096, 8192), description="further FFT windows, one column each")
    hop_policy: Literal["fixed", "half"] = "fixed"
    pyramid: Literal["none", "gaussian", "laplacian", "both"] = "none"
    pyramid_levels: int = Field(4, ge=2, le=8, description="pyramid levels, the base included")
    audio_shards: bool = Field(False, description="also write int16 PCM at mel.sample_rate to audio/<dataset>/")
    files_per_task: int = Field(32, ge=1, description="files decoded per Dask task")
    min_seconds: float = Field(1.0, ge=0.0, description="shorter clips are quarantined")

    @model_validator(mode="before")
    @classmethod
    def _half_hop(cls, data: Any) -> Any:
        """The hop rule, in this one place: under ``half`` the first resolution's hop (``mel.hop_length``,
        which training crops and the served spectrogram use) is its window / 2, as for every other
        resolution. Left unset, it is set so; set to anything else, the settings are refused."""
        if not isinstance(data, dict) or data.get("hop_policy") != "half":
            return data
        mel = data.get("mel", MelSettings())
        if isinstance(mel, MelSettings):
            given, fields = "hop_length" in mel.model_fields_set, mel.model_dump()
        else:
            given, fields = "hop_length" in mel, dict(mel)
        n_fft = int(fields.get("n_fft", MelSettings.model_fields["n_fft"].default))
        if given and int(fields["hop_length"]) != n_fft // 2:
            raise ValueError(
                f"hop_policy='half' gives every resolution a hop of half its window, so mel.hop_length must be "
                f"{n_fft // 2} (n_fft={n_fft} / 2), got {fields['hop_length']}: leave mel.hop_length unset, "
                f"or use hop_policy='fixed' to keep a hop of {fields['hop_length']} at every resolution"
            )
        return {**data, "mel": {**fields, "hop_length": n_fft // 2}}

    @model_validator(mode="after")
    def _check(self) -> FeatureSettings:
        windows = self.windows
        if len(set(windows)) != len(windows):
            raise ValueError(f"windows must be distinct, got {windows}")
        for resolution in self.resolutions():
            MelSettings.model_validate(resolution.model_dump())  # hop <= window, fmax <= Nyquist
        return self

    @property
    def windows(self) -> tuple[int, ...]:
        return (self.mel.n_fft, *self.extra_windows)

    def resolutions(self) -> list[MelSettings]:
        """One MelSettings per window, in column order."""
        return [
            self.mel.model_copy(
                update={"n_fft": w, "hop_length": self.mel.hop_length if self.hop_policy == "fixed" else w // 2}
            )
            for w in self.windows
        ]

    @property
    def columns(self) -> list[str]:
        """Every feature column a shard of these settings holds."""
        base = self.mel.column
        columns = [r.column for r in self.resolutions()]
        if self.pyramid in ("gaussian", "both"):
            columns += [f"{base}_g{k}" for k in range(1, self.pyramid_levels)]
        if self.pyramid in ("laplacian", "both"):
            columns += [f"{base}_l{k}" for k in range(self.pyramid_levels)]
        return columns

    @property
    def settings_hash(self) -> str:
        """Hash of everything that changes feature values (not batch sizes or audio shards)."""
        payload = json.dumps(self.model_dump(mode="json", exclude={"files_per_task", "audio_shards"}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]

    @property
    def feature_set(self) -> str:
        m = self.mel
        windows = "-".join(str(w) for w in self.windows)
        return f"logmel-sr{m.sample_rate}-n{windows}-h{m.hop_length}{self.hop_policy[0]}-m{m.n_mels}-{self.settings_hash[:6]}"


class SourceSettings(_Settings):
    """Where a catalogue's audio and labels come from, and which adapter reads them."""

    adapter: Literal["mtat", "gtzan", "manifest"]
    path: Path = Field(
        ..., description="mtat: annotations_final.csv; gtzan: the genre folders' root; manifest: the CSV/Parquet file"
    )
    audio_root: Path | None = Field(None, description="mtat: root of the mp3 tree (default: the annotations' folder)")
    split: str | None = Field(
        None, description="mtat: folder | lists; gtzan: filtered | random (default: folder / filtered)"
    )
    split_dir: Path | None = Field(
        None, description="gtzan: folder of *_filtered.txt; mtat lists: folder of train/valid/test .txt"
    )
    n_tags: int = Field(50, ge=1, description="mtat: top-N tags")
    seed: int = 0


class ClusterSettings(_Settings):
    kind: Literal["local", "address", "cuda"] = "local"
    n_workers: int | None = Field(None, ge=1, description="default: one per core")
    address: str | None = Field(None, description="scheduler address for kind=address, e.g. tcp://host:8786")
    dashboard: bool = Field(False, description="log the dashboard link (it always binds 127.0.0.1 on a free port)")
    spectrogram_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: the GPU when kind is cuda and every worker sees one, else the CPU"
    )

    @model_validator(mode="after")
    def _check(self) -> ClusterSettings:
        if self.kind == "address" and not self.address:
            raise ValueError("cluster kind 'address' needs an address such as tcp://127.0.0.1:8786")
        return self


class WMFSettings(_Settings):
    """Weighted matrix factorization for implicit feedback (Hu, Koren & Volinsky 2008)."""

    factors: int = Field(16, ge=1)
    regularization: float = Field(5.0, ge=0.0)
    iterations: int = Field(15, ge=1)
    confidence: Literal["log", "linear"] = "log"
    alpha: float = Field(2.0, gt=0.0)
    epsilon: float = Field(1.0, gt=0.0, description="play-count scale in the log confidence")
    solver: Literal["cg", "cholesky"] = Field("cg", description="implicit's conjugate gradient, or exact solves")
    seed: int = 0
    # Evaluation and early stopping (in-matrix protocol: held-out plays of known items).
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="share of each user's items held out (in-matrix)")
    early_stopping_patience: int = Field(0, ge=0, description="evaluations without gain before stopping; 0 = off")
    eval_every: int = Field(1, ge=1, description="ALS sweeps between early-stopping evaluations")
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="training plays set aside for early stopping")
    eval_max_users: int = Field(100_000, ge=0, description="users sampled for in-matrix evaluation; 0 = all")
    # Incremental updates when new listening batches arrive.
    incremental_sweeps: int = Field(3, ge=1, description="ALS sweeps from the previous factors")
    compare_full_refit: bool = Field(True, description="also refit from scratch and record both")

    def fit_key(self) -> dict[str, Any]:
        """The settings that change the factors (not how they are evaluated)."""
        return self.model_dump(
            include={
                "factors",
                "regularization",
                "iterations",
                "confidence",
                "alpha",
                "epsilon",
                "solver",
                "seed",
                "early_stopping_patience",
                "eval_every",
                "validation_fraction",
            }
        )


class TrainSettings(_Settings):
    """Shared by every Lightning family; each family keeps its own copy."""

    crop_seconds: float = Field(3.0, gt=0.0)
    eval_hop_seconds: float = Field(1.5, gt=0.0, description="window hop for whole-clip averages")
    batch_size: int = Field(64, ge=1)
    crops_per_clip: int = Field(4, ge=1, description="random crops drawn from each clip per epoch")
    max_epochs: int = Field(20, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    patience: int = Field(5, ge=1, description="early stopping on the validation metric")
    accelerator: str = "auto"
    devices: int = Field(
        1,
        ge=1,
        description="processes (GPUs, or CPU processes over gloo) training under DDP; "
        "evaluation is gathered across them, each clip counted once",
    )
    precision: Literal["32-true", "bf16-mixed", "16-mixed"] = Field(
        "32-true", description="bf16-mixed on a GPU (Lightning's precision plugin)"
    )
    compile: bool = Field(False, description="torch.compile the network (in place: checkpoints keep their keys)")
    resident_data: Literal["off", "auto", "cpu", "cuda"] = Field(
        "off", description="keep the training split on a device and cut crops by gather (auto: the GPU if any)"
    )
    num_workers: int = Field(0, ge=0)
    checkpoint_every_n_steps: int = Field(
        50, ge=1, description="how often a run saves last.ckpt (a killed run resumes from it, mid-epoch)"
    )
    seed: int = 0


class TaggerSettings(_Settings):
    """The spectrogram tagger: the 2014 convnet (Dieleman & Schrauwen, ICASSP 2014) or the short-chunk ResNet.

    ``short-chunk-resnet`` (Won et al. 2020) wants 128 mel bands of a 512-point STFT at
    hop 256 and 3.69 s crops (its published settings); it ignores the convnet's fields.
    """

    n_tags: int = Field(50, ge=1, description="top-N tags by count")
    model: Literal["convnet2014", "short-chunk-resnet"] = "convnet2014"
    conv_channels: int = 32
    conv_length: int = 8
    pool: int = 4
    pool_ceil: bool = Field(
        False,
        description="keep a partial last pooling window (Theano's ignore_border=False): "
        "lets coarse hops (e.g. 1024 at 16 kHz, 46 frames in 3 s) through "
        "two conv+pool stages",
    )
    hidden: int = 100
    resnet_channels: int = Field(128, ge=8, description="short-chunk ResNet: width of its first blocks")
    train: TrainSettings = TrainSettings(max_epochs=100, patience=10, crops_per_clip=8)


class LatentFactorSettings(_Settings):
    """The latent-factor CNN (van den Oord, Dieleman & Schrauwen, NIPS 2013).

    ``objective``: ``mse`` on the WMF item factors, or ``wpe``, the weighted prediction
    error of the training tracks' plays under the WMF confidences, the user factors fixed.
    """

    objective: Literal["mse", "wpe"] = "mse"
    channels: tuple[int, int, int] = (64, 64, 128)
    conv_length: int = 4
    hidden: int = 256
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    train: TrainSettings = TrainSettings(
        max_epochs=60, learning_rate=1e-3, weight_decay=1e-4, patience=10, crops_per_clip=8
    )


class KMeansSettings(_Settings):
    """Spherical K-means feature learning per timescale (Dieleman & Schrauwen, ISMIR 2013; DESIGN.md §3 I).

    (?) marks choices the paper leaves open: ``context`` (4 frames), ``epsilon``,
    ``activation`` (linear: the paper's encoding is the dot products themselves) and
    ``pooling`` (max over the whole clip).
    """

    k: int = Field(200, description="means per timescale (the paper: 200-500)")
    context: int = Field(4, description="consecutive frames per window (?4)")
    epsilon: float = Field(0.01, ge=0.0, description="whitening regularizer, relative to the mean variance (?)")
    sample_windows: int = Field(
        50_000,
        ge=100,
        description="windows sampled from the training split, per timescale, to fit the whitening and the means",
    )
    iterations: int = Field(10, ge=1, description="passes of mini-batch K-means over the sample")
    batch_size: int = Field(1000, ge=1, description="windows per mini-batch update")
    activation: Literal["linear", "relu", "threshold"] = Field("linear", description="on the dot products (?linear)")
    threshold: float = Field(0.0, description="for activation=threshold: max(0, f - threshold)")
    pooling: Literal["max", "mean", "max+mean"] = Field("max", description="over the whole clip (?max)")
    codebook: Literal["kmeans", "random"] = Field(
        "kmeans", description="random: random unit means under the same whitening (the control, nothing learned)"
    )
    timescales: tuple[str, ...] = Field((), description="feature columns to learn on; () = every column")
    tracks_per_task: int = Field(64, ge=1, description="clips encoded per Dask task (and per shard)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where K-means and the encoding compute")
    seed: int = 0

    @field_validator("k")
    @classmethod
    def _two_means(cls, value: int) -> int:
        if value < 2:
            raise ValueError(f"k={value}: K-means needs at least 2 means")
        return value

    @field_validator("context")
    @classmethod
    def _one_frame(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"context={value}: a window needs at least 1 frame")
        return value

    @property
    def settings_hash(self) -> str:
        """Hash of what changes the features (not where or in what batches they are computed)."""
        payload = json.dumps(self.model_dump(mode="json", exclude={"tracks_per_task", "device"}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def kmeans_feature_set(features: FeatureSettings, kmeans: KMeansSettings) -> str:
    """Folder name of K-means features: ``kmeans-<hash of the log-mel set and the K-means settings>``."""
    return "kmeans-" + hashlib.sha1(f"{features.feature_set}/{kmeans.settings_hash}".encode()).hexdigest()[:12]


class MLPSettings(_Settings):
    """The MLP tagger on pooled K-means features: rectified-linear hidden layers, dropout, BCE on logits."""

    n_tags: int = Field(50, ge=1, description="top-N tags by count")
    hidden: int = Field(1000, ge=1, description="units per hidden layer")
    layers: int = Field(1, ge=1, le=4, description="hidden layers")
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    train: TrainSettings = TrainSettings(
        max_epochs=200, patience=20, batch_size=64, learning_rate=1e-3, weight_decay=1e-5
    )


TIMESCALE_GROUPS = ("multiresolution", "gaussian", "laplacian")


class StudySettings(_Settings):
    """A tagging study (DESIGN.md §8): configurations that differ only in their timescales and codebook.

    Every configuration trains the same MLP on the same split with the same seed.
    ``single_timescales`` adds one configuration per timescale; ``groups`` adds one per
    group of timescales (the four resolutions, the Gaussian levels, the Laplacian
    levels); each configuration runs once per codebook in ``codebooks``. For each
    group in ``importance`` every timescale is left out once (K-means codebook), which
    measures what it adds per tag.
    """

    preset: str = Field(..., description="name of the preset the settings came from")
    features: FeatureSettings
    kmeans: KMeansSettings = KMeansSettings()
    mlp: MLPSettings = MLPSettings()
    single_timescales: bool = True
    groups: tuple[Literal["multiresolution", "gaussian", "laplacian"], ...] = TIMESCALE_GROUPS
    codebooks: tuple[Literal["kmeans", "random"], ...] = ("kmeans", "random")
    importance: tuple[Literal["multiresolution", "gaussian", "laplacian"], ...] = ("multiresolution", "laplacian")

    @model_validator(mode="after")
    def _check(self) -> StudySettings:
        groups = self.timescale_groups()
        for group in (*self.groups, *self.importance):
            if not groups.get(group):
                raise ValueError(
                    f"group {group!r} needs feature columns the feature settings do not make "
                    f"(pyramid={self.features.pyramid!r}, windows={self.features.windows})"
                )
        unknown = [t for t in self.kmeans.timescales if t not in self.features.columns]
        if unknown:
            raise ValueError(
                f"timescale(s) {unknown} are not made by the feature settings (columns {self.features.columns})"
            )
        if not self.codebooks:
            raise ValueError("a study needs at least one codebook kind (kmeans, random)")
        if self.importance and "kmeans" not in self.codebooks:
            raise ValueError(
                "the timescale importance analysis uses the K-means codebook: add 'kmeans' to "
                "codebooks or set importance to []"
            )
        return self

    def timescale_groups(self) -> dict[str, tuple[str, ...]]:
        """The columns of each group (empty when the feature settings do not make them)."""
        base = self.features.mel.column
        columns = self.features.columns
        return {
            "multiresolution": tuple(r.column for r in self.features.resolutions())
            if len(self.features.windows) > 1
            else (),
            "gaussian": tuple(c for c in columns if c == base or c.startswith(f"{base}_g"))
            if any(c.startswith(f"{base}_g") for c in columns)
            else (),
            "laplacian": tuple(c for c in columns if c.startswith(f"{base}_l")),
        }

    @property
    def single_timescale_columns(self) -> tuple[str, ...]:
        """The timescales that get a configuration of their own (``kmeans.timescales``, or every column)."""
        if not self.single_timescales:
            return ()
        return tuple(self.kmeans.timescales) or tuple(self.features.columns)

    @property
    def timescales(self) -> tuple[str, ...]:
        """Every timescale some configuration uses, in feature-column order."""
        groups = self.timescale_groups()
        used = set(self.single_timescale_columns)
        for group in (*self.groups, *self.importance):
            used |= set(groups[group])
        return tuple(c for c in self.features.columns if c in used)

    @property
    def settings_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json", exclude={"preset"}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


def _steps_after_stack(steps: int, tagger: TaggerSettings) -> int:
    """Time steps the 2014 stack (two conv + max-pool stages) leaves of ``steps`` input steps."""
    for _ in range(2):
        steps -= tagger.conv_length - 1
        if steps < 1:
            return 0
        steps = -(-steps // tagger.pool) if tagger.pool_ceil else steps // tagger.pool
    return steps


FilterShape = tuple[int, int]  # (filter length, stride) in samples = (window, hop) of the spectrogram counterpart


class EndToEndStudySettings(_Settings):
    """An end-to-end study (Dieleman & Schrauwen, ICASSP 2014; DESIGN.md §3 III): raw audio beside spectrograms.

    For every ``(length, stride)`` in ``filters``: the 2014 convnet on a log-mel spectrogram
    of ``n_mels`` bands with window = length and hop = stride, and the same stack behind a
    strided first convolution over the waveform (``raw``). At ``variants_at`` the raw model
    is also trained with each first-layer nonlinearity and each feature pooling. ``modern``
    adds the short-chunk ResNet (Won et al. 2020) on its own spectrogram (``resnet_window``
    / ``resnet_hop``) beside the 2014 convnet on the same input. One split, one seed.
    """

    preset: str = Field(..., description="name of the preset the settings came from")
    sample_rate: int = Field(16000, ge=4000, le=96000)
    n_mels: int = Field(128, ge=8, le=512)
    n_tags: int = Field(50, ge=1)
    tagger: TaggerSettings = TaggerSettings(pool_ceil=True)
    n_filters: int = Field(128, ge=2, description="raw first-layer filters (as many as the spectrogram's bands)")
    log_c: float = Field(10.0, gt=0.0, description="C of the log(1 + C x²) and log(1 + C |x|) nonlinearities")
    filters: tuple[FilterShape, ...] = ((1024, 1024), (1024, 512), (512, 512), (512, 256), (256, 256))
    inputs: tuple[Literal["spectrogram", "raw"], ...] = ("spectrogram", "raw")
    variants_at: FilterShape = (256, 256)
    nonlinearities: tuple[Literal["relu", "log1p_square", "log1p_abs"], ...] = ("relu", "log1p_square", "log1p_abs")
    feature_pooling: tuple[tuple[Literal["l2", "max"], int], ...] = (("l2", 2), ("l2", 4), ("max", 2), ("max", 4))
    modern: bool = False
    resnet: TaggerSettings = TaggerSettings(
        model="short-chunk-resnet", train=TrainSettings(crop_seconds=3.69, max_epochs=100, patience=10)
    )
    resnet_window: int = 512
    resnet_hop: int = 256

    @model_validator(mode="after")
    def _check(self) -> EndToEndStudySettings:
        """Everything a model of the study would trip on later, refused now, before any audio is read."""
        if self.tagger.model != "convnet2014" or self.resnet.model != "short-chunk-resnet":
            raise ValueError(
                f"tagger.model must be 'convnet2014' and resnet.model 'short-chunk-resnet', got "
                f"{self.tagger.model!r} and {self.resnet.model!r}"
            )
        for length, stride in (*self.filters, self.variants_at):
            if not 0 < stride <= length:
                raise ValueError(
                    f"filter ({length}, {stride}): need 0 < stride <= length (a hop past the window would skip samples)"
                )
        if not (self.filters and self.inputs) and not self.modern:
            raise ValueError("an end-to-end study needs filters and inputs, or modern")
        variants = self.nonlinearities or self.feature_pooling
        if variants and "raw" not in self.inputs:
            raise ValueError(
                "nonlinearity and feature-pooling rows are raw-audio models: add 'raw' to inputs "
                "or set nonlinearities and feature_pooling to []"
            )
        for kind, size in self.feature_pooling:
            if size < 2 or self.n_filters % size:
                raise ValueError(
                    f"feature pooling ({kind}, {size}): the size must be >= 2 and divide n_filters={self.n_filters}"
                )
        crop = self.tagger.train.crop_seconds * self.sample_rate
        for length, stride in (*self.filters, *([self.variants_at] if variants else [])):
            self.spectrogram(length, stride)  # window, hop and bands valid for a log-mel (raises ValueError)
            steps = min(1 + int((crop - length) // stride), max(1, round(crop / stride)))  # raw, spectrogram
            if _steps_after_stack(steps, self.tagger) < 1:
                raise ValueError(
                    f"filter ({length}, {stride}): a {self.tagger.train.crop_seconds} s crop has "
                    f"{steps} steps, too few for two conv({self.tagger.conv_length}) + "
                    f"pool({self.tagger.pool}) stages (pool_ceil={self.tagger.pool_ceil})"
                )
        if self.modern:
            self.spectrogram(self.resnet_window, self.resnet_hop)
            frames = round(self.resnet.train.crop_seconds * self.sample_rate / self.resnet_hop)
            if min(self.n_mels, frames) < 64:
                raise ValueError(
                    f"the short-chunk ResNet needs >= 64 mel bands and frames per crop (seven "
                    f"stride-2 blocks), got {self.n_mels} bands and {frames} frames"
                )
        return self

    def spectrogram(self, length: int, stride: int) -> FeatureSettings:
        """The spectrogram counterpart of a raw first layer: window ``length``, hop ``stride``, one column."""
        return FeatureSettings(
            mel=MelSettings(sample_rate=self.sample_rate, n_fft=length, hop_length=stride, n_mels=self.n_mels),
            extra_windows=(),
        )

    @property
    def settings_hash(self) -> str:
        payload = json.dumps(self.model_dump(mode="json", exclude={"preset"}), sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


class EvalSettings(_Settings):
    k: int = Field(500, ge=1, description="cut-off of mAP@k")
    map_tags: tuple[str, ...] = Field((), description="tags that colour the t-SNE maps (default: the 8 most frequent)")
    seed: int = 0


class RegressorSettings(_Settings):
    """Linear regression (0 hidden layers) or an MLP from pooled K-means features to a vector (factors).

    The baselines of the recommendation study (van den Oord et al., NIPS 2013) and the
    source models of transfer learning (van den Oord et al., ISMIR 2014): rectified-linear
    hidden layers with dropout, MSE on the targets scaled to unit deviation.
    """

    hidden: int = Field(1000, ge=1, description="units per hidden layer")
    dropout: float = Field(0.25, ge=0.0, lt=1.0)
    train: TrainSettings = TrainSettings(
        max_epochs=200, patience=20, batch_size=64, learning_rate=1e-3, weight_decay=1e-5
    )


def _default_timescales(features: FeatureSettings, kmeans: KMeansSettings) -> tuple[str, ...]:
    timescales = tuple(kmeans.timescales) or (features.mel.column,)
    unknown = [t for t in timescales if t not in features.columns]
    if unknown:
        raise ValueError(f"timescale(s) {unknown} are not made by the feature settings (columns {features.columns})")
    return timescales


class RecommendationStudySettings(_Settings):
    """The recommendation study (van den Oord, Dieleman & Schrauwen, NIPS 2013; DESIGN.md §3 II).

    Cold start on the tracks held out of the factorization: random, popularity (an
    oracle: it uses the held-out plays), linear regression and an MLP on pooled
    K-means features, the latent-factor CNN under each of ``objectives``, and the
    WMF factors folded in from the held-out plays (the upper bound). ``queries``
    seeded test tracks (or ``query_ids``) get their ``neighbours`` nearest tracks by
    WMF factors and by the ``query_model`` CNN's predicted factors.
    """

    preset: str = Field(..., description="name of the preset the settings came from")
    n_tags: int = Field(50, ge=1, description="top-N tags of the catalogue (shown beside the query neighbours)")
    features: FeatureSettings = FeatureSettings()
    kmeans: KMeansSettings = KMeansSettings()
    regressor: RegressorSettings = RegressorSettings()
    mlp_layers: int = Field(1, ge=1, le=4, description="hidden layers of the MLP baseline")
    cnn: LatentFactorSettings = LatentFactorSettings()
    objectives: tuple[Literal["mse", "wpe"], ...] = ("mse", "wpe")
    wmf: WMFSettings = WMFSettings()
    evaluation: EvalSettings = EvalSettings()
    queries: int = Field(5, ge=0, description="seeded query tracks drawn from the held-out tracks")
    query_ids: tuple[str, ...] = Field((), description="query these tracks instead of a seeded draw")
    neighbours: int = Field(5, ge=1)
    query_model: Literal["mse", "wpe"] = "wpe"

    @model_validator(mode="after")
    def _check(self) -> RecommendationStudySettings:
        _default_timescales(self.features, self.kmeans)
        if self.query_model not in self.objectives:
            raise ValueError(f"query_model {self.query_model!r} is not among the objectives {self.objectives}")
        return self

    @property
    def timescales(self) -> tuple[str, ...]:
        return _default_timescales(self.features, self.kmeans)

    @property
    def settings_hash(self) -> str:
        """Of what the models learn from (the queries only read them: other queries reuse the same runs)."""
        payload = json.dumps(
            self.model_dump(mode="json", exclude={"preset", "queries", "query_ids", "neighbours", "query_model"}),
            sort_keys=True,
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


class TransferSettings(_Settings):
    """Transfer to a labelled target catalogue (van den Oord et al., ISMIR 2014): a simple classifier per feature set."""

    classifier: Literal["logreg", "svm"] = "logreg"
    cs: tuple[float, ...] = Field(
        (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0), min_length=1, description="inverse regularization strengths tried"
    )
    cv: int | None = Field(None, ge=2, description="outer cross-validation folds; None: the target's own split")
    inner_folds: int = Field(5, ge=2, description="with cv: folds that choose C inside each outer training part")
    feature_sets: tuple[Literal["pretrained", "kmeans", "logmel-stats", "mfcc"], ...] = (
        "pretrained",
        "kmeans",
        "logmel-stats",
        "mfcc",
    )
    seed: int = 0


class TransferStudySettings(_Settings):
    """Supervised pre-training on a source catalogue, transfer to a target (van den Oord et al., ISMIR 2014).

    Source tasks: ``tags`` (the track × tag matrix factorized by WMF to ``tag_factors``
    factors; the models predict each track's tag factors) and ``listening`` (the WMF
    item factors of the plays). Each of ``models`` (``linear``, ``mlp-1``, ``mlp-2``:
    0, 1 or 2 hidden layers) learns each task from pooled K-means features. Their
    embeddings then feed :class:`TransferSettings` on the synthetic target catalogue of
    ``target_tracks`` genre-labelled clips, beside the target's own feature sets.
    """

    preset: str = Field(..., description="name of the preset the settings came from")
    n_tags: int = Field(50, ge=1)
    features: FeatureSettings = FeatureSettings()
    kmeans: KMeansSettings = KMeansSettings()
    regressor: RegressorSettings = RegressorSettings()
    sources: tuple[Literal["tags", "listening"], ...] = ("tags", "listening")
    models: tuple[Literal["linear", "mlp-1", "mlp-2"], ...] = ("linear", "mlp-1", "mlp-2")
    tag_factors: int = Field(16, ge=1, description="WMF factors of the track × tag matrix")
    wmf: WMFSettings = WMFSettings()
    evaluation: EvalSettings = EvalSettings()
    transfer: TransferSettings = TransferSettings()
    target_tracks: int = Field(240, ge=12, description="clips of the synthetic target catalogue")
    target_seed: int = 1

    @model_validator(mode="after")
    def _check(self) -> TransferStudySettings:
        _default_timescales(self.features, self.kmeans)
        if not self.sources or not self.models:
            raise ValueError("a transfer study needs at least one source task and one model")
        return self

    @property
    def timescales(self) -> tuple[str, ...]:
        return _default_timescales(self.features, self.kmeans)

    @property
    def settings_hash(self) -> str:
        """Of what the source models learn from: another classifier, protocol or target reuses the same runs."""
        payload = json.dumps(
            self.model_dump(mode="json", exclude={"preset", "transfer", "target_tracks", "target_seed"}), sort_keys=True
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


MODEL_LAYERS = {"linear": 0, "mlp-1": 1, "mlp-2": 2}


class TrackingSettings(_Settings):
    tracking_uri: str = Field(..., description="e.g. sqlite:////abs/path/mlflow.db or http://127.0.0.1:5000")
    artifact_root: str | None = Field(
        ..., description="where runs' artifacts are stored; None: the tracking server's own artifact store"
    )
    experiment_prefix: str = "mirflow"


class PromotionSettings(_Settings):
    """When a retrained recommender replaces the champion (DESIGN.md §8).

    Challenger and champion are scored on the same held-out tracks and users; the
    ``champion`` alias moves when the challenger is better on ``metric`` by at least
    ``margin`` (``gain > 0`` and ``gain >= margin``).
    """

    metric: Literal["map_at_k", "auc", "ndcg_at_k", "precision_at_k"] = "map_at_k"
    margin: float = Field(
        0.0, ge=0.0, description="absolute gain the challenger needs on the metric, besides being better"
    )


class RetrainSettings(_Settings):
    """``retrain-on-new-listening``: fine-tuning of the champion and the promotion rule."""

    finetune: TrainSettings = TrainSettings(
        max_epochs=8, learning_rate=3e-4, weight_decay=1e-4, patience=3, crops_per_clip=8
    )
    promotion: PromotionSettings = PromotionSettings()


class PipelineSettings(_Settings):
    """Everything one run of the whole pipeline needs."""

    data_dir: Path
    dataset: str = "synthetic"
    annotations: Path | None = Field(None, description="MTAT annotations_final.csv")
    audio_root: Path | None = Field(None, description="root of the MTAT mp3 tree")
    triplets: tuple[Path, ...] = Field((), description="Taste Profile triplet files, oldest first")
    initial_batches: int | None = Field(
        None,
        ge=1,
        description="synthetic world: factorize only its first N listening batches (the later ones "
        "are new data for `mirflow retrain`)",
    )
    register_models: bool = Field(True, description="register the trained models in the MLflow model registry")
    world: WorldSettings = WorldSettings()
    features: FeatureSettings = FeatureSettings()
    cluster: ClusterSettings = ClusterSettings()
    wmf: WMFSettings = WMFSettings()
    tagger: TaggerSettings = TaggerSettings()
    recommender: LatentFactorSettings = LatentFactorSettings()
    evaluation: EvalSettings = EvalSettings()
    retrain: RetrainSettings = RetrainSettings()
    tracking: TrackingSettings

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    def with_max_epochs(self, epochs: int) -> PipelineSettings:
        """The same settings with every model's training capped at ``epochs``."""
        return self.with_training(max_epochs=epochs)

    def with_training(self, **options: Any) -> PipelineSettings:
        """The same settings with ``options`` (e.g. ``devices``, ``precision``, ``compile``) in every model's training.

        Validated like any settings: a bad value raises pydantic's ``ValidationError``.
        """

        def updated(train: TrainSettings) -> TrainSettings:
            return TrainSettings.model_validate({**train.model_dump(), **options})

        return self.model_copy(
            update={
                "tagger": self.tagger.model_copy(update={"train": updated(self.tagger.train)}),
                "recommender": self.recommender.model_copy(update={"train": updated(self.recommender.train)}),
                "retrain": self.retrain.model_copy(update={"finetune": updated(self.retrain.finetune)}),
            }
        )


def feature_settings_from_options(
    *,
    windows: str,
    hop: int,
    hop_policy: str,
    sample_rate: int,
    n_mels: int,
    pyramid: str,
    pyramid_levels: int,
    audio_shards: bool,
    files_per_task: int = 32,
) -> FeatureSettings:
    """Feature settings from command-line style options (``windows="1024,2048"``); the first window is the finest.

    Raises ``ParameterError`` for windows that are not a list of numbers, pydantic's ``ValidationError``
    for a bad value (both are ``ValueError``).
    """
    try:
        sizes = [int(w) for w in windows.split(",") if w.strip()]
    except ValueError:
        raise ParameterError(
            f"windows={windows!r}: FFT windows are whole numbers of samples, comma-separated, e.g. 1024,2048,4096,8192"
        ) from None
    if not sizes:
        raise ParameterError(f"windows={windows!r}: give at least one FFT window, e.g. 1024,2048,4096,8192")
    # Under ``half`` the hop follows from each window (FeatureSettings' rule); ``hop`` is for ``fixed``.
    mel = {"sample_rate": sample_rate, "n_fft": sizes[0], "n_mels": n_mels}
    if hop_policy != "half":
        mel["hop_length"] = hop
    return FeatureSettings(
        mel=mel,
        extra_windows=tuple(sizes[1:]),
        hop_policy=hop_policy,
        pyramid=pyramid,
        pyramid_levels=pyramid_levels,
        audio_shards=audio_shards,
        files_per_task=files_per_task,
    )
