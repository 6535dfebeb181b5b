"""Elastic default process group: real processes, real gloo, loopback.

Scenarios (each with its own processes, all started in parallel and reused
across the phases of the scenario; every process is reaped and every wait is
bounded, on success and on failure):

* three nodes all-reduce; one leaves gracefully, the two others switch to a
  two-node group and all-reduce; a fourth joins and the three switch again;
  no survivor restarts (same pids, still running); the next groups are built
  ahead on a thread by some ranks (while the current group all-reduces) and
  at the switch by the others, and they meet;
* the rank-0 node (which also hosts the epoch's store) is SIGKILLed while the
  others are inside an all_reduce: they get an error or, if one hangs, the
  abort flag the test sets 0.3 s later (standing in for the membership layer's
  MemberFailed) ends the wait; they switch to a two-node group on a
  survivor's store and all-reduce;
* a node is SIGSTOPped (hung, not dead) while the others are inside an
  all_reduce: the PG timeout is 30 s, the survivors abandon the collective on
  the abort flag and all-reduce in the next group in well under 5 s;
* in one process: the private detach still works on this torch (pinned).

Workers are this file run as a script (``--worker ID``); they speak JSON
lines: commands on stdin, one reply per command on stdout (``allreduce``
first says ``entering``).  An ``abort`` command is handled by a reader thread,
like a control-plane event, while the main thread is inside the collective.
The timings each worker measures are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0  # 4 torch imports in parallel on 2 cores: ~5-10 s
REPLY_TIMEOUT = 20.0  # any one command; the longest is an init at its PG timeout


# --------------------------------------------------------------------------- worker
def _worker_main(node_id: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch

    from chaos_lightning.membership.view import Member, View
    from chaos_lightning.rendezvous.store import StoreHost, epoch_store
    from chaos_lightning.strategy.process_group import (
        CollectiveError,
        ElasticProcessGroup,
    )

    host = StoreHost(secret=None)  # loopback: no secret needed
    lock = threading.Lock()

    def emit(**kw: object) -> None:
        with lock:
            print(json.dumps({"id": node_id, "pid": os.getpid(), **kw}), flush=True)

    abort = threading.Event()
    abort_at: list[float | None] = [None]
    cmds: queue.Queue[dict] = queue.Queue()

    def reader() -> None:
        for line in sys.stdin:
            msg = json.loads(line)
            if msg["op"] == "abort":  # the control plane's MemberFailed
                abort_at[0] = time.perf_counter()
                abort.set()
            else:
                cmds.put(msg)
        cmds.put({"op": "exit"})  # the harness is gone

    threading.Thread(target=reader, daemon=True).start()
    epg = ElasticProcessGroup()
    ahead: dict[int, tuple[threading.Thread, dict]] = {}  # epoch -> the thread building its group, its result
    emit(ev="ready", endpoint=host.endpoint)

    def view_of(msg: dict) -> tuple[View, int]:
        members = tuple(Member(i, meta=(("store", ep),)) for i, ep in msg["members"])
        view = View(msg["epoch"], members)
        return view, view.ids.index(node_id)

    while True:
        msg = cmds.get(timeout=120)  # bounded: a lost harness ends the worker
        op = msg["op"]
        if op == "ahead":  # build the group of a view on a thread while this one goes on
            view, rank = view_of(msg)
            store = epoch_store(view, timedelta(seconds=10), secret=None)
            out: dict = {"store": store}

            def build(rank: int = rank, size: int = len(view.ids), store=store, out: dict = out) -> None:
                out["backend"] = ElasticProcessGroup.build_ahead(rank, size, store, msg["timeout"])

            thread = threading.Thread(target=build, daemon=True)
            thread.start()
            ahead[view.epoch] = (thread, out)
            emit(ev="building", epoch=view.epoch)
        elif op == "switch":
            view, rank = view_of(msg)
            abort.clear()  # the new epoch's flag
            built = ahead.pop(view.epoch, None)
            if built is not None:
                built[0].join(msg["timeout"])
                store, prebuilt = built[1]["store"], built[1]["backend"]
            else:
                store, prebuilt = epoch_store(view, timedelta(seconds=10), secret=None), None
            t = epg.switch(rank, len(view.ids), store, msg["timeout"], prebuilt=prebuilt)
            emit(ev="switched", epoch=view.epoch, rank=rank, world=epg.world_size, abandoned=t.abandoned,
                 teardown_ms=1e3 * t.teardown_s, init_ms=1e3 * t.init_s, ahead=prebuilt is not None)
        elif op == "allreduce":
            v = float(msg["value"])
            if msg.get("bucket"):
                ts = [torch.full((3,), v), torch.full((2, 2), v, dtype=torch.float64), torch.full((7,), v)]
            else:
                ts = [torch.full((5,), v)]
            emit(ev="entering")
            t0 = time.perf_counter()
            try:
                if msg.get("bucket"):
                    epg.all_reduce_bucket(ts, abort=abort, timeout=msg.get("timeout"))
                else:
                    epg.all_reduce(ts[0], abort=abort, timeout=msg.get("timeout"))
            except CollectiveError as e:
                # perf_counter is CLOCK_MONOTONIC: comparable across processes.
                emit(ev="allreduce", ok=False, error=type(e).__name__, message=str(e)[:300],
                     ms=1e3 * (time.perf_counter() - t0), at=time.perf_counter(),
                     unchanged=all(bool((t == v).all()) for t in ts))
                continue
            done = time.perf_counter()
            recovery = None if abort_at[0] is None else 1e3 * (done - abort_at[0])
            abort_at[0] = None
            emit(ev="allreduce", ok=True, values=sorted({float(x) for t in ts for x in t.flatten().tolist()}),
                 ms=1e3 * (done - t0), recovery_ms=recovery)
        elif op == "reduce":  # Lightning's reduce_op through the strategy's abortable reduction
            from chaos_lightning.strategy import collectives

            name = collectives.reduce_op_name(getattr(torch.distributed.ReduceOp, msg["torch_op"])
                                              if msg.get("torch_op") else msg["name"])
            t = torch.tensor(msg["values"], dtype=getattr(torch, msg["dtype"]))
            try:
                out = collectives.reduce(epg, t, name, abort, 10.0, absent=msg.get("absent"))
                emit(ev="reduced", name=name, values=out.tolist(), dtype=str(out.dtype).split(".")[-1])
            except TypeError as e:
                emit(ev="reduced", name=name, error=str(e))
        elif op == "exit":
            pending = epg.close(timeout=float(msg.get("wait", 2.0)))
            host.close()
            emit(ev="bye", pending=pending)
            if pending:
                # A detached op still pending would hold interpreter exit until
                # its PG timeout (see ElasticProcessGroup.close).
                os._exit(0)
            return


# --------------------------------------------------------------------------- harness
class Node:
    """One worker process and its reply stream."""

    def __init__(self, node_id: str) -> None:
        self.id = node_id
        env = dict(os.environ, PYTHONPATH=str(REPO), GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", node_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env,
        )
        self.pid = self.proc.pid
        self.endpoint = ""
        self._replies: queue.Queue[dict | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if line.startswith("{"):
                self._replies.put(json.loads(line))
        self._replies.put(None)  # EOF

    def send(self, op: str, **kw: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def expect(self, ev: str, timeout: float = REPLY_TIMEOUT) -> dict:
        try:
            reply = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"{self.id}: no {ev!r} within {timeout} s") from None
        assert reply is not None, f"{self.id}: exited (rc={self.proc.poll()}) while we waited for {ev!r}"
        assert reply["ev"] == ev, f"{self.id}: expected {ev!r}, got {reply}"
        assert reply["pid"] == self.pid, f"{self.id}: reply from another process: {reply}"
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture
def nodes():
    """Start nodes in parallel; afterwards reap every one of them, whatever happened."""
    started: list[Node] = []

    def start(*ids: str) -> list[Node]:
        new = [Node(i) for i in ids]
        started.extend(new)
        for n in new:
            n.endpoint = n.expect("ready", READY_TIMEOUT)["endpoint"]
        return new

    try:
        yield start
    finally:
        for n in started:
            if n.alive():
                try:
                    os.kill(n.pid, signal.SIGCONT)  # a stopped process dies on KILL anyway; be explicit
                    n.proc.kill()
                except ProcessLookupError:
                    pass
        for n in started:
            try:
                n.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{n.id} (pid {n.pid}) could not be reaped")
            for f in (n.proc.stdin, n.proc.stdout):
                try:
                    if f is not None:
                        f.close()
                except OSError:
                    pass


def build_ahead(builders: list[Node], group: list[Node], epoch: int, timeout: float = 10.0) -> None:
    """``builders`` (some of ``group``) start building the group of ``epoch`` on a thread."""
    members = [[n.id, n.endpoint] for n in group]
    for n in builders:
        n.send("ahead", epoch=epoch, members=members, timeout=timeout)
    for n in builders:
        assert n.expect("building")["epoch"] == epoch


def switch(group: list[Node], epoch: int, timeout: float = 10.0) -> list[dict]:
    """Send one view (store on the first node) to every node, collect the replies."""
    members = [[n.id, n.endpoint] for n in group]
    for n in group:
        n.send("switch", epoch=epoch, members=members, timeout=timeout)
    replies = [n.expect("switched") for n in group]
    for rank, r in enumerate(replies):
        assert (r["epoch"], r["rank"], r["world"]) == (epoch, rank, len(group))
    return replies


def all_reduce(group: list[Node], values: list[float], bucket: bool = False) -> list[dict]:
    for n, v in zip(group, values):
        n.send("allreduce", value=v, bucket=bucket)
    for n in group:
        n.expect("entering")
    replies = [n.expect("allreduce") for n in group]
    for r in replies:
        assert r["ok"], r
        assert r["values"] == [sum(values)], r
    return replies


def leave(node: Node, wait: float = 2.0) -> dict:
    node.send("exit", wait=wait)
    bye = node.expect("bye", REPLY_TIMEOUT + wait)
    assert node.proc.wait(timeout=10) == 0
    return bye


def _fmt(replies: list[dict], *keys: str) -> str:
    return "; ".join(" ".join(f"{k}={r[k]:.2f}" for k in keys if r.get(k) is not None) for r in replies)


def reduce(group: list[Node], values: list[list], dtype: str, name: str = "", torch_op: str = "",
           absent: list[bool] | None = None) -> list[dict]:
    for i, (n, v) in enumerate(zip(group, values)):
        n.send("reduce", values=v, dtype=dtype, name=name, torch_op=torch_op,
               absent=None if absent is None else absent[i])
    return [n.expect("reduced") for n in group]


def check_reduce_ops(group: list[Node]) -> None:
    """Every op gloo has goes through the abortable reduction (issue 14: a
    product or a bitwise op used to fall back to plain ``torch.distributed``,
    where a member's death is noticed only at the collective timeout): the
    results are gloo's, ``ReduceOp.AVG`` (which gloo lacks) is a mean, an
    absent rank (a stop-free joiner) sends the op's identity, and a float
    given to a bitwise op is refused on every rank before any collective."""
    ints = [[3, 5, 0, -1], [6, 1, 7, -1], [2, 3, 1, 4]]
    expect = {
        "product": [36, 15, 0, 4], "band": [2, 1, 0, 4], "bor": [7, 7, 7, -1], "bxor": [7, 7, 6, 4],
    }
    for name, want in expect.items():
        for how in ({"name": name.upper() if name == "bor" else name}, {"torch_op": name.upper()}):
            got = reduce(group, ints, "int64", **how)
            assert all(r["values"] == want and r["dtype"] == "int64" for r in got), (name, how, got)
    flags = [[True, True, False], [True, False, False], [True, True, True]]
    assert all(r["values"] == [True, False, False] for r in reduce(group, flags, "bool", "band"))
    assert all(r["values"] == [True, True, True] for r in reduce(group, flags, "bool", "bor"))
    # the third rank absent: the identity of each op in its place
    absent = [False, False, True]
    assert all(r["values"] == [18, 5, 0, 1] for r in reduce(group, ints, "int64", "product", absent=absent))
    assert all(r["values"] == [2, 1, 0, -1] for r in reduce(group, ints, "int64", "band", absent=absent))
    assert all(r["values"] == [True, False, False] for r in reduce(group, flags, "bool", "band", absent=absent))
    assert all(r["values"] == [5, 4, 7, 0] for r in reduce(group, ints, "int64", "bxor", absent=absent))
    assert all(r["values"] == [1.5, 2.0, 2.5] for r in reduce(group, [[1.0, 2.0, 3.0], [2.0, 2.0, 2.0], [1.5, 2.0, 2.5]],
                                                              "float32", torch_op="AVG"))
    refused = reduce(group, [[1.0], [2.0], [3.0]], "float32", "bxor")
    assert all("needs an integer or bool tensor" in r.get("error", "") for r in refused), refused


# --------------------------------------------------------------------------- scenarios
def test_three_nodes_one_leaves_one_joins_survivors_keep_their_processes(nodes):
    a, b, c, d = nodes("a", "b", "c", "d")  # d is warm and idle until it joins
    pids = {n.id: n.pid for n in (a, b)}

    s1 = switch([a, b, c], epoch=1)
    all_reduce([a, b, c], [1, 2, 3])
    all_reduce([a, b, c], [1, 2, 3], bucket=True)

    # a builds the group without c ahead, while the three still all-reduce
    # in theirs; b builds it at the switch, as init_process_group would: the
    # two meet on the same gloo keys
    build_ahead([a], [a, b], epoch=2)
    all_reduce([a, b, c], [1, 2, 3])
    assert leave(c)["pending"] == 0  # c leaves gracefully
    s2 = switch([a, b], epoch=2)
    assert [r["ahead"] for r in s2] == [True, False]
    all_reduce([a, b], [1, 2])
    all_reduce([a, b], [1, 2], bucket=True)

    build_ahead([a, b], [a, b, d], epoch=3)  # both build ahead, the newcomer at the switch
    all_reduce([a, b], [1, 2])
    s3 = switch([a, b, d], epoch=3)  # d joins at the end of the rank order
    assert [r["ahead"] for r in s3] == [True, True, False]
    assert s3[2]["teardown_ms"] < 1  # d had no group before
    all_reduce([a, b, d], [1, 2, 4])
    all_reduce([a, b, d], [1, 2, 4], bucket=True)

    check_reduce_ops([a, b, d])

    assert not any(r["abandoned"] for r in s1 + s2 + s3)
    assert {n.id: n.pid for n in (a, b)} == pids and a.alive() and b.alive()
    print(f"\nswitch 3->2: {_fmt(s2, 'teardown_ms', 'init_ms')}\nswitch 2->3: {_fmt(s3, 'teardown_ms', 'init_ms')}")
    for n in (a, b, d):
        assert leave(n)["pending"] == 0


def test_sigkill_of_rank0_mid_allreduce_survivors_switch_without_restart(nodes):
    a, b, c = nodes("a", "b", "c")
    switch([a, b, c], epoch=1, timeout=10)
    all_reduce([a, b, c], [1, 2, 3])

    survivors = [b, c]
    for n in survivors:  # a never joins this one: b and c wait for it
        n.send("allreduce", value=10, bucket=True)
    for n in survivors:
        n.expect("entering")
    time.sleep(0.05)
    t_kill = time.perf_counter()
    a.proc.kill()  # rank 0, and the host of epoch 1's store
    assert a.proc.wait(timeout=10) == -signal.SIGKILL
    time.sleep(0.3)  # the control plane's MemberFailed, later than gloo's reset (11-33 ms)
    members = [[n.id, n.endpoint] for n in survivors]  # epoch 2's store is b's
    for n in survivors:
        n.send("abort")
        n.send("switch", epoch=2, members=members, timeout=10)
        n.send("allreduce", value=1 if n is b else 2)
    failed = [n.expect("allreduce") for n in survivors]
    switched = [n.expect("switched") for n in survivors]
    for n in survivors:
        n.expect("entering")
    ok = [n.expect("allreduce") for n in survivors]

    for r in failed:
        assert not r["ok"] and r["error"] in ("CollectiveFailed", "CollectiveAborted"), r
        assert r["unchanged"], r  # a failed collective leaves the caller's tensors alone
    assert all(r["ok"] and r["values"] == [3.0] for r in ok), ok
    assert all(r["abandoned"] for r in switched)
    assert all(r["recovery_ms"] < 2000 for r in ok), ok
    print(
        "\nkill: " + "; ".join(f"{r['id']} {r['error']} {1e3 * (r['at'] - t_kill):.1f} ms after the kill" for r in failed)
        + f"\nswitch: {_fmt(switched, 'teardown_ms', 'init_ms')}"
        + f"\nabort -> next all_reduce ok: {_fmt(ok, 'recovery_ms')} ms"
    )
    all_reduce(survivors, [5, 6], bucket=True)
    assert b.alive() and c.alive()
    for n in survivors:
        leave(n)


def test_sigstopped_peer_is_abandoned_long_before_the_pg_timeout(nodes):
    pg_timeout = 30.0
    a, b, c = nodes("a", "b", "c")
    switch([a, b, c], epoch=1, timeout=pg_timeout)
    all_reduce([a, b, c], [1, 2, 3])

    survivors = [a, c]
    os.kill(b.pid, signal.SIGSTOP)  # hung, not dead: its sockets stay open
    try:
        for n in survivors:
            n.send("allreduce", value=10)
        for n in survivors:
            n.expect("entering")
        time.sleep(0.3)
        t_abort = time.perf_counter()
        members = [[n.id, n.endpoint] for n in survivors]
        for n in survivors:
            n.send("abort")
            n.send("switch", epoch=2, members=members, timeout=pg_timeout)
            n.send("allreduce", value=1 if n is a else 2)
        failed = [n.expect("allreduce") for n in survivors]
        switched = [n.expect("switched") for n in survivors]
        for n in survivors:
            n.expect("entering")
        ok = [n.expect("allreduce") for n in survivors]
        wall = time.perf_counter() - t_abort
    finally:
        b.proc.kill()  # SIGKILL ends a stopped process too
        b.proc.wait(timeout=10)

    for r in failed:
        assert not r["ok"] and r["error"] == "CollectiveAborted" and r["unchanged"], r
    assert all(r["abandoned"] for r in switched)
    assert all(r["ok"] and r["values"] == [3.0] for r in ok), ok
    assert wall < 5.0, f"recovery took {wall:.2f} s (PG timeout {pg_timeout} s)"
    print(
        f"\nstop: abort -> all_reduce ok in the next group: {_fmt(ok, 'recovery_ms')} ms"
        f" (harness wall {1e3 * wall:.1f} ms)\nswitch: {_fmt(switched, 'teardown_ms', 'init_ms')}"
    )
    all_reduce(survivors, [5, 6], bucket=True)
    assert a.alive() and c.alive()
    byes = [leave(n, wait=3.0) for n in survivors]
    # b's death resets the connections of ops that waited on b; an op that
    # waited on the other survivor can only end at the PG timeout: that
    # worker leaves with os._exit (see close()).
    print("detached ops still pending at exit:", [r["pending"] for r in byes])


# --------------------------------------------------------------------------- the pin
def test_gloo_detach_pinned():
    """What the detach relies on, on this torch: fails loudly after an upgrade.

    One process: rank 0 is the default group (through ElasticProcessGroup),
    rank 1 a bare ProcessGroupGloo on a thread that does not join the first
    all_reduce, so rank 0's op stays pending.
    """
    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from chaos_lightning.strategy import _gloo_detach
    from chaos_lightning.strategy.process_group import (
        CollectiveAborted,
        ElasticProcessGroup,
    )

    assert _gloo_detach.torch_version() in _gloo_detach.TESTED_TORCH, (
        f"torch {torch.__version__} is not in TESTED_TORCH: if this file passes, add it"
    )
    assert _gloo_detach.missing_internals() == []
    assert not dist.is_initialized()

    store = dist.HashStore()
    peer: dict[str, object] = {}

    def rank1() -> None:
        # The key layout init_process_group gives the default group's gloo
        # backend (distributed_c10d.py:2060, :2101): "<group name>/" then "cpu/".
        peer["pg"] = dist.ProcessGroupGloo(
            dist.PrefixStore("cpu/", dist.PrefixStore("0/", dist.PrefixStore("e1/", store))), 1, 2,
            timedelta(seconds=10),
        )

    th = threading.Thread(target=rank1)
    th.start()
    epg = ElasticProcessGroup()
    abort = threading.Event()
    try:
        epg.switch(0, 2, dist.PrefixStore("e1/", store), timeout=10)
        th.join(timeout=10)
        old = dist.group.WORLD
        assert old.group_name == "0" and "pg" in peer

        x = torch.full((4,), 1.0)
        threading.Timer(0.1, abort.set).start()
        t0 = time.perf_counter()
        with pytest.raises(CollectiveAborted):
            epg.all_reduce(x, abort=abort)  # rank 1 never joins: pending
        assert time.perf_counter() - t0 < 1.0  # not the 10 s PG timeout
        assert epg._pending and not epg._pending[0].is_completed()

        t = epg.switch(0, 1, dist.PrefixStore("e2/", store), timeout=10)
        assert t.abandoned and t.teardown_s < 0.05  # the detach did not wait for the op
        assert dist.is_initialized() and dist.group.WORLD is not old
        assert dist.group.WORLD.group_name == "0" and c10d._world.group_count == 1
        assert old not in c10d._world.pg_map
        assert len(_gloo_detach.GRAVEYARD) >= 1 and _gloo_detach.GRAVEYARD.pending() == 1
        y = torch.full((3,), 7.0)
        epg.all_reduce(y)
        assert y.tolist() == [7.0] * 3
        with pytest.raises(ValueError, match="twice"):  # re-init needs a teardown first
            dist.init_process_group("gloo", store=dist.PrefixStore("e3/", store), rank=0, world_size=1)

        # Rank 1 now joins the abandoned op: it completes in our private
        # buffer, the caller's tensor keeps its value, the graveyard drains.
        w = peer["pg"].allreduce([torch.full((4,), 2.0)])  # type: ignore[attr-defined]
        w.wait(timedelta(seconds=10))
        assert _gloo_detach.GRAVEYARD.wait(5.0) == 0
        assert x.tolist() == [1.0] * 4
    finally:
        epg.close(timeout=1.0)
        th.join(timeout=10)
        peer.clear()
    assert not dist.is_initialized()


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2])


def test_a_failed_switch_leaves_the_next_group_named_as_everyone_elses():
    """gloo's store keys start with the group's name, taken from c10d's
    counter.  A switch whose init failed (a rank never came) must not leave
    the counter at 1: this rank's next group would wait on ``1/...`` keys
    while the others write ``0/...`` (the soak's healed partition: a
    rejoining node and the members never met)."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from chaos_lightning.strategy.process_group import ElasticProcessGroup

    assert not dist.is_initialized()
    store = dist.HashStore()
    epg = ElasticProcessGroup()
    try:
        with pytest.raises(Exception):
            epg.switch(0, 2, dist.PrefixStore("e1/", store), timeout=1)  # rank 1 never comes
        assert not dist.is_initialized() and c10d._world.group_count == 0
        epg.switch(0, 1, dist.PrefixStore("e2/", store), timeout=5)
        assert dist.group.WORLD.group_name == "0"
    finally:
        epg.close()


def test_the_rank_prefix_of_a_traceback_is_the_current_groups_alone():
    """torch's ``init_process_group`` wraps ``sys.excepthook`` with a
    ``[rankN]:`` prefix each time; a node whose rank changed printed one
    prefix per group it ever had (the soak's ``[rank2]: [rank2]: [rank4]:``).
    Each switch now wraps the hook from before the first group."""
    import io
    import sys

    import torch.distributed as dist

    from chaos_lightning.strategy.process_group import ElasticProcessGroup

    assert not dist.is_initialized()
    store = dist.HashStore()
    before = sys.excepthook
    sys.excepthook = sys.__excepthook__  # as a fresh process has it (other tests here switched groups)
    epg = ElasticProcessGroup()
    try:
        for epoch in range(3):
            epg.switch(0, 1, dist.PrefixStore(f"e{epoch}/", store), timeout=5)
        err, sys.stderr = sys.stderr, io.StringIO()
        try:
            try:
                raise ValueError("boom")
            except ValueError:
                sys.excepthook(*sys.exc_info())
            text = sys.stderr.getvalue()
        finally:
            sys.stderr = err
        lines = [line for line in text.splitlines() if "boom" in line]
        assert lines and all(line.count("[rank") == 1 for line in lines), text
    finally:
        epg.close()
        sys.excepthook = before
