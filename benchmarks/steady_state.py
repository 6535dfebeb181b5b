"""Steady-state overhead against Lightning's ``ddp``, and what membership events cost the survivors.

Role in the whole: DESIGN.md ("How performance is measured") defines the
*steady-state overhead* (samples/s of ``strategy="chaos"`` against
``strategy="ddp"`` on the same processes, model and data, no events), the
*survivor idle time* per event and the joiner's *scale-out delay*; this
benchmark measures them with real processes, real gloo and real Lightning
``fit`` calls.  Every process is ``benchmarks/_fit_worker.py`` (an MLP of a
few MB with Adam on synthetic data), which prints one JSON line per training
batch with ``time.monotonic()`` stamps (one clock for every process on the
host); all numbers below come from those stamps.

    python benchmarks/steady_state.py [--quick | --smoke] [--json PATH] [--nodes K]

Reproduce the numbers in docs/strategy.md with
``python benchmarks/steady_state.py --quick --json results/steady.json``
(about 3 minutes on 2 cores); the default (full) mode repeats more and runs
longer.  On a shared machine compare only the ratios of one run: other
tenants' load shifts absolute samples/s between runs (the JSON records the
load average before and after each run).  Where ``mpi4py`` is installed but
MPI cannot start a singleton, Lightning's ``MPIEnvironment.detect()`` aborts
the ddp workers; put a directory whose ``mpi4py/__init__.py`` raises
``ImportError`` first on ``PYTHONPATH`` (``detect()`` then returns False).

1. Steady state.  The same ``K`` processes train ``warmup + steps`` batches
   of ``batch`` samples each, once with ``ddp`` and once with ``chaos``; runs
   alternate (ddp, chaos, then chaos, ddp, ...: ABBA, so a slow drift of the
   machine's load is charged to both) for ``rounds`` rounds.  ``ddp``
   processes are started externally as Lightning 2.6 expects: ``LOCAL_RANK``
   set (``LightningEnvironment.creates_processes_externally``), ``NODE_RANK``,
   ``MASTER_ADDR``, ``MASTER_PORT``, plus ``WORLD_SIZE`` and ``RANK``, and
   ``Trainer(strategy="ddp", devices=1, num_nodes=K)`` (global rank =
   ``NODE_RANK``); torchelastic/SLURM variables are removed so that
   ``LightningEnvironment`` is the one detected.  ``chaos`` processes get
   ``CHAOS_BIND``/``CHAOS_PEERS``/``CHAOS_MIN_NODES=K``.  Per run, the first
   ``warmup`` batches are dropped; ``samples_per_s`` is
   ``K * batch * (steady batches - 1) / (t1 of the last - t1 of the first)``
   (median over processes), and ``samples_per_s_med`` uses the median
   interval between batch ends instead (robust to a burst of foreign load),
   and ``cpu_ms`` is one process's CPU time (all its threads, gloo's
   included) per steady batch: less sensitive to other tenants than wall
   time, it shows whether a difference is work or waiting.  The ratio
   chaos/ddp is the median of the rounds' ratios; the target is 0.97 and it
   is reported, never asserted.  Both strategies run with the same
   ``OMP_NUM_THREADS`` (see :func:`clean_env`).
2. Events, ``chaos`` only, one cluster per repetition: ``K`` nodes train;
   a node *joins* (a new process with ``CHAOS_PEERS`` set to a member that is
   not the founder); one original node is ``kill -9``-ed half a step into a
   batch (*crash*); the joiner gets ``SIGTERM`` half a step into a batch
   (graceful *leave*).  That order keeps a majority of every view alive.
   Each event waits until every survivor has trained ``settle`` batches in
   the new view.  For each survivor, *idle* is the time from the end of its
   last batch that committed in the old view (a batch the crash made fail is
   not committed: its lost work counts as idle) to the end of its first
   batch in the new view, minus one normal batch interval (the median
   interval between batch ends in the new view); rows give the sum and the
   max over survivors (medians over repetitions).  ``stall_s`` is the
   strategy's own switch time (``strategy.events``) and ``to_step_s`` the
   time from the event (signal sent, process started) to the last
   survivor's first batch end in the new view.  For the joiner,
   ``delay_s`` is process start to the end of its first batch (its update
   applied), ``warm_s`` its ``on_fit_start`` (imports done, model, optimizer
   and strategy set up; it asks to join right after) to that same point,
   ``join_s`` the strategy's own join time (join request to group formed and
   state received, from ``strategy.events``) and ``cold_s`` process start to
   ``ready``.  Note: the joiner's own start-up competes for the same two
   cores, which slows the members' batches meanwhile; that is not idle time.

Modes: ``--smoke`` 2 processes, 1 round of 15 steady batches, 1 event
repetition (the test, ~40 s); ``--quick`` 3 processes, 3 rounds of 120, 1
repetition (~3 min); default 3 processes, 6 rounds of 300, 3 repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

from chaos_lightning.testbed.procs import free_ports

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_fit_worker.py")
TARGET_RATIO = 0.97
#: seconds: a process's start-up (imports, model, first group) on a busy
#: 2-core machine, and any one batch in steady state
STARTUP_TIMEOUT = 180.0
STEP_TIMEOUT = 30.0
#: seconds: membership detection and the switch after an event
EVENT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0
#: max_steps of an event run: never reached, the run ends by being stopped
ENDLESS = 1_000_000
#: environment a worker must not inherit: it would change Lightning's cluster
#: detection or the chaos configuration
FOREIGN_ENV_PREFIXES = ("CHAOS_", "SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_")
FOREIGN_ENV = frozenset({"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK",
                         "GROUP_RANK", "LOCAL_WORLD_SIZE", "PL_GLOBAL_SEED"})


class BenchError(RuntimeError):
    """A run did not produce what was waited for (the message names the node's log)."""


@dataclass
class Params:
    """What one benchmark run does (recorded in the JSON)."""

    mode: str
    nodes: int
    rounds: int
    warmup: int
    steps: int
    event_repeats: int
    settle: int
    batch: int = 64
    samples: int = 65536
    inputs: int = 256
    hidden: int = 768
    layers: int = 3
    classes: int = 10
    threads: int = 1

    def worker_args(self) -> list[str]:
        return [f"--batch={self.batch}", f"--samples={self.samples}", f"--inputs={self.inputs}",
                f"--hidden={self.hidden}", f"--layers={self.layers}", f"--classes={self.classes}",
                f"--threads={self.threads}"]


MODES = {
    "smoke": Params("smoke", nodes=2, rounds=1, warmup=5, steps=15, event_repeats=1, settle=5),
    "quick": Params("quick", nodes=3, rounds=3, warmup=10, steps=120, event_repeats=1, settle=12),
    "full": Params("full", nodes=3, rounds=6, warmup=20, steps=300, event_repeats=3, settle=25),
}


# ---------------------------------------------------------------------- processes
class Node:
    """One worker process; its JSON lines are collected by a reader thread.

    ``worker`` is the script (this benchmark's by default) and ``popen``
    what starts it (:class:`subprocess.Popen` by default; the heterogeneity
    benchmark passes a namespace testbed's ``popen`` for its node)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path, bind: str = "", *,
                 worker: Path = WORKER, popen: Callable[..., subprocess.Popen] = subprocess.Popen) -> None:
        self.name = name
        self.bind = bind
        self.log = logdir / f"{name}.log"
        self._err = open(self.log, "wb")
        self.records: list[dict[str, Any]] = []
        self._eof = False
        self._cond = threading.Condition()
        self.started = time.monotonic()
        self.proc = popen(
            [sys.executable, str(worker), *argv], cwd=REPO, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err, text=True,
        )
        threading.Thread(target=self._read, name=f"read-{name}", daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.records.append(rec)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait(self, cond: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str) -> None:
        """Until ``cond(records)`` holds; BenchError after ``timeout`` s or if the process ends first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not cond(self.records):
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    state = "timed out" if left <= 0 else f"ended its output (exit code {self.proc.poll()})"
                    raise BenchError(f"{self.name}: {state} waiting for {what}; last lines {self.records[-2:]}; log {self.log}")
                self._cond.wait(min(left, 0.5))

    def first(self, event: str, timeout: float) -> dict[str, Any]:
        self.wait(lambda rs: any(r["event"] == event for r in rs), timeout, event)
        return next(r for r in self.records if r["event"] == event)

    def steps(self) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r["event"] == "step"]

    def switches(self) -> list[dict[str, Any]]:
        with self._cond:
            return [r for r in self.records if r["event"] == "switch"]

    def stop(self) -> None:
        """Kill if still running, reap, close the log."""
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=EXIT_TIMEOUT)
        finally:
            self._err.close()


class Cluster:
    """The processes of one run; all of them are killed and reaped on exit, whatever happened."""

    def __init__(self, params: Params, logdir: Path, tag: str) -> None:
        self.p = params
        self.logdir = logdir
        self.tag = tag
        self.nodes: list[Node] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        errors = []
        for n in self.nodes:
            try:
                n.stop()
            except Exception as e:  # keep reaping the others
                errors.append(f"{n.name}: {e}")
        if errors and exc[0] is None:
            raise BenchError(f"could not reap: {errors}")

    def start_ddp(self, max_steps: int) -> list[Node]:
        k = self.p.nodes
        port = free_ports(1)[0]
        for rank in range(k):
            env = clean_env(self.p.threads, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(k),
                            NODE_RANK=str(rank), RANK=str(rank), LOCAL_RANK="0")
            argv = ["--strategy=ddp", f"--nodes={k}", f"--max-steps={max_steps}", *self.p.worker_args()]
            self.nodes.append(Node(f"{self.tag}-ddp{rank}", argv, env, self.logdir))
        return list(self.nodes)

    def start_chaos(self, name: str, peers: str, min_nodes: int, max_steps: int) -> Node:
        bind = f"127.0.0.1:{free_ports(1)[0]}"
        env = clean_env(self.p.threads, CHAOS_BIND=bind, CHAOS_PEERS=peers, CHAOS_MIN_NODES=str(min_nodes))
        argv = ["--strategy=chaos", f"--max-steps={max_steps}", *self.p.worker_args()]
        node = Node(f"{self.tag}-{name}", argv, env, self.logdir, bind=bind)
        self.nodes.append(node)
        return node


def clean_env(threads: int, **extra: str) -> dict[str, str]:
    """This environment without cluster/chaos variables, plus ``extra``.

    ``OMP_NUM_THREADS`` pins the intra-op threads of both strategies alike:
    without it Lightning's ddp launcher (which runs even when the processes
    are started externally) sets ``cpu_count // devices`` threads per
    process, 2 here, and K such processes on 2 cores oversubscribe them
    (measured: ~0.4 s instead of ~0.04 s per batch), while chaos, which has
    no launcher, keeps the worker's setting.
    """
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_ENV and not k.startswith(FOREIGN_ENV_PREFIXES)}
    env.update(extra, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
    return env


def loadavg() -> float:
    return os.getloadavg()[0]


# ---------------------------------------------------------------------- steady state
def intervals(steps: list[dict[str, Any]]) -> list[float]:
    """Seconds between consecutive batch ends."""
    return [b["t1"] - a["t1"] for a, b in zip(steps, steps[1:])]


def steady_run(p: Params, strategy: str, logdir: Path, tag: str) -> dict[str, Any]:
    """One run of ``warmup + steps`` batches on K fresh processes; samples/s over the steady batches."""
    total = p.warmup + p.steps
    load0 = loadavg()
    with Cluster(p, logdir, tag) as c:
        if strategy == "ddp":
            nodes = c.start_ddp(total)
        else:
            founder = c.start_chaos("chaos0", "", p.nodes, total)
            nodes = [founder] + [c.start_chaos(f"chaos{i}", founder.bind, p.nodes, total) for i in range(1, p.nodes)]
        ready = [n.first("ready", STARTUP_TIMEOUT) for n in nodes]
        for n in nodes:
            n.first("done", STARTUP_TIMEOUT + STEP_TIMEOUT * total)
            if n.proc.wait(timeout=EXIT_TIMEOUT) != 0:
                raise BenchError(f"{n.name} exited with {n.proc.returncode}; log {n.log}")
    span, med, cpu = [], [], []
    for n in nodes:
        steady = [s for s in n.steps() if s["seq"] >= p.warmup]
        if len(steady) != p.steps or {s["world"] for s in steady} != {p.nodes}:
            raise BenchError(f"{n.name}: {len(steady)} steady batches in worlds {sorted({s['world'] for s in steady})}")
        span.append((steady[-1]["t1"] - steady[0]["t1"]) / (len(steady) - 1))
        med.append(statistics.median(intervals(steady)))
        cpu.append((steady[-1]["cpu"] - steady[0]["cpu"]) / (len(steady) - 1))
    global_batch = p.nodes * p.batch
    return {
        "strategy": strategy,
        "samples_per_s": global_batch / statistics.median(span),
        "samples_per_s_med": global_batch / statistics.median(med),
        "step_ms": statistics.median(span) * 1e3,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "params": ready[0]["params"],
        "loadavg": [round(load0, 2), round(loadavg(), 2)],
    }


def steady_state(p: Params, logdir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """ABBA-alternated ddp/chaos runs; one row per strategy and the ratio row."""
    runs: dict[str, list[dict[str, Any]]] = {"ddp": [], "chaos": []}
    for r in range(p.rounds):
        for strategy in ("ddp", "chaos") if r % 2 == 0 else ("chaos", "ddp"):
            run = steady_run(p, strategy, logdir, f"r{r}")
            runs[strategy].append(run)
            say(f"round {r} {strategy:5s}: {run['samples_per_s']:8.1f} samples/s ({run['step_ms']:.1f} ms/batch, "
                f"CPU {run['cpu_ms']:.1f} ms/batch, load {run['loadavg'][0]}->{run['loadavg'][1]})")
    rows: list[dict[str, Any]] = []
    for strategy, rs in runs.items():
        rows.append({
            "kind": "steady", "strategy": strategy, "runs": len(rs),
            "samples_per_s": statistics.median(r["samples_per_s"] for r in rs),
            "samples_per_s_min": min(r["samples_per_s"] for r in rs),
            "samples_per_s_max": max(r["samples_per_s"] for r in rs),
            "samples_per_s_med": statistics.median(r["samples_per_s_med"] for r in rs),
            "step_ms": statistics.median(r["step_ms"] for r in rs),
            "cpu_ms": statistics.median(r["cpu_ms"] for r in rs),
            "samples": rs,
        })
    pairs = [c["samples_per_s"] / d["samples_per_s"] for c, d in zip(runs["chaos"], runs["ddp"])]
    pairs_med = [c["samples_per_s_med"] / d["samples_per_s_med"] for c, d in zip(runs["chaos"], runs["ddp"])]
    pairs_cpu = [c["cpu_ms"] / d["cpu_ms"] for c, d in zip(runs["chaos"], runs["ddp"])]
    ratio = statistics.median(pairs)
    rows.append({
        "kind": "ratio", "what": "chaos/ddp", "ratio": ratio, "ratio_med": statistics.median(pairs_med),
        "cpu_ratio": statistics.median(pairs_cpu),
        "round_ratios": pairs, "target": TARGET_RATIO, "meets_target": ratio >= TARGET_RATIO,
    })
    return rows


# ---------------------------------------------------------------------- events
def _median_step(nodes: list[Node], world: int) -> float:
    steps = [s for n in nodes for s in n.steps()[-6:] if s["world"] == world]
    return statistics.median(s["t1"] - s["t0"] for s in steps) if steps else 0.05


def _wait_new_view(survivors: list[Node], world: int, since: float, count: int) -> None:
    """Until every survivor has ended ``count`` batches in a ``world``-sized view, started after ``since``."""
    for n in survivors:
        n.wait(lambda rs: sum(1 for r in rs if r["event"] == "step" and r["world"] == world and r["t0"] > since) >= count,
               EVENT_TIMEOUT + STEP_TIMEOUT * count, f"{count} batches in world {world}")


def survivor_idle(node: Node, event_t: float, old: int, new: int, settle: int) -> dict[str, float]:
    """One survivor's idle time around an event (see the module docstring)."""
    steps = node.steps()
    failed = {s["after_seq"] for s in node.switches() if s.get("failed_step")}
    j = next(i for i, s in enumerate(steps) if s["world"] == new and s["t0"] > event_t)
    a = max(i for i in range(j) if steps[i]["world"] == old and steps[i]["seq"] not in failed)
    after = [s for s in steps[j : j + settle + 1] if s["world"] == new]
    normal = statistics.median(intervals(after))
    stall = sum(s["stall_s"] for s in node.switches() if steps[a]["seq"] <= s["after_seq"] < steps[j]["seq"])
    return {
        "idle_s": steps[j]["t1"] - steps[a]["t1"] - normal,
        "normal_step_s": normal,
        "stall_s": stall,
        "to_step_s": steps[j]["t1"] - event_t,
        "lost_batches": steps[j]["seq"] - steps[a]["seq"] - 1,
    }


def _event_sample(survivors: list[Node], event_t: float, old: int, new: int, settle: int) -> dict[str, Any]:
    per = [survivor_idle(n, event_t, old, new, settle) for n in survivors]
    return {
        "old_world": old, "new_world": new, "survivors": len(per),
        "idle_sum_s": sum(x["idle_s"] for x in per),
        "idle_max_s": max(x["idle_s"] for x in per),
        "stall_s": max(x["stall_s"] for x in per),
        "to_step_s": max(x["to_step_s"] for x in per),
        "per_survivor": per,
    }


def event_run(p: Params, logdir: Path, tag: str, say: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """One cluster through join, crash and leave; one sample per event (and the joiner's scale-out)."""
    k = p.nodes
    out: dict[str, dict[str, Any]] = {}
    with Cluster(p, logdir, tag) as c:
        founder = c.start_chaos("n0", "", k, ENDLESS)
        members = [founder] + [c.start_chaos(f"n{i}", founder.bind, k, ENDLESS) for i in range(1, k)]
        for n in members:
            n.wait(lambda rs: sum(r["event"] == "step" for r in rs) >= p.warmup, STARTUP_TIMEOUT, f"{p.warmup} batches")

        # join: a new process through a member that is not the founder
        t_join = time.monotonic()
        joiner = c.start_chaos("joiner", members[-1].bind, 1, ENDLESS)
        ready = joiner.first("ready", STARTUP_TIMEOUT)
        asked = joiner.first("fit_start", STARTUP_TIMEOUT)
        first = joiner.first("step", EVENT_TIMEOUT)
        _wait_new_view(members + [joiner], k + 1, t_join, p.settle)
        out["join"] = _event_sample(members, t_join, k, k + 1, p.settle)
        joined = next(s for s in joiner.switches() if s.get("joined"))
        out["scale_out"] = {"delay_s": first["t1"] - joiner.started, "warm_s": first["t1"] - asked["t"],
                            "join_s": joined["stall_s"], "cold_s": ready["t"] - joiner.started,
                            "world": first["world"]}
        say(f"{tag} join : idle sum {out['join']['idle_sum_s']:.3f}s, joiner delay {out['scale_out']['delay_s']:.2f}s")

        # crash: kill -9 an original node (not the founder) half a batch in
        victim = members[-1]
        survivors = members[:-1] + [joiner]
        half = _median_step(survivors, k + 1) / 2
        n_before = len(victim.steps())
        victim.wait(lambda rs: sum(r["event"] == "step" for r in rs) > n_before, STEP_TIMEOUT, "a batch")
        time.sleep(half)
        t_crash = time.monotonic()
        victim.proc.kill()
        victim.proc.wait(timeout=EXIT_TIMEOUT)
        _wait_new_view(survivors, k, t_crash, p.settle)
        out["crash"] = _event_sample(survivors, t_crash, k + 1, k, p.settle)
        say(f"{tag} crash: idle sum {out['crash']['idle_sum_s']:.3f}s")

        # leave: SIGTERM the joiner half a batch in
        leaver, survivors = joiner, members[:-1]
        half = _median_step(survivors, k) / 2
        n_before = len(leaver.steps())
        leaver.wait(lambda rs: sum(r["event"] == "step" for r in rs) > n_before, STEP_TIMEOUT, "a batch")
        time.sleep(half)
        t_leave = time.monotonic()
        leaver.proc.send_signal(signal.SIGTERM)
        leaver.first("done", EVENT_TIMEOUT)
        if leaver.proc.wait(timeout=EXIT_TIMEOUT) != 0:
            raise BenchError(f"the leaver exited with {leaver.proc.returncode}; log {leaver.log}")
        _wait_new_view(survivors, k - 1, t_leave, p.settle)
        out["leave"] = _event_sample(survivors, t_leave, k, k - 1, p.settle)
        say(f"{tag} leave: idle sum {out['leave']['idle_sum_s']:.3f}s")
    return out


def events(p: Params, logdir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """``event_repeats`` event runs; one idle row per event and one scale-out row (medians)."""
    samples = [event_run(p, logdir, f"e{r}", say) for r in range(p.event_repeats)]
    rows: list[dict[str, Any]] = []
    for name in ("leave", "crash", "join"):
        ss = [s[name] for s in samples]
        row: dict[str, Any] = {"kind": "idle", "event": name, "repeats": len(ss),
                               "old_world": ss[0]["old_world"], "new_world": ss[0]["new_world"],
                               "survivors": ss[0]["survivors"]}
        for key in ("idle_sum_s", "idle_max_s", "stall_s", "to_step_s"):
            row[key] = statistics.median(s[key] for s in ss)
        row["normal_step_s"] = statistics.median(x["normal_step_s"] for s in ss for x in s["per_survivor"])
        row["samples"] = ss
        rows.append(row)
    so = [s["scale_out"] for s in samples]
    rows.append({"kind": "scale_out", "event": "join", "repeats": len(so), "world": so[0]["world"],
                 **{key: statistics.median(s[key] for s in so) for key in ("delay_s", "warm_s", "join_s", "cold_s")},
                 "samples": so})
    return rows


# ---------------------------------------------------------------------- output
def print_table(params: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Two tables (steady state; events) with rich, or plain text without it."""
    steady = [["strategy", "runs", "samples/s", "min-max", "samples/s (median batch)", "ms/batch", "CPU ms/batch"]]
    for r in rows:
        if r["kind"] == "steady":
            steady.append([r["strategy"], str(r["runs"]), f"{r['samples_per_s']:.0f}",
                           f"{r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f}",
                           f"{r['samples_per_s_med']:.0f}", f"{r['step_ms']:.1f}", f"{r['cpu_ms']:.1f}"])
        elif r["kind"] == "ratio":
            steady.append(["chaos/ddp", "", f"{r['ratio']:.3f}",
                           " ".join(f"{x:.3f}" for x in r["round_ratios"]), f"{r['ratio_med']:.3f}",
                           f"target {r['target']}: {'met' if r['meets_target'] else 'missed'}", f"{r['cpu_ratio']:.3f}"])
    ev = [["event", "world", "survivors", "idle sum s", "idle max s", "switch stall s", "event->step s", "step s"]]
    for r in rows:
        if r["kind"] == "idle":
            ev.append([r["event"], f"{r['old_world']}->{r['new_world']}", str(r["survivors"]), f"{r['idle_sum_s']:.3f}",
                       f"{r['idle_max_s']:.3f}", f"{r['stall_s']:.3f}", f"{r['to_step_s']:.3f}",
                       f"{r['normal_step_s']:.3f}"])
        elif r["kind"] == "scale_out":
            ev.append(["joiner", f"->{r['world']}", "", f"delay {r['delay_s']:.2f}", f"warm {r['warm_s']:.2f}",
                       f"join {r['join_s']:.3f}", "", ""])
    title = (f"{params['nodes']} processes, MLP {params['model_params'] / 1e6:.2f}M params "
             f"({params['model_mb']:.1f} MB), Adam, batch {params['batch']}/process, torch {params['torch']}, "
             f"lightning {params['lightning']}")
    notes = [
        "samples/s: steady batches only (warm-up dropped), median over runs; ratio: median of per-round ratios",
        "CPU ms/batch: one process's CPU time (all its threads) per batch; its ratio is chaos/ddp (lower is better)",
        "idle: per survivor, last committed batch end in the old view -> first batch end in the new, minus one",
        "  median batch interval of the new view; median over repeats. joiner delay: process start -> end",
        "  of its first batch; warm: its on_fit_start (warm, about to ask to join) -> the same point.",
    ]
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        print(title)
        for body in (steady, ev):
            widths = [max(len(b[i]) for b in body) for i in range(len(body[0]))]
            for b in body:
                print("  ".join(x.rjust(w) for x, w in zip(b, widths)))
            print()
        print("\n".join(notes))
        return
    console = Console(width=max(140, Console().width))
    for name, body in (("steady state, no events", steady), ("survivor idle time per event (chaos)", ev)):
        table = Table(title=f"{name}: {title}" if name.startswith("steady") else name)
        for i, c in enumerate(body[0]):
            table.add_column(Text(c), justify="left" if i == 0 else "right")
        for b in body[1:]:
            table.add_row(*(Text(x) for x in b))
        console.print(table)
    for line in notes:
        console.print(line, highlight=False, markup=False)


# ---------------------------------------------------------------------- main
def finish(params: dict[str, Any], rows: list[dict[str, Any]], json_path: str | None,
           table: Callable[[dict[str, Any], list[dict[str, Any]]], None]) -> None:
    """Refuse a non-finite number in any row, print the table and the wall
    time, and write ``{"params", "rows"}`` to ``json_path`` (if given)."""
    for r in rows:
        for k, v in r.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise BenchError(f"{r['kind']} {k} is not finite")
    table(params, rows)
    print(f"total {params['wall_s']:.0f}s wall")
    if json_path:
        Path(json_path).write_text(json.dumps({"params": params, "rows": rows}, indent=1))
        print(f"wrote {json_path}")


@contextlib.contextmanager
def log_dir() -> Iterator[Path]:
    """The workers' stderr logs: removed after a clean run, kept (and named) after a failure."""
    path = Path(tempfile.mkdtemp(prefix="steady-state-"))
    try:
        yield path
    except BaseException:
        print(f"worker logs kept in {path}", file=sys.stderr)
        raise
    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="3 processes, 3 rounds of 120 batches, 1 event repetition")
    g.add_argument("--smoke", action="store_true", help="2 processes, 1 round of 15 batches, 1 event repetition (tests)")
    ap.add_argument("--nodes", type=int, help="processes K (overrides the mode's; at least 2)")
    ap.add_argument("--json", metavar="PATH", help="write parameters and rows here")
    args = ap.parse_args(argv)
    p = MODES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.nodes is not None:
        if args.nodes < 2:
            ap.error("--nodes must be at least 2 (a crash needs a surviving majority with the joiner)")
        p = replace(p, nodes=args.nodes)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    with log_dir() as logs:
        rows = steady_state(p, logs, say)
        rows += events(p, logs, say)
    n_params = rows[0]["samples"][0]["params"]
    params = {
        **asdict(p), "model_params": n_params, "model_mb": n_params * 4 / 2**20, "optimizer": "Adam",
        "torch": version("torch"), "lightning": version("lightning"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "wall_s": round(time.monotonic() - started, 1),
        "order": "ABBA: round r runs ddp then chaos when r is even, chaos then ddp when odd",
    }
    finish(params, rows, args.json, print_table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
