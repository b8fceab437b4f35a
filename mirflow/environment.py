"""The environment of a long-running mirflow service, read once per deployment run.

``make serve`` (``mirflow up``) starts the worker that runs deployments with these
variables set; an operator who runs their own worker sets them the same way:

    MIRFLOW_DATA_DIR      the storage root (default: ./data)
    MIRFLOW_TRACKING_URI  the MLflow tracking server, e.g. http://127.0.0.1:5000
                          (default: the sqlite store under the storage root)
    MIRFLOW_ARTIFACT_ROOT where new experiments keep their artifacts (default with a
                          server: wherever the server says; `make serve` sets
                          file://<data>/mlartifacts, so that the CLI's sqlite store and
                          the server share one store)
    MIRFLOW_DASK_ADDRESS  the Dask scheduler every deployment run uses, e.g.
                          tcp://127.0.0.1:8786 (default: a LocalCluster per run)

Nothing reads these at import time: :func:`service_environment` is called at the
start of each deployment run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.settings import ClusterSettings, TrackingSettings
from infra.tracking import tracking_for

DATA_DIR = "MIRFLOW_DATA_DIR"
TRACKING_URI = "MIRFLOW_TRACKING_URI"
ARTIFACT_ROOT = "MIRFLOW_ARTIFACT_ROOT"
DASK_ADDRESS = "MIRFLOW_DASK_ADDRESS"


@dataclass(frozen=True)
class ServiceEnvironment:
    data_dir: Path
    tracking: TrackingSettings
    dask_address: str | None

    def cluster(self) -> ClusterSettings:
        """The running cluster by address, or a LocalCluster for this run when none is configured."""
        from mirflow.jobs import service_runtime  # the job layer builds every ClusterSettings

        return service_runtime(self.data_dir, self.tracking, self.dask_address).cluster


def service_environment(environ: Mapping[str, str] | None = None) -> ServiceEnvironment:
    environ = os.environ if environ is None else environ
    data_dir = Path(environ.get(DATA_DIR) or "data").expanduser().resolve()
    uri = environ.get(TRACKING_URI)
    # A remote tracking server chooses where artifacts go (its --artifacts-destination) unless told.
    tracking = (
        TrackingSettings(tracking_uri=uri, artifact_root=environ.get(ARTIFACT_ROOT) or None)
        if uri
        else tracking_for(data_dir)
    )
    return ServiceEnvironment(data_dir=data_dir, tracking=tracking, dask_address=environ.get(DASK_ADDRESS) or None)


@contextmanager
def subflow_heartbeats_off() -> Iterator[None]:
    """Flows started inside run without Prefect heartbeats; the run that enters this keeps its own.

    A flow run's heartbeat thread sleeps in one-second steps and the run waits for it to
    notice the end: up to a second per flow run, for every subflow. Heartbeats let Prefect
    mark a run Crashed when its process dies; subflows live in their parent's process, so
    the parent's heartbeat already tells that.
    """
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
