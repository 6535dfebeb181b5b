"""Real worker processes that print JSON lines, for the multi-process tests.

A generic form of the ``Trainer`` harness in ``test_strategy.py``: any worker
script and argv, any environment.  Every wait is bounded and :meth:`Node.stop`
kills and reaps the process, so tests call it from ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from chaos_lightning.testbed.procs import kill_and_reap

REPO = Path(__file__).resolve().parents[1]

Record = dict[str, Any]


class Node:
    """One worker process; its JSON stdout lines become ``records`` (with ``_t``,
    the monotonic arrival time); stderr goes to ``log`` (named on failure)."""

    def __init__(
        self, script: Path, argv: Sequence[str], env: Mapping[str, str], log: Path, *, own_group: bool = False,
        wrap: Sequence[str] = (),
    ) -> None:
        """``own_group``: the process leads a new process group (a node whose
        ``devices=N`` children a test signals as one, ``kill -SIG -PGID``);
        :meth:`stop` then kills the whole group.  ``wrap``: a command that
        execs the worker (``ip netns exec NS``: a node of the namespace testbed)."""
        self.log = log
        self.own_group = own_group
        self.env = dict(env)  # what the test set (not the inherited environment)
        self._err = open(log, "wb")
        self.proc = subprocess.Popen(
            [*wrap, sys.executable, str(script), *argv],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=subprocess.PIPE, stderr=self._err, text=True, start_new_session=own_group,
        )
        self.records: list[Record] = []
        self._lines: queue.Queue[Record] = queue.Queue()
        self._eof = threading.Event()  # stdout closed: no record will come any more
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict):
                continue
            rec["_t"] = time.monotonic()
            self.records.append(rec)
            self._lines.put(rec)
        self._eof.set()

    def wait(self, pred: Callable[[Record], bool], timeout: float) -> Record:
        """The first record (already seen or still to come) matching ``pred``."""
        deadline = time.monotonic() + timeout
        for rec in list(self.records):
            if pred(rec):
                return rec
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._dump_stacks()
            assert left > 0, f"timed out after {timeout}s; last records {self.records[-3:]}; {self._state()}"
            try:
                rec = self._lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                # fail fast (not at the deadline) once the worker is gone
                assert not (self._eof.is_set() and self._lines.empty()), (
                    f"stdout closed before the record came; last records {self.records[-3:]}; {self._state()}"
                )
                continue
            if pred(rec):
                return rec

    def _dump_stacks(self) -> None:
        """A worker still running when a wait times out: SIGUSR1 makes it
        write every thread's stack to its log (``tests/_say.py``)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(0.5)

    def _state(self) -> str:
        return f"exit code {self.proc.poll()}, log {self.log}"

    def event(self, name: str, timeout: float) -> Record:
        return self.wait(lambda r: r.get("event") == name, timeout)

    def exit_code(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        """Kill (if still running; its whole group if it leads one) and reap; idempotent."""
        if self.own_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        kill_and_reap(self.proc)
        if not self._err.closed:
            self._err.close()


def cluster(
    script: Path,
    argv: Sequence[str] | Callable[[int], Sequence[str]],
    k: int,
    tmp: Path,
    *,
    env: Mapping[str, str] | Callable[[int], Mapping[str, str]] | None = None,
    prefix: str = "n",
) -> list[Node]:
    """``k`` chaos nodes started at once (node 0 founds the cluster, the others
    join through it); training starts once all ``k`` are members.  ``argv``
    and ``env`` may depend on the node's index."""
    from chaos_lightning.testbed.procs import free_ports

    addrs = [f"127.0.0.1:{p}" for p in free_ports(k)]
    return [
        Node(script, argv(i) if callable(argv) else argv, {
            "CHAOS_BIND": a, "CHAOS_PEERS": "" if i == 0 else addrs[0], "CHAOS_MIN_NODES": str(k),
            **((env(i) if callable(env) else env) or {}),
        }, tmp / f"{prefix}{i}.log")
        for i, a in enumerate(addrs)
    ]


def joiner(
    script: Path, argv: Sequence[str], via: Node, tmp: Path, name: str, env: Mapping[str, str] | None = None
) -> Node:
    """A node started later that joins the running fit through ``via``."""
    from chaos_lightning.testbed.procs import free_port

    return Node(script, argv, {
        "CHAOS_BIND": f"127.0.0.1:{free_port()}", "CHAOS_PEERS": via.env["CHAOS_BIND"], "CHAOS_MIN_NODES": "1",
        **(env or {}),
    }, tmp / f"{name}.log")


def finish(nodes: Sequence[Node], timeout: float) -> list[Record]:
    """Every node's ``done`` record; each must exit 0."""
    done = [n.event("done", timeout) for n in nodes]
    for n in nodes:
        assert n.exit_code(30) == 0, n.log
    return done


def run_to_end(nodes: Sequence[Node], timeout: float) -> list[Record]:
    """:func:`finish` for nodes started for it; they are stopped (reaped) whatever happens."""
    try:
        return finish(nodes, timeout)
    finally:
        for n in nodes:
            n.stop()


def churn_cluster(
    script: Path, argv: Sequence[str], tmp: Path, prefix: str, kill: Callable[[Node], None] | None = None,
    env: Callable[[int], Mapping[str, str]] | None = None,
) -> tuple[list[Node], list[Record]]:
    """Three founders; a fourth joins mid-fit; once it trains, the founder that
    is rank 0 is SIGTERMed (a graceful leave: rank 0 moves); once the view
    without it trains, another founder is ``kill -9``ed (by ``kill``, if
    given: a worker may SIGKILL itself at a point of its choosing).  Returns the four
    nodes (leaver, the founder that stays, victim, joiner) and the ``done``
    records of the founder that stays and the joiner, after checking exit
    codes and that no log holds a traceback.  The worker prints ``ready``,
    ``step`` records with ``step`` and ``world``, and ``done`` with ``left``.
    ``env(i)``: what node ``i`` adds to its environment (the joiner is 3)."""
    nodes = cluster(script, argv, 3, tmp, prefix=prefix, env=env)
    try:
        for node in nodes:
            node.event("ready", 90)
        leaver, first, victim = nodes  # node 0 founds the cluster: rank 0 until it leaves
        leaver.wait(lambda r: r["event"] == "step" and r["step"] >= 4, 120)
        late = joiner(script, argv, first, tmp, f"{prefix}-joiner", env(3) if env else None)
        nodes.append(late)
        late.wait(lambda r: r["event"] == "step", 120)
        sent = time.monotonic()
        leaver.proc.send_signal(signal.SIGTERM)
        first.wait(lambda r: r["event"] == "step" and r["world"] == 3 and r["_t"] > sent, 60)
        (kill or (lambda n: n.proc.kill()))(victim)
        done = [first.event("done", 240), late.event("done", 240)]
        assert leaver.event("done", 60)["left"] is True
        for node in (first, late, leaver):
            assert node.exit_code(30) == 0, node.log
        assert victim.exit_code(10) == -signal.SIGKILL
        for node in (first, late, leaver):
            text = node.log.read_text()
            assert "Traceback" not in text, node.log
            assert "dirpath has changed" not in text, node.log
        return nodes, done
    finally:
        for node in nodes:
            node.stop()
