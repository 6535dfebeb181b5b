"""Heterogeneous nodes: a cluster with one member at half speed, equal shares against adaptive ones.

    python benchmarks/heterogeneity.py [--quick | --smoke] [--json PATH] [--netns [--link-mbit R]]
                                       [--shares equal,adaptive] [--no-ideal]

Role in the whole: issue 16 asks that each member's share of a step's
global batch follow its measured speed (``CHAOS_SHARES=adaptive``), so that
one slow member no longer sets everyone's pace.  This benchmark runs the
same small Lightning project (``benchmarks/_hetero_worker.py``: an MLP
classifier with Adam whose per-sample compute dominates its step) on
``len(cpus)`` processes with ``Trainer(strategy="chaos")``, each in its own
CPU cgroup (:class:`chaos_lightning.testbed.cpu.CpuLimit`, one torch thread
each): by default three at 0.4 CPU and one at 0.2, so the last is half as
fast (the quotas sum to 1.4 of this machine's 2 cores, leaving room for the
driver and the kernel).  It runs once per shares setting, on fresh
processes, and checks in every run that the replicas are bit-identical and
every epoch an exact cover.

The members run the ``lan`` membership preset (``--preset``), also on
loopback: under ``local`` (80 ms probe timeout, 0.4 s suspicion) the node
at 0.2 CPU, whose agent thread gets what the training thread leaves of 2 ms
per 10 ms, was declared failed once in a quick run (it rejoined; the
run's throughput then is not a steady state).  A run with a membership
event still reports, with ``failed_batches`` and ``worlds`` in its row.

A node's limit is applied when it prints ``ready`` (imports done, data and
model built): start-up is not what is measured, and at 0.2 CPU it would
take half a minute.  Everything it does in ``fit``, the strategy's agent and
gloo's threads included, runs under the limit.

Rows (JSON ``rows``; the table prints them):

``kind: calibration`` (one per speed class)
    One process alone (world 1, same worker, same per-process batch as an
    equal share, same CPU limit), ``samples_per_s`` over its steps after
    the first ``CALIBRATION_WARMUP``.  Why a solo run and not each node's
    busy time inside the cluster run: inside, a node's step also pays its
    part of the all-reduce and, with adaptive shares, trains a different
    batch than its equal share; alone it shows what the node does by itself
    under its quota, which is what "the sum of each node's own rate" means.
    The speed classes run concurrently (0.6 CPU together).
``kind: run`` (one per shares setting)
    ``shares`` (``equal``/``adaptive``); ``samples_per_s``: steady-state
    training throughput of the whole cluster, the samples all members
    trained in global steps ``warmup+1 .. last`` over the time from the end
    of step ``warmup`` to the end of the last step (median over the members
    of that span; the members end each step together, at its all-reduce).  The same window in both runs; it leaves out start-up and,
    with adaptive shares, the first relayouts.  ``samples_per_s_all``: the
    same from the end of step 1 (the first relayouts included).
    ``step_ms`` is the window's mean step, ``step_ms_median`` its median
    step (what a step costs without the occasional slow one: a relayout
    restarts the data loader's iterator); ``relayouts_in_window`` counts
    the ``shares`` records inside the window.
    ``ideal_samples_per_s``: the sum over the nodes of their class's
    calibration rate; ``vs_ideal`` the ratio.  ``node_samples``: each
    member's median samples per step in the window (its share);
    ``shares_trace``: the strategy's ``shares`` trace records of member 0
    (``CHAOS_TRACE``; ``samples`` per rank, measured ``rates``, ``weights``),
    ``t`` in seconds after the end of global step 1.  ``exact_cover``:
    every epoch of every member's sample ledger (``CHAOS_RECORD_SAMPLES=1``)
    has each sample exactly once; ``identical``: one digest of parameters
    and optimizer state and one ``global_step`` over all members.
``kind: ratio``
    ``adaptive_vs_equal`` and ``adaptive_vs_ideal`` against the issue's
    targets (1.5 and 0.9): reported, never asserted.

Modes: ``--smoke`` (the test: 2 nodes at 0.5 and 0.25 CPU, adaptive
shares only, a few steps, no calibration; only the invariants matter),
``--quick`` (4 nodes, 3 epochs of 25 steps, ~2-3 min) and the default full
mode (8 epochs).  ``--netns`` runs the members in network namespaces
(:class:`chaos_lightning.testbed.Testbed`, the CPU limit through
:meth:`~chaos_lightning.testbed.Testbed.limit_cpu`), each link shaped to
``--link-mbit`` both ways; loopback otherwise.  Timings on a shared 2-core
machine are noisy: compare within one run (the JSON records the load
average before and after each run).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import steady_state  # noqa: E402
from steady_state import EXIT_TIMEOUT, STARTUP_TIMEOUT, STEP_TIMEOUT, BenchError, Node  # noqa: E402

from chaos_lightning.testbed.cpu import CpuLimit  # noqa: E402
from chaos_lightning.testbed.procs import free_ports  # noqa: E402

WORKER = Path(__file__).with_name("_hetero_worker.py")
#: the issue's targets (reported, never asserted)
TARGET_VS_EQUAL = 1.5
TARGET_VS_IDEAL = 0.9
#: steps of a calibration run left out of its rate (start-up, first-use allocations)
CALIBRATION_WARMUP = 5
#: the members' rendezvous port in network namespaces (each node has its own address)
NETNS_PORT = 29600


@dataclass(frozen=True)
class Params:
    """What one benchmark run does (recorded in the JSON)."""

    mode: str
    cpus: tuple[float, ...]  # one CPU limit per node
    batch: int  # per-process batch under equal shares; the global batch is len(cpus) * batch
    steps_per_epoch: int
    epochs: int
    warmup: int  # global steps left out of the steady window
    calibration_steps: int
    shares: tuple[str, ...] = ("equal", "adaptive")
    ideal: bool = True
    inputs: int = 64
    hidden: int = 512
    layers: int = 2
    classes: int = 10

    @property
    def nodes(self) -> int:
        return len(self.cpus)

    @property
    def global_batch(self) -> int:
        return self.nodes * self.batch

    @property
    def samples(self) -> int:
        return self.global_batch * self.steps_per_epoch

    @property
    def steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def worker_args(self, samples: int, epochs: int) -> list[str]:
        return [f"--batch={self.batch}", f"--epochs={epochs}", f"--samples={samples}", f"--inputs={self.inputs}",
                f"--hidden={self.hidden}", f"--layers={self.layers}", f"--classes={self.classes}"]


MODES = {
    "smoke": Params("smoke", cpus=(0.5, 0.25), batch=256, steps_per_epoch=5, epochs=2, warmup=2,
                    calibration_steps=0, shares=("adaptive",), ideal=False),
    "quick": Params("quick", cpus=(0.4, 0.4, 0.4, 0.2), batch=2048, steps_per_epoch=25, epochs=3, warmup=15,
                    calibration_steps=25),
    "full": Params("full", cpus=(0.4, 0.4, 0.4, 0.2), batch=2048, steps_per_epoch=25, epochs=8, warmup=20,
                   calibration_steps=60),
}


# ---------------------------------------------------------------------- processes
class Placement:
    """Where the nodes of one run live: loopback with a :class:`CpuLimit`
    each, or a namespace testbed whose nodes get theirs from
    :meth:`~chaos_lightning.testbed.Testbed.limit_cpu`.  Closes (processes
    reaped, groups and namespaces removed) on exit, whatever happened."""

    def __init__(self, n: int, netns: bool, link_mbit: float, label: str) -> None:
        self.stack = contextlib.ExitStack()
        self.nodes: list[Node] = []
        self.limits: list[CpuLimit] = []
        self.label = label
        self.tb: Any = None
        if netns:
            from chaos_lightning.testbed import Testbed

            self.tb = self.stack.enter_context(Testbed(n))
            for i in range(n):
                self.tb.shape(i, link_mbit)
        self.binds = ([f"{self.tb.addr(i)}:{NETNS_PORT}" for i in range(n)] if self.tb is not None
                      else [f"127.0.0.1:{port}" for port in free_ports(n)])

    def __enter__(self) -> Placement:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            for node in self.nodes:  # every one reaped even if one fails
                with contextlib.suppress(Exception):
                    node.stop()
        finally:
            self.stack.close()

    def start(self, i: int, name: str, argv: list[str], env: dict[str, str], logdir: Path) -> Node:
        popen: Callable[..., subprocess.Popen] = (functools.partial(self.tb.popen, i) if self.tb is not None
                                                  else subprocess.Popen)
        node = Node(name, argv, env, logdir, self.binds[i], worker=WORKER, popen=popen)
        self.nodes.append(node)
        return node

    def limit(self, i: int, node: Node, cpus: float) -> None:
        """Put ``node``'s process (all its threads) under ``cpus`` CPUs from now on."""
        if self.tb is not None:
            limit = self.tb.limit_cpu(i, cpus)  # `ip netns exec` exec'd the worker: the pid is Python's
        else:
            limit = self.stack.enter_context(CpuLimit(cpus, label=f"{self.label}{i}"))
        limit.attach(node.proc.pid)
        self.limits.append(limit)


def _wait_done(nodes: list[Node], steps: int) -> list[dict[str, Any]]:
    done = []
    for n in nodes:
        done.append(n.first("done", STARTUP_TIMEOUT + STEP_TIMEOUT * steps))
        if n.proc.wait(timeout=EXIT_TIMEOUT) != 0:
            raise BenchError(f"{n.name} exited with {n.proc.returncode}; log {n.log}")
    return done


def _start_limited(place: Placement, cpus: tuple[float, ...], argv: list[str], envs: list[dict[str, str]],
                   logdir: Path, names: list[str]) -> list[Node]:
    nodes = [place.start(i, names[i], argv, envs[i], logdir) for i in range(len(cpus))]
    for i, n in enumerate(nodes):
        n.first("ready", STARTUP_TIMEOUT)
        place.limit(i, n, cpus[i])
    return nodes


# ---------------------------------------------------------------------- runs
def calibrate(p: Params, logdir: Path, say: Callable[[str], None]) -> dict[float, dict[str, Any]]:
    """Each speed class's own rate: one process alone per class, all classes at once (see the module docstring)."""
    classes = sorted(set(p.cpus), reverse=True)
    steps = p.calibration_steps
    argv = p.worker_args(samples=p.batch * steps, epochs=1)
    binds = free_ports(len(classes))
    envs = [steady_state.clean_env(1, CHAOS_BIND=f"127.0.0.1:{port}", CHAOS_MIN_NODES="1") for port in binds]
    load0 = steady_state.loadavg()
    with Placement(len(classes), False, 0.0, "cal") as place:
        nodes = _start_limited(place, tuple(classes), argv, envs, logdir, [f"cal-{c:g}" for c in classes])
        _wait_done(nodes, steps)
    out = {}
    for c, n in zip(classes, nodes):
        st = [s for s in n.steps() if s["gs"] > CALIBRATION_WARMUP]
        if len(st) < 2:
            raise BenchError(f"{n.name}: {len(st)} steps after the warm-up of {CALIBRATION_WARMUP}")
        span = st[-1]["t1"] - st[0]["t1"]
        samples = sum(s["n"] for s in st[1:])
        out[c] = {"kind": "calibration", "cpus": c, "batch": p.batch, "steps": len(st) - 1,
                  "samples_per_s": samples / span, "step_ms": 1e3 * span / (len(st) - 1),
                  "cpu_ms": 1e3 * (st[-1]["cpu"] - st[0]["cpu"]) / (len(st) - 1),
                  "loadavg": [round(load0, 2), round(steady_state.loadavg(), 2)]}
        say(f"calibration {c:g} CPU: {out[c]['samples_per_s']:.0f} samples/s alone "
            f"({out[c]['step_ms']:.0f} ms/step of {p.batch})")
    return out


def _shares_trace(path: Path, t_first: float) -> list[dict[str, Any]]:
    """The ``shares`` records of one member's trace (times relative to ``t_first``, wall clock)."""
    out = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("ev") == "shares":
            out.append({"t": round(rec["t"] - t_first, 3),
                        **{k: v for k, v in rec.items() if k not in ("t", "ev", "node", "pid")}})
    return out


def _committed(steps: list[dict[str, Any]], last: int) -> list[dict[str, Any]]:
    """One record per global step 1..``last``: the batch that committed it
    (a failed step, which applies no update, prints the global step it left
    unchanged; the batch after it with the same number is the one that counted)."""
    by_step = {s["gs"]: s for s in steps}
    missing = [g for g in range(1, last + 1) if g not in by_step]
    if missing:
        raise BenchError(f"global steps {missing[:5]} ({len(missing)}) never committed")
    return [by_step[g] for g in range(1, last + 1)]


def cluster_run(p: Params, shares: str, logdir: Path, say: Callable[[str], None], *, netns: bool = False,
                link_mbit: float = 1000.0, preset: str = "lan") -> dict[str, Any]:
    """One cluster of ``p.nodes`` fresh processes with ``CHAOS_SHARES=shares``; its ``run`` row."""
    k = p.nodes
    secret = secrets.token_hex(16)
    load0 = steady_state.loadavg()
    traces = [logdir / f"{shares}-n{i}.trace.jsonl" for i in range(k)]
    with Placement(k, netns, link_mbit, shares) as place:
        envs = [steady_state.clean_env(
            1, CHAOS_BIND=place.binds[i], CHAOS_PEERS="" if i == 0 else place.binds[0], CHAOS_MIN_NODES=str(k),
            CHAOS_SHARES=shares, CHAOS_RECORD_SAMPLES="1", CHAOS_TRACE=str(traces[i]), CHAOS_SECRET=secret,
            CHAOS_PRESET=preset)
            for i in range(k)]
        nodes = _start_limited(place, p.cpus, p.worker_args(p.samples, p.epochs), envs, logdir,
                               [f"{shares}-n{i}" for i in range(k)])
        done = _wait_done(nodes, p.steps)
    batches = [n.steps() for n in nodes]
    steps = [_committed(b, p.steps) for b in batches]
    failed = sum(len(b) - p.steps for b in batches)
    worlds = sorted({s["world"] for b in batches for s in b})
    if failed or worlds != [k]:
        say(f"{shares}: the run had a membership event ({failed} failed batches over the members, worlds "
            f"{worlds}): its throughput is not a steady state; see the traces in {logdir}")
    w = p.warmup
    window = [sum(st[i]["n"] for st in steps) for i in range(w, p.steps)]  # samples of global steps w+1..last
    span = statistics.median(st[-1]["t1"] - st[w - 1]["t1"] for st in steps)
    span_all = statistics.median(st[-1]["t1"] - st[0]["t1"] for st in steps)
    samples_all = sum(st[i]["n"] for st in steps for i in range(1, p.steps))
    digests = {(d["params"], d["optim"]) for d in done}
    epochs_ok = all(len(d["epochs"]) == p.epochs and all(not any(v.values()) for v in d["epochs"].values())
                    for d in done)
    row = {
        "kind": "run", "shares": shares, "nodes": k, "cpus": list(p.cpus),
        "samples_per_s": sum(window) / span,
        "samples_per_s_all": samples_all / span_all,
        "ideal_samples_per_s": None, "vs_ideal": None,
        "step_ms": 1e3 * span / len(window),
        "step_ms_median": 1e3 * statistics.median(
            statistics.median(b["t1"] - a["t1"] for a, b in zip(st[w - 1:], st[w:])) for st in steps),
        "window": f"global steps {w + 1}..{p.steps}: end of step {w} -> end of step {p.steps}",
        "step_intervals_ms": [round(1e3 * (b["t1"] - a["t1"]), 1) for a, b in zip(steps[0][w - 1:], steps[0][w:])],
        "node_samples": [statistics.median(s["n"] for s in st[w:]) for st in steps],
        "node_cpu_ms": [1e3 * (st[-1]["cpu"] - st[w - 1]["cpu"]) / len(window) for st in steps],
        "global_batch": p.global_batch, "global_step": sorted({d["global_step"] for d in done}),
        "failed_batches": failed, "worlds": worlds, "preset": preset,
        "exact_cover": epochs_ok, "identical": len(digests) == 1 and len({d["global_step"] for d in done}) == 1,
        "epochs": {n.name: d["epochs"] for n, d in zip(nodes, done)},
        # trace times are wall clock, step stamps monotonic: relative to the end of step 1
        "shares_trace": _shares_trace(traces[0], time.time() - time.monotonic() + steps[0][0]["t1"]),
        "where": f"network namespaces, links {link_mbit:g} Mbit/s" if netns else "loopback",
        "loadavg": [round(load0, 2), round(steady_state.loadavg(), 2)],
    }
    window_from = steps[0][w - 1]["t1"] - steps[0][0]["t1"]  # seconds after the end of step 1
    row["relayouts_in_window"] = sum(1 for r in row["shares_trace"] if r["t"] > window_from)
    say(f"{shares:8s}: {row['samples_per_s']:.0f} samples/s ({row['step_ms']:.0f} ms/step), shares "
        f"{[round(x) for x in row['node_samples']]}, exact cover {row['exact_cover']}, identical {row['identical']}")
    return row


def run(p: Params, logdir: Path, say: Callable[[str], None], *, netns: bool = False,
        link_mbit: float = 1000.0, preset: str = "lan") -> list[dict[str, Any]]:
    """Calibration (unless ``p.ideal`` is off), one run per shares setting, the ratio row."""
    rows: list[dict[str, Any]] = []
    cal = calibrate(p, logdir, say) if p.ideal else {}
    rows += list(cal.values())
    ideal = sum(cal[c]["samples_per_s"] for c in p.cpus) if cal else None
    runs = {}
    for shares in p.shares:
        row = cluster_run(p, shares, logdir, say, netns=netns, link_mbit=link_mbit, preset=preset)
        if ideal:
            row["ideal_samples_per_s"], row["vs_ideal"] = ideal, row["samples_per_s"] / ideal
        runs[shares] = row
        rows.append(row)
    if "equal" in runs and "adaptive" in runs:
        vs_equal = runs["adaptive"]["samples_per_s"] / runs["equal"]["samples_per_s"]
        vs_ideal = runs["adaptive"]["vs_ideal"]
        rows.append({"kind": "ratio", "adaptive_vs_equal": vs_equal, "adaptive_vs_ideal": vs_ideal,
                     "target_vs_equal": TARGET_VS_EQUAL, "target_vs_ideal": TARGET_VS_IDEAL,
                     "meets_vs_equal": vs_equal >= TARGET_VS_EQUAL,
                     "meets_vs_ideal": None if vs_ideal is None else vs_ideal >= TARGET_VS_IDEAL})
    return rows


# ---------------------------------------------------------------------- output
def print_table(params: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """One plain-text table (shares, throughput, ideal, shares per node, invariants) and the ratios."""
    head = ["shares", "samples/s", "ideal", "vs ideal", "ms/step", "median", "samples/step per node", "exact cover",
            "identical"]
    body = [head]
    for r in rows:
        if r["kind"] == "run":
            body.append([r["shares"], f"{r['samples_per_s']:.0f}",
                         "-" if r["ideal_samples_per_s"] is None else f"{r['ideal_samples_per_s']:.0f}",
                         "-" if r["vs_ideal"] is None else f"{r['vs_ideal']:.2f}", f"{r['step_ms']:.0f}",
                         f"{r['step_ms_median']:.0f}",
                         " ".join(f"{x:.0f}" for x in r["node_samples"]), str(r["exact_cover"]), str(r["identical"])])
    widths = [max(len(b[i]) for b in body) for i in range(len(head))]
    print(f"{params['nodes']} nodes at {', '.join(f'{c:g}' for c in params['cpus'])} CPU, MLP "
          f"{params['model_params'] / 1e6:.2f}M params, Adam, global batch {params['global_batch']}, "
          f"{params['where']}, torch {params['torch']}, lightning {params['lightning']}")
    for b in body:
        print("  ".join(x.rjust(wd) for x, wd in zip(b, widths)))
    for r in rows:
        if r["kind"] == "calibration":
            print(f"calibration, one node alone at {r['cpus']:g} CPU: {r['samples_per_s']:.0f} samples/s "
                  f"({r['step_ms']:.0f} ms per step of {r['batch']})")
        elif r["kind"] == "ratio":
            ideal = ("no calibration" if r["adaptive_vs_ideal"] is None else
                     f"{r['adaptive_vs_ideal']:.2f} (target {r['target_vs_ideal']}: "
                     f"{'met' if r['meets_vs_ideal'] else 'missed'})")
            print(f"adaptive/equal {r['adaptive_vs_equal']:.2f} (target {r['target_vs_equal']}: "
                  f"{'met' if r['meets_vs_equal'] else 'missed'}); adaptive/ideal {ideal}")
    for r in rows:
        if r["kind"] == "run" and r["shares_trace"]:
            last = r["shares_trace"][-1]
            print(f"{r['shares']}: {len(r['shares_trace'])} shares records ({r['relayouts_in_window']} in the window), the last at {last['t']:.1f} s: "
                  f"{ {k: v for k, v in last.items() if k != 't'} }")
    print(f"samples/s: the cluster's samples in global steps {params['warmup'] + 1}..{params['steps']} over the "
          f"time from the end of step {params['warmup']} to the end of the last (median over members); ideal: the "
          "sum of each node's rate alone at its CPU limit (calibration rows)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="4 nodes, 3 epochs of 25 steps (~2-3 min)")
    g.add_argument("--smoke", action="store_true", help="2 nodes, adaptive only, 10 steps, no calibration (tests)")
    ap.add_argument("--json", metavar="PATH", help="write parameters and rows here")
    ap.add_argument("--shares", help="comma-separated settings to run (default: the mode's)")
    ap.add_argument("--cpus", help="comma-separated CPU limit per node (default: the mode's)")
    ap.add_argument("--no-ideal", action="store_true", help="skip the calibration runs (no ideal_samples_per_s)")
    ap.add_argument("--netns", action="store_true", help="nodes in network namespaces with shaped links (root)")
    ap.add_argument("--link-mbit", type=float, default=1000.0, help="with --netns: each node's link, both ways")
    ap.add_argument("--preset", default="lan", choices=("local", "lan", "edge"),
                    help="the members' membership timing (CHAOS_PRESET; see the module docstring)")
    args = ap.parse_args(argv)
    p = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.shares:
        p = replace(p, shares=tuple(args.shares.split(",")))
        if not set(p.shares) <= {"equal", "adaptive"}:
            ap.error("--shares takes equal and/or adaptive")
    if args.cpus:
        p = replace(p, cpus=tuple(float(c) for c in args.cpus.split(",")))
    if args.no_ideal:
        p = replace(p, ideal=False)
    if args.netns:
        from chaos_lightning.testbed import available

        ok, why = available()
        if not ok:
            ap.error(f"--netns: the namespace testbed is unavailable here: {why}")

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    with steady_state.log_dir() as logs:
        rows = run(p, logs, say, netns=args.netns, link_mbit=args.link_mbit, preset=args.preset)
    inputs, hidden, layers, classes = p.inputs, p.hidden, p.layers, p.classes
    n_params = inputs * hidden + hidden + (layers - 1) * (hidden * hidden + hidden) + hidden * classes + classes
    params = {
        **asdict(p), "nodes": p.nodes, "global_batch": p.global_batch, "samples": p.samples, "steps": p.steps,
        "model_params": n_params, "optimizer": "Adam", "threads_per_node": 1,
        "where": f"network namespaces, links {args.link_mbit:g} Mbit/s" if args.netns else "loopback",
        "cpu_limit": "cgroup CFS quota, 10 ms period, applied at the worker's ready line",
        "torch": version("torch"), "lightning": version("lightning"), "python": platform.python_version(),
        "cpus_host": os.cpu_count(), "wall_s": round(time.monotonic() - started, 1),
    }
    steady_state.finish(params, rows, args.json, print_table)
    broken = [r["shares"] for r in rows if r["kind"] == "run" and not (r["exact_cover"] and r["identical"])]
    if broken:
        print(f"invariants broken in: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
