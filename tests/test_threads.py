"""The thread policy: the CPU budget from affinity and cgroup quota, less the cores other processes keep busy."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from infra.threads import LoadMeter, ThreadAdjuster, apply_thread_policy, cgroup_quota, cpu_budget, threads_for


def test_quota_from_cgroup_v2_and_v1_files(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) == 3.0
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(v1) is None
    assert cgroup_quota(tmp_path / "none") is None
    assert 1 <= cpu_budget()


@pytest.mark.parametrize(
    "budget, others, threads",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.0, 1), (2, 3.0, 1), (16, 2.2, 14), (16, 2.5, 13), (1, 0.9, 1)],
)
def test_threads_leave_the_cores_other_processes_keep_busy(budget, others, threads):
    assert threads_for(budget, others) == threads


def test_a_quota_below_the_cores_is_not_cut_by_load_on_the_other_cores():
    # 32 cores in the mask, a quota of 4, other containers keeping 4 busy: 28 are free, the quota allows 4.
    assert threads_for(4, 4.0, cores=32) == 4
    assert threads_for(4, 30.0, cores=32) == 2


def test_a_busy_process_is_measured_and_training_gives_way_then_takes_the_core_back(monkeypatch):
    monkeypatch.delenv("MIRFLOW_THREADS", raising=False)
    before = torch.get_num_threads()
    meter = LoadMeter()
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        assert meter.others() >= 0.5  # the busy loop: most of a core
        adjuster = ThreadAdjuster(every_s=0.0)
        time.sleep(0.5)
        adjuster.maybe_adjust()
        assert torch.get_num_threads() <= threads_for(cpu_budget(), 1.0)  # at least its core given up
    finally:
        busy.kill()
        busy.wait()
        torch.set_num_threads(before)


def test_a_pinned_count_is_kept(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("MIRFLOW_THREADS", "1")
    try:
        assert apply_thread_policy() == 1 and torch.get_num_threads() == 1
        assert ThreadAdjuster(every_s=0.0).maybe_adjust() is None
    finally:
        torch.set_num_threads(before)
