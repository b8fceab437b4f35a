"""Training throughput per model family: the DataModule's loader against the same model fed from memory.

For each family the same training step (forward, loss, backward, Adam step) runs on
batches from

``in-memory``  ready-made batches of crops, fed again and again: the model's own speed, the baseline;
``copied``     the same batches, each copied to fresh memory first: what any loader that makes a
               new batch pays at least (on a CPU, allocating and touching a new batch costs
               measurably against a small model);
``loader``     the family's DataModule as training uses it (``resident_data=off``): random
               crops drawn per item by a ``DataLoader`` from the clips in memory;
``resident``   the DataModule with ``resident_data`` on this device: the whole split in one
               tensor, a batch of crops cut by one gather (DESIGN.md §7).

and prints crops/s (median of ``--repeats``) and each path's ratio to ``in-memory``: the
loader's efficiency (the target is >= 0.9).

    python benchmarks/bench_training.py                                   # CPU, every family but the ResNet
    python benchmarks/bench_training.py --families short-chunk-resnet --batches 5
    python benchmarks/bench_training.py --device cuda --precision bf16-mixed [--compile]   # on a GPU

Clips are random data of the shapes the demo uses: 15 s of 128-band log-mel at hop 512
(float16), 15 s of 16 kHz int16 PCM, 1,000-wide pooled K-means vectors. Shard reading
happens once per fit in ``setup`` and is not timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.datamodule import ClipDataModule, VectorDataModule
from lightning_modules.latent_factors import LatentFactorModule
from lightning_modules.mlp import MLPTaggerModule
from lightning_modules.tagger import RawAudioTaggerModule, TaggerModule

N_CLIPS, N_MELS, N_TAGS = 512, 128, 50
MEL_FRAMES, CROP_FRAMES = 469, 94  # 15 s and 3 s at hop 512, 16 kHz
PCM_SAMPLES, CROP_SAMPLES = 240_000, 48_000


class InMemoryClips(ClipDataModule):
    """The ClipDataModule's loaders over clips already in memory (what ``setup`` leaves after reading shards)."""

    def __init__(
        self, clips: list[torch.Tensor], targets: np.ndarray, *, crop: int, batch_size: int, resident: str | None
    ) -> None:
        ids = [f"c{i}" for i in range(len(clips))]
        super().__init__(
            track_ids={"train": ids, "valid": ids[:1], "test": ids[:1]},
            targets=dict(zip(ids, targets)),
            crop=crop,
            hop=crop,
            batch_size=batch_size,
            crops_per_clip=4,
            resident=resident,
        )
        self._clips = {"train": clips}


def families(batch_size: int) -> dict[str, Callable[[], tuple[torch.nn.Module, Callable[[str | None], Iterable]]]]:
    """``{family: () -> (module, loader(resident) -> batches)}``."""
    g = torch.Generator().manual_seed(0)
    tags = np.random.default_rng(0).integers(0, 2, size=(N_CLIPS, N_TAGS)).astype(np.float32)

    def mel_clips() -> list[torch.Tensor]:
        return [torch.randn(N_MELS, MEL_FRAMES, generator=g).half() for _ in range(N_CLIPS)]

    def clip_loader(clips, targets, crop):
        return lambda resident: InMemoryClips(
            clips, targets, crop=crop, batch_size=batch_size, resident=resident
        ).train_dataloader()

    def tagger(architecture: str = "convnet2014"):
        def make():
            crop = 231 if architecture == "short-chunk-resnet" else CROP_FRAMES
            module = TaggerModule(
                n_mels=N_MELS, crop_frames=crop, tags=[f"t{i}" for i in range(N_TAGS)], architecture=architecture
            )
            return module, clip_loader(mel_clips(), tags, crop)

        return make

    def latent():
        factors = np.random.default_rng(1).standard_normal((N_CLIPS, 50)).astype(np.float32)
        return (
            LatentFactorModule(n_mels=N_MELS, n_factors=50, target_scale=1.0),
            clip_loader(mel_clips(), factors, CROP_FRAMES),
        )

    def raw():
        clips = [(torch.randn(1, PCM_SAMPLES, generator=g) * 3000).to(torch.int16) for _ in range(N_CLIPS // 4)]
        module = RawAudioTaggerModule(crop_samples=CROP_SAMPLES, tags=[f"t{i}" for i in range(N_TAGS)])
        return module, clip_loader(clips, tags[: len(clips)], CROP_SAMPLES)

    def mlp():
        vectors = np.random.default_rng(2).standard_normal((N_CLIPS * 4, 1000)).astype(np.float32)
        targets = np.tile(tags, (4, 1))
        datamodule = VectorDataModule(
            features={"train": vectors, "valid": vectors[:8], "test": vectors[:8]},
            targets={"train": targets, "valid": targets[:8], "test": targets[:8]},
            batch_size=batch_size,
        )
        module = MLPTaggerModule(n_inputs=1000, tags=[f"t{i}" for i in range(N_TAGS)])
        return module, lambda resident: None if resident else datamodule.train_dataloader()

    return {
        "convnet2014": tagger(),
        "latent-factor-cnn": latent,
        "raw-audio": raw,
        "mlp": mlp,
        "short-chunk-resnet": tagger("short-chunk-resnet"),
    }


def timed_steps(
    module: torch.nn.Module, batches: Iterable, *, n: int, device: torch.device, precision: str, step: Callable
) -> float:
    """Crops/s over ``n`` training steps on ``batches`` (each moved to ``device`` as training would)."""
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    crops, start, done = 0, 0.0, -1  # the first step (warm-up, compile) is not timed
    for x, y, *_ in batches:
        if done == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()  # the warm-up step ends before the clock starts
            start = time.perf_counter()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done += 1
        if done > 0:
            crops += len(x)
        if done == n:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return crops / (time.perf_counter() - start)


def epochs(loader) -> Iterable:
    """The loader's batches, epoch after epoch (a small split has fewer batches than the steps timed)."""
    while True:
        yield from loader


def in_memory(batches: Iterable, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n + 1`` batches drawn once and kept on ``device``: the baseline feeds these again."""
    kept = []
    for x, y, *_ in batches:
        kept.append((x.to(device, copy=True), y.to(device, copy=True)))
        if len(kept) == n + 1:
            return kept
    raise AssertionError("unreachable: epochs() never ends")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["convnet2014", "latent-factor-cnn", "raw-audio", "mlp"])
    parser.add_argument("--batches", type=int, default=30, help="timed training steps per repeat")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    makers = families(args.batch_size)
    print(
        f"training crops/s on {device} ({torch.get_num_threads()} threads), batch {args.batch_size}, "
        f"{args.batches} steps, {args.precision}{', compiled' if args.compile else ''}, median of {args.repeats}"
    )
    print(
        f"{'family':20s} {'in-memory':>10s} {'copied':>10s} {'ratio':>6s} {'loader':>10s} {'ratio':>6s} "
        f"{'resident':>10s} {'ratio':>6s}"
    )
    for name in args.families:
        module, loader = makers[name]()
        module = module.to(device).train()
        if args.compile:
            module.net.compile()
        step = lambda x, y, m=module: m.loss(m(x), y)  # noqa: E731
        if isinstance(module, LatentFactorModule):
            step = lambda x, y, m=module: m.loss(m(x), y / m.hparams.target_scale)  # noqa: E731
        baseline = in_memory(epochs(loader(None)), args.batches, device)
        rates = {"in-memory": [], "copied": [], "loader": [], "resident": []}
        for _ in range(args.repeats):
            rates["in-memory"].append(
                timed_steps(module, iter(baseline), n=args.batches, device=device, precision=args.precision, step=step)
            )
            rates["copied"].append(
                timed_steps(
                    module,
                    ((x.clone(), y.clone()) for x, y, *_ in baseline),
                    n=args.batches,
                    device=device,
                    precision=args.precision,
                    step=step,
                )
            )
            rates["loader"].append(
                timed_steps(
                    module, epochs(loader(None)), n=args.batches, device=device, precision=args.precision, step=step
                )
            )
            resident = loader(args.device)
            if resident is not None:
                rates["resident"].append(
                    timed_steps(
                        module, epochs(resident), n=args.batches, device=device, precision=args.precision, step=step
                    )
                )
        med = {k: statistics.median(v) if v else float("nan") for k, v in rates.items()}
        base = med["in-memory"]
        print(
            f"{name:20s} {base:10.0f} "
            + " ".join(f"{med[k]:10.0f} {med[k] / base:6.2f}" for k in ("copied", "loader", "resident")),
            flush=True,
        )


if __name__ == "__main__":
    main()
