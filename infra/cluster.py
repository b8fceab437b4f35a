"""The Dask cluster factory: the one place where the compute environment is chosen.

``local``   a LocalCluster, one single-threaded worker process per core (BLAS and
            torch threads pinned to 1 by distributed's pre-spawn environment).
``address`` an existing scheduler (dask-jobqueue, a Kubernetes operator, ...).
``cuda``    dask-cuda's LocalCUDACluster, one worker per GPU; falls back to
            ``local`` with a log line when there is no GPU or no dask-cuda.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import dask
from distributed import Client, LocalCluster, as_completed

from core.settings import ClusterSettings
from infra.progress import ProgressReporter
from infra.threads import usable_cores

log = logging.getLogger("mirflow")
T = TypeVar("T")
R = TypeVar("R")


# Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536 to hand memory back to the OS.
# Setting any trim threshold also freezes glibc's mmap threshold at 128 KiB, so every
# large temporary array (STFT frames, mel blocks) becomes an mmap/munmap pair with
# fresh page faults: the spectrogram kernel ran 2.5-3x slower on a worker than in a
# plain process (benchmarks/bench_features.py overhead). Fixed, larger thresholds
# keep big temporaries in the heap and still return free memory beyond 64 MiB.
WORKER_MALLOC_ENVIRON = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(64 * 2**20),
}


def _worker_environ() -> dict[str, str]:
    """Dask's pre-spawn environment for workers, with the malloc settings above and OpenMP waiting passively
    (a worker shares its node with other workers and with training; infra/threads.py)."""
    return {
        **dask.config.get("distributed.nanny.pre-spawn-environ", default={}),
        **WORKER_MALLOC_ENVIRON,
        "OMP_WAIT_POLICY": "PASSIVE",
    }


def _local_cluster(settings: ClusterSettings) -> LocalCluster:
    n_workers = settings.n_workers or usable_cores()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environ()}):
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",  # a free port, loopback only
        )


def _cuda_cluster(settings: ClusterSettings) -> Any:
    try:
        import torch
        from dask_cuda import LocalCUDACluster
    except ImportError as err:
        log.warning("cluster kind 'cuda' asked for but dask-cuda is not importable (%s): using a LocalCluster", err)
        return _local_cluster(settings)
    if not torch.cuda.is_available():
        log.warning("cluster kind 'cuda' asked for but no CUDA GPU is visible: using a LocalCluster")
        return _local_cluster(settings)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environ()}):
            return LocalCUDACluster(host="127.0.0.1", dashboard_address="127.0.0.1:0")
    except Exception as err:  # NVML missing or no device: the documented fallback
        log.warning("LocalCUDACluster failed (%s): using a LocalCluster", err)
        return _local_cluster(settings)


def spectrogram_device(client: Client, settings: ClusterSettings) -> str | None:
    """Where the workers compute spectrograms: ``"cuda"`` or None (the CPU).

    ``auto`` picks the GPU when the cluster is a CUDA one whose every worker sees one.
    """
    if settings.spectrogram_device != "auto":
        return "cuda" if settings.spectrogram_device == "cuda" else None
    if settings.kind != "cuda":
        return None

    def has_cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    answers = client.run(has_cuda)
    return "cuda" if answers and all(answers.values()) else None


def shared_settings(client: Client, settings: ClusterSettings) -> ClusterSettings:
    """Settings that reach ``client``'s running cluster by address (for sub-flows), with its spectrogram device."""
    device = spectrogram_device(client, settings)
    return ClusterSettings(
        kind="address", address=client.scheduler.address, spectrogram_device="cuda" if device == "cuda" else "cpu"
    )


@contextmanager
def dask_client(settings: ClusterSettings) -> Iterator[Client]:
    """A connected client for the configured cluster, closed (and the cluster stopped) on exit."""
    if settings.kind == "address":
        with Client(settings.address) as client:
            yield client
        return
    cluster = _cuda_cluster(settings) if settings.kind == "cuda" else _local_cluster(settings)
    with cluster, Client(cluster) as client:
        log.info(
            "dask cluster up: %d workers%s",
            len(client.scheduler_info()["workers"]),
            f", dashboard {client.dashboard_link}" if settings.dashboard else "",
        )
        yield client


def map_batches(
    client: Client,
    fn: Callable[..., R],
    batches: Sequence[T],
    *,
    description: str,
    unit: str,
    size: Callable[[T], int] = lambda batch: 1,
    **kwargs: Any,
) -> list[R]:
    """Run ``fn(batch, **kwargs)`` for every batch on the cluster, with progress in ``unit``/s.

    Results come back in the order of ``batches``. Dask reschedules a batch whose
    worker died; a batch that raises re-raises here after the others were cancelled.
    """
    if not batches:
        return []
    futures = client.map(fn, list(batches), pure=False, **kwargs)
    index = {f.key: i for i, f in enumerate(futures)}
    results: list[Any] = [None] * len(futures)
    key = re.sub(r"[^a-z0-9]+", "-", description.lower()).strip("-")
    with ProgressReporter(description, total=sum(size(b) for b in batches), unit=unit, artifact_key=key) as progress:
        try:
            for future in as_completed(futures):
                i = index[future.key]
                results[i] = future.result()
                progress.advance(size(batches[i]))
        except BaseException:
            client.cancel(futures)
            raise
    return results


def chunked(items: Sequence[T], size: int) -> list[list[T]]:
    """Consecutive batches of ``size`` items (the last may be shorter)."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]
