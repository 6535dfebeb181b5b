"""``chaos-run`` (chaos_lightning.launch): help, status against live agents,
one-line errors, and the process launcher with a tiny script (no training).

The launcher runs as ``python -m chaos_lightning.launch`` (what the
``chaos-run`` console script calls), so the tests do not depend on the
editable install's entry points being current.  Every process is reaped in a
``finally`` and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from chaos_lightning.agent import Agent
from chaos_lightning.wire.addr import AddressError, parse_hostport

REPO = Path(__file__).resolve().parents[1]
SECRET = "launch-test-secret"
pytestmark = pytest.mark.timeout(60)

#: prints its CHAOS_* environment and pid as one JSON line; --sleep: waits for
#: SIGTERM (prints "got SIGTERM", exits 0); --ignore-term: ignores SIGTERM;
#: --listen PORT: listens there; --exit N: exits with N
TINY = textwrap.dedent(
    """\
    import json, os, signal, socket, sys, time
    args = sys.argv[1:]
    env = {k: v for k, v in os.environ.items() if k.startswith("CHAOS_")}
    print(json.dumps({"pid": os.getpid(), "env": env, "argv": args}), flush=True)
    print("stderr line", file=sys.stderr, flush=True)
    if "--listen" in args:
        s = socket.socket()
        s.bind(("127.0.0.1", int(args[args.index("--listen") + 1])))
        s.listen()
    if "--ignore-term" in args:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: (print("got SIGTERM", flush=True), sys.exit(0)))
    standby_waits = "--standby-waits" in args and os.environ.get("CHAOS_STANDBY") == "1"
    if "--sleep" in args or "--ignore-term" in args or standby_waits:
        for _ in range(600):
            time.sleep(0.1)
    sys.exit(int(args[args.index("--exit") + 1]) if "--exit" in args else 0)
    """
)


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return path


def chaos_run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "chaos_lightning.launch", *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


class Launched:
    """A ``chaos-run`` process whose stdout/stderr lines are collected by threads."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chaos_lightning.launch", *args],
            cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _read(stream: IO[str], sink: list[str]) -> None:
        for line in stream:
            sink.append(line.rstrip("\n"))

    def records(self, n: int, timeout: float = 20) -> list[dict]:
        """The first ``n`` JSON lines of stdout, each with its prefix as ``tag``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = []
            for line in list(self.out):
                tag, _, rest = line.partition(" ") if line.startswith("[") else ("", "", line)
                if rest.startswith("{"):
                    found.append({"tag": tag, **json.loads(rest)})
            if len(found) >= n:
                return found[:n]
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} records within {timeout}s: {self.out!r} {self.err!r}")

    def finish(self, timeout: float = 20) -> tuple[str, str]:
        """Wait for the exit (bounded), then all output."""
        try:
            self.proc.wait(timeout)
        finally:
            self.close()
        for t in self._threads:
            t.join(5)
        return "\n".join(self.out), "\n".join(self.err)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def free_ports(n: int) -> int:
    """A base port with ``n`` consecutive free ports after it."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no consecutive free ports")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_dead(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# ---------------------------------------------------------------------- help, addresses
def test_help() -> None:
    result = chaos_run("--help")
    assert result.returncode == 0
    for flag in ("--bind", "--peers", "--nodes", "--join", "--min-nodes", "--secret-env", "status", "leave", "SIGTERM"):
        assert flag in result.stdout
    for sub in ("status", "leave"):
        result = chaos_run(sub, "--help")
        assert result.returncode == 0 and "usage: chaos-run " + sub in result.stdout


@pytest.mark.parametrize("text", ["127.0.0.1", "host:port", "1.2.3.4:99999", ":80", "a b:1", "1.2.3:80", "::1:80", "h:0"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_hostport(text)
    assert str(err.value).startswith(f"invalid address {text!r}: ") and "\n" not in str(err.value)


def test_parse_hostport_accepts() -> None:
    assert parse_hostport("127.0.0.1:7000") == ("127.0.0.1", 7000)
    assert parse_hostport("node-1.example.com:80") == ("node-1.example.com", 80)
    assert parse_hostport("[::1]:7000") == ("::1", 7000)
    assert parse_hostport("localhost:0", allow_port0=True) == ("localhost", 0)


# ---------------------------------------------------------------------- status
@pytest.fixture
def cluster() -> Iterator[list[Agent]]:
    """Two agents in this process, with a secret, in one view."""
    a = Agent(secret=SECRET).start([])
    b = Agent(secret=SECRET).start([a.addr])
    try:
        view = a.wait_view(timeout=15)
        deadline = time.monotonic() + 15
        while (view is None or len(view.members) < 2) and time.monotonic() < deadline:
            view = a.wait_view(view.epoch if view else 0, timeout=1)
        assert view is not None and len(view.members) == 2
        yield [a, b]
    finally:
        b.stop()
        a.stop()


def test_status_table_and_json(cluster: list[Agent]) -> None:
    a, b = cluster
    result = chaos_run("status", "--peer", a.addr, env={"CHAOS_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for text in (f"node {a.node_id}", "view", a.node_id, b.node_id, "coordinator", "rtt ms", "resources", "member"):
        assert text in out, out
    result = chaos_run("status", "--peer", b.addr, "--json", "--secret-env", "MY_SECRET", env={"MY_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    snap = json.loads(result.stdout)
    assert sorted(snap["view"]["members"]) == sorted([a.node_id, b.node_id])
    assert snap["membership"]["phase"] == "member"
    assert {"links", "resources", "transfers"} <= set(snap)


def test_status_wrong_secret(cluster: list[Agent]) -> None:
    line = one_line_error(chaos_run("status", "--peer", cluster[0].addr, env={"CHAOS_SECRET": "not-the-cluster-secret"}))
    assert "secret" in line


def test_status_bad_peer() -> None:
    port = free_ports(1)
    line = one_line_error(chaos_run("status", "--peer", f"127.0.0.1:{port}"))
    assert "refused" in line and str(port) in line
    line = one_line_error(chaos_run("status", "--peer", "no-such-host.invalid:7000"))
    assert "resolve" in line


@pytest.mark.parametrize("addr", ["127.0.0.1", "127.0.0.1:http", "127.0.0.1:70000", "bad host:1"])
def test_malformed_addresses(addr: str, tiny: Path) -> None:
    for args in (["status", "--peer", addr], ["--join", addr, str(tiny)], ["--peers", addr, str(tiny)]):
        line = one_line_error(chaos_run(*args))
        assert "invalid address" in line or "HOST:PORT" in line, line


def test_missing_script_and_busy_port(tiny: Path) -> None:
    assert "no such script" in one_line_error(chaos_run("--nodes", "2", "does_not_exist.py"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert "in use" in one_line_error(chaos_run("--bind", f"127.0.0.1:{port}", str(tiny)))
    env = {k: v for k, v in os.environ.items() if k != "CHAOS_SECRET"}
    result = subprocess.run([sys.executable, "-m", "chaos_lightning.launch", "--bind", "0.0.0.0:0", str(tiny)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert "not loopback" in one_line_error(result)
    # an empty secret is refused, not taken for "no secret"
    assert "CHAOS_SECRET must not be empty" in one_line_error(chaos_run(str(tiny), env={"CHAOS_SECRET": ""}))


@pytest.mark.parametrize("args, env, words", [
    (["--preset", "fast"], {}, "--preset must be a membership preset (local, lan, edge), got 'fast'"),
    (["--membership", "probe_interval=soon"], {}, "--membership probe_interval must be a number > 0, got 'soon'"),
    (["--membership", "warp=9"], {}, "--membership names no membership setting"),
    (["--backend", "zookeeper"], {}, "--backend must be an installed rendezvous backend (etcd, peer), got 'zookeeper'"),
    (["--min-nodes", "0"], {}, "--min-nodes must be at least 1"),
    ([], {"CHAOS_MIN_NODES": "abc"}, "CHAOS_MIN_NODES must be an integer >= 1, got 'abc'"),
    ([], {"CHAOS_JOIN_TIMEOUT": "-1"}, "CHAOS_JOIN_TIMEOUT must be a number of seconds > 0, got '-1'"),
    ([], {"CHAOS_BIND": "127.0.0.1:99999"}, "CHAOS_BIND port must be 0-65535, got '127.0.0.1:99999'"),
    ([], {"CHAOS_PEERS": "bad"}, "CHAOS_PEERS must be HOST:PORT, got 'bad'"),
])
def test_bad_settings_are_one_line_naming_the_flag_or_variable(args: list[str], env: dict[str, str], words: str,
                                                                tiny: Path) -> None:
    result = chaos_run(*args, str(tiny), env=env)
    assert result.returncode == 2
    assert words in one_line_error(result)


def test_preset_and_membership_overrides_reach_the_children(tiny: Path) -> None:
    result = chaos_run("--preset", "lan", "--membership", "probe_interval=0.3,suspicion_mult=3", str(tiny))
    assert result.returncode == 0, result.stderr
    env = json.loads(result.stdout.splitlines()[0])["env"]
    assert env["CHAOS_PRESET"] == "lan" and env["CHAOS_MEMBERSHIP"] == "probe_interval=0.3,suspicion_mult=3"
    # what the child's strategy resolves from that environment
    from chaos_lightning.config import NodeConfig
    from chaos_lightning.membership.config import Config

    assert NodeConfig.resolve(env=env).membership == Config.preset("lan", probe_interval=0.3, suspicion_mult=3.0)


# ---------------------------------------------------------------------- launching
def test_nodes_prefix_env_signal_forwarding_and_reaping(tiny: Path) -> None:
    base = free_ports(2)
    run = Launched("--nodes", "2", "--base-port", str(base), str(tiny), "--sleep", "--lr", "0.1")
    try:
        records = run.records(2)
        by_tag = {r["tag"]: r for r in records}
        assert set(by_tag) == {"[node0]", "[node1]"}
        env0, env1 = by_tag["[node0]"]["env"], by_tag["[node1]"]["env"]
        assert env0["CHAOS_BIND"] == f"127.0.0.1:{base}" and env0["CHAOS_PEERS"] == ""
        assert env1["CHAOS_BIND"] == f"127.0.0.1:{base + 1}" and env1["CHAOS_PEERS"] == f"127.0.0.1:{base}"
        assert env0["CHAOS_MIN_NODES"] == env1["CHAOS_MIN_NODES"] == "2"
        assert by_tag["[node0]"]["argv"] == ["--sleep", "--lr", "0.1"]
        pids = [r["pid"] for r in records]
        assert all(alive(p) for p in pids)
        run.proc.send_signal(signal.SIGTERM)  # forwarded: both leave (exit 0)
        out, err = run.finish()
        assert run.proc.returncode == 0, err
        assert "[node0] got SIGTERM" in out and "[node1] got SIGTERM" in out
        assert "[node0] stderr line" in err and "[node1] stderr line" in err
        assert wait_dead(pids, 5)
    finally:
        run.close()


def test_standbys_get_every_node_as_seed_the_policy_and_are_stopped_when_the_fit_ends(tiny: Path) -> None:
    """``--nodes 2 --standby 1``: a third process with CHAOS_STANDBY=1, the
    next port, every node's address as a seed and the target 2 (the nodes
    too: the founder's policy is the cluster's).  The nodes end (exit 0)
    while the standby still waits: the launcher stops it, and that is no failure."""
    base = free_ports(3)
    result = chaos_run("--nodes", "2", "--standby", "1", "--base-port", str(base), str(tiny), "--standby-waits")
    assert result.returncode == 0, result.stderr
    envs = {line.split(" ", 1)[0]: json.loads(line.split(" ", 1)[1])["env"]
            for line in result.stdout.splitlines() if line.split(" ", 1)[1].startswith("{")}
    assert set(envs) == {"[node0]", "[node1]", "[node2]"}
    standby = envs["[node2]"]
    assert standby["CHAOS_STANDBY"] == "1" and standby["CHAOS_BIND"] == f"127.0.0.1:{base + 2}"
    assert standby["CHAOS_PEERS"] == f"127.0.0.1:{base},127.0.0.1:{base + 1}" and standby["CHAOS_MIN_NODES"] == "1"
    assert all(e["CHAOS_TARGET_NODES"] == "2" for e in envs.values())
    assert "CHAOS_STANDBY" not in envs["[node0]"] and "CHAOS_STANDBY" not in envs["[node1]"]
    assert "[node2] got SIGTERM" in result.stdout
    assert "node 2 (standby" in result.stderr and "the fit ended; stopping it" in result.stderr
    bad = chaos_run("--standby", "1", str(tiny))
    assert bad.returncode == 2 and "--standby needs --nodes" in bad.stderr


def test_an_admitted_standby_is_replaced_so_that_s_standbys_wait_again() -> None:
    """``--nodes 1 --standby 1 --target-nodes 2`` with real rendezvous nodes
    (``-m chaos_lightning.rendezvous`` reads the same CHAOS_* variables as the
    strategy): the view has room, so the standby is admitted at once; the
    launcher sees it a member (its agent's status) and starts a new standby on
    the next port, which the full cluster holds.  SIGTERM ends all three."""
    base = free_ports(3)
    env = {"CHAOS_SECRET": SECRET, "CHAOS_LEAVE_TIMEOUT": "3"}
    run = Launched("--nodes", "1", "--standby", "1", "--target-nodes", "2", "--base-port", str(base),
                   "-m", "chaos_lightning.rendezvous", env=env)
    addrs = [f"127.0.0.1:{base + i}" for i in range(3)]
    try:
        deadline = time.monotonic() + 30
        while not any(line.startswith("[node2]") and '"event":"ready"' in line for line in run.out):
            assert time.monotonic() < deadline and run.proc.poll() is None, (run.out, run.err)
            time.sleep(0.1)
        assert any("node 1 (standby" in line and "is a member now; starting standby node 2" in line for line in run.err)
        # its seeds: the members alive now first (node 1, just admitted, among them)
        assert any("node 2 (standby): pid" in line and f"bind {addrs[2]}, peers {addrs[0]},{addrs[1]}" in line
                   for line in run.err), run.err
        # the replacement asks to join and is held: the cluster is at its target of 2
        deadline = time.monotonic() + 10
        while True:
            snap = json.loads(chaos_run("status", "--peer", addrs[0], "--json", env=env).stdout)
            if sorted(snap["view"]["members"]) == addrs[:2]:
                break
            assert time.monotonic() < deadline, snap["view"]
            time.sleep(0.2)
        time.sleep(1.5)  # a poll or two later: still held, and no fourth process
        held = json.loads(chaos_run("status", "--peer", addrs[2], "--json", env=env).stdout)
        assert held["membership"]["phase"] != "member", held["membership"]
        assert not any(line.startswith("[node3]") for line in run.out + run.err)
        run.proc.send_signal(signal.SIGTERM)
        out, err = run.finish(timeout=30)
        assert run.proc.returncode == 0, err
    finally:
        run.close()


def test_nodes_failure_is_nonzero(tiny: Path) -> None:
    base = free_ports(2)
    result = chaos_run("--nodes", "2", "--base-port", str(base), str(tiny), "--exit", "3")
    assert result.returncode == 3
    assert "2 of 2 nodes failed" in result.stderr


def test_grace_then_kill(tiny: Path) -> None:
    base = free_ports(2)
    run = Launched("--nodes", "2", "--base-port", str(base), "--grace", "1", str(tiny), "--ignore-term")
    try:
        records = run.records(2)
        run.proc.send_signal(signal.SIGTERM)
        out, err = run.finish(timeout=15)
        assert run.proc.returncode == 128 + signal.SIGKILL, err
        assert "killing them" in err
        assert wait_dead([r["pid"] for r in records], 5)
    finally:
        run.close()


def test_children_leave_when_the_launcher_is_killed(tiny: Path) -> None:
    base = free_ports(2)
    run = Launched("--nodes", "2", "--base-port", str(base), str(tiny), "--sleep")
    try:
        records = run.records(2)
        run.proc.kill()  # no chance to forward anything: PR_SET_PDEATHSIG sends the SIGTERM
        run.proc.wait(5)
        assert wait_dead([r["pid"] for r in records], 10)
    finally:
        run.close()


def test_one_node_join_exit_code_and_forwarding(tiny: Path) -> None:
    result = chaos_run("--join", "127.0.0.1:7000", str(tiny), "--exit", "5")
    assert result.returncode == 5
    rec = json.loads(result.stdout.splitlines()[0])
    assert rec["env"]["CHAOS_PEERS"] == "127.0.0.1:7000" and rec["env"]["CHAOS_MIN_NODES"] == "1"
    assert rec["env"]["CHAOS_BIND"] == "127.0.0.1:0"

    port = free_ports(1)
    run = Launched("--bind", f"127.0.0.1:{port}", "--min-nodes", "3", str(tiny), "--sleep", "--listen", str(port),
                   env={"CHAOS_SECRET": SECRET})
    try:
        (rec,) = run.records(1)
        assert rec["tag"] == ""  # unprefixed: one node inherits the launcher's stdio
        # what chaos-run sets, and conftest's CHAOS_RECORD_SAMPLES passed through
        assert rec["env"] == {"CHAOS_BIND": f"127.0.0.1:{port}", "CHAOS_PEERS": "", "CHAOS_MIN_NODES": "3",
                              "CHAOS_SECRET": SECRET, "CHAOS_LAUNCH_INDEX": "0",
                              "CHAOS_RECORD_SAMPLES": os.environ["CHAOS_RECORD_SAMPLES"]}
        # graceful leave by address: SIGTERM to the process listening there
        left = chaos_run("leave", "--node", f"127.0.0.1:{port}", "--wait", "10")
        assert left.returncode == 0, left.stderr
        assert f"pid {rec['pid']}" in left.stdout
        out, err = run.finish()
        assert run.proc.returncode == 0 and "got SIGTERM" in out, err
    finally:
        run.close()


def test_leave_by_pid(tiny: Path) -> None:
    node = subprocess.Popen([sys.executable, str(tiny), "--sleep"], stdout=subprocess.PIPE, text=True)
    try:
        assert node.stdout is not None
        json.loads(node.stdout.readline())
        result = chaos_run("leave", "--pid", str(node.pid))
        assert result.returncode == 0, result.stderr
        assert node.wait(10) == 0
        assert "no process" in one_line_error(chaos_run("leave", "--pid", str(node.pid)))
    finally:
        if node.poll() is None:
            node.kill()
            node.wait(5)


def test_real_nodes_status_and_leave() -> None:
    """The launcher with real rendezvous nodes (``-m chaos_lightning.rendezvous``
    reads the same CHAOS_* variables as the strategy): they form one view,
    ``status`` shows it, ``leave --node`` removes one, SIGTERM ends the rest."""
    base = free_ports(2)
    env = {"CHAOS_SECRET": SECRET, "CHAOS_LEAVE_TIMEOUT": "3"}  # the last member alone waits for its leave bound
    run = Launched("--nodes", "2", "--base-port", str(base), "-m", "chaos_lightning.rendezvous", env=env)
    addrs = [f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"]
    try:
        deadline = time.monotonic() + 30
        while not any('"epoch":2' in line and line.startswith("[node1]") for line in run.out):
            assert time.monotonic() < deadline and run.proc.poll() is None, (run.out, run.err)
            time.sleep(0.1)
        snap = json.loads(chaos_run("status", "--peer", addrs[1], "--json", env=env).stdout)
        assert snap["view"]["epoch"] >= 2 and sorted(snap["view"]["members"]) == addrs
        table = chaos_run("status", "--peer", addrs[0], env=env)
        assert table.returncode == 0 and addrs[1] in table.stdout and "this node" in table.stdout
        assert chaos_run("leave", "--node", addrs[1], "--wait", "15").returncode == 0
        run.proc.send_signal(signal.SIGTERM)
        out, err = run.finish(timeout=30)
        assert run.proc.returncode == 0, err
        assert '[node1] {"event":"left"' in out and '[node0] {"event":"left"' in out
    finally:
        run.close()
