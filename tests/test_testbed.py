"""The namespace testbed, as scenarios: reach, shape, cut, cut a pair, clean up.

ping may not be installed, so reachability is a TCP echo between tiny
``python -c`` programs inside the namespaces.  Every wait is bounded.
Without root/ip/tc these tests skip with the reason; under CI=true they fail.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from chaos_lightning.testbed import Testbed, cleanup_stale

PY = sys.executable
PORT = 7000


# every test here needs the namespace testbed (skips without it, fails under CI=true)
pytestmark = pytest.mark.usefixtures("need_netns")


# -- tiny programs run inside the namespaces -------------------------------------
ECHO_SERVER = r"""
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])), backlog=64)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    c.settimeout(5)
    try:
        c.sendall(c.recv(64))
    except OSError:
        pass
    c.close()
"""

# Exit 0 and print "ok" on an echo; exit 1 and print the error otherwise.
ECHO_CLIENT = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    c = socket.create_connection((host, port), timeout=timeout)
    c.sendall(b"ping")
    assert c.recv(64) == b"ping"
    print("ok")
except Exception as e:
    print("fail", type(e).__name__, e)
    sys.exit(1)
"""

# Receive one connection to EOF; print bytes and seconds since the first byte.
SINK = r"""
import socket, sys, time
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("READY", flush=True)
s.settimeout(15)
c, _ = s.accept()
c.settimeout(15)
n, t0 = 0, None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""

SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
buf, left = b"\0" * (1 << 16), int(sys.argv[3])
while left > 0:
    left -= c.send(buf[: min(left, len(buf))])
c.close()
"""


def _wait_ready(p: subprocess.Popen, timeout: float = 5.0) -> None:
    ready, _, _ = select.select([p.stdout], [], [], timeout)
    assert ready, "server did not start in time"
    line = p.stdout.readline()
    assert line.strip() == "READY", line


def _echo_server(tb: Testbed, node: int) -> subprocess.Popen:
    p = tb.popen(node, [PY, "-c", ECHO_SERVER, PORT], stdout=subprocess.PIPE, text=True)
    _wait_ready(p)
    return p


def _reaches(tb: Testbed, src: int, dst: int, timeout: float = 1.0) -> bool:
    r = tb.run(
        src, [PY, "-c", ECHO_CLIENT, tb.addr(dst), PORT, timeout], timeout=timeout + 5
    )
    return r.returncode == 0


def _throughput_mbit(tb: Testbed, src: int, dst: int, nbytes: int) -> float:
    sink = tb.popen(dst, [PY, "-c", SINK, PORT + 1], stdout=subprocess.PIPE, text=True)
    _wait_ready(sink)
    tb.run(
        src, [PY, "-c", SOURCE, tb.addr(dst), PORT + 1, nbytes], timeout=15, check=True
    )
    out, _ = sink.communicate(timeout=10)
    got, secs = out.split()
    assert int(got) == nbytes
    return int(got) * 8 / float(secs) / 1e6


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], check=False, capture_output=True, text=True, timeout=5
    ).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith(prefix + "-")]


# -- scenarios ---------------------------------------------------------------------
def test_three_nodes_reach_each_other_over_the_switch():
    with Testbed(3) as tb:
        assert len({tb.addr(i) for i in tb.nodes}) == 3
        for dst in tb.nodes:
            _echo_server(tb, dst)
        for src in tb.nodes:
            for dst in tb.nodes:
                if src != dst:
                    assert _reaches(tb, src, dst, timeout=2), (src, dst)


def test_egress_cap_of_20_mbit_holds_while_an_unshaped_pair_runs_much_faster():
    with Testbed(3) as tb:
        tb.shape(0, 20, direction="egress")
        # ~7.5 MB at 20 Mbit/s is ~3 s: the tbf burst (64 KiB) is < 1% of it.
        shaped = _throughput_mbit(tb, 0, 1, 7_500_000)
        unshaped = _throughput_mbit(tb, 2, 1, 50_000_000)
        print(f"shaped {shaped:.1f} Mbit/s, unshaped {unshaped:.0f} Mbit/s")
        # tbf counts headers too (~4% of a 1514-byte frame), so goodput sits
        # a little below the cap.
        assert 17.0 <= shaped <= 23.0, shaped
        assert unshaped > 5 * 20, unshaped
        # Ingress shaping lives on the switch port: node 0 receiving is capped
        # too once asked, and unshape lifts both.
        tb.shape(0, 10, direction="ingress")
        ingress = _throughput_mbit(tb, 1, 0, 2_500_000)
        print(f"ingress-shaped {ingress:.1f} Mbit/s")
        assert 8.5 <= ingress <= 11.5, ingress
        tb.unshape(0)
        assert _throughput_mbit(tb, 0, 1, 20_000_000) > 5 * 20


def test_a_cut_node_is_unreachable_until_restored():
    with Testbed(3) as tb:
        for dst in tb.nodes:
            _echo_server(tb, dst)
        assert _reaches(tb, 0, 2)
        tb.cut(2)
        assert tb.is_cut(2)
        t0 = time.monotonic()
        assert not _reaches(tb, 0, 2, timeout=1.0)
        assert time.monotonic() - t0 < 5  # bounded: a timeout, not a hang
        assert not _reaches(tb, 2, 1, timeout=1.0)  # isolated both ways
        assert _reaches(tb, 0, 1)  # the rest of the switch is fine
        tb.restore(2)
        assert _reaches(tb, 0, 2, timeout=3.0)
        assert _reaches(tb, 2, 1, timeout=3.0)


def test_a_pair_cut_blocks_a_and_b_but_not_a_and_c():
    with Testbed(3) as tb:
        a, b, c = tb.nodes
        for dst in tb.nodes:
            _echo_server(tb, dst)
        assert _reaches(tb, a, b)
        tb.cut_pair(a, b)
        assert tb.is_pair_cut(b, a)
        assert not _reaches(tb, a, b, timeout=1.0)
        assert not _reaches(tb, b, a, timeout=1.0)
        assert _reaches(tb, a, c) and _reaches(tb, c, a)
        assert _reaches(tb, b, c) and _reaches(tb, c, b)
        tb.restore_pair(a, b)
        assert _reaches(tb, a, b, timeout=3.0)
        assert _reaches(tb, b, a, timeout=3.0)


def test_a_partition_is_every_pair_cut_and_outlives_a_restarted_process():
    """The scenario runner's ``partition 0,1 2,3``: every cross pair cut,
    each side still whole; the cut lives in the namespace (neighbour
    entries), so a process restarted there (``restart``) is cut off from its
    first packet; the heal restores every cross pair."""
    with Testbed(4) as tb:
        servers = {dst: _echo_server(tb, dst) for dst in tb.nodes}
        cross = [(x, y) for x in (0, 1) for y in (2, 3)]
        for x, y in cross:
            tb.cut_pair(x, y)
        for x, y in cross:
            assert not _reaches(tb, x, y, timeout=0.5) and not _reaches(tb, y, x, timeout=0.5), (x, y)
        assert _reaches(tb, 0, 1) and _reaches(tb, 3, 2)
        servers[2].kill()
        servers[2].wait(5)
        servers[2] = _echo_server(tb, 2)  # a new process, same namespace and address
        assert not _reaches(tb, 0, 2, timeout=0.5) and not _reaches(tb, 2, 1, timeout=0.5)
        assert _reaches(tb, 3, 2) and _reaches(tb, 2, 3)
        for x, y in cross:
            tb.restore_pair(x, y)
        for x, y in cross:
            assert _reaches(tb, x, y, timeout=3.0) and _reaches(tb, y, x, timeout=3.0), (x, y)


def test_exit_by_exception_leaves_no_namespace_and_no_process():
    procs = []
    with pytest.raises(RuntimeError, match="boom"), Testbed(2) as tb:
        prefix = tb.prefix
        assert len(_namespaces(prefix)) == 3  # two nodes and the switch
        for node in tb.nodes:
            procs.append(tb.popen(node, [PY, "-c", "import time; time.sleep(60)"]))
        # A grandchild the testbed never saw: it must die with the namespace.
        r = tb.run(
            0,
            [
                "sh",
                "-c",
                f"{PY} -c 'import time; time.sleep(60)' >/dev/null 2>&1 & echo $!",
            ],
            timeout=5,
        )
        orphan = int(r.stdout)
        raise RuntimeError("boom")
    assert _namespaces(prefix) == []
    for p in procs:
        assert p.returncode is not None  # killed and reaped
        with pytest.raises(ProcessLookupError):
            os.kill(p.pid, 0)
    assert _dead(orphan)


def _dead(pid: int, timeout: float = 3.0) -> bool:
    # Not our child: init reaps it, so allow a moment in the zombie state.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


HOLDER = r"""
import sys, time
from chaos_lightning.testbed import Testbed
tb = Testbed(2).start()
tb.popen(0, [sys.executable, "-c", "import time; time.sleep(60)"])
print(tb.prefix, flush=True)
if sys.argv[1] == "exit":
    sys.exit(0)  # never closed: the atexit hook must do it
time.sleep(60)  # killed by SIGTERM: the signal handler must do it
"""


@pytest.mark.parametrize("ending", ["exit", "sigterm"])
def test_a_process_that_exits_or_is_terminated_without_closing_leaves_nothing(ending):
    holder = subprocess.Popen(
        [PY, "-c", HOLDER, ending], stdout=subprocess.PIPE, text=True
    )
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 10)
        assert ready, "holder did not start"
        prefix = holder.stdout.readline().strip()
        assert prefix and len(_namespaces(prefix)) == 3
        if ending == "sigterm":
            holder.send_signal(signal.SIGTERM)
        rc = holder.wait(timeout=10)
        assert rc == (0 if ending == "exit" else -signal.SIGTERM)
        assert _namespaces(prefix) == []
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=5)


def test_a_clean_exit_leaves_nothing_and_close_is_idempotent():
    with Testbed(2) as tb:
        p = tb.popen(1, [PY, "-c", "import time; time.sleep(60)"])
    assert _namespaces(tb.prefix) == []
    assert p.returncode is not None
    tb.close()  # again: harmless


def test_cleanup_stale_removes_what_a_crashed_run_left():
    tb = Testbed(2).start()  # as if its process had died without closing
    try:
        tb.popen(0, [PY, "-c", "import time; time.sleep(60)"])
        # Our own pid is alive, so the default spares it...
        assert not set(cleanup_stale()) & set(_namespaces(tb.prefix))
        assert len(_namespaces(tb.prefix)) == 3
        # ...and a pattern for exactly this run with dead-owner checks off removes it.
        removed = cleanup_stale(re.escape(tb.prefix) + "-", only_dead_owners=False)
        assert sorted(removed) == sorted([tb.switch_netns, tb.netns(0), tb.netns(1)])
        assert _namespaces(tb.prefix) == []
    finally:
        tb.close()
