"""The testbed's CPU limit, as scenarios: a busy loop capped at a quarter of a
CPU gets about a quarter; the group is gone after the test body raises; a
killed run's group is removed at the next start; no usable cgroup is a
clear error; a namespace node with a limit runs its processes under it.

The bounds (0.15-0.35 of a CPU for a 0.25 limit) check that the limit
works, not its precision: the machine is shared.  Without a writable cgroup
these tests skip with the reason; under CI=true (root) they fail.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from chaos_lightning.testbed.cpu import CpuLimit, CpuLimitError, cleanup_stale, detect

PY = sys.executable
#: prints the CPU seconds this process used over ``seconds`` of wall time of busy looping
BUSY = r"""
import sys, time
seconds = float(sys.argv[1])
c0, t0 = time.process_time(), time.monotonic()
while time.monotonic() - t0 < seconds:
    pass
print((time.process_time() - c0) / (time.monotonic() - t0), flush=True)
"""


def _groups() -> set[str]:
    return {p.name for p in detect().base.iterdir() if p.is_dir() and p.name.startswith("chaos")}


def _cpu_cgroup_of(pid: int) -> str:
    """The pid's cgroup path in the hierarchy the limits use."""
    version = detect().version
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        hid, controllers, path = line.split(":", 2)
        if (version == 2 and hid == "0") or (version == 1 and "cpu" in controllers.split(",")):
            return path
    raise AssertionError(f"pid {pid} is in no cpu cgroup")


def _wait_inside(limit: CpuLimit, pid: int) -> None:
    deadline = time.monotonic() + 5
    while pid not in limit.pids():
        assert time.monotonic() < deadline, f"pid {pid} never entered {limit.name}"
        time.sleep(0.01)


@pytest.mark.usefixtures("need_cgroup")
@pytest.mark.timeout(30)
def test_a_busy_loop_limited_to_a_quarter_cpu_gets_about_a_quarter():
    with CpuLimit(0.25, label="busy") as limit:
        out = subprocess.run(limit.argv([PY, "-c", BUSY, "1.5"]), capture_output=True, text=True, timeout=20, check=True)
    share = float(out.stdout)
    assert 0.15 <= share <= 0.35, f"a process limited to 0.25 CPU used {share:.3f} CPU"
    assert limit.name not in _groups()


@pytest.mark.usefixtures("need_cgroup")
@pytest.mark.timeout(30)
def test_the_group_is_removed_when_the_body_raises_and_what_runs_in_it_moved_out():
    proc = None
    try:
        with pytest.raises(RuntimeError, match="the test body failed"):
            with CpuLimit(0.3, label="raises") as limit:
                path = limit.path
                proc = limit.popen([PY, "-c", "import time; time.sleep(30)"])
                assert limit.name in _groups()
                _wait_inside(limit, proc.pid)  # the shell moved itself in, then exec'd python: same pid
                assert limit.pids() == [proc.pid]
                raise RuntimeError("the test body failed")
        assert path is not None and not path.exists()
        assert limit.name not in _groups()
        assert proc.poll() is None, "close() moves a live process out, it does not kill it"
        assert limit.name not in _cpu_cgroup_of(proc.pid)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.usefixtures("need_cgroup")
@pytest.mark.timeout(30)
def test_a_killed_runs_group_is_removed_at_the_next_start():
    # a run whose owner died (a reaped process: its pid names no live process) left a group with a worker in it
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait(timeout=10)
    stale = CpuLimit(0.3, name=f"chaos{dead.pid}x0-stale").start()
    orphan = stale.popen([PY, "-c", "import time; time.sleep(30)"])
    try:
        _wait_inside(stale, orphan.pid)
        stale.path = None  # forget it, as a kill -9 of its owner would
        with CpuLimit(0.3, label="live") as live:
            removed = cleanup_stale()
            assert live.name in _groups(), "a live owner's group is spared"
        assert f"chaos{dead.pid}x0-stale" in removed
        assert f"chaos{dead.pid}x0-stale" not in _groups()
        assert orphan.wait(timeout=10) == -9, "the stale group's process is killed, as the netns cleanup does"
    finally:
        orphan.kill()
        orphan.wait(timeout=10)
        stale.close()


def test_no_usable_cgroup_is_a_clear_error(tmp_path):
    proc_mounts = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
    with pytest.raises(CpuLimitError, match="no usable cgroup for a CPU limit.*no mount with the cpu controller"):
        detect(mountinfo=proc_mounts, self_cgroup="0::/\n")
    # a v2 mount whose cpu controller is bound elsewhere (the hybrid layout) does not count
    (tmp_path / "cgroup.controllers").write_text("memory pids\n")
    hybrid = proc_mounts + f"41 31 0:38 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n"
    with pytest.raises(CpuLimitError, match=r"cgroup v2 at .*: no cpu controller \(controllers: memory pids\)"):
        detect(mountinfo=hybrid, self_cgroup="0::/\n")
    # with one, v2 is chosen, under this process's own cgroup
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    h = detect(mountinfo=hybrid + "32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n",
               self_cgroup="1:cpu:/\n0::/job/a\n")
    assert (h.version, h.base) == (2, tmp_path / "job" / "a")
    assert h.quota_files(0.25, 10_000) == {"cpu.max": "2500 10000"}
    # v1: the cpu mount, under this process's path in it
    h = detect(mountinfo="32 31 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu,cpuacct\n",
               self_cgroup="2:cpu,cpuacct:/job\n0::/\n")
    assert (h.version, str(h.base)) == (1, "/sys/fs/cgroup/cpu/job")
    assert h.quota_files(0.25, 10_000) == {"cpu.cfs_period_us": "10000", "cpu.cfs_quota_us": "2500"}
    with pytest.raises(ValueError, match="under the kernel's minimum quota"):
        CpuLimit(0.05)


@pytest.mark.usefixtures("need_cgroup", "need_netns")
@pytest.mark.timeout(30)
def test_a_namespace_node_given_a_cpu_limit_runs_its_processes_under_it():
    from chaos_lightning.testbed import Testbed

    with Testbed(2) as tb:
        limit = tb.limit_cpu(1, 0.25)
        assert limit.name == tb.netns(1) and limit.name in _groups()
        slow = tb.run(1, [PY, "-c", BUSY, "1.5"], timeout=20, check=True)
        free = tb.run(0, [PY, "-c", "import os; print(open(f'/proc/{os.getpid()}/cgroup').read())"], timeout=20,
                      check=True)
    assert 0.15 <= float(slow.stdout) <= 0.35, f"node 1 limited to 0.25 CPU used {float(slow.stdout):.3f} CPU"
    assert tb.netns(1) not in free.stdout, "node 0 has no limit"
    assert limit.name not in _groups(), "the testbed's close removes its nodes' groups"
