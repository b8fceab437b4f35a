"""Quiet, offline defaults for every process mirflow starts: no telemetry, no phoning home, no chatter.

The one place they are written; the CLI, the ``make serve`` stack, the tests and the benchmarks
apply them before Prefect, MLflow or Dask is imported. An explicit setting in the environment wins.
This module imports nothing, so that applying it costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

QUIET_OFFLINE = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "GIT_PYTHON_REFRESH": "quiet",
    "DASK_LOGGING__DISTRIBUTED": "warning",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def apply_quiet_offline(environ: MutableMapping[str, str] | None = None) -> None:
    """Set each default in ``environ`` (the process environment by default) unless it is already set."""
    environ = os.environ if environ is None else environ
    for key, value in QUIET_OFFLINE.items():
        environ.setdefault(key, value)
