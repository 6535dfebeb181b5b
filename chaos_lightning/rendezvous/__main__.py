"""One rendezvous node as a process: the driver of the contract tests and the demo.

``python -m chaos_lightning.rendezvous --backend peer|etcd --bind HOST:PORT ...``
builds a backend with :func:`chaos_lightning.rendezvous.create`, joins, and
then reports every membership event as one JSON line on stdout (flushed, so a
parent process sees it at once)::

    {"event": "ready", "node": ..., "addr": ...}            # first line, before joining
    {"event": "view", "t": ..., "node": ..., "epoch": ..., "members": [...], "down_links": [[a, b], ...]}
    {"event": "removed", ..., "graceful": true}
    {"event": "member_failed" | "member_suspected", ..., "member": ...}
    {"event": "link_down" | "link_up", ..., "link": [a, b]}
    {"event": "quorum_lost" | "quorum_regained", ..., "epoch": ...}
    {"event": "proposed" / any other event: its snake_case class name and fields}
    {"event": "left"}                                        # last line of a graceful leave

Commands, one per stdin line: ``leave`` (leave gracefully, exit 0),
``status`` (print the current view line, with ``"status": true``), and, for
the peer backend, ``block ADDR`` / ``unblock ADDR`` (drop this node's traffic
to and from the agent at ADDR: a link cut on loopback, see ``Agent.block``).  SIGTERM
also leaves gracefully and exits 0.  EOF on stdin changes nothing, so the node
can run detached.  Bad arguments: one line on stderr, exit 2; a failed join:
an ``error`` line, exit 1.

Real processes, not threads, because the contract is about what survives a
``kill -9``.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import sys
import threading
import time
from dataclasses import fields, is_dataclass
from typing import Any

_out_lock = threading.Lock()


def emit(record: dict[str, Any]) -> None:
    line = json.dumps(record, separators=(",", ":"))
    with _out_lock:  # events arrive from the backend's thread and the main thread
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def _view_fields(view: Any) -> dict[str, Any]:
    if view is None:
        return {"epoch": None, "members": [], "down_links": []}
    return {
        "epoch": view.epoch,
        "members": list(view.ids),
        "down_links": [list(pair) for pair in view.down_links],
    }


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def event_record(event: object, node: str) -> dict[str, Any]:
    """The JSON line of a membership event (see the module docstring)."""
    from chaos_lightning.membership.view import View

    name = type(event).__name__
    record: dict[str, Any] = {"event": "view" if name == "ViewChanged" else _snake(name), "t": time.time(), "node": node}
    values = {f.name: getattr(event, f.name) for f in fields(event)} if is_dataclass(event) else {}
    if name in ("LinkDown", "LinkUp"):
        record["link"] = [values.pop("a"), values.pop("b")]
    if "node" in values:  # the subject of MemberFailed/MemberSuspected; "node" is the reporter
        record["member"] = values.pop("node")
    for key, value in values.items():
        if isinstance(value, View):
            record.update(_view_fields(value))
        else:
            record[key] = value
    return record


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line, so a test or a launcher can show it verbatim.
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, resolved with the ``CHAOS_*`` environment into ``args.config``
    (a :class:`~chaos_lightning.config.NodeConfig`); a bad value: one line, exit 2."""
    from chaos_lightning.config import ConfigError, resolve_flags

    p = _Parser(prog="python -m chaos_lightning.rendezvous", description="Run one rendezvous node, print events as JSON lines.")
    p.add_argument("--backend", default=None, help="rendezvous backend: peer, etcd (CHAOS_BACKEND; default peer)")
    p.add_argument("--bind", default=None, help="HOST:PORT this node is named/listens by (CHAOS_BIND; default 127.0.0.1:0)")
    p.add_argument("--peers", default=None, help="comma-separated members to join through (peer; CHAOS_PEERS)")
    p.add_argument("--id", dest="node_id", default=None, help="node id (default: the bound HOST:PORT)")
    p.add_argument("--preset", default=None, help="membership timing preset (peer): local, lan, edge (CHAOS_PRESET)")
    p.add_argument("--membership", default=None, metavar="FIELD=VALUE,...",
                   help="membership settings overriding the preset's, e.g. probe_interval=0.3 (CHAOS_MEMBERSHIP)")
    p.add_argument("--etcd", default=None, help="etcd endpoints HOST:PORT[,...] (etcd; CHAOS_ETCD_ENDPOINTS)")
    p.add_argument("--no-store", dest="host_store", action="store_false", help="do not host a process-group store")
    p.add_argument("--join-timeout", default=None, help="seconds (CHAOS_JOIN_TIMEOUT; default 120)")
    p.add_argument("--leave-timeout", default=None, help="seconds (CHAOS_LEAVE_TIMEOUT; default 15)")
    args = p.parse_args(argv)
    try:
        args.config = resolve_flags({
            "CHAOS_BACKEND": ("--backend", args.backend),
            "CHAOS_BIND": ("--bind", args.bind),
            "CHAOS_PEERS": ("--peers", args.peers),
            "CHAOS_PRESET": ("--preset", args.preset),
            "CHAOS_MEMBERSHIP": ("--membership", args.membership),
            "CHAOS_ETCD_ENDPOINTS": ("--etcd", args.etcd),
            "CHAOS_JOIN_TIMEOUT": ("--join-timeout", args.join_timeout),
            "CHAOS_LEAVE_TIMEOUT": ("--leave-timeout", args.leave_timeout),
        })
    except ConfigError as exc:
        p.error(str(exc).removeprefix("chaos: "))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from chaos_lightning.membership.events import ViewChanged
    from chaos_lightning.rendezvous import RendezvousError, create

    cfg = args.config
    try:
        rdv = create(**cfg.rendezvous_kwargs(), node_id=args.node_id, host_store=args.host_store)
    except (ValueError, RendezvousError, OSError) as exc:
        emit({"event": "error", "t": time.time(), "message": f"create failed: {exc}"})
        return 1
    node = rdv.node_id
    emit({"event": "ready", "t": time.time(), "node": node, "addr": getattr(rdv, "addr", None) or node})

    # Print views in epoch order exactly once, whether they come from the
    # subscription or from join()'s return value, whichever is first.
    printed = {"epoch": -1}

    def on_event(event: object) -> None:
        record = event_record(event, node)
        if record["event"] == "view":
            with _out_lock:
                if record["epoch"] <= printed["epoch"]:
                    return
                printed["epoch"] = record["epoch"]
        emit(record)

    rdv.subscribe(on_event)

    # Commands from stdin and SIGTERM meet in one queue.  SimpleQueue.put is
    # reentrant, so the signal handler may call it at any point.
    commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
    signal.signal(signal.SIGTERM, lambda signum, frame: commands.put("sigterm"))

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                commands.put(line.strip())
        # EOF: keep running (the node may be detached from its parent's pipe)

    threading.Thread(target=read_stdin, name="stdin", daemon=True).start()

    # Join on a thread so that SIGTERM or "leave" during a slow join is still
    # answered promptly (leave() also cancels a join in progress).
    def join() -> None:
        try:
            commands.put(("joined", rdv.join(cfg.join_timeout)))
        except Exception as exc:  # any failure must reach the main loop, not kill the thread silently
            commands.put(("join_failed", exc))

    threading.Thread(target=join, name="join", daemon=True).start()

    code = 0
    while True:
        try:
            command = commands.get(timeout=0.5)  # timeout: let signal handlers run
        except queue.Empty:
            continue
        if isinstance(command, tuple):
            kind, value = command
            if kind == "joined":
                on_event(ViewChanged(value))
                continue
            emit({"event": "error", "t": time.time(), "node": node, "message": f"join failed: {value}"})
            code = 1
            break
        if command == "status":
            emit({"event": "view", "t": time.time(), "node": node, "status": True, **_view_fields(rdv.current_view())})
        elif command.split(" ")[0] in ("block", "unblock") and hasattr(rdv, "agent"):
            # a link cut on loopback: this node's transport drops traffic
            # to and from ADDR (the peer backend only; etcd sees no links)
            verb, _, addr = command.partition(" ")
            getattr(rdv.agent, verb)(addr.strip())
        elif command in ("leave", "sigterm"):
            rdv.leave(cfg.leave_timeout)
            emit({"event": "left", "t": time.time(), "node": node})
            break
        else:
            emit({"event": "error", "t": time.time(), "node": node, "message": f"unknown command {command!r}"})
    rdv.close()
    return code


def _run() -> None:
    code = main()
    sys.stdout.flush()
    # Backend threads (grpc, watchers) are daemons but some clients join them
    # at interpreter exit; the node has said everything it had to say.
    os._exit(code)


if __name__ == "__main__":
    _run()
