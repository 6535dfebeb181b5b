"""``torchrun --rdzv-backend chaos`` (chaos_lightning.integrations.torchrun).

Scenarios: the handler as torch finds it (the ``torchrun.handlers`` entry
point): a round of one with a working store, the founder and joiner
environments, one-line errors for a bad endpoint or ``--rdzv-conf``; and real
torchrun agents: two nodes train, a third joins mid-fit, the founding node's
worker is killed, and the survivors finish without torchrun restarting any
worker, identical and with every sample trained exactly once.  Every process
(agents and their workers, which torchrun starts in sessions of their own) is
reaped in a ``finally``; every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousParameters
from torch.distributed.elastic.rendezvous import registry

from _procs import REPO, Node, Record
from chaos_lightning.integrations.torchrun import ChaosRendezvousError, ChaosRendezvousHandler, handler_creator
from chaos_lightning.testbed.procs import free_port

WORKER = Path(__file__).with_name("_train_worker.py")
RECORD = {"CHAOS_RECORD_SAMPLES": "1"}


@pytest.fixture(autouse=True)
def _restore_environ() -> Iterator[None]:
    """The handler writes the chaos environment into ``os.environ`` (for torchrun's workers)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("CHAOS_")]:
        del os.environ[key]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def params(endpoint: str, min_nodes: int = 2, max_nodes: int | None = None, **conf: str) -> RendezvousParameters:
    """``--nnodes MIN`` (MAX = MIN, as torchrun sets it) or ``MIN:MAX``."""
    return RendezvousParameters("chaos", endpoint, "run-1", min_nodes, max_nodes or min_nodes, **conf)


def chaos_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("CHAOS_")}


# ---------------------------------------------------------------------- the handler
def test_torch_finds_the_handler_through_the_entry_point() -> None:
    registry._register_out_of_tree_handlers()  # again: the same creator, so no conflict
    assert registry.handler_registry._registry["chaos"] is handler_creator()
    handler = registry.get_rendezvous_handler(params(f"127.0.0.1:{free_port()}"))
    assert isinstance(handler, ChaosRendezvousHandler)
    assert handler.get_backend() == "chaos" and handler.get_run_id() == "run-1"
    handler.shutdown()


def test_a_round_of_one_founder_then_joiner_on_one_host() -> None:
    """Two agents on the endpoint's host: the first claims it and founds, the
    second sees the claim and joins through it; both are rank 0 of world 1
    with a store that serves the agent's rank assignment."""
    endpoint = f"127.0.0.1:{free_port()}"
    founder = registry.get_rendezvous_handler(params(endpoint))
    joiner = registry.get_rendezvous_handler(params(endpoint, preset="lan"))
    try:
        info = founder.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        info.store.set("torchelastic/role_info/0", b"x")
        assert info.store.multi_get(["torchelastic/role_info/0"]) == [b"x"]
        assert info.bootstrap_store_info.master_addr == "127.0.0.1" and info.bootstrap_store_info.master_port > 0
        assert chaos_env() == {"CHAOS_BIND": endpoint, "CHAOS_PEERS": "", "CHAOS_MIN_NODES": "2"}
        assert founder.num_nodes_waiting() == 0

        info = joiner.next_rendezvous()
        assert (info.rank, info.world_size) == (0, 1)
        assert chaos_env() == {
            "CHAOS_BIND": "127.0.0.1:0", "CHAOS_PEERS": endpoint, "CHAOS_MIN_NODES": "2", "CHAOS_PRESET": "lan",
        }
        assert joiner.num_nodes_waiting() == 0
        # a local restart of a joining node's worker: it joins again, as a new node
        assert joiner.next_rendezvous().world_size == 1 and chaos_env()["CHAOS_PEERS"] == endpoint
        # the founder's worker cannot come back: it would found a second cluster
        with pytest.raises(ChaosRendezvousError, match="founding node"):
            founder.next_rendezvous()
    finally:
        founder.shutdown()
        joiner.shutdown()
    assert founder.is_closed()
    with pytest.raises(RendezvousClosedError):
        founder.next_rendezvous()


def test_a_live_endpoint_is_joined_and_is_host_overrides_the_guess() -> None:
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    with socket.socket() as member:  # someone (a member) already answers there
        member.bind(("127.0.0.1", port))
        member.listen()
        handler = ChaosRendezvousHandler(params(endpoint))
        handler.next_rendezvous()
        assert not handler.founds and chaos_env()["CHAOS_PEERS"] == endpoint
        handler.shutdown()
    forced_join = ChaosRendezvousHandler(params(endpoint, is_host="0"))
    forced_join.next_rendezvous()
    assert chaos_env()["CHAOS_PEERS"] == endpoint
    forced_host = ChaosRendezvousHandler(params(endpoint, min_nodes=1, is_host="1", chaos_backend="peer"))
    forced_host.next_rendezvous()
    assert chaos_env() == {"CHAOS_BIND": endpoint, "CHAOS_PEERS": "", "CHAOS_MIN_NODES": "1", "CHAOS_BACKEND": "peer"}


def test_the_secret_comes_from_the_named_variable() -> None:
    os.environ["MY_CLUSTER_SECRET"] = "s3cret-s3cret-s3cret"
    handler = ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", secret_env="MY_CLUSTER_SECRET", is_host="0"))
    handler.next_rendezvous()
    assert chaos_env()["CHAOS_SECRET"] == "s3cret-s3cret-s3cret"


@pytest.mark.parametrize("endpoint", ["", "127.0.0.1", "host:port", "127.0.0.1:99999", "127.0.0.1:0", "::1:80", "a b:1"])
def test_a_malformed_endpoint_is_one_clear_line(endpoint: str) -> None:
    with pytest.raises(ChaosRendezvousError) as err:
        registry.get_rendezvous_handler(params(endpoint))
    message = str(err.value)
    assert message.startswith("chaos rendezvous: ") and "--rdzv-endpoint" in message and "\n" not in message


@pytest.mark.parametrize("conf, words", [
    ({"is_host": "maybe"}, "is_host"),
    ({"preset": "fast"}, "local, lan, edge"),
    ({"chaos_backend": "zookeeper"}, "etcd, peer"),
    ({"membership": "probe_interval=fast"}, "--rdzv-conf membership probe_interval must be a number"),
    ({"secret_env": "NO_SUCH_VARIABLE_HERE"}, "not set"),
    ({"frobnicate": "1"}, "unknown --rdzv-conf key(s) frobnicate"),
])
def test_a_bad_rdzv_conf_is_one_clear_line(conf: dict[str, str], words: str) -> None:
    with pytest.raises(ChaosRendezvousError) as err:
        ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", **conf))
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_size_policy_and_standby_reach_the_workers_counted_in_members() -> None:
    """``--nnodes 1:3 --rdzv-conf standby=1,target_nodes=2``: the workers wait
    as standbys; the policy counts members (nodes times --nproc-per-node: 1
    here); a plain ``--nnodes N`` (MAX = MIN) caps nothing."""
    handler = ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", min_nodes=1, max_nodes=3, is_host="0",
                                            standby="1", target_nodes="2"))
    handler.next_rendezvous()
    env = chaos_env()
    assert (env["CHAOS_STANDBY"], env["CHAOS_TARGET_NODES"], env["CHAOS_MAX_NODES"]) == ("1", "2", "3")
    handler.nproc = 2
    assert handler._members("3") == "6"
    plain = ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", min_nodes=2, max_nodes=2, is_host="0"))
    plain.founds = False  # a joining node (what next_rendezvous decides first)
    assert "CHAOS_MAX_NODES" not in plain.chaos_env()
    with pytest.raises(ChaosRendezvousError, match="target_nodes"):
        ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", target_nodes="many"))


def test_torch_timeouts_are_accepted_and_ignored() -> None:
    ChaosRendezvousHandler(params(f"127.0.0.1:{free_port()}", timeout="900", join_timeout="60"))


def torchrun(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, words", [
    (["--rdzv-endpoint", "127.0.0.1:99999"], "port must be 1-65535"),
])  # (--nproc-per-node N is supported: test_nproc_per_node_2_*)
def test_torchrun_reports_user_errors_in_one_line(args: list[str], words: str) -> None:
    full = ["--nnodes", "1", "--rdzv-backend", "chaos", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    result = torchrun(*full, str(WORKER), "8", "1", "0")
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == [errors[0]] and words in errors[0] and errors[0].startswith("torchrun: error: chaos rendezvous:")
    assert "Traceback" not in result.stderr and not result.stdout.strip()


# ---------------------------------------------------------------------- real torchrun agents
class Agent(Node):
    """A torchrun agent (``python -m torch.distributed.run``) and its worker.

    Its stdout carries the worker's JSON lines (torchrun does not redirect
    them).  torchrun starts the worker in a session of its own, so
    :meth:`stop` kills the agent's whole process tree, not only the agent."""

    def __init__(self, endpoint: str, argv: list[str], log: Path) -> None:
        self.log = log
        self.env = {}
        self.own_group = True  # started in a session of its own: Node.stop kills its group too
        self._err = open(log, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2:3", "--nproc-per-node", "1",
             "--rdzv-backend", "chaos", "--rdzv-endpoint", endpoint, "--max-restarts", "0", str(WORKER), *argv],
            # the ledger the exactly-once check reads (the fixture above clears CHAOS_*)
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **RECORD},
            stdout=subprocess.PIPE, stderr=self._err, text=True, start_new_session=True,
        )
        self.records: list[Record] = []
        self._lines: queue.Queue[Record] = queue.Queue()
        self._eof = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def worker_env(self) -> dict[str, str]:
        """The ``CHAOS_*`` environment the worker was started with (set by the handler)."""
        pid = self.event("ready", 60)["pid"]
        return {k: v for k, v in psutil.Process(pid).environ().items() if k.startswith("CHAOS_")}

    def pids(self) -> set[int]:
        return {r["pid"] for r in self.records if "pid" in r}

    def stop(self) -> None:
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for proc in [*tree, *(psutil.Process(p) for p in self.pids() if psutil.pid_exists(p))]:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        super().stop()


def exactly_once(done: Record, epochs: int, n: int) -> None:
    for epoch in range(epochs):
        counts = dict(done["epochs"][str(epoch)])
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, f"epoch {epoch}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchrun_two_nodes_a_third_joins_the_founder_is_killed_survivors_never_restart(tmp_path: Path) -> None:
    """Two torchrun agents started together elect one founder; a third agent
    joins mid-fit (torchrun restarts nobody: ``num_nodes_waiting`` is 0); the
    founding node's worker is killed (``kill -9``, ``--max-restarts 0``): its
    agent exits with the failure, and the survivors finish the fit with the
    same worker processes, identical replicas and an exact cover of every
    epoch."""
    n, epochs, sleep = 160, 8, 0.05
    argv = [str(n), str(epochs), str(sleep)]
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [Agent(endpoint, argv, tmp_path / f"agent{i}.log") for i in range(2)]
    try:
        envs = [a.worker_env() for a in agents]
        founders = [i for i, e in enumerate(envs) if e["CHAOS_PEERS"] == ""]
        assert len(founders) == 1, envs
        founder, other = agents[founders[0]], agents[1 - founders[0]]
        # the handler's four (--nnodes 2:3: at most 3 members), and the
        # agent's own CHAOS_RECORD_SAMPLES passed through
        cap = {"CHAOS_MIN_NODES": "2", "CHAOS_MAX_NODES": "3"}
        assert envs[founders[0]] == {"CHAOS_BIND": endpoint, "CHAOS_PEERS": "", **cap, **RECORD}
        assert envs[1 - founders[0]] == {"CHAOS_BIND": "127.0.0.1:0", "CHAOS_PEERS": endpoint, **cap, **RECORD}
        other.wait(lambda r: r.get("event") == "step" and r["world"] == 2 and r["step"] >= 3, 60)

        late = Agent(endpoint, argv, tmp_path / "agent2.log")
        agents.append(late)
        assert late.worker_env()["CHAOS_PEERS"] == endpoint
        first = late.wait(lambda r: r.get("event") == "step", 60)
        other.wait(lambda r: r.get("event") == "step" and r["world"] == 3 and r["step"] >= first["step"] + 8, 30)

        victim = founder.event("ready", 1)["pid"]
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        assert founder.exit_code(30) != 0, "the founder's agent reports its worker's failure"

        survivors = [other, late]
        done = [a.event("done", 60) for a in survivors]
        for a in survivors:
            assert a.exit_code(30) == 0, a.log
            assert len(a.pids()) == 1, f"torchrun restarted a worker: {a.pids()}"
        assert len({(d["params"], d["optim"], d["global_step"]) for d in done}) == 1, done
        # the ledger is what the node saw committed: the joiner's lacks the
        # epochs before it came (as in test_strategy's join scenarios)
        exactly_once(done[0], epochs, n)
        worlds = [r["world"] for r in other.records if r.get("event") == "step"]
        assert {2, 3} <= set(worlds) and worlds[-1] == 2, sorted(set(worlds))
        after = other.wait(lambda r: r.get("event") == "step" and r["_t"] > killed_at and r["world"] == 2, 1)
        print(
            f"\ntorchrun: join (agent start -> first step) {first['_t'] - late.started:.1f} s; "
            f"kill -> first step in world 2 {after['_t'] - killed_at:.2f} s"
        )
    finally:
        for a in agents:
            a.stop()


@pytest.mark.timeout(180)
def test_nproc_per_node_2_makes_two_members_that_split_the_node_address(tmp_path: Path) -> None:
    """``--nnodes 1 --nproc-per-node 2``: both workers inherit one
    ``CHAOS_BIND`` and split it by ``LOCAL_RANK`` (the founding endpoint and
    the port after it); they are two members of one world and end identical,
    with every sample trained once."""
    endpoint = f"127.0.0.1:{free_port()}"
    n, epochs = 64, 2
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--rdzv-backend", "chaos", "--rdzv-endpoint", endpoint, "--max-restarts", "0",
         "--log-dir", str(tmp_path / "logs"), "--redirects", "3", str(WORKER),
         str(n), str(epochs), "0.02"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CHAOS_TEST_DEVICES": "2", **RECORD},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    assert proc.returncode == 0, out
    import json

    # --redirects 3: each worker's stdout and stderr in its own file
    outs = sorted((tmp_path / "logs").rglob("stdout.log"))
    assert len(outs) == 2, list((tmp_path / "logs").rglob("*"))
    records = [json.loads(line) for f in outs for line in f.read_text().splitlines() if line.startswith("{")]
    out += "".join(f.read_text() for f in sorted((tmp_path / "logs").rglob("stderr.log")))
    done = [r for r in records if r["event"] == "done"]
    assert len(done) == 2 and len({d["pid"] for d in done}) == 2, out[-3000:]
    assert len({(d["params"], d["optim"], d["global_step"]) for d in done}) == 1, done
    assert {r["world"] for r in records if r["event"] == "step"} == {2}
    exactly_once(done[0], epochs, n)
    host, port = endpoint.rsplit(":", 1)
    assert f"{endpoint},{host}:{int(port) + 1}" in out or f"{host}:{int(port) + 1},{endpoint}" in out, out[-3000:]
