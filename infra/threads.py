"""How many threads torch's CPU kernels use: the CPUs this process can really have, not the machine's core count.

torch sizes its intra-op pool by the core count and splits every operator evenly over
it. When another process keeps one of those cores busy (a Dask worker beside training,
another job on a shared node), every operator waits at its end for the thread that
shares the busy core, which the scheduler runs only in turns; a competitor with its
own spinning OpenMP pool (another framework's inference) makes that far worse.
``benchmarks/bench_threads.py`` measures it.

The policy, applied when training starts and kept up to date while it runs
(:class:`ThreadAdjuster`, the ``ThreadPolicy`` training callback):

1. the budget: the cores of the CPU affinity mask, capped by the cgroup CPU quota
   (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), at least 1;
2. minus the cores other processes keep busy, measured from ``/proc/stat`` over a short
   sample (this process's own CPU time taken out), rounded to whole cores.

OpenMP's wait policy: training keeps the default (a waiting thread spins a while), which
is the fastest when its threads have their cores; a passive wait cost 15-30 % of the
idle speed here and helps only when threads outnumber the free cores, which the policy
above avoids. Dask workers wait passively (``OMP_WAIT_POLICY=PASSIVE`` in their
environment), so that a worker never spins on a core training needs.

``MIRFLOW_THREADS=N`` pins the count (no measuring, no adjusting).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger("mirflow")

# Other processes' load, in cores, at or above which a core counts as taken (0.5: more than half a core).
BUSY_SHARE = 0.5


def usable_cores() -> int:
    """Cores this process may run on (affinity-aware, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (e.g. 1.5), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


_TORCH_DEFAULT: list[int] = []  # torch's own count (physical cores, or OMP_NUM_THREADS) before the policy's first


def cpu_budget() -> int:
    """Whole CPUs this process may use: the affinity mask capped by the cgroup quota and by torch's own default
    count (physical cores: hyperthreads do not speed these kernels up), at least 1."""
    import torch

    if not _TORCH_DEFAULT:
        _TORCH_DEFAULT.append(torch.get_num_threads())
    cores = usable_cores()
    quota = cgroup_quota()
    return max(1, min(cores, _TORCH_DEFAULT[0], int(quota) if quota is not None else cores))


def _cpu_seconds(cores: set[int]) -> float:
    """Busy CPU seconds so far of ``cores`` (everything but idle and iowait), from /proc/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu" and int(name[3:]) in cores:
            values = [int(v) for v in fields]
            busy += sum(values[:8]) - values[3] - values[4]  # user..steal minus idle and iowait
    return busy / ticks


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system  # children count as others: their time arrives only when they are reaped


class LoadMeter:
    """Other processes' load on this process's cores, in cores, since the last reading."""

    def __init__(self) -> None:
        try:
            self.cores = set(os.sched_getaffinity(0))
        except AttributeError:
            self.cores = set(range(os.cpu_count() or 1))
        self._last = self._now()

    def _now(self) -> tuple[float, float, float] | None:
        try:
            return time.monotonic(), _cpu_seconds(self.cores), _own_cpu_seconds()
        except (OSError, ValueError):  # no /proc (not Linux): nothing measured
            return None

    def others(self) -> float:
        now, last = self._now(), self._last
        self._last = now
        if now is None or last is None or now[0] - last[0] <= 0:
            return 0.0
        wall = now[0] - last[0]
        return max(0.0, ((now[1] - last[1]) - (now[2] - last[2])) / wall)


def threads_for(budget: int, others_load: float, cores: int | None = None) -> int:
    """Threads for a budget of cores when other processes keep ``others_load`` of ``cores`` (the affinity mask,
    where the load was measured; default: the budget) busy."""
    taken = int(others_load + (1 - BUSY_SHARE))  # 0.5 of a core or more counts as a whole core
    return max(1, min(budget, (budget if cores is None else cores) - taken))


def apply_thread_policy(sample_s: float = 0.2, *, processes: int = 1, quiet: bool = False) -> int:
    """Set torch's intra-op threads by the policy above, shared by ``processes`` ranks; returns the count."""
    import torch

    pinned = os.environ.get("MIRFLOW_THREADS")
    if pinned:
        n = max(1, int(pinned))
    else:
        budget = cpu_budget()
        meter = LoadMeter()
        time.sleep(sample_s)
        others = meter.others()
        n = max(1, threads_for(budget, others, len(meter.cores)) // max(1, processes))
        if not quiet and n < torch.get_num_threads():
            log.info(
                "threads: %d of %d cores (cgroup quota %s; other processes keep %.1f cores busy)",
                n,
                usable_cores(),
                cgroup_quota() or "none",
                others,
            )
    torch.set_num_threads(n)
    return n


class ThreadAdjuster:
    """Re-applies the policy while training runs: every ``every_s`` seconds, the threads follow other processes'
    load (a Dask worker that starts, a job that ends). Call :meth:`maybe_adjust` once per step."""

    def __init__(self, every_s: float = 2.0, *, processes: int = 1) -> None:
        self.every_s = every_s
        self.budget = cpu_budget()
        self.processes = max(1, processes)
        # Ranks of one DDP run would count each other as others' load: they keep the count they started with.
        self.pinned = bool(os.environ.get("MIRFLOW_THREADS")) or self.processes > 1
        self._meter = LoadMeter()
        self._next = time.monotonic() + every_s

    def maybe_adjust(self) -> int | None:
        """The new thread count when it changed, else None."""
        if self.pinned or time.monotonic() < self._next:
            return None
        self._next = time.monotonic() + self.every_s
        import torch

        n = max(1, threads_for(self.budget, self._meter.others(), len(self._meter.cores)) // self.processes)
        if n == torch.get_num_threads():
            return None
        torch.set_num_threads(n)
        log.debug("threads: %d (other processes' load changed)", n)
        return n


__all__ = [
    "LoadMeter",
    "ThreadAdjuster",
    "apply_thread_policy",
    "cgroup_quota",
    "cpu_budget",
    "threads_for",
    "usable_cores",
]


class ThreadPolicy(L.Callback):
    """On CPUs: torch's threads by this module's policy when training starts, then re-measured every few
    seconds, so that training gives way to (and takes back) cores another process keeps busy."""

    def __init__(self, every_s: float = 2.0) -> None:
        self.every_s = every_s
        self._adjuster = None
        self._before: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.strategy.root_device.type == "cpu":
            self._before = torch.get_num_threads()
            processes = max(1, trainer.num_devices)  # the ranks on this machine share its cores
            apply_thread_policy(processes=processes)
            self._adjuster = ThreadAdjuster(self.every_s, processes=processes)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._before is not None:  # testing and prediction after it start from torch's count
            torch.set_num_threads(self._before)
            self._before, self._adjuster = None, None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._adjuster is not None:
            self._adjuster.maybe_adjust()
