"""The cluster factory: local, address and cuda (falling back without a GPU), and the batch map."""

from __future__ import annotations

import logging

import pytest
import torch
from distributed import LocalCluster

from core.settings import ClusterSettings
from infra.cluster import chunked, dask_client, map_batches, spectrogram_device

pytestmark = pytest.mark.integration


def _square_sum(batch: list[int], *, offset: int) -> int:
    if -1 in batch:
        raise ValueError("a bad batch")
    return sum(x * x for x in batch) + offset


def test_local_cluster_binds_loopback_and_maps_in_order():
    with dask_client(ClusterSettings(n_workers=1)) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert "127.0.0.1" in client.dashboard_link
        batches = chunked(list(range(10)), 3)
        assert map_batches(client, _square_sum, batches, description="squares", unit="numbers", size=len, offset=1) == [
            6,
            51,
            150,
            82,
        ]
        with pytest.raises(ValueError, match="a bad batch"):
            map_batches(client, _square_sum, [[1], [-1]], description="squares", unit="numbers", offset=0)
        assert spectrogram_device(client, ClusterSettings()) is None
        assert spectrogram_device(client, ClusterSettings(spectrogram_device="cuda")) == "cuda"


def test_address_connects_to_a_running_scheduler():
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster:
        with dask_client(ClusterSettings(kind="address", address=cluster.scheduler_address)) as client:
            assert client.submit(sum, [1, 2, 3]).result() == 6
        assert len(cluster.workers) == 1  # the cluster outlives the client: it is not ours to stop


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without a GPU")
def test_cuda_without_a_gpu_falls_back_to_a_local_cluster_with_a_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="mirflow"):
        with dask_client(ClusterSettings(kind="cuda", n_workers=1)) as client:
            assert len(client.scheduler_info()["workers"]) == 1
            assert spectrogram_device(client, ClusterSettings(kind="cuda")) is None
    assert "using a LocalCluster" in caplog.text


@pytest.mark.gpu
def test_cuda_cluster_puts_spectrograms_on_the_gpu():
    with dask_client(ClusterSettings(kind="cuda")) as client:
        assert spectrogram_device(client, ClusterSettings(kind="cuda")) == "cuda"


def test_address_kind_needs_an_address():
    with pytest.raises(ValueError, match="needs an address"):
        ClusterSettings(kind="address")


def test_workers_start_with_malloc_settings_that_keep_big_arrays_fast():
    import os

    from infra.cluster import WORKER_MALLOC_ENVIRON

    with dask_client(ClusterSettings(n_workers=1)) as client:
        seen = client.run(lambda: {k: os.environ.get(k) for k in WORKER_MALLOC_ENVIRON})
    assert list(seen.values()) == [WORKER_MALLOC_ENVIRON]
