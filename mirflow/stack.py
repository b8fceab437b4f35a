"""``make serve`` (``mirflow up``): mirflow as a long-running service on this machine.

It starts, each bound to 127.0.0.1 and each as the operator of a real deployment
would start it:

    Prefect server      ``prefect server start``           (its database under <data>/service/prefect)
    MLflow server       ``mlflow server``                  (sqlite <data>/mlflow.db, artifacts <data>/mlartifacts)
    Dask scheduler      ``dask scheduler``                 (dashboard on its own port)
    Dask workers        ``dask worker --nworkers N``       (one single-threaded worker per core)
    work pool + worker  a ``process`` work pool and ``prefect worker start`` with the service environment
                        (mirflow/environment.py) pointing every deployment run at the servers above

then registers the deployments of ``prefect.yaml`` and prints the URLs. Ctrl-C (or
SIGTERM) stops everything it started, newest first, each process group whole (a
server's own children included), so nothing is left behind. One service per storage
root: a lock file says whether one is running, and a second ``make serve`` says so and
exits.

Each child is started in a session of its own, so the terminal's Ctrl-C reaches only
this process, which then stops the children in order rather than all at once.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.errors import ParameterError

log = logging.getLogger("mirflow")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: Every process of one service carries this variable, so its processes can be found (and none forgotten).
SERVICE_ID = "MIRFLOW_SERVICE_ID"
_BIN = Path(sys.executable).parent


class StackError(RuntimeError):
    """The service could not start (a port in use, a server that did not come up, another service running)."""


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000
    dask: int = 8786
    dashboard: int = 8787
    web: int = 8000

    def __post_init__(self) -> None:  # a command-line mistake, found before anything starts
        values = list(asdict(self).values())
        if len(set(values)) != len(values):
            raise ParameterError(f"the service ports must differ, got {asdict(self)}")

    def check(self) -> None:
        """Raise :class:`StackError` when a port is taken on 127.0.0.1."""
        for name, port in asdict(self).items():
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    raise StackError(
                        f"port {port} ({name}) on 127.0.0.1 is in use: stop what holds it, or pass --{name}-port"
                    ) from None


@dataclass(frozen=True)
class ServiceInfo:
    """What a running service wrote about itself (``<data>/service/serve.json``)."""

    pid: int
    data_dir: str
    prefect_ui: str
    prefect_api: str
    mlflow_ui: str
    dask_scheduler: str
    dask_dashboard: str
    work_pool: str
    logs: str
    service_id: str = ""
    web_demo: str = ""

    def lines(self) -> list[str]:
        return [
            f"Prefect UI        {self.prefect_ui}",
            f"MLflow UI         {self.mlflow_ui}",
            *([f"web demo          {self.web_demo}"] if self.web_demo else []),
            f"Dask dashboard    {self.dask_dashboard}",
            f"Dask scheduler    {self.dask_scheduler}",
            f"logs              {self.logs}",
        ]


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log_path: Path


@dataclass
class Stack:
    """The processes of one service; :meth:`start` brings them up, :meth:`stop` takes them down."""

    data_dir: Path
    ports: Ports = field(default_factory=Ports)
    n_workers: int = 1
    work_pool: str = "mirflow"
    concurrency: int = 1
    paused_schedules: bool = False
    poll_seconds: float = 0.5  # how often the worker asks for runs: what a run waits before it starts
    stop_requested: Callable[[], bool] = lambda: False  # checked while starting: Ctrl-C need not wait for it
    children: list[_Child] = field(default_factory=list)
    service_id: str = ""
    _lock: object = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).resolve()
        self.service_id = os.environ.get(SERVICE_ID) or uuid.uuid4().hex
        self.folder = self.data_dir / "service"
        self.logs = self.folder / "logs"

    # ----------------------------------------------------------------- environment

    @property
    def info(self) -> ServiceInfo:
        p = self.ports
        return ServiceInfo(
            pid=os.getpid(),
            data_dir=str(self.data_dir),
            prefect_ui=f"http://127.0.0.1:{p.prefect}",
            prefect_api=f"http://127.0.0.1:{p.prefect}/api",
            mlflow_ui=f"http://127.0.0.1:{p.mlflow}",
            dask_scheduler=f"tcp://127.0.0.1:{p.dask}",
            dask_dashboard=f"http://127.0.0.1:{p.dashboard}/status",
            work_pool=self.work_pool,
            logs=str(self.logs),
            service_id=self.service_id,
            web_demo=f"http://127.0.0.1:{p.web}/",
        )

    def environ(self) -> dict[str, str]:
        """The children's environment: quiet, offline, pointed at this service."""
        from mirflow.environment import ARTIFACT_ROOT, DASK_ADDRESS, DATA_DIR, TRACKING_URI
        from mirflow.offline import QUIET_OFFLINE

        info = self.info
        return {
            **QUIET_OFFLINE,
            **os.environ,
            SERVICE_ID: self.service_id,
            "PREFECT_HOME": str(self.folder / "prefect"),
            "PREFECT_API_URL": info.prefect_api,
            "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "INFO"),
            DATA_DIR: str(self.data_dir),
            TRACKING_URI: info.mlflow_ui,
            DASK_ADDRESS: info.dask_scheduler,
            # Runs through the server and `mirflow` commands on the sqlite store then share experiments.
            ARTIFACT_ROOT: (self.data_dir / "mlartifacts").as_uri(),
            "MIRFLOW_PROJECT_ROOT": str(PROJECT_ROOT),
            "MIRFLOW_WORK_POOL": self.work_pool,
        }

    # ----------------------------------------------------------------- lifecycle

    @property
    def owned(self) -> bool:
        """Whether this stack holds the storage root's service lock (and so may stop what is there)."""
        return self._lock is not None

    def acquire(self) -> None:
        """Take the storage root's service lock, or raise with what is running there."""
        from infra.locks import try_lock

        handle = try_lock(self.folder / "serve.lock")
        if handle is None:
            raise StackError(running_message(self.data_dir))
        self._lock = handle

    def start(self, on_step: Callable[[str], None] = log.info) -> ServiceInfo:
        """Start every server, register the deployments, start the worker; returns the URLs.

        On any failure (or a stop request) everything started so far is stopped and a
        :class:`StackError` says what went wrong, with the tail of the failing log.
        """
        self.acquire()
        try:
            return self._start(on_step)
        except BaseException as err:
            self.stop()
            if isinstance(err, StackError):
                raise
            if isinstance(err, Exception):
                raise StackError(f"the service did not start: {type(err).__name__}: {err}") from err
            raise

    def _start(self, on_step: Callable[[str], None]) -> ServiceInfo:
        from infra.cluster import WORKER_MALLOC_ENVIRON, _worker_environ

        self._stop_leftovers()
        self.ports.check()
        self.logs.mkdir(parents=True, exist_ok=True)
        info = self.info
        (self.folder / "serve.json").write_text(json.dumps(asdict(info), indent=1))  # the id, before any child
        on_step(f"starting the Prefect server on {info.prefect_ui}")
        self._spawn(
            "prefect-server",
            [_BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.ports.prefect)],
        )
        on_step(f"starting the MLflow server on {info.mlflow_ui}")
        self._spawn(
            "mlflow-server",
            [
                _BIN / "mlflow",
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports.mlflow),
                "--backend-store-uri",
                f"sqlite:///{self.data_dir / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.data_dir / "mlartifacts"),
                "--workers",
                "1",
            ],
        )
        on_step(f"starting the Dask scheduler on {info.dask_scheduler} and {self.n_workers} workers")
        self._spawn(
            "dask-scheduler",
            [
                _BIN / "dask",
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.ports.dask),
                "--dashboard-address",
                f"127.0.0.1:{self.ports.dashboard}",
            ],
        )
        # The workers get the malloc settings and thread pins of infra.cluster's LocalCluster.
        spawn_environ = {**_worker_environ(), **WORKER_MALLOC_ENVIRON}
        self._spawn(
            "dask-workers",
            [
                _BIN / "dask",
                "worker",
                info.dask_scheduler,
                "--nworkers",
                str(self.n_workers),
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
            ],
            extra_env={"DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON": repr(spawn_environ)},
        )
        self._wait_http("prefect-server", f"{info.prefect_api}/health")
        self._wait_http("mlflow-server", f"{info.mlflow_ui}/health")
        self._wait_http("dask-scheduler", f"http://127.0.0.1:{self.ports.dashboard}/health")
        self._wait_for_workers(info.dask_scheduler)
        on_step(f"work pool {self.work_pool!r} and the deployments of prefect.yaml")
        self._work_pool()
        self._run_cli("deploy", [_BIN / "prefect", "--no-prompt", "deploy", "--all"])
        if self.paused_schedules:
            self._pause_schedules()
        self._spawn(
            "prefect-worker",
            [_BIN / "prefect", "worker", "start", "--pool", self.work_pool, "--type", "process"],
            extra_env={"PREFECT_WORKER_QUERY_SECONDS": str(self.poll_seconds)},
        )
        on_step(f"starting the web demo on {info.web_demo} (it serves the champions once a pipeline run made them)")
        self._spawn(
            "web-demo",
            [_BIN / "mirflow", "serve", "--data-dir", self.data_dir, "--port", str(self.ports.web), "--wait"],
        )
        self._wait_http("web-demo", f"{info.web_demo}healthz")
        self._check_stop()
        return info

    def watch(self) -> str | None:
        """Block until asked to stop (returns None) or a child dies (returns its name)."""
        while not self.stop_requested():
            for child in self.children:
                if child.process.poll() is not None:
                    return child.name
            time.sleep(0.5)
        return None

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every child, newest first: SIGTERM to its process group, SIGKILL if it lingers."""
        for child in reversed(self.children):
            _stop_group(child.process, timeout=timeout)
        self.children.clear()
        # Anything that left its group (a daemonized grandchild) still carries the service id.
        for pid in service_processes(self.service_id, exclude=_ancestors()):
            _kill(pid, signal.SIGKILL)
        (self.folder / "serve.json").unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    # ----------------------------------------------------------------- helpers

    def _check_stop(self) -> None:
        if self.stop_requested():
            raise StackError("stopped while starting")

    def _stop_leftovers(self) -> None:
        """Kill what a previous service of this storage root left (it was killed itself, so it could not)."""
        try:
            previous = json.loads((self.folder / "serve.json").read_text()).get("service_id")
        except (OSError, ValueError):
            return
        leftovers = service_processes(previous, exclude=_ancestors()) if previous else []
        if leftovers:
            log.warning("stopping %d processes left by a previous service of %s", len(leftovers), self.data_dir)
            for pid in leftovers:
                _kill(pid, signal.SIGKILL)

    def _spawn(self, name: str, argv: list, extra_env: Mapping[str, str] | None = None) -> _Child:
        self._check_stop()
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            try:
                # Each child in a session of its own (Ctrl-C reaches only us, and we stop them in order),
                # and told to end if we die without stopping it (SIGKILL, a crash).
                process = subprocess.Popen(
                    [str(a) for a in argv],
                    cwd=PROJECT_ROOT,
                    env={**self.environ(), **(extra_env or {})},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    preexec_fn=_end_with_parent_hook(),
                )
            except OSError as err:
                raise StackError(f"could not start {name} ({argv[0]}): {err}") from err
        child = _Child(name, process, log_path)
        self.children.append(child)
        return child

    def _run_cli(self, name: str, argv: list, timeout: float = 300) -> None:
        self._check_stop()
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            try:
                done = subprocess.run(
                    [str(a) for a in argv],
                    cwd=PROJECT_ROOT,
                    env=self.environ(),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    timeout=timeout,
                    start_new_session=True,
                )
            except subprocess.TimeoutExpired:
                raise StackError(
                    f"{' '.join(map(str, argv[1:]))} took more than {timeout:.0f} s:\n{_tail(log_path)}"
                ) from None
        if done.returncode != 0:
            raise StackError(f"{' '.join(map(str, argv[1:]))} failed (exit {done.returncode}):\n{_tail(log_path)}")

    def _wait_http(self, name: str, url: str, timeout: float = 180) -> None:
        child = next(c for c in self.children if c.name == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_stop()
            if child.process.poll() is not None:
                raise StackError(f"{name} exited with code {child.process.returncode}:\n{_tail(child.log_path)}")
            if http_ok(url):
                return
            time.sleep(0.5)
        raise StackError(f"{name} did not answer {url} within {timeout:.0f} s:\n{_tail(child.log_path)}")

    def _wait_for_workers(self, address: str, timeout: float = 120) -> None:
        from distributed import Client

        child = next(c for c in self.children if c.name == "dask-workers")
        deadline = time.monotonic() + timeout
        with Client(address, timeout=30) as client:
            while len(client.scheduler_info(n_workers=-1)["workers"]) < self.n_workers:
                self._check_stop()
                if child.process.poll() is not None or time.monotonic() > deadline:
                    raise StackError(f"the Dask workers did not all join the scheduler:\n{_tail(child.log_path)}")
                time.sleep(0.5)

    @contextmanager
    def _prefect_client(self) -> Iterator:
        """A synchronous Prefect client of this service's server."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.info.prefect_api}), get_client(sync_client=True) as client:
            yield client

    def _work_pool(self) -> None:
        from prefect.client.schemas.actions import WorkPoolCreate
        from prefect.workers.process import ProcessWorker

        with self._prefect_client() as client:
            # Runs share the storage root and the cores: `concurrency` at a time (1 by default).
            client.create_work_pool(
                WorkPoolCreate(
                    name=self.work_pool,
                    type="process",
                    base_job_template=ProcessWorker.get_default_base_job_template(),
                    concurrency_limit=self.concurrency,
                ),
                overwrite=True,
            )

    def _pause_schedules(self) -> None:
        with self._prefect_client() as client:
            for deployment in client.read_deployments():
                for schedule in client.read_deployment_schedules(deployment.id):
                    client.update_deployment_schedule(deployment.id, schedule.id, active=False)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now (for tests and benchmarks that start a service)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 400
    except OSError:
        return False


def running_message(data_dir: Path) -> str:
    info_path = Path(data_dir) / "service" / "serve.json"
    try:
        info = ServiceInfo(**json.loads(info_path.read_text()))
    except (OSError, ValueError, TypeError):
        return f"a mirflow service is already running (or starting) for {data_dir}"
    return "\n".join([f"a mirflow service is already running for {data_dir} (pid {info.pid}):", *info.lines()])


def _ancestors() -> set[int]:
    """This process and its parents (they may carry the service id too: it can be given to ``make serve``)."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def service_processes(service_id: str, *, exclude: set[int] = frozenset()) -> list[int]:
    """Pids of live processes whose environment carries ``MIRFLOW_SERVICE_ID=service_id`` (Linux /proc)."""
    marker = f"{SERVICE_ID}={service_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in exclude:
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie is gone, only not yet reaped
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def _stop_group(process: subprocess.Popen, *, timeout: float) -> None:
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # the leader is gone; its group may not be
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not stop within %.0f s of SIGTERM: killing it", process.pid, timeout)
    _kill_group(process.pid, signal.SIGKILL)
    process.wait()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end_with_parent_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child get SIGTERM when this process dies (Linux ``PR_SET_PDEATHSIG``).

    ``prctl`` is looked up here, in the parent: the hook itself runs between fork and exec,
    where importing or loading a library could deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
