"""Network-namespace testbed: N nodes behind one switch, links shaped and cut.

What this file owns: creating, shaping, cutting and deleting namespaces,
veths and a bridge, and every process it starts inside them.  What it never
does: send traffic outside the namespaces it created (node addresses are a
private 10.77.<k>.0/24 that exists only behind the testbed's own bridge).

Topology (DESIGN.md, "Testbed")::

    <prefix>-n0  eth0 10.77.k.1 ──veth── port0 ┐
    <prefix>-n1  eth0 10.77.k.2 ──veth── port1 ├─ br0   (in <prefix>-sw)
    <prefix>-n2  eth0 10.77.k.3 ──veth── port2 ┘

Each node has exactly one uplink, so its egress is shaped on ``eth0`` (node
side) and its ingress on ``port<i>`` (switch side), and a node is cut by
taking its switch port down.  Veths are created from inside the switch
namespace, so no interface ever appears in the host namespace and two
testbeds never collide on names.

A node can also be slowed: :meth:`Testbed.limit_cpu` gives it a CPU quota
(a cgroup, :mod:`.cpu`) that every process started in it afterwards runs
under, so nodes of different speed share one machine (issue 16).

Needs root, iproute2 ``ip`` and ``tc``; netem is not assumed (no delay
emulation).  :func:`available` says whether this machine can do it.
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

__all__ = [
    "DEFAULT_PREFIX_PATTERN",
    "Testbed",
    "TestbedError",
    "available",
    "cleanup_stale",
]

#: Names this module gives namespaces by default: ``chaos<pid>x<n>-...``.
#: :func:`cleanup_stale` matches it; the ``pid`` group lets it spare live runs.
DEFAULT_PREFIX_PATTERN = r"chaos(?P<pid>\d+)x\d+-"

#: Name of a node's single interface, inside the node's namespace.
NODE_IFACE = "eth0"
BRIDGE = "br0"

# A locally administered MAC that no interface in any testbed carries.  A pair
# cut pins the peer's address to it: frames go out, the bridge floods them
# (unknown destination), every node drops them (not its MAC).  That is silent
# loss, like a real partition.  Why not the alternatives: tc drop actions
# (act_gact) and flower are not loaded on this kernel, nft/iptables/ebtables
# are not installed, and a `blackhole`/`prohibit` route makes connect() fail
# at once with EINVAL/EACCES, which no real partition does.
_VOID_MAC = "02:00:00:00:00:00"

# Default command timeout for the ip/tc calls themselves (they take ms).
_CMD_TIMEOUT_S = 10.0
# Grace between SIGTERM and SIGKILL for processes the testbed started.
_KILL_GRACE_S = 1.0

_counter = itertools.count()
_live: dict[int, Testbed] = {}
_live_lock = threading.Lock()
_hooks_installed = False


class TestbedError(RuntimeError):
    """An ip/tc command the testbed needed failed."""

    __test__ = False  # not a pytest test class despite the name


def _cmd(
    argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        list(argv), check=False, capture_output=True, text=True, timeout=timeout
    )
    if check and r.returncode != 0:
        raise TestbedError(
            f"{' '.join(argv)!r} failed ({r.returncode}): {r.stderr.strip()}"
        )
    return r


def _netns_list() -> list[str]:
    # Lines look like "name (id: 3)" or "name".
    r = _cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    r = _cmd(["ip", "netns", "pids", ns], check=False)
    return [int(t) for t in r.stdout.split() if t.isdigit()]


def _kill_netns_and_delete(ns: str) -> None:
    """SIGKILL whatever still runs in ``ns``, then delete it.

    A namespace outlives ``ip netns del`` while any process is inside it (and
    so do its veths), hence the kill first, and the short wait for the kernel
    to let go of the processes.
    """
    deadline = time.monotonic() + 2.0
    while True:
        pids = _netns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    _cmd(["ip", "netns", "del", ns], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale(
    pattern: str = DEFAULT_PREFIX_PATTERN, *, only_dead_owners: bool = True
) -> list[str]:
    """Delete namespaces left behind by crashed runs; return their names.

    ``pattern`` is a regex matched at the start of each namespace name.  With
    ``only_dead_owners`` (default) a name whose ``pid`` group names a live
    process is spared, so this is safe to call while other test runs are
    active.  Testbeds with a custom prefix: pass ``re.escape(prefix) + "-"``
    and ``only_dead_owners=False``.
    """
    rx = re.compile(pattern)
    deleted = []
    for ns in _netns_list():
        m = rx.match(ns)
        if not m:
            continue
        pid = m.groupdict().get("pid")
        if only_dead_owners and pid is not None and _pid_alive(int(pid)):
            continue
        _kill_netns_and_delete(ns)
        deleted.append(ns)
    return deleted


@functools.lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether this machine can run a :class:`Testbed`, and if not, why."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool!r} (iproute2) not found"
    ns = f"chaos{os.getpid()}x{next(_counter)}-probe"
    try:
        _cmd(["ip", "netns", "add", ns])
        try:
            _cmd(["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge"])
            _cmd(
                [
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "add",
                    "p0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "p1",
                ]
            )
            _cmd(
                [
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    "p0",
                    "root",
                    "tbf",
                    "rate",
                    "10mbit",
                    "burst",
                    "64kb",
                    "latency",
                    "20ms",
                ]
            )
        finally:
            _cmd(["ip", "netns", "del", ns], check=False)
    except (TestbedError, OSError, subprocess.TimeoutExpired) as e:
        return False, f"cannot create a namespace with a bridge, veth and tbf: {e}"
    return True, "ok"


def _close_all_live() -> None:
    with _live_lock:
        beds = list(_live.values())
    for tb in beds:
        try:
            tb.close()
        except Exception:  # best effort at exit: keep closing the others
            pass


def _on_signal(signum: int, frame: Any, previous: Any) -> None:
    _close_all_live()
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_DFL:
        # Die the way the signal meant us to, now that nothing is left behind.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    """atexit plus SIGTERM/SIGHUP handlers, chained to whatever was there.

    SIGINT needs nothing: it raises KeyboardInterrupt and the context manager
    closes.  SIGKILL cannot be caught: :func:`cleanup_stale` covers it.  The
    handlers are only installable from the main thread; elsewhere atexit and
    the context manager remain.
    """
    global _hooks_installed
    if _hooks_installed:
        return
    _hooks_installed = True
    atexit.register(_close_all_live)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(signum)
        if previous == signal.SIG_IGN:
            continue
        signal.signal(signum, functools.partial(_on_signal, previous=previous))


class Testbed:
    """``n_nodes`` network namespaces on one bridge; a context manager.

    Nodes are numbered ``0..n_nodes-1``; node ``i`` has address
    ``10.77.<subnet>.<i+1>/24``.  Everything it creates, and every process it
    starts, is removed on :meth:`close` (context exit, exception, interpreter
    exit, SIGTERM/SIGHUP).  Closing twice is harmless.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(
        self, n_nodes: int, *, prefix: str | None = None, subnet: int | None = None
    ) -> None:
        if not 1 <= n_nodes <= 250:
            raise ValueError(f"n_nodes must be in 1..250, got {n_nodes}")
        n = next(_counter)
        self.n_nodes = n_nodes
        self.prefix = prefix if prefix is not None else f"chaos{os.getpid()}x{n}"
        # Every testbed has its own bridge, so subnets could all be equal;
        # distinct ones just make captures and logs unambiguous.
        self.subnet = subnet if subnet is not None else n % 256
        self.network = ipaddress.ip_network(f"10.77.{self.subnet}.0/24")
        self._procs: list[subprocess.Popen] = []
        self._cut_nodes: set[int] = set()
        self._cut_pairs: set[frozenset[int]] = set()
        self._created: list[str] = []
        self._cpu: dict[int, Any] = {}  # node -> its CpuLimit (chaos_lightning.testbed.cpu)
        self._started = False
        self._closed = False

    # -- names ----------------------------------------------------------------
    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}-sw"

    def netns(self, node: int) -> str:
        """The namespace name of ``node``."""
        self._check(node)
        return f"{self.prefix}-n{node}"

    def addr(self, node: int) -> str:
        """The IPv4 address of ``node`` (no prefix length)."""
        self._check(node)
        return str(self.network.network_address + node + 1)

    @property
    def nodes(self) -> range:
        return range(self.n_nodes)

    def _port(self, node: int) -> str:
        return f"port{node}"

    def _check(self, node: int) -> None:
        if not 0 <= node < self.n_nodes:
            raise IndexError(f"no node {node} in a {self.n_nodes}-node testbed")

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> Testbed:
        """Create the namespaces, bridge and veths.  Idempotent."""
        if self._started:
            return self
        if self._closed:
            raise TestbedError("testbed already closed")
        self._started = True
        _install_hooks()
        with _live_lock:
            _live[id(self)] = self
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        sw = self.switch_netns
        _cmd(["ip", "netns", "add", sw])
        self._created.append(sw)
        # STP off (the default) with forward_delay 0: ports forward at once.
        _cmd(
            [
                "ip",
                "-n",
                sw,
                "link",
                "add",
                BRIDGE,
                "type",
                "bridge",
                "forward_delay",
                "0",
            ]
        )
        _cmd(["ip", "-n", sw, "link", "set", BRIDGE, "up"])
        for i in self.nodes:
            ns = self.netns(i)
            _cmd(["ip", "netns", "add", ns])
            self._created.append(ns)
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            _cmd(
                [
                    "ip",
                    "-n",
                    sw,
                    "link",
                    "add",
                    self._port(i),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    NODE_IFACE,
                    "netns",
                    ns,
                ]
            )
            _cmd(["ip", "-n", sw, "link", "set", self._port(i), "master", BRIDGE])
            _cmd(["ip", "-n", sw, "link", "set", self._port(i), "up"])
            _cmd(
                [
                    "ip",
                    "-n",
                    ns,
                    "addr",
                    "add",
                    f"{self.addr(i)}/{self.network.prefixlen}",
                    "dev",
                    NODE_IFACE,
                ]
            )
            _cmd(["ip", "-n", ns, "link", "set", NODE_IFACE, "up"])

    def close(self) -> None:
        """Kill and reap every started process, delete every namespace.

        Idempotent and re-entrant (a signal may arrive while closing): each
        step tolerates having been done already.
        """
        self._closed = True
        procs = list(self._procs)
        for p in procs:
            self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + _KILL_GRACE_S
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(p, signal.SIGKILL)
        for p in procs:
            try:
                p.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        # Node namespaces first, the switch last; deleting a namespace
        # deletes the veth ends in it, and with them their peers.
        try:
            for ns in reversed(list(self._created)):
                _kill_netns_and_delete(ns)
            self._created.clear()
        finally:
            # after the namespaces: their processes are dead, the groups empty
            for limit in list(self._cpu.values()):
                limit.close()
            self._cpu.clear()
            with _live_lock:
                _live.pop(id(self), None)

    @staticmethod
    def _signal(p: subprocess.Popen, sig: int) -> None:
        if p.poll() is not None:
            return
        try:
            # popen() starts each process in its own session, so the whole
            # group (children it forked included) goes.
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, sig)
            else:
                p.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> Testbed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- processes ------------------------------------------------------------
    def _exec_argv(self, node: int, argv: Sequence[str]) -> list[str]:
        if not self._started or self._closed:
            raise TestbedError("testbed is not running (use it as a context manager)")
        argv = ["ip", "netns", "exec", self.netns(node), *map(str, argv)]
        # `ip netns exec` execs the command (no fork): it stays in the group
        return self._cpu[node].argv(argv) if node in self._cpu else argv

    def limit_cpu(self, node: int, cpus: float) -> Any:
        """Cap ``node`` at ``cpus`` CPUs (0.25: a quarter of one) from now on.

        Every process :meth:`popen` or :meth:`run` starts in the node
        afterwards runs in one cgroup with that quota (all of them together:
        the node is one device), from before its ``exec``.  Returns the
        :class:`~chaos_lightning.testbed.cpu.CpuLimit` (its
        :meth:`~chaos_lightning.testbed.cpu.CpuLimit.attach` moves in a
        process started otherwise).  Again on the same node: a new quota for
        the same group.  Removed on :meth:`close`.
        """
        from chaos_lightning.testbed.cpu import CpuLimit

        self._check(node)
        if not self._started or self._closed:
            raise TestbedError("testbed is not running (use it as a context manager)")
        if node in self._cpu:
            self._cpu[node].set_cpus(cpus)
        else:
            self._cpu[node] = CpuLimit(cpus, name=self.netns(node)).start()
        return self._cpu[node]

    def popen(self, node: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``node``; the testbed kills it on close.

        kwargs go to :class:`subprocess.Popen`.  ``start_new_session``
        defaults to True so that close() can kill the process group.
        """
        kwargs.setdefault("start_new_session", True)
        p = subprocess.Popen(self._exec_argv(node, argv), **kwargs)
        self._procs.append(p)
        return p

    def run(
        self,
        node: int,
        argv: Sequence[str],
        timeout: float,
        *,
        check: bool = False,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess:
        """Run a short command inside ``node``, text output captured.

        ``timeout`` is required: on expiry the command is killed and
        :class:`subprocess.TimeoutExpired` raised.
        """
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            self._exec_argv(node, argv), timeout=timeout, check=check, **kwargs
        )

    # -- shaping ----------------------------------------------------------------
    @staticmethod
    def _tbf_args(
        rate_mbit: float, burst_bytes: int | None, latency_ms: float
    ) -> list[str]:
        rate_bps = rate_mbit * 1e6 / 8
        if burst_bytes is None:
            # tbf can only release `burst` per timer tick, so burst must be at
            # least rate/HZ or the rate is never reached; 10 ms of traffic
            # covers HZ >= 100.  The 64 KiB floor holds one whole GSO
            # super-packet (veth does TSO), so tbf never has to split them.
            # At 20 Mbit/s that is 64 KiB, ~2% of one second of traffic.
            burst_bytes = max(64 * 1024, int(rate_bps * 0.010))
        # latency bounds the queue (limit = rate*latency + burst): a shallow
        # bottleneck buffer as on a real switch, so TCP sees loss and backs
        # off instead of filling an unbounded queue.
        return [
            "tbf",
            "rate",
            f"{int(rate_mbit * 1000)}kbit",
            "burst",
            str(burst_bytes),
            "latency",
            f"{latency_ms}ms",
        ]

    def shape(
        self,
        node: int,
        rate_mbit: float,
        direction: str = "both",
        *,
        burst_bytes: int | None = None,
        latency_ms: float = 50.0,
    ) -> None:
        """Cap ``node``'s uplink (egress), downlink (ingress) or both.

        Egress is shaped on the node's ``eth0``, ingress on its switch port
        (which transmits towards the node): tbf only shapes what a device
        sends.  Replaces any earlier shaping of the same direction.
        """
        self._check(node)
        if direction not in ("both", "egress", "ingress"):
            raise ValueError(
                f"direction must be both, egress or ingress, not {direction!r}"
            )
        if rate_mbit <= 0:
            raise ValueError("rate_mbit must be positive")
        tbf = self._tbf_args(rate_mbit, burst_bytes, latency_ms)
        if direction in ("both", "egress"):
            _cmd(
                [
                    "tc",
                    "-n",
                    self.netns(node),
                    "qdisc",
                    "replace",
                    "dev",
                    NODE_IFACE,
                    "root",
                    *tbf,
                ]
            )
        if direction in ("both", "ingress"):
            _cmd(
                [
                    "tc",
                    "-n",
                    self.switch_netns,
                    "qdisc",
                    "replace",
                    "dev",
                    self._port(node),
                    "root",
                    *tbf,
                ]
            )

    def unshape(self, node: int) -> None:
        """Remove all shaping of ``node`` (both directions)."""
        self._check(node)
        # "No such file" when nothing was shaped: fine.
        _cmd(
            ["tc", "-n", self.netns(node), "qdisc", "del", "dev", NODE_IFACE, "root"],
            check=False,
        )
        _cmd(
            [
                "tc",
                "-n",
                self.switch_netns,
                "qdisc",
                "del",
                "dev",
                self._port(node),
                "root",
            ],
            check=False,
        )

    # -- cuts -------------------------------------------------------------------
    def cut(self, node: int) -> None:
        """Isolate ``node``: take its switch port down.

        The cable is pulled at the switch: the node keeps its address and
        routes, its peer end loses carrier, and frames either way vanish, so
        peers see timeouts, as in a real failure.  Shaping survives.
        """
        self._check(node)
        _cmd(["ip", "-n", self.switch_netns, "link", "set", self._port(node), "down"])
        self._cut_nodes.add(node)

    def restore(self, node: int) -> None:
        """Undo :meth:`cut`; established connections resume (TCP retransmits)."""
        self._check(node)
        _cmd(["ip", "-n", self.switch_netns, "link", "set", self._port(node), "up"])
        self._cut_nodes.discard(node)

    def cut_pair(self, a: int, b: int) -> None:
        """Silently drop all traffic between ``a`` and ``b``, both ways.

        Each side's neighbour entry for the other is pinned to a MAC nobody
        has (see ``_VOID_MAC``); the other pairs are untouched.
        """
        self._check(a)
        self._check(b)
        if a == b:
            raise ValueError("a pair needs two distinct nodes")
        for x, y in ((a, b), (b, a)):
            _cmd(
                [
                    "ip",
                    "-n",
                    self.netns(x),
                    "neigh",
                    "replace",
                    self.addr(y),
                    "lladdr",
                    _VOID_MAC,
                    "nud",
                    "permanent",
                    "dev",
                    NODE_IFACE,
                ]
            )
        self._cut_pairs.add(frozenset((a, b)))

    def restore_pair(self, a: int, b: int) -> None:
        """Undo :meth:`cut_pair`; ARP resolves the real neighbour again."""
        self._check(a)
        self._check(b)
        for x, y in ((a, b), (b, a)):
            _cmd(
                [
                    "ip",
                    "-n",
                    self.netns(x),
                    "neigh",
                    "del",
                    self.addr(y),
                    "dev",
                    NODE_IFACE,
                ],
                check=False,
            )
        self._cut_pairs.discard(frozenset((a, b)))

    def is_cut(self, node: int) -> bool:
        return node in self._cut_nodes

    def is_pair_cut(self, a: int, b: int) -> bool:
        return frozenset((a, b)) in self._cut_pairs

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._started else "new"
        return f"Testbed({self.n_nodes}, prefix={self.prefix!r}, net={self.network}, {state})"
