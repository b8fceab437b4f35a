"""The web service under load: analyze requests of 30 s clips at a fixed concurrency, against the in-process bound.

The project's path is ``mirflow serve`` started as a user starts it (a subprocess on
127.0.0.1), sent ``--requests`` POST /api/analyze uploads of 30 s MP3 clips by
``--concurrency`` client threads. It reports p50 and p95 latency, the error count (target
0) and the server's resident memory, its decoder workers' included, after a warm-up of
``--concurrency`` requests at once and after the load (target: flat within 15 %). The
baseline is the in-process lower bound of one request: ``decode`` + log-mel + the
tagger's and the CNN's forward passes + the neighbours' matrix product, in this process,
on the same clip; the ratio p50 / bound has a target of 1.5 (at concurrency 1; with more clients
than cores, requests queue and the ratio grows with the queue).

    python benchmarks/bench_serve.py --data-dir data                 # after `make demo`
    python benchmarks/bench_serve.py --requests 200 --concurrency 8  # a small pipeline run into --cache

Without ``--data-dir`` a small pipeline (96 clips, 3 epochs) is run once into ``--cache``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mirflow.offline import apply_quiet_offline

apply_quiet_offline()

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import soundfile as sf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import WorldSettings  # noqa: E402
from tasks import synth  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pipeline_data(cache: Path) -> Path:
    data_dir = cache / "pipeline"
    if not (data_dir / "ready").exists():
        print("running a small pipeline (96 clips, 3 epochs) ...", file=sys.stderr)
        subprocess.run(
            [
                str(Path(sys.executable).parent / "mirflow"),
                "demo",
                "--tracks",
                "96",
                "--users",
                "200",
                "--clip-seconds",
                "5",
                "--epochs",
                "3",
                "--data-dir",
                str(data_dir),
            ],
            cwd=ROOT,
            check=True,
        )
        (data_dir / "ready").write_text("ok")
    return data_dir


def clips(cache: Path, n: int = 8) -> list[Path]:
    """``n`` 30 s MP3 clips of the synthetic target catalogue (rendered once)."""
    world = WorldSettings(clip_seconds=30.0)
    out = []
    for plan in synth.plan_target(world, n_tracks=max(n, 6), seed=11)[:n]:
        path = cache / "clips" / f"{Path(plan.mp3_path).stem}.mp3"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, synth.render_clip(plan, sample_rate=22050, seconds=30.0), 22050, format="MP3")
        out.append(path)
    return out


def lower_bound(data_dir: Path, clip: Path, repeats: int) -> float:
    """Median seconds of decode + log-mel + both forwards + neighbours, in this process."""
    from infra.tracking import tracking_for
    from lightning_modules.served import mel_clips, predict_latent_factors, predict_tag_scores
    from mirflow.web.catalogue import load_catalogue
    from tasks.audio import decode
    from tasks.recommend import nearest_by_cosine

    catalogue = load_catalogue(data_dir, tracking_for(data_dir))
    tagger, cnn = catalogue.tagger, catalogue.cnn
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        y = decode(clip, sample_rate=cnn.mel.sample_rate)
        predict_tag_scores(tagger.module, mel_clips(y[None], mel=tagger.mel), crop=tagger.crop, hop=tagger.hop)
        factors = predict_latent_factors(cnn.module, mel_clips(y[None], mel=cnn.mel), crop=cnn.crop, hop=cnn.hop)
        nearest_by_cosine(np.vstack([catalogue.predicted, factors]), len(catalogue.predicted), n=10)
        np.argsort(-(catalogue.user_factors @ factors[0]))[:10]
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def rss_mb(process: psutil.Process) -> float:
    """Resident memory of the server and its decoder workers together."""
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on the whole load, seconds")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "mirflow-bench-serve")
    args = parser.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    data_dir = (args.data_dir or pipeline_data(args.cache)).resolve()
    paths = clips(args.cache)
    payloads = [(p.name, p.read_bytes()) for p in paths]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mirflow"), "serve", "--data-dir", str(data_dir), "--port", str(port)],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        process = psutil.Process(server.pid)
        with httpx.Client(timeout=120) as client:  # warm-up: the decoder workers, the first forward passes
            client.post(f"{url}/api/analyze", files={"file": payloads[0]}).raise_for_status()
        first = rss_mb(process)
        with ThreadPoolExecutor(args.concurrency) as pool:  # and `concurrency` requests at once, as the load will
            list(
                pool.map(
                    lambda p: httpx.post(f"{url}/api/analyze", files={"file": p}, timeout=120).raise_for_status(),
                    [payloads[i % len(payloads)] for i in range(args.concurrency)],
                )
            )
        before = rss_mb(process)

        local = threading.local()  # one client (one kept-alive connection) per client thread, as a real client

        def one(i: int) -> tuple[float, int]:
            name, data = payloads[i % len(payloads)]
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            start = time.perf_counter()
            try:
                status = local.client.post(f"{url}/api/analyze", files={"file": (name, data)}).status_code
            except httpx.HTTPError:
                status = -1
            return time.perf_counter() - start, status

        start = time.perf_counter()
        half = args.requests // 2
        with ThreadPoolExecutor(args.concurrency) as pool:  # two halves: the second shows whether memory still grows
            results = list(pool.map(one, range(half), timeout=args.timeout))
            middle = rss_mb(process)
            results += list(pool.map(one, range(half, args.requests), timeout=args.timeout))
        wall = time.perf_counter() - start
        after = rss_mb(process)
    finally:
        server.terminate()
        server.wait(30)
    latencies = np.array([r[0] for r in results])
    errors = sum(1 for r in results if r[1] != 200)
    bound = lower_bound(data_dir, paths[0], repeats=5)
    p50, p95 = np.percentile(latencies, 50), np.percentile(latencies, 95)
    print(
        f"\n{args.requests} analyze requests of 30 s MP3 clips, concurrency {args.concurrency}, "
        f"{os.cpu_count()} cores, {wall:.1f} s ({args.requests / wall:.2f} requests/s)"
    )
    print(f"  latency p50 {p50:.3f} s, p95 {p95:.3f} s; errors {errors}")
    print(
        f"  server memory (with its decoder workers) {first:.0f} MiB after one request, {before:.0f} MiB after "
        f"{args.concurrency} at once, {middle:.0f} MiB after half the requests, {after:.0f} MiB after "
        f"all ({(after / before - 1) * 100:+.1f} % overall, {(after / middle - 1) * 100:+.1f} % in the second half)"
    )
    print(f"  in-process bound (decode + log-mel + forwards + neighbours): {bound:.3f} s")
    print(
        f"  p50 / bound {p50 / bound:.2f}   (per request at concurrency {args.concurrency}: "
        f"{wall / args.requests:.3f} s of wall time, {wall / args.requests / bound:.2f} x the bound)"
    )


if __name__ == "__main__":
    main()
