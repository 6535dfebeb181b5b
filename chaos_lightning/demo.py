"""The control-plane demo: peer-negotiated membership surviving churn, on loopback.

``python -m chaos_lightning.demo`` starts node agents as separate processes
(the peer backend: no etcd, nothing central), then plays a fixed timeline:

1. four nodes form a cluster;
2. one is ``kill -9``-ed: the others detect it and commit a view without it;
3. a new node joins through a member that did not found the cluster;
4. one leaves gracefully;
5. the link between two members is cut (their transports drop each other's
   traffic: loopback has no cable to pull) and then restored: the view marks
   the link down and up again, and nobody is declared failed.

Every committed view is printed as it first appears, and a summary gives, per
event, the time until the new view was committed at every live member.  All
processes are reaped on exit, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from chaos_lightning.testbed.local import Node, NodeTimeout
from chaos_lightning.testbed.procs import free_port

#: generous bounds: process start-up on a loaded 2-core box takes ~1 s
FORM_TIMEOUT = 30.0
EVENT_TIMEOUT = 20.0


class Demo:
    def __init__(self, workdir: Path, preset: str):
        self.workdir = workdir
        self.preset = preset
        self.nodes: dict[str, Node] = {}
        self.t0 = time.monotonic()
        self.seen_epochs: set[int] = set()
        self.rows: list[dict] = []

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.2f}s] {text}", flush=True)

    def start(self, name: str, via: str | None) -> Node:
        port = free_port()
        args = ["--backend", "peer", "--bind", f"127.0.0.1:{port}", "--id", name, "--preset", self.preset, "--no-store"]
        if via:
            args += ["--peers", self.nodes[via].addr]
        node = Node(args, self.workdir / f"{name}.log")
        node.ready(FORM_TIMEOUT)
        self.nodes[name] = node
        return node

    def live(self) -> list[str]:
        return [n for n, node in self.nodes.items() if node.proc.poll() is None]

    def print_new_views(self) -> None:
        views = sorted((r for node in self.nodes.values() for r in node.views()), key=lambda r: r["t"])
        for r in views:
            if r["epoch"] not in self.seen_epochs:
                self.seen_epochs.add(r["epoch"])
                down = "".join(f"  link down: {a}-{b}" for a, b in r["down_links"])
                self.log(f"view {r['epoch']:>3}: {', '.join(r['members'])}{down}")

    def wait_everywhere(self, what: str, started: float, predicate, among: list[str]) -> dict:
        """Wait until every node in ``among`` committed a view satisfying
        ``predicate``; record the time from ``started`` (wall clock)."""
        epochs = []
        commit_times = []
        for name in among:
            rec = self.nodes[name].wait_for(
                lambda r: r.get("event") == "view" and not r.get("status") and r["t"] >= started and predicate(r),
                EVENT_TIMEOUT,
                what,
            )
            epochs.append(rec["epoch"])
            commit_times.append(rec["t"])
        self.print_new_views()
        row = {"event": what, "commit_ms": round((max(commit_times) - started) * 1000, 1), "epoch": max(epochs)}
        self.rows.append(row)
        self.log(f"{what}: committed at all {len(among)} live members in {row['commit_ms']:.0f} ms")
        return row

    def run(self, n: int) -> None:
        names = [f"node{i}" for i in range(n)]
        self.log(f"starting {n} nodes (peer negotiation, preset {self.preset!r}; no etcd)")
        started = time.time()
        self.start(names[0], None)
        for name in names[1:]:
            self.start(name, names[0])
        self.wait_everywhere("form", started, lambda r: sorted(r["members"]) == sorted(names), names)

        victim = names[2]
        self.log(f"kill -9 {victim}")
        started = time.time()
        self.nodes[victim].kill9()
        alive = [x for x in names if x != victim]
        self.wait_everywhere("failure", started, lambda r: victim not in r["members"], alive)

        newcomer = "node-new"
        self.log(f"{newcomer} joins through {names[1]} (not the founder)")
        started = time.time()
        self.start(newcomer, names[1])
        alive.append(newcomer)
        self.wait_everywhere("join", started, lambda r: newcomer in r["members"], alive)

        leaver = names[-1]
        self.log(f"{leaver} leaves gracefully")
        started = time.time()
        self.nodes[leaver].send("leave")
        alive.remove(leaver)
        self.wait_everywhere("leave", started, lambda r: leaver not in r["members"], alive)
        rc = self.nodes[leaver].proc.wait(timeout=EVENT_TIMEOUT)
        self.log(f"{leaver} exited with code {rc}")

        a, b = names[0], names[1]
        pair = sorted([a, b])
        self.log(f"cutting the link {a}-{b}")
        started = time.time()
        self.nodes[a].send(f"block {self.nodes[b].addr}")
        self.nodes[b].send(f"block {self.nodes[a].addr}")
        self.wait_everywhere("link-down", started, lambda r: pair in r["down_links"], alive)
        self.log(f"restoring the link {a}-{b}")
        started = time.time()
        self.nodes[a].send(f"unblock {self.nodes[b].addr}")
        self.nodes[b].send(f"unblock {self.nodes[a].addr}")
        self.wait_everywhere("link-up", started, lambda r: pair not in r["down_links"], alive)

        failed = {
            r.get("member") for name in alive for r in self.nodes[name].records if r.get("event") == "member_failed"
        }
        if failed - {victim}:
            raise RuntimeError(f"false failures reported: {sorted(failed - {victim})}")

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4, help="nodes to start with (>= 4; default 4)")
    p.add_argument("--preset", default="local", help="membership preset (default: local)")
    p.add_argument("--json", metavar="PATH", help="also write the per-event results as JSON")
    args = p.parse_args(argv)
    if args.nodes < 4:
        p.error("--nodes must be at least 4 (the timeline kills one and removes another)")
    with tempfile.TemporaryDirectory(prefix="chaos-demo-") as tmp:
        demo = Demo(Path(tmp), args.preset)
        try:
            demo.run(args.nodes)
        except (NodeTimeout, RuntimeError) as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130
        finally:
            demo.close()
    print()
    print(f"{'event':<10} {'commit at every member':>24}")
    for row in demo.rows:
        print(f"{row['event']:<10} {row['commit_ms']:>21.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(demo.rows, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
