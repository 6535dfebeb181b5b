"""A CPU limit per testbed node: a cgroup with a CPU quota (a fraction of one CPU).

Role in the whole: the heterogeneous testbed of issue 16.  Nodes of
different speed on one machine are processes whose CPU bandwidth is capped
by the kernel's CFS bandwidth control: a node limited to 0.2 CPU gets 2 ms of
CPU time in every 10 ms period, whatever else it would like, so a
compute-bound training step takes twice as long as on a node at 0.4.  The
namespace testbed (:mod:`.netns`) gives a node one by
:meth:`~chaos_lightning.testbed.netns.Testbed.limit_cpu`; the benchmarks
use :class:`CpuLimit` directly.

What this file owns: creating, filling and removing the cgroups named
``chaos<pid>x<n>-<label>`` (the netns testbed's pattern, so one
:data:`~.netns.DEFAULT_PREFIX_PATTERN` matches both) under the cgroup this
process is in.  What it never does: touch a cgroup it did not create (stale
ones of dead owners aside, :func:`cleanup_stale`), or kill a live run's
processes: :meth:`CpuLimit.close` moves what still runs back to the parent
group before removing the group.

Both hierarchies, detected at run time (:func:`detect`):

- cgroup v1 (this machine): the ``cpu`` controller's own mount,
  ``cpu.cfs_period_us`` and ``cpu.cfs_quota_us``;
- cgroup v2: the unified mount with ``cpu`` in ``cgroup.controllers``,
  ``cpu.max`` (``"<quota> <period>"``); the parent must have ``+cpu`` in its
  ``cgroup.subtree_control``, which the kernel refuses while the parent holds
  processes itself (the no-internal-process rule) unless it is the root:
  that case is an error that says so.

Neither usable (no root, no cpu controller, a read-only mount) is a
:class:`CpuLimitError` naming what was tried; :func:`available` says it
without raising, for tests to skip on.

The period is 10 ms, not the kernel's default 100 ms: a node at 0.2 CPU
would otherwise run 20 ms and then sit throttled for 80 ms, so a 50 ms
training step would take 50 ms or 250 ms depending on where it fell in the
period; with 10 ms periods it takes 250 ms +- a few ms every time (the
quota per period, 2 ms, stays above the kernel's 1 ms minimum down to
0.1 CPU).

Processes get in two ways: :meth:`CpuLimit.argv` wraps a command so that
it enters the group before its ``exec`` (everything it ever forks is
inside), and :meth:`CpuLimit.attach` moves a running process, all its
threads, in (children it forked before stay where they are).  Cleanup is
the context manager's (exception or not), ``atexit``'s, and at the next
start :func:`cleanup_stale`'s (a ``kill -9``-ed owner).
"""

from __future__ import annotations

import atexit
import errno
import functools
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chaos_lightning.testbed.netns import DEFAULT_PREFIX_PATTERN, _pid_alive

__all__ = [
    "CpuLimit",
    "CpuLimitError",
    "Hierarchy",
    "available",
    "cleanup_stale",
    "detect",
]

#: CFS period, microseconds (see the module docstring)
PERIOD_US = 10_000
#: the kernel's smallest quota per period, microseconds
MIN_QUOTA_US = 1_000
#: seconds close() waits for an emptied group to be removable
_RMDIR_TIMEOUT_S = 5.0

_counter = itertools.count()
_live: dict[int, CpuLimit] = {}
_live_lock = threading.Lock()
_atexit_installed = False
_stale_swept = False


class CpuLimitError(RuntimeError):
    """No usable cgroup, or a cgroup file could not be written."""


@dataclass(frozen=True)
class Hierarchy:
    """Where this process's CPU cgroups go: ``base`` (the cgroup this process
    is in, in the hierarchy with the cpu controller) and the version."""

    version: int  # 1 or 2
    base: Path

    def quota_files(self, cpus: float, period_us: int) -> dict[str, str]:
        quota = round(cpus * period_us)
        if self.version == 1:
            # period first: a quota above the old period would be refused otherwise
            return {"cpu.cfs_period_us": str(period_us), "cpu.cfs_quota_us": str(quota)}
        return {"cpu.max": f"{quota} {period_us}"}


def _mounts(mountinfo: str) -> list[tuple[str, str, str, list[str]]]:
    """(mount root, mount point, fs type, super options) per line of /proc/self/mountinfo."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rest = left.split(), right.split()
        if len(fields) < 5 or len(rest) < 3:
            continue
        out.append((fields[3], fields[4].replace("\\040", " "), rest[0], rest[2].split(",")))
    return out


def _own_cgroup(self_cgroup: str, version: int) -> str:
    """This process's path in the v1 hierarchy with ``cpu`` or in the v2 one."""
    for line in self_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and hid == "0" and controllers == "":
            return path
        if version == 1 and "cpu" in controllers.split(","):
            return path
    return "/"


def _under(mount_root: str, mount_point: str, path: str) -> Path:
    """The directory of cgroup ``path`` under a mount of ``mount_root``."""
    rel = os.path.relpath(path, mount_root) if path.startswith(mount_root) else path.lstrip("/")
    return Path(mount_point) if rel in (".", "") else Path(mount_point) / rel


def detect(mountinfo: str | None = None, self_cgroup: str | None = None) -> Hierarchy:
    """The hierarchy to put CPU cgroups in; :class:`CpuLimitError` when none fits.

    ``mountinfo`` and ``self_cgroup`` default to this process's
    ``/proc/self/mountinfo`` and ``/proc/self/cgroup`` (given, they make the
    choice testable).  v2 is chosen where its ``cpu`` controller is
    available, else v1's ``cpu`` mount; a v2 mount without ``cpu`` (the
    hybrid layout, where cpu is bound to v1) does not count.
    """
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    if self_cgroup is None:
        self_cgroup = Path("/proc/self/cgroup").read_text()
    tried = []
    mounts = _mounts(mountinfo)
    for root, point, fstype, _opts in mounts:
        if fstype != "cgroup2":
            continue
        base = _under(root, point, _own_cgroup(self_cgroup, 2))
        try:
            controllers = (Path(point) / "cgroup.controllers").read_text().split()
        except OSError as e:
            tried.append(f"cgroup v2 at {point}: {e}")
            continue
        if "cpu" in controllers:
            return Hierarchy(2, base)
        tried.append(f"cgroup v2 at {point}: no cpu controller (controllers: {' '.join(controllers) or 'none'})")
    for root, point, fstype, opts in mounts:
        if fstype == "cgroup" and "cpu" in opts:
            return Hierarchy(1, _under(root, point, _own_cgroup(self_cgroup, 1)))
    tried.append("cgroup v1: no mount with the cpu controller")
    raise CpuLimitError("no usable cgroup for a CPU limit: " + "; ".join(tried))


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether a :class:`CpuLimit` can be made here, and if not, why (one real try)."""
    try:
        with CpuLimit(0.5, label="probe"):
            pass
    except (CpuLimitError, OSError) as e:
        return False, str(e)
    return True, "ok"


def _write(path: Path, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        raise CpuLimitError(f"cannot write {value!r} to {path}: {e.strerror or e}") from e


def _pids(group: Path) -> list[int]:
    try:
        return [int(t) for t in (group / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _empty_and_remove(group: Path, *, kill: bool) -> None:
    """Move (or with ``kill`` SIGKILL) every process out of ``group``, then
    remove it; bounded by :data:`_RMDIR_TIMEOUT_S`."""
    parent_procs = group.parent / "cgroup.procs"
    deadline = time.monotonic() + _RMDIR_TIMEOUT_S
    while True:
        for pid in _pids(group):
            try:
                if kill:
                    os.kill(pid, signal.SIGKILL)
                else:
                    with open(parent_procs, "w") as f:
                        f.write(str(pid))
            except (ProcessLookupError, OSError):
                pass  # gone meanwhile, or a zombie: it leaves the group once reaped
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY) or time.monotonic() > deadline:
                raise CpuLimitError(f"cannot remove cgroup {group}: {e.strerror} (pids {_pids(group)})") from e
        time.sleep(0.02)


def cleanup_stale(pattern: str = DEFAULT_PREFIX_PATTERN, *, only_dead_owners: bool = True,
                  hierarchy: Hierarchy | None = None) -> list[str]:
    """Remove CPU cgroups left by crashed runs (their processes killed); their names.

    The counterpart of :func:`chaos_lightning.testbed.netns.cleanup_stale`:
    ``pattern`` matched at the start of each group's name under this
    process's cgroup; with ``only_dead_owners`` a name whose ``pid`` group
    names a live process is spared (a concurrent run's groups).  The
    processes of a stale group are killed: their owner died, as the netns
    cleanup kills what runs in a stale namespace.
    """
    h = hierarchy or detect()
    rx = re.compile(pattern)
    removed = []
    try:
        entries = sorted(p for p in h.base.iterdir() if p.is_dir())
    except OSError:
        return removed
    for group in entries:
        m = rx.match(group.name)
        if not m:
            continue
        pid = m.groupdict().get("pid")
        if only_dead_owners and pid is not None and _pid_alive(int(pid)):
            continue
        _empty_and_remove(group, kill=True)
        removed.append(group.name)
    return removed


def _check_quota(cpus: float, period_us: int) -> None:
    if not cpus > 0:
        raise ValueError(f"cpus must be positive, got {cpus}")
    if cpus * period_us < MIN_QUOTA_US:
        raise ValueError(f"{cpus} CPU is under the kernel's minimum quota ({MIN_QUOTA_US} us) at a {period_us} us period")


def _close_all_live() -> None:
    with _live_lock:
        limits = list(_live.values())
    for limit in limits:
        try:
            limit.close()
        except Exception:  # best effort at exit: keep closing the others
            pass


class CpuLimit:
    """A cgroup capped at ``cpus`` CPUs (0.25: a quarter of one); a context manager.

    ``label`` ends the group's name (``chaos<pid>x<n>-<label>``), or ``name``
    gives the whole name (the netns testbed passes its node's namespace
    name).  :meth:`start` (or ``with``) creates it; :meth:`close` moves what
    still runs in it to the parent group and removes it.  Closing twice is
    harmless; so is a close after a failed start.
    """

    __test__ = False

    def __init__(self, cpus: float, *, label: str = "cpu", name: str | None = None,
                 period_us: int = PERIOD_US, hierarchy: Hierarchy | None = None) -> None:
        _check_quota(cpus, period_us)
        self.cpus = float(cpus)
        self.period_us = period_us
        self.name = name or f"chaos{os.getpid()}x{next(_counter)}-{label}"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ValueError(f"not a cgroup name: {self.name!r}")
        self._hierarchy = hierarchy
        self.path: Path | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> CpuLimit:
        """Create the group and set its quota.  Idempotent."""
        global _atexit_installed, _stale_swept
        if self.path is not None:
            return self
        if self._closed:
            raise CpuLimitError("CPU limit already closed")
        h = self._hierarchy or detect()
        if not _stale_swept:
            _stale_swept = True
            cleanup_stale(hierarchy=h)
        path = h.base / self.name
        try:
            path.mkdir()
        except OSError as e:
            raise CpuLimitError(f"cannot create cgroup {path} (cgroup v{h.version}): {e.strerror or e}") from e
        self.path = path
        with _live_lock:
            _live[id(self)] = self
            if not _atexit_installed:
                _atexit_installed = True
                atexit.register(_close_all_live)
        self._hierarchy = h
        try:
            if h.version == 2:
                self._enable_v2_controller(h.base)
            self.set_cpus(self.cpus)
        except BaseException:
            self.close()
            raise
        return self

    def set_cpus(self, cpus: float) -> None:
        """A new quota for the running group (its processes stay in it)."""
        if self.path is None or self._hierarchy is None:
            raise CpuLimitError("CPU limit is not running (use it as a context manager)")
        _check_quota(cpus, self.period_us)
        for fname, value in self._hierarchy.quota_files(cpus, self.period_us).items():
            _write(self.path / fname, value)
        self.cpus = float(cpus)

    @staticmethod
    def _enable_v2_controller(parent: Path) -> None:
        control = parent / "cgroup.subtree_control"
        try:
            if "cpu" in control.read_text().split():
                return
        except OSError as e:
            raise CpuLimitError(f"cannot read {control}: {e.strerror or e}") from e
        try:
            with open(control, "w") as f:
                f.write("+cpu")
        except OSError as e:
            why = (" (the parent holds processes itself: cgroup v2's no-internal-process rule;"
                   " run from a cgroup with a delegated subtree)") if e.errno == errno.EBUSY else ""
            raise CpuLimitError(f"cannot enable the cpu controller in {control}: {e.strerror or e}{why}") from e

    def close(self) -> None:
        """Move what still runs in the group to its parent, remove the group."""
        self._closed = True
        path, self.path = self.path, None
        try:
            if path is not None:
                _empty_and_remove(path, kill=False)
        finally:
            with _live_lock:
                _live.pop(id(self), None)

    def __enter__(self) -> CpuLimit:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes -------------------------------------------------------------
    def _procs_path(self) -> Path:
        if self.path is None:
            raise CpuLimitError("CPU limit is not running (use it as a context manager)")
        return self.path / "cgroup.procs"

    def argv(self, argv: Sequence[Any]) -> list[str]:
        """``argv`` wrapped so that it enters the group before it runs: a
        shell writes its own pid into ``cgroup.procs`` and then ``exec`` runs the
        command (same pid, so everything it forks is inside too).  Fails
        (exit 125) if the write does."""
        script = 'echo $$ > "$0" || exit 125; exec "$@"'
        return ["sh", "-c", script, str(self._procs_path()), *map(str, argv)]

    def popen(self, argv: Sequence[Any], **kwargs: Any) -> subprocess.Popen:
        """:class:`subprocess.Popen` of ``argv`` inside the group (see :meth:`argv`)."""
        return subprocess.Popen(self.argv(argv), **kwargs)

    def attach(self, pid: int) -> None:
        """Move the running process ``pid`` (all its threads) into the group."""
        _write(self._procs_path(), str(pid))

    def pids(self) -> list[int]:
        """Processes in the group now."""
        return _pids(self.path) if self.path is not None else []

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self.path is not None else "new"
        return f"CpuLimit({self.cpus:g}, {self.name!r}, {state})"
