"""Listening data at Million Song Dataset scale: ingestion, WMF and evaluation, against named baselines.

``scale``     Synthetic triplets with the Taste Profile's shape (1,019,318 users, 384,546
              songs, 48,373,586 rows, heavy-tailed activity and counts; ``--fraction``
              scales all three) through the stages the WMF flow runs: ingestion
              (``tasks.events.ingest_sources``), the play matrix and the cold-start split
              (10,000 held-out songs), WMF with 50 factors (``tasks.wmf.fit_wmf``), the
              fold-in of the held-out songs, and the cold-start evaluation of every user
              (WMF upper bound and popularity, ``tasks.metrics.ranking_metrics``). Prints
              each stage's wall time and the process's peak resident memory during it.
``overhead``  The project's ALS step (``fit_wmf``: validation, log confidence, implicit)
              against the raw ``implicit`` call a user would write (``AlternatingLeastSquares``
              with its own ``alpha`` on the raw counts), same matrix, factors, sweeps and
              threads; median of ``--repeats``, alternating. Target: ratio <= 1.1.
``ingest``    Ingestion alone, each path in a fresh process, on the same triplet file
              (``--fraction`` of the Taste Profile): the project's chunked path
              (``ingest_sources``: parse, route by user-id range, reduce) in one process,
              and on a Dask LocalCluster of ``--cluster`` workers (the flow's chunks of
              256 MiB), against
              today's baseline, the whole-file path (every valid row of the file in memory,
              one group-by and one sort). Prints wall time and peak RSS (``ru_maxrss``; on
              the cluster, the driver's and each worker's), the ratios, and the peak of a
              raw ``implicit`` ALS fit of the same play matrix (the target: ingestion
              peak <= 2x it, time <= 1.3x the baseline's).
``eval``      ``ranking_metrics`` over 1M users against 10,000 held-out items, against a
              naive per-user loop (numpy score, stable argsort, AP/precision/NDCG, and
              sklearn's ``roc_auc_score``) on a sample of users, extrapolated to all.

    python benchmarks/bench_listening.py scale [--fraction 1.0] [--iterations 15]
    python benchmarks/bench_listening.py overhead [--repeats 3]
    python benchmarks/bench_listening.py ingest [--fraction 1.0] [--paths baseline chunked] [--cluster 2]
    python benchmarks/bench_listening.py eval [--users 1000000] [--sample 2000]

The triplet file is generated once into ``--cache`` (default /tmp/mirflow-bench-listening)
and reused while its parameters match.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import WMFSettings
from tasks.events import ingest_sources
from tasks.listening import cold_start_split, load_play_matrix
from tasks.metrics import random_factors, ranking_metrics
from tasks.synth_listening import ListeningWorld, iter_rows, write_triplets
from tasks.wmf import confidence, fit_wmf, fold_in_items

TASTE_PROFILE = {"n_users": 1_019_318, "n_items": 384_546, "n_rows": 48_373_586}
HELDOUT = 10_000


class PeakMemory:
    """Samples this process's RSS every ``every_s`` seconds; ``peak()`` since the last ``reset()``."""

    def __init__(self, every_s: float = 0.1) -> None:
        self._process = psutil.Process()
        self._every = every_s
        self._peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._process.memory_info().rss)
            self._stop.wait(self._every)

    def reset(self) -> None:
        self._peak = self._process.memory_info().rss

    def peak(self) -> int:
        return max(self._peak, self._process.memory_info().rss)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def stage(name: str, rows: list, memory: PeakMemory):
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
    memory.reset()
    start = time.perf_counter()
    info: dict = {}
    yield info
    seconds = time.perf_counter() - start
    rows.append((name, seconds, memory.peak() / 2**30, info.get("note", "")))
    print(
        f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:.1f} s, peak RSS {memory.peak() / 2**30:.2f} GiB "
        f"{info.get('note', '')}",
        file=sys.stderr,
        flush=True,
    )


def _triplets(cache: Path, world: ListeningWorld) -> Path:
    path = cache / "train_triplets.txt"
    meta = cache / "train_triplets.json"
    wanted = json.dumps(world.__dict__, sort_keys=True)
    if path.exists() and meta.exists() and meta.read_text() == wanted:
        return path
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    write_triplets(world, path)
    meta.write_text(wanted)
    print(
        f"generated {world.n_rows:,} triplets ({path.stat().st_size / 2**30:.2f} GiB) in "
        f"{time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return path


def scale(args: argparse.Namespace) -> None:
    shape = {k: max(1, int(v * args.fraction)) for k, v in TASTE_PROFILE.items()}
    world = ListeningWorld(**shape, seed=0)
    cache = Path(args.cache)
    triplets = _triplets(cache, world)
    work = cache / "store"
    shutil.rmtree(work, ignore_errors=True)
    settings = WMFSettings(factors=50, iterations=args.iterations)
    memory = PeakMemory()
    rows: list = []
    total = time.perf_counter()

    with stage("ingest (validate, ids, events Parquet)", rows, memory) as info:
        report = ingest_sources(
            [triplets], listening_dir=work / "listening", quarantine_path=work / "quarantine.parquet"
        )
        b = report.batches[0]
        info["note"] = (
            f"{b.rows:,} rows, {b.malformed} malformed, {b.events:,} events, {b.rows / b.seconds:,.0f} rows/s"
        )
    with stage("play matrix + cold-start split", rows, memory) as info:
        matrix = load_play_matrix(work / "listening")
        rng = np.random.default_rng(0)
        heldout = matrix.items[rng.choice(len(matrix.items), size=min(HELDOUT, len(matrix.items) // 10), replace=False)]
        split = cold_start_split(matrix, heldout_items=heldout)
        del matrix
        info["note"] = (
            f"{split.train.plays.shape[0]:,} users x {split.train.plays.shape[1]:,} items, "
            f"{split.train.plays.nnz:,} plays; {split.test.plays.shape[1]:,} held out, "
            f"{split.test.plays.nnz:,} held-out plays"
        )
    with stage(
        f"WMF fit (implicit ALS, {settings.factors} factors, {settings.iterations} sweeps)", rows, memory
    ) as info:
        start = time.perf_counter()
        model = fit_wmf(split.train.plays, settings=settings)
        info["note"] = f"{(time.perf_counter() - start) / settings.iterations:.1f} s per sweep"
    with stage("fold-in of the held-out songs", rows, memory):
        heldout_factors = fold_in_items(model.user_factors, split.test.plays.T.tocsr(), settings=settings)
    with stage("cold-start evaluation, all users (WMF, popularity)", rows, memory) as info:
        test = split.test.plays
        wmf = ranking_metrics(model.user_factors, heldout_factors, test, k=500)
        popularity = ranking_metrics(
            np.ones((test.shape[0], 1), np.float32),
            np.asarray(test.sum(axis=0), np.float32).reshape(-1, 1),
            test,
            k=500,
        )
        info["note"] = (
            f"{wmf['n_users']:,} users; WMF mAP@500 {wmf['map_at_k']:.4f} AUC {wmf['auc']:.3f}; "
            f"popularity {popularity['map_at_k']:.4f} / {popularity['auc']:.3f}"
        )
    memory.close()

    print(
        f"\nscale: {shape['n_users']:,} users, {shape['n_items']:,} songs, {shape['n_rows']:,} triplets "
        f"({triplets.stat().st_size / 2**30:.2f} GiB), {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    )
    print(f"{'stage':62s} {'wall s':>8s} {'peak RSS GiB':>13s}")
    for name, seconds, peak, note in rows:
        print(f"{name:62s} {seconds:8.1f} {peak:13.2f}  {note}")
    print(f"{'total':62s} {time.perf_counter() - total:8.1f} {max(r[2] for r in rows):13.2f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _matrix(n_users: int, n_items: int, n_rows: int, seed: int = 0) -> sp.csr_matrix:
    world = ListeningWorld(n_users=n_users, n_items=n_items, n_rows=n_rows, seed=seed)
    parts = list(iter_rows(world))
    users = np.concatenate([p[0] for p in parts])
    items = np.concatenate([p[1] for p in parts])
    plays = np.concatenate([p[2] for p in parts]).astype(np.float32)
    matrix = sp.csr_matrix((plays, (users, items)), shape=(n_users, n_items))
    matrix.sum_duplicates()
    return matrix


def overhead(args: argparse.Namespace) -> None:
    import implicit.als
    from threadpoolctl import threadpool_limits

    plays = _matrix(args.users, args.items, args.rows)
    settings = WMFSettings(factors=50, iterations=args.iterations, confidence="linear", alpha=2.0)
    print(
        f"matrix {plays.shape[0]:,} x {plays.shape[1]:,}, {plays.nnz:,} plays; {settings.factors} factors, "
        f"{settings.iterations} sweeps, linear confidence 1 + 2 r",
        file=sys.stderr,
    )

    def project() -> None:
        fit_wmf(plays, settings=settings)

    def raw() -> None:
        # What a user of implicit writes: its alpha scales the raw counts (c = alpha r; the
        # project stores c = 1 + alpha r), BLAS held to one thread as implicit asks.
        with threadpool_limits(limits=1, user_api="blas"):
            model = implicit.als.AlternatingLeastSquares(
                factors=settings.factors,
                regularization=settings.regularization,
                alpha=settings.alpha,
                iterations=settings.iterations,
                random_state=settings.seed,
            )
            model.fit(plays, show_progress=False)

    times: dict[str, list[float]] = {"project fit_wmf": [], "raw implicit": []}
    for repeat in range(args.repeats):
        for name, fn in (
            (("raw implicit", raw), ("project fit_wmf", project))
            if repeat % 2
            else (("project fit_wmf", project), ("raw implicit", raw))
        ):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            print(f"repeat {repeat + 1}: {name} {times[name][-1]:.2f} s", file=sys.stderr)
    project_s, raw_s = statistics.median(times["project fit_wmf"]), statistics.median(times["raw implicit"])
    # The confidence transform alone, for the record.
    start = time.perf_counter()
    confidence(plays, settings=settings)
    transform = time.perf_counter() - start
    print(f"\noverhead: {plays.shape[0]:,} x {plays.shape[1]:,}, {plays.nnz:,} plays, median of {args.repeats}")
    print(f"{'path':28s} {'median s':>9s}")
    print(f"{'raw implicit':28s} {raw_s:9.2f}")
    print(f"{'project fit_wmf':28s} {project_s:9.2f}   (of which validation + confidence {transform:.2f} s)")
    ratio = project_s / raw_s
    print(f"-> project / raw = {ratio:.3f}; target <= 1.1: {'met' if ratio <= 1.1 else 'MISSED'}")


def _naive(users: np.ndarray, items: np.ndarray, relevant: sp.csr_matrix, k: int) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    aps, aucs, precisions, ndcgs = [], [], [], []
    n_items = items.shape[0]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    for u in range(users.shape[0]):
        rel = np.zeros(n_items, dtype=bool)
        rel[relevant.indices[relevant.indptr[u] : relevant.indptr[u + 1]]] = True
        n_rel = int(rel.sum())
        if n_rel == 0 or n_rel == n_items:
            continue
        scores = items @ users[u]
        hits = rel[np.argsort(-scores, kind="stable")[:k]]
        cumulative = np.cumsum(hits)
        aps.append(float((cumulative / np.arange(1, len(hits) + 1) * hits).sum() / min(n_rel, k)))
        precisions.append(float(hits.sum() / min(k, n_items)))
        ndcgs.append(float((hits * discount[: len(hits)]).sum() / discount[: min(n_rel, k)].sum()))
        aucs.append(roc_auc_score(rel, scores))
    return {
        "map_at_k": float(np.mean(aps)),
        "auc": float(np.mean(aucs)),
        "precision_at_k": float(np.mean(precisions)),
        "ndcg_at_k": float(np.mean(ndcgs)),
        "n_users": len(aps),
    }


def evaluation(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    n_users, n_items, factors = args.users, args.items, 50
    users = random_factors(n_users, factors, seed=1)
    items = random_factors(n_items, factors, seed=2)
    # Held-out plays as in the Taste Profile: about 1.3 held-out songs per user, Zipf popularity.
    per_user = rng.poisson(args.relevant_per_user, size=n_users)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.8
    cols = np.searchsorted(np.cumsum(popularity) / popularity.sum(), rng.random(per_user.sum()), side="right")
    relevant = sp.csr_matrix(
        (np.ones(per_user.sum(), np.float32), (np.repeat(np.arange(n_users), per_user), np.minimum(cols, n_items - 1))),
        shape=(n_users, n_items),
    )
    relevant.sum_duplicates()
    print(f"{n_users:,} users x {n_items:,} items, {relevant.nnz:,} relevant", file=sys.stderr)

    sample = np.sort(rng.choice(n_users, size=min(args.sample, n_users), replace=False))
    start = time.perf_counter()
    naive = _naive(users[sample], items, relevant[sample], 500)
    naive_s = time.perf_counter() - start
    start = time.perf_counter()
    check = ranking_metrics(users[sample], items, relevant[sample], k=500)
    project_sample_s = time.perf_counter() - start
    for key in ("map_at_k", "auc", "precision_at_k", "ndcg_at_k"):
        assert abs(check[key] - naive[key]) < 1e-6, (key, check[key], naive[key])
    start = time.perf_counter()
    full = ranking_metrics(users, items, relevant, k=500)
    project_s = time.perf_counter() - start
    naive_all = naive_s / len(sample) * n_users

    print(
        f"\neval: {n_users:,} users x {n_items:,} held-out items, {relevant.nnz:,} relevant, k=500, "
        f"torch threads {__import__('torch').get_num_threads()}"
    )
    print(f"{'path':44s} {'users':>10s} {'seconds':>9s} {'users/s':>10s}")
    print(f"{'naive per-user loop (sample)':44s} {len(sample):10,d} {naive_s:9.2f} {len(sample) / naive_s:10,.0f}")
    print(
        f"{'project ranking_metrics (same sample)':44s} {len(sample):10,d} {project_sample_s:9.2f} "
        f"{len(sample) / project_sample_s:10,.0f}"
    )
    print(f"{'project ranking_metrics (all users)':44s} {n_users:10,d} {project_s:9.2f} {n_users / project_s:10,.0f}")
    print(f"{'naive, extrapolated to all users':44s} {n_users:10,d} {naive_all:9.0f}")
    print(
        f"-> project is {naive_all / project_s:.1f}x faster than the naive loop (extrapolated); the sample's "
        f"metrics agree within 1e-6; {full['n_users']:,} users with a relevant item scored; "
        f"mAP@500 {full['map_at_k']:.5f}, AUC {full['auc']:.4f} (random factors)"
    )


def _whole_file_ingest(triplets: Path, store: Path) -> None:
    """The baseline, ingestion as it was before chunking: every valid row of the file in memory, then one
    group-by and one sort of them all (same validation, id maps and output)."""
    import pyarrow as pa

    from tasks import events as ev

    source = ev.ListeningSource(triplets).resolved()
    ev.content_sha1(triplets)  # as every path does, to skip an unchanged file next time
    users, items = ev.IdMap(store / "users.parquet"), ev.IdMap(store / "items.parquet")
    bad = ev._Malformed(path=triplets, unit="line")
    parts, position = [], 1
    for block in ev._raw_blocks(source, bad):
        valid = ev._validate(block, first_position=position, bad=bad, delimiter="\t")
        position += block.num_rows
        parts.append(
            pa.table(
                {
                    "user": pa.array(users.ids(valid.column("user")), pa.int32()),
                    "item": pa.array(items.ids(valid.column("item")), pa.int32()),
                    "plays": valid.column("plays"),
                    "ts": valid.column("ts"),
                },
                schema=ev.EVENT_SCHEMA,
            )
        )
    table = pa.concat_tables(parts)
    del parts
    table = table.group_by(["user", "item"], use_threads=True).aggregate([("plays", "sum"), ("ts", "max")])
    table = table.rename_columns(["user", "item", "plays", "ts"]).cast(ev.EVENT_SCHEMA)
    table = table.sort_by([("user", "ascending"), ("item", "ascending")])
    users.save()
    items.save()
    ev.write_table_atomic(table, store / "events" / "batch=whole" / "part-0.parquet", row_group_size=1 << 20)


def _ingest_child(path_name: str, triplets: str, store: str, workers: int, result) -> None:
    """One path in a fresh process; puts (seconds, peak GiB of this process, [peak GiB of each worker])."""
    import resource

    store_path = Path(store)
    start = time.perf_counter()
    worker_peaks: list[float] = []
    if path_name == "baseline":
        _whole_file_ingest(Path(triplets), store_path)
    elif path_name == "chunked":
        ingest_sources([Path(triplets)], listening_dir=store_path, quarantine_path=store_path / "quarantine.parquet")
    elif path_name == "cluster":
        from core.settings import ClusterSettings
        from flows.listening import CLUSTER_CHUNK_BYTES
        from infra.cluster import dask_client, map_batches

        with dask_client(ClusterSettings(n_workers=workers)) as client:
            start = time.perf_counter()  # the cluster's start-up is not ingestion
            ingest_sources(
                [Path(triplets)],
                listening_dir=store_path,
                quarantine_path=store_path / "quarantine.parquet",
                map_fn=lambda fn, items, **kw: map_batches(client, fn, items, **kw),
                chunk_bytes=CLUSTER_CHUNK_BYTES,
            )
            seconds = time.perf_counter() - start
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
            worker_peaks = [v * 1024 / 2**30 for v in peaks.values()]
        result.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, worker_peaks))
        return
    elif path_name == "raw-als":
        import implicit.als
        from threadpoolctl import threadpool_limits

        matrix = load_play_matrix(store_path).plays.astype(np.float32)
        with threadpool_limits(limits=1, user_api="blas"):
            implicit.als.AlternatingLeastSquares(factors=50, iterations=2, random_state=0).fit(
                matrix, show_progress=False
            )
    result.put((time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, []))


def _run_child(path_name: str, triplets: Path, store: Path, workers: int = 0) -> tuple[float, float, list[float]]:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    child = context.Process(target=_ingest_child, args=(path_name, str(triplets), str(store), workers, result))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise SystemExit(f"{path_name}: the child process failed (exit code {child.exitcode})")
    return result.get()


def ingest(args: argparse.Namespace) -> None:
    shape = {k: max(1, int(v * args.fraction)) for k, v in TASTE_PROFILE.items()}
    triplets = _triplets(
        Path(args.cache) / (f"x{args.fraction:g}" if args.fraction != 1.0 else ""), ListeningWorld(**shape, seed=0)
    )
    size = triplets.stat().st_size / 2**30
    rows = []
    for name in args.paths:
        label = f"cluster ({args.cluster} workers)" if name == "cluster" else name
        store = Path(args.cache) / f"store-{name}"
        shutil.rmtree(store, ignore_errors=True)
        print(f"[{time.strftime('%H:%M:%S')}] {label} ...", file=sys.stderr, flush=True)
        seconds, peak, workers = _run_child(name, triplets, store, args.cluster)
        print(
            f"[{time.strftime('%H:%M:%S')}] {label}: {seconds:.1f} s, peak {peak:.2f} GiB"
            + (f", workers {', '.join(f'{w:.2f}' for w in workers)} GiB" if workers else ""),
            file=sys.stderr,
        )
        rows.append((label, seconds, peak, workers))
        if name == "chunked" and args.raw_als:
            als_seconds, als_peak, _ = _run_child("raw-als", triplets, store)
            rows.append(("raw implicit ALS fit of the same plays (2 sweeps)", als_seconds, als_peak, []))
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
    print(
        f"\ningest: {shape['n_rows']:,} triplets ({size:.2f} GiB), {shape['n_users']:,} users, "
        f"{shape['n_items']:,} songs; {os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    )
    print(f"{'path':52s} {'wall s':>8s} {'peak GiB':>9s}  workers' peaks GiB")
    for label, seconds, peak, workers in rows:
        print(f"{label:52s} {seconds:8.1f} {peak:9.2f}  {', '.join(f'{w:.2f}' for w in workers)}")
    named = {r[0]: r for r in rows}
    base = named.get("baseline")
    for label, seconds, peak, workers in rows:
        if base and label not in ("baseline",) and not label.startswith("raw"):
            print(
                f"{label}: time {seconds / base[1]:.2f}x the baseline's (target <= 1.3), peak "
                f"{(peak + sum(workers)) / base[2]:.2f}x"
            )
    raw = next((r for r in rows if r[0].startswith("raw")), None)
    if raw:
        for label, _seconds, peak, workers in rows:
            if not label.startswith("raw"):
                print(f"{label}: peak {(peak + sum(workers)) / raw[2]:.2f}x the raw ALS fit's (target <= 2)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scale")
    p.add_argument("--fraction", type=float, default=1.0, help="scale users, songs and rows of the Taste Profile")
    p.add_argument("--iterations", type=int, default=15)
    p.add_argument("--cache", default="/tmp/mirflow-bench-listening")
    p.add_argument("--keep", action="store_true", help="keep the ingested store")
    p.set_defaults(run=scale)
    p = sub.add_parser("overhead")
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--rows", type=int, default=8_000_000)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(run=overhead)
    p = sub.add_parser("ingest")
    p.add_argument("--fraction", type=float, default=1.0, help="scale users, songs and rows of the Taste Profile")
    p.add_argument("--paths", nargs="+", default=["baseline", "chunked"], choices=["baseline", "chunked", "cluster"])
    p.add_argument("--cluster", type=int, default=2, help="workers of the cluster path")
    p.add_argument(
        "--raw-als",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the chunked path, the peak of a raw implicit fit of its play matrix",
    )
    p.add_argument("--cache", default="/tmp/mirflow-bench-listening")
    p.add_argument("--keep", action="store_true", help="keep the ingested stores")
    p.set_defaults(run=ingest)
    p = sub.add_parser("eval")
    p.add_argument("--users", type=int, default=1_000_000)
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--sample", type=int, default=2_000)
    p.add_argument("--relevant-per-user", type=float, default=1.3)
    p.set_defaults(run=evaluation)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
