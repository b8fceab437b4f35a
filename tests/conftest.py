"""Shared fixtures and the marker rules: realdata and gpu tests skip with a reason when they cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirflow.offline import apply_quiet_offline

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

apply_quiet_offline()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    no_data = pytest.mark.skip(reason=f"real sample data not found at {SHARED_DATA} (see shared/data/README.md)")
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    has_data, has_gpu = SHARED_DATA.is_dir(), None
    for item in items:
        if "realdata" in item.keywords and not has_data:
            item.add_marker(no_data)
        if "gpu" in item.keywords:
            has_gpu = _cuda_available() if has_gpu is None else has_gpu
            if not has_gpu:
                item.add_marker(no_gpu)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def prefect_server():
    """Prefect's own (test) server, one for the whole session (each xdist worker starts its own).

    A start costs about 5-10 s on 2 cores, and the integration modules only run flows on it: nothing
    they assert reads another module's flow runs. A module that reads Prefect's state back (artifacts
    by key) overrides this fixture with a module-scoped server of its own (tests/test_feature_flow.py).
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture(scope="session")
def dask_cluster():
    """One 2-worker LocalCluster for the session, as the settings that reach it by address.

    Each flow given ``kind="local"`` starts and stops a cluster of its own (about 5 s up and 2 s down on
    2 cores); the study and pipeline fixtures, whose assertions are about what the flows compute, share
    this one instead, the way the flows hand their own cluster to their sub-flows. It is built by the
    project's own ``dask_client`` (the workers' environment of ``kind="local"``). Tests that kill a worker,
    or that are about how a cluster is started, keep their own.
    """
    from core.settings import ClusterSettings
    from infra.cluster import dask_client, shared_settings

    local = ClusterSettings(kind="local", n_workers=2)
    with dask_client(local) as client:
        yield shared_settings(client, local)
