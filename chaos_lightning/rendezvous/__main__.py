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

#: Default bound on joining/leaving, seconds (``CHAOS_JOIN_TIMEOUT``).  Generous:
#: the demo may start all nodes at once on a loaded 2-core machine.
JOIN_TIMEOUT = float(os.environ.get("CHAOS_JOIN_TIMEOUT", "30"))
LEAVE_TIMEOUT = float(os.environ.get("CHAOS_LEAVE_TIMEOUT", "15"))

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


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return text


def _peer_list(text: str) -> list[str]:
    return [_host_port(p.strip()) for p in text.split(",") if p.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from chaos_lightning.rendezvous import BACKENDS

    p = _Parser(prog="python -m chaos_lightning.rendezvous", description="Run one rendezvous node, print events as JSON lines.")
    env = os.environ
    p.add_argument("--backend", choices=BACKENDS, default=env.get("CHAOS_BACKEND", "peer"), help="(CHAOS_BACKEND)")
    p.add_argument(
        "--bind", type=_host_port, default=env.get("CHAOS_BIND", "127.0.0.1:0"),
        help="HOST:PORT this node is named/listens by (CHAOS_BIND)",
    )
    p.add_argument(
        "--peers", type=_peer_list, default=_peer_list(env.get("CHAOS_PEERS", "")),
        help="comma-separated members to join through (peer; CHAOS_PEERS)",
    )
    p.add_argument("--id", dest="node_id", default=None, help="node id (default: the bound HOST:PORT)")
    p.add_argument(
        "--preset", default=env.get("CHAOS_PRESET", "local"),
        help="membership timing preset (peer): local, lan, edge (CHAOS_PRESET)",
    )
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints HOST:PORT[,...] (etcd)")
    p.add_argument("--no-store", dest="host_store", action="store_false", help="do not host a process-group store")
    p.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT)
    p.add_argument("--leave-timeout", type=float, default=LEAVE_TIMEOUT)
    args = p.parse_args(argv)
    if args.join_timeout <= 0 or args.leave_timeout <= 0:
        p.error("timeouts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from chaos_lightning.membership.events import ViewChanged
    from chaos_lightning.rendezvous import RendezvousError, create

    try:
        rdv = create(
            args.backend,
            bind=args.bind,
            peers=args.peers,
            node_id=args.node_id,
            preset=args.preset,
            etcd_endpoints=args.etcd,
            host_store=args.host_store,
        )
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
            commands.put(("joined", rdv.join(args.join_timeout)))
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
            rdv.leave(args.leave_timeout)
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
