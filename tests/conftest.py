"""Shared fixtures and the marker rules: realdata and gpu tests skip with a reason when they cannot run.

What costs seconds and is only read is built once per session (per xdist worker): the Prefect test server
(``prefect_server``), a 2-worker Dask cluster (``dask_cluster``) and the pipeline run (``pipeline_run``, with a
pristine copy for the modules that change what they are given). A module whose assertions depend on being
alone (Prefect artifacts read back by key, a killed worker, how a cluster starts) keeps its own.
"""

from __future__ import annotations

import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# Under `make test` (pytest-xdist, `-n 2 --dist loadfile --no-loadscope-reorder`: a module is one unit of work,
# so that its module-scoped fixtures are built once, handed out in this order) the modules that take longest on
# 2 cores (from `--durations`) go first, so that the two workers finish together instead of one waiting on the
# other's last long module; the rest keep file order. test_pipeline and test_serve_api share the session's
# pipeline run across workers (see ``pipeline_run``). (`--dist loadgroup` could pin modules together, but its
# groups are not applied with pytest 9.2 and xdist 3.8: the tests of one group land on both workers.)
LONGEST_FIRST = (
    "test_transfer_flow",
    "test_service",
    "test_study",
    "test_end_to_end_study",
    "test_cli",
    "test_models",
    "test_pipeline",
    "test_serve_api",
    "test_recommendation_study",
    "test_cli_errors",
    "test_feature_flow",
    "test_listening_flow",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and must order alike
        rank = {module: i for i, module in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(Path(str(item.path)).stem, len(rank)))  # stable: file order within
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


@dataclass(frozen=True)
class PipelineRun:
    """The session's pipeline run: its settings and summary, and an untouched copy of its storage root."""

    settings: Any  # core.settings.PipelineSettings (imported late: collection stays light)
    summary: Any  # flows.pipeline.PipelineSummary
    pristine: Path  # copied right after the run, before any test retrains or deletes models

    def copy_to(self, root: Path) -> Path:
        """A storage root of one's own (a test that mutates it must not touch the session's), as it was after the
        run. The copy's MLflow runs still name their artifacts under the original root, which nobody deletes."""
        target = Path(root) / "data"
        shutil.copytree(self.pristine, target)
        return target


def _run_pipeline(data_dir: Path, dask_cluster) -> tuple[Any, Any]:
    from core.settings import LatentFactorSettings, PipelineSettings, TaggerSettings, TrainSettings, WorldSettings
    from flows.pipeline import pipeline
    from infra.tracking import tracking_for

    seed = int(os.environ.get("MIRFLOW_TEST_SEED", "0"))
    train = TrainSettings(max_epochs=12, patience=12, crops_per_clip=4, seed=seed)
    settings = PipelineSettings(
        data_dir=data_dir,
        world=WorldSettings(n_tracks=192, n_users=400, clip_seconds=6.0, seed=seed),
        initial_batches=2,  # the third listening batch is new data for the retraining tests
        cluster=dask_cluster,
        tagger=TaggerSettings(train=train),
        recommender=LatentFactorSettings(train=train),
        tracking=tracking_for(data_dir),
    )
    return settings, pipeline(settings)


@pytest.fixture(scope="session")
def pipeline_run(tmp_path_factory, prefect_server, dask_cluster) -> PipelineRun:
    """The whole pipeline once per session on a 192-track world (6 s clips, 12 epochs; the margins of
    tests/test_pipeline.py were checked over world seeds 0, 1 and 2: set MIRFLOW_TEST_SEED to repeat that).

    tests/test_pipeline.py works on this storage root itself (its retraining tests add to it, in file order);
    a module that only needs what the run left takes ``copy_to``, and the pipeline runs once instead of twice.
    Under xdist the workers share one run: the first to ask builds it under a file lock in the session's
    common temporary folder, the others wait for it and read its settings and summary back (pickles the tests
    wrote themselves), with their own Dask cluster in place of the builder's.
    """
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        data_dir = tmp_path_factory.mktemp("pipeline")
        settings, summary = _run_pipeline(data_dir, dask_cluster)
        pristine = tmp_path_factory.mktemp("pipeline-pristine") / "data"
        shutil.copytree(data_dir, pristine)
        return PipelineRun(settings, summary, pristine)

    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "shared-pipeline-run"
    done = shared / "run.pickle"
    with FileLock(f"{shared}.lock"):
        if not done.exists():
            shared.mkdir(exist_ok=True)
            settings, summary = _run_pipeline(shared / "run", dask_cluster)
            shutil.copytree(shared / "run", shared / "pristine")
            done.write_bytes(pickle.dumps((settings, summary)))
    settings, summary = pickle.loads(done.read_bytes())
    return PipelineRun(settings.model_copy(update={"cluster": dask_cluster}), summary, shared / "pristine")
