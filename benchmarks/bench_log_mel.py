"""Log-mel throughput: ``tasks.spectrogram.log_mel`` against librosa, side by side.

Both paths run in this one process on the same synthetic 30 s clips at 22,050 Hz,
128 mels, one thread each (torch intra-op threads and BLAS pinned to 1), for each
window size of the multiscale papers (1024 to 8192 samples, common hop so the
resolutions share frames) and for all four windows per clip. Prints median clips/s
over the repeats and the ratio torch / librosa.

    python benchmarks/bench_log_mel.py --clips 20 --repeats 5 --device cpu

On ``--device cuda`` the clips are copied to the GPU once and ``--batch-size`` clips
go through each call, as when building shards from GPU workers; librosa still runs on
the CPU as the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import librosa
import numpy as np
import torch
from threadpoolctl import threadpool_limits

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import MelSettings
from tasks.spectrogram import log_mel

SAMPLE_RATE = 22050
CLIP_SECONDS = 30.0
N_MELS = 128
WINDOWS = (1024, 2048, 4096, 8192)


def synth_clips(n_clips: int, *, seed: int = 0) -> np.ndarray:
    """``n_clips`` music-like clips: a few decaying harmonic notes, a chirp and noise.

    Returns float32 of shape (n_clips, 30 s * 22050).
    """
    rng = np.random.default_rng(seed)
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    clips = np.empty((n_clips, n), dtype=np.float32)
    for i in range(n_clips):
        y = 0.05 * rng.standard_normal(n)
        f0, f1 = rng.uniform(50, 500), rng.uniform(2000, 9000)
        y += 0.2 * np.sin(2 * np.pi * (f0 * t + (f1 - f0) / (2 * CLIP_SECONDS) * t**2))
        for onset in np.arange(0.0, CLIP_SECONDS, 0.5):
            pitch = 110.0 * 2 ** (rng.integers(0, 36) / 12)
            start = int(onset * SAMPLE_RATE)
            seg = t[: n - start]
            note = sum(np.sin(2 * np.pi * k * pitch * seg) / k for k in range(1, 5))
            y[start:] += 0.1 * note * np.exp(-4.0 * seg)
        clips[i] = y / np.max(np.abs(y))
    return clips


def librosa_log_mel(y: np.ndarray, s: MelSettings) -> np.ndarray:
    S = librosa.feature.melspectrogram(
        y=y,
        sr=s.sample_rate,
        n_fft=s.n_fft,
        hop_length=s.hop_length,
        win_length=s.n_fft,
        window="hann",
        center=True,
        pad_mode="constant",
        power=2.0,
        n_mels=s.n_mels,
        fmin=s.fmin,
        fmax=s.fmax,
        htk=s.mel_scale == "htk",
    )
    return np.log1p(s.log_c * S)


def median_rate(run_all: Callable[[], None], n_clips: int, repeats: int, sync: Callable[[], None]) -> float:
    run_all()  # warm-up: filterbank caches, FFT plans, CUDA context
    sync()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_all()
        sync()
        rates.append(n_clips / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=20, help="30 s clips to synthesize")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="torch device for log_mel, e.g. cpu, cuda")
    parser.add_argument("--hop", type=int, default=512, help="hop length in samples, shared by all windows")
    parser.add_argument("--batch-size", type=int, default=1, help="clips per log_mel call")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(1)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    clips = synth_clips(args.clips)
    clips_on_device = torch.from_numpy(clips).to(device)
    batches = list(torch.split(clips_on_device, args.batch_size))
    configs = {
        str(n_fft): [MelSettings(sample_rate=SAMPLE_RATE, n_fft=n_fft, hop_length=args.hop, n_mels=N_MELS)]
        for n_fft in WINDOWS
    }
    configs["all four"] = [cfg for group in configs.values() for cfg in group]

    print(
        f"log-mel, {args.clips} clips x {CLIP_SECONDS:.0f} s at {SAMPLE_RATE} Hz, {N_MELS} mels, hop {args.hop}, "
        f"1 thread, median of {args.repeats}; torch {torch.__version__} on {device} "
        f"(batch {args.batch_size}), librosa {librosa.__version__}"
    )
    print(f"{'window':>9} {'librosa clips/s':>16} {'torch clips/s':>14} {'torch/librosa':>14} {'max |diff|':>11}")
    with threadpool_limits(limits=1):
        for name, settings in configs.items():
            # Same answer first, so the speed comparison is between equals.
            diff = max(
                float(
                    np.max(
                        np.abs(log_mel(clips_on_device[0], settings=s).cpu().numpy() - librosa_log_mel(clips[0], s).T)
                    )
                )
                for s in settings
            )

            def run_librosa(settings=settings) -> None:
                for y in clips:
                    for s in settings:
                        librosa_log_mel(y, s)

            def run_torch(settings=settings) -> None:
                for batch in batches:
                    for s in settings:
                        log_mel(batch, settings=s)

            librosa_rate = median_rate(run_librosa, args.clips, args.repeats, lambda: None)
            torch_rate = median_rate(run_torch, args.clips, args.repeats, sync)
            print(
                f"{name:>9} {librosa_rate:16.1f} {torch_rate:14.1f} {torch_rate / librosa_rate:14.2f} {diff:11.2e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
