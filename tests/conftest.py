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


@pytest.fixture(scope="module")
def prefect_server():
    """Prefect's own (test) server for one test module's flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
