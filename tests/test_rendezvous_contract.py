"""The rendezvous contract: every backend, as real processes, agrees on views.

One suite, parametrized over the backends (``peer``, the default, and
``etcd``, the baseline): what the strategy relies on must hold for both, so
the two can be swapped and compared.  Each node is a real
``python -m chaos_lightning.rendezvous`` process (a ``kill -9`` is only
honest against a process); the test reads its JSON event lines from a reader
thread, every wait is bounded, and every process is killed and reaped in
teardown.

Scenarios:
  (a) a founder and four joiners, started at once, agree on one 5-member view;
  (b) a graceful ``leave``: the others commit a view without the leaver, which
      exits 0;
  (c) a ``kill -9``: the others commit a view without it within 15 s;
  (d) a newcomer joins through a member that is not the founder;
  (e) under churn (joins, a leave, a kill), epochs only grow at every node, and
      one epoch means one member list, in one order, everywhere.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from chaos_lightning.testbed.procs import free_port

from chaos_lightning.testbed.local import Node, Record

REPO = Path(__file__).resolve().parents[1]

#: Bounds, in seconds.  Forming five nodes on a loaded 2-core machine is mostly
#: interpreter start-up (about 1 s each, five at once); failure bounds are the
#: issue's: detection must be well under them for both backends (etcd's lease
#: TTL is 2 s, the peer "local" preset detects in about a second).
FORM_TIMEOUT = 25.0
LEAVE_TIMEOUT = 15.0
KILL_TIMEOUT = 15.0

class Cluster:
    """The nodes of one scenario, on one backend."""

    def __init__(self, backend: str, etcd_endpoint: str | None, workdir: Path):
        self.backend = backend
        self.etcd_endpoint = etcd_endpoint
        self.workdir = workdir
        self.nodes: list[Node] = []
        self._ports: set[int] = set()

    def _port(self) -> int:
        while True:
            port = free_port()
            if port not in self._ports:
                self._ports.add(port)
                return port

    def start(self, count: int, via: Node | None = None, found: bool = False) -> list[Node]:
        """Start ``count`` nodes at once (peer: joining through ``via``; the
        first founds the cluster if ``found``) and wait for their ready lines."""
        started = []
        founder_addr = None
        for i in range(count):
            port = self._port()
            args = ["--backend", self.backend, "--bind", f"127.0.0.1:{port}", "--no-store"]
            if self.backend == "peer":
                args += ["--preset", "local"]
                if found and i == 0:
                    founder_addr = f"127.0.0.1:{port}"
                else:
                    target = founder_addr if found else (via.addr if via else None)
                    assert target, "a peer joiner needs a member to join through"
                    args += ["--peers", target]
            else:
                args += ["--etcd", self.etcd_endpoint or ""]
            node = Node(args, self.workdir / f"node{len(self.nodes)}.err", cwd=REPO)
            self.nodes.append(node)
            started.append(node)
        for node in started:
            node.ready(FORM_TIMEOUT)
        return started

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture(params=["peer", pytest.param("etcd", marks=pytest.mark.etcd)])
def cluster(request, tmp_path):
    backend = request.param
    endpoint = request.getfixturevalue("etcd_endpoint") if backend == "etcd" else None
    c = Cluster(backend, endpoint, tmp_path)
    try:
        yield c
    finally:
        c.close()


# -- checks -------------------------------------------------------------------
def agreed_view(nodes: list[Node], ids: set[str], timeout: float, what: str, after: int = -1) -> Record:
    """Wait until every node reports a view newer than epoch ``after`` with
    exactly ``ids``; all must report the same (epoch, member order) for it.

    ``after`` matters: while a cluster forms, an earlier view may already hold
    the very set a later leave or kill leads back to."""
    views = [n.wait_view(lambda m: set(m) == ids, timeout, what, after) for n in nodes]
    first = views[0]
    for node, view in zip(nodes, views):
        assert (view["epoch"], view["members"]) == (first["epoch"], first["members"]), (
            f"{node.name} committed {view['epoch']}:{view['members']}, "
            f"{nodes[0].name} committed {first['epoch']}:{first['members']}"
        )
    return first


def assert_consistent(nodes: list[Node]) -> None:
    """(e): epochs grow at every node; one epoch, one member list everywhere;
    between a node's consecutive views, survivors keep their relative order."""
    by_epoch: dict[int, tuple[str, list[str]]] = {}
    for node in nodes:
        views = node.views()
        epochs = [v["epoch"] for v in views]
        assert epochs == sorted(set(epochs)), f"{node.name}: epochs not strictly increasing: {epochs}"
        for view in views:
            seen = by_epoch.setdefault(view["epoch"], (node.name, view["members"]))
            assert seen[1] == view["members"], (
                f"epoch {view['epoch']}: {seen[0]} has {seen[1]}, {node.name} has {view['members']}"
            )
        for before, after in zip(views, views[1:]):
            kept = [m for m in before["members"] if m in after["members"]]
            assert [m for m in after["members"] if m in kept] == kept, (
                f"{node.name}: survivors reordered from epoch {before['epoch']} {before['members']} "
                f"to {after['epoch']} {after['members']}"
            )


def form(cluster: Cluster, size: int) -> tuple[list[Node], int]:
    """Found a cluster of ``size``; returns the nodes and the agreed epoch."""
    nodes = cluster.start(size, found=True)
    view = agreed_view(nodes, {n.node_id for n in nodes}, FORM_TIMEOUT, f"{size}-member view")
    return nodes, view["epoch"]


# -- scenarios -------------------------------------------------------------------
def test_founder_and_four_joiners_agree_on_one_view(cluster):
    nodes, _ = form(cluster, 5)
    assert all(len(n.views()[-1]["members"]) == 5 for n in nodes)
    assert_consistent(nodes)


def test_graceful_leave_commits_a_view_without_the_leaver(cluster):
    nodes, epoch = form(cluster, 5)
    leaver, rest = nodes[1], nodes[:1] + nodes[2:]
    leaver.send("leave")
    agreed_view(rest, {n.node_id for n in rest}, LEAVE_TIMEOUT, "view without the leaver", after=epoch)
    leaver.wait_for(lambda r: r.get("event") == "left", LEAVE_TIMEOUT, "left line")
    assert leaver.proc.wait(timeout=LEAVE_TIMEOUT) == 0, leaver.describe()
    assert_consistent(nodes)


def test_killed_member_is_removed_within_bound(cluster):
    nodes, epoch = form(cluster, 5)
    # The founder: no node may be special, least of all the first one.
    victim, rest = nodes[0], nodes[1:]
    killed_at = time.monotonic()
    victim.kill9()
    agreed_view(rest, {n.node_id for n in rest}, KILL_TIMEOUT, "view without the killed node", after=epoch)
    print(f"[{cluster.backend}] kill -9 -> view at every survivor: {time.monotonic() - killed_at:.2f}s")
    assert_consistent(nodes)


def test_newcomer_joins_through_a_non_founder(cluster):
    nodes, epoch = form(cluster, 4)
    (newcomer,) = cluster.start(1, via=nodes[2])
    everyone = nodes + [newcomer]
    view = agreed_view(everyone, {n.node_id for n in everyone}, FORM_TIMEOUT, "view with the newcomer", after=epoch)
    # Ranks move as little as possible: the newcomer is appended.
    assert view["members"][-1] == newcomer.node_id
    assert_consistent(everyone)


def test_epochs_grow_and_order_agrees_under_churn(cluster):
    nodes, epoch = form(cluster, 3)
    # Two joiners at once, through different members.
    joiners = cluster.start(1, via=nodes[1]) + cluster.start(1, via=nodes[2])
    members = nodes + joiners
    epoch = agreed_view(members, {n.node_id for n in members}, FORM_TIMEOUT, "view with both joiners", epoch)["epoch"]
    # A leave and a kill close together.
    leaver, victim = nodes[1], joiners[0]
    leaver.send("leave")
    victim.kill9()
    rest = [n for n in members if n not in (leaver, victim)]
    epoch = agreed_view(
        rest, {n.node_id for n in rest}, KILL_TIMEOUT, "view without the leaver and the killed node", epoch
    )["epoch"]
    assert leaver.proc.wait(timeout=LEAVE_TIMEOUT) == 0, leaver.describe()
    # And one more joiner afterwards.
    (late,) = cluster.start(1, via=rest[-1])
    rest.append(late)
    agreed_view(rest, {n.node_id for n in rest}, FORM_TIMEOUT, "view with the late joiner", epoch)
    assert_consistent(cluster.nodes)


def test_a_hung_member_is_removed_and_after_resuming_comes_back_or_is_told(cluster):
    """SIGSTOP: the process is alive but silent (a hung host).  The others
    remove it within the failure bound; after SIGCONT it learns it was
    removed: the peer backend rejoins on its own (auto_rejoin), the etcd
    baseline reports ``removed``."""
    import signal

    nodes, epoch = form(cluster, 4)
    hung, rest = nodes[0], nodes[1:]  # the founder, and with the peer backend the coordinator
    hung.proc.send_signal(signal.SIGSTOP)
    try:
        epoch = agreed_view(rest, {n.node_id for n in rest}, KILL_TIMEOUT, "view without the hung node", after=epoch)[
            "epoch"
        ]
    finally:
        hung.proc.send_signal(signal.SIGCONT)
    if cluster.backend == "peer":
        agreed_view(nodes, {n.node_id for n in nodes}, FORM_TIMEOUT, "view with the resumed node", after=epoch)
        assert hung.wait_for(lambda r: r.get("event") == "removed" and not r.get("graceful"), 5, "removed line")
    else:
        hung.wait_for(lambda r: r.get("event") in ("removed", "error"), KILL_TIMEOUT, "removed line")
    assert_consistent(rest)


def test_the_coordinator_leaves_gracefully_and_the_next_one_takes_over(cluster):
    nodes, epoch = form(cluster, 4)
    founder, rest = nodes[0], nodes[1:]
    founder.send("leave")
    epoch = agreed_view(rest, {n.node_id for n in rest}, LEAVE_TIMEOUT, "view without the founder", after=epoch)["epoch"]
    assert founder.proc.wait(timeout=LEAVE_TIMEOUT) == 0, founder.describe()
    # the cluster still takes changes: a kill among the rest is committed
    victim = rest[1]
    victim.kill9()
    rest = [n for n in rest if n is not victim]
    agreed_view(rest, {n.node_id for n in rest}, KILL_TIMEOUT, "view without the killed node", after=epoch)
