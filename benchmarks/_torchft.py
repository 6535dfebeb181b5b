"""The TorchFT baseline of the head-to-head benchmark: join, kill -9 and steady state, measured.

Role in the whole: DESIGN.md lists TorchFT (``torchft`` 0.2.0 on PyPI) as
the baseline to beat and defines the measurements ("How performance is
measured").  This module runs a *real* TorchFT job on the scenario workload
(:mod:`chaos_lightning.scenario.workload`: ``MLP(hidden).net``, Adam lr 1e-3,
``Synthetic(4096)``, batch 16 per replica, ``step_sleep`` of stand-in
compute per step) and measures it with those definitions, so the chaos
numbers can be set against it row by row.

    python benchmarks/_torchft.py --nodes 3 --hidden 1024 --reps 3 [--step-sleep 0.05] [--json PATH]

Processes (all on loopback, all reaped in ``finally``): one Lighthouse
(torchft's ``torchft_lighthouse`` binary, or
:mod:`chaos_lightning.integrations.torchft.lighthouse` where the wheel did
not install it) and one process per replica group
(:mod:`chaos_lightning.integrations.torchft.worker`), each writing
wall-clock (``time.time()``) JSON lines that this module tails.  ``nodes``
replicas start and train until all are in one quorum; then:

1. *steady*, ``reps`` consecutive windows (at least ``STEADY_STEPS`` steps
   and ``STEADY_SECONDS``) with all ``nodes`` replicas contributing and
   nothing else running: ``samples_per_s = nodes * batch * (steps - 1) /
   (t1 last - t1 first)``, median over replicas.
2. ``reps`` times:

   *join*: a new replica process starts.  ``scale_out_cold_s`` = its process
   create time (psutil) -> end of its first committed step whose gradients
   were in the all-reduce (``should_commit`` true and
   ``Manager.is_participating()``; the healing step zeroes the joiner's
   gradients, so it does not count); ``scale_out_warm_s`` = from ``built``
   (model, optimizer and Manager built; the first quorum is asked next) to
   that step; ``transfer_s`` = the joiner's checkpoint fetch (torchft's HTTP
   transport, timed around ``recv_checkpoint``); ``first_step_s`` = from
   ``built`` to the end of the first step in which the joiner contributes,
   at every member (the latest of them).

   *kill*: after ``WINDOW`` steps with the joiner, it gets ``kill -9`` (so
   ``nodes`` for this row is ``nodes + 1``; the survivors are the ``nodes``
   original replicas); ``first_step_s`` = from the kill to the end of every
   survivor's first committed step in a quorum without the victim (event
   handling latency (b)).  The next join starts ``SETTLE`` steps later.

Survivor idle (join and kill): for each survivor, ``(t1 of its first
committed step in the new membership - t1 of its last committed step before
the event) - k * normal``, where ``normal`` is the median of its 10 step
intervals before the event (a join: of its first 10 in the new membership,
since the steps before ran beside the joiner's start-up; the notes give the
figure against the steps before) and ``k`` the number of steps it committed in
between, that one included (the healing step of a join trains with the old
members, so it is work, not idle; a step a kill made fail is idle); clamped
at 0; ``idle_sum_s``/``idle_max_s`` over survivors.  For a join "before the
event" is before the first step whose quorum includes the joiner.

Every wait is bounded: ``EVENT_WAIT`` (or ``EVENT_STEPS`` steady steps) per event (an event that does not
complete within it, or within ``timeout``, keeps ``None`` where it was cut
short, says why in ``notes``, and ends the measurement) and ``timeout`` for
the whole call.
Timings are noisy on a shared 2-core machine: compare ratios within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from chaos_lightning.testbed.procs import free_port, kill_and_reap

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
LIGHTHOUSE = "chaos_lightning.integrations.torchft.lighthouse"
WORKER = "chaos_lightning.integrations.torchft.worker"

#: steps every replica trains with the joiner before it is killed (the kill's idle
#: baseline: the median of 10 step intervals)
WINDOW = 11
#: a steady window: at least this many steps and STEADY_SECONDS (or 4x the steps)
STEADY_STEPS = 6
STEADY_SECONDS = 3.0
#: steps every member trains in a new membership before the next event starts
SETTLE = 2
#: bound on one event, or EVENT_STEPS normal steps if longer (a join's cold start
#: under load is 10-16 s, then WINDOW steps; torchft's gloo timeout 5 s and
#: Manager timeout 30 s bound a stuck survivor)
EVENT_WAIT = 60.0
EVENT_STEPS = 30
#: bound on the start: imports of 3 processes at once on 2 cores took 15-36 s (the
#: latter under other jobs' load), plus the first replicas' healing
START_WAIT = 180.0
BATCH = 16
SAMPLES = 4096
#: Lighthouse settings: torchft README's ``--min_replicas 1 --quorum_tick_ms
#: 100 --join_timeout_ms 10000``, heartbeat timeout 1 s instead of 5 s (see
#: docs/baselines_torchft.md: comparable to chaos' ``local`` failure detector)
LH_SETTINGS = {"min_replicas": 1, "quorum_tick_ms": 100, "join_timeout_ms": 10000, "heartbeat_timeout_ms": 1000}



class Stop(Exception):
    """The measurement cannot go on: a bounded wait ran out, or a replica died unasked."""


class Timeout(Stop):
    pass


class Died(Stop):
    pass


class Trace:
    """Tails every replica's JSON-lines file; ``steps[rid]`` and ``events[rid][ev]`` grow as they write."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[Path, int, str]] = {}
        self.steps: dict[str, list[dict]] = {}
        self.events: dict[str, dict[str, list[dict]]] = {}

    def add(self, rid: str, path: Path) -> None:
        self.files[rid] = (path, 0, "")
        self.steps[rid] = []
        self.events[rid] = {}

    def poll(self) -> None:
        for rid, (path, pos, rest) in list(self.files.items()):
            try:
                with open(path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                continue
            text = rest + data.decode("utf-8", "replace")
            *lines, rest = text.split("\n")
            self.files[rid] = (path, pos + len(data), rest)
            for line in lines:
                if not line.strip():
                    continue
                rec = json.loads(line)
                if rec["ev"] == "step":
                    self.steps[rid].append(rec)
                else:
                    self.events[rid].setdefault(rec["ev"], []).append(rec)

    def first(self, rid: str, ev: str) -> dict | None:
        got = self.events[rid].get(ev)
        return got[0] if got else None

    def committed(self, rid: str) -> list[dict]:
        return [s for s in self.steps[rid] if s["commit"]]


class Cluster:
    """The Lighthouse and the replica processes of one measurement; ``close`` reaps them all."""

    def __init__(self, workdir: Path, hidden: int, step_sleep: float, groups: int, deadline: float) -> None:
        self.workdir, self.hidden, self.step_sleep, self.groups = workdir, hidden, step_sleep, groups
        self.deadline = deadline
        self.trace = Trace()
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []
        self.lighthouse: subprocess.Popen | None = None
        self.stop = workdir / "stop"
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
        # one intra-op thread per process, as the workload (torch.set_num_threads(1) in both)
        self.env.setdefault("OMP_NUM_THREADS", "1")
        self.killed: set[str] = set()

    def _log(self, name: str):
        f = open(self.workdir / f"{name}.log", "ab")
        self.logs.append(f)
        return f

    def start_lighthouse(self) -> tuple[str, int]:
        """Start the Lighthouse (no wait: the replicas' imports take longer than its start)."""
        port = free_port()
        binary = Path(PY).parent / "torchft_lighthouse"
        if binary.exists():  # the Rust binary the torchft wheel installs: no Python, no torch import
            cmd = [str(binary), "--bind", f"127.0.0.1:{port}"]
            cmd += [x for k, v in LH_SETTINGS.items() for x in (f"--{k}", str(v))]
        else:
            cmd = [PY, "-m", LIGHTHOUSE, "--port", str(port)]
            cmd += [x for k, v in LH_SETTINGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        self.lighthouse = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log("lighthouse"),
                                           stderr=subprocess.STDOUT)
        return f"http://127.0.0.1:{port}", port

    def wait_lighthouse(self, port: int, bound: float = 30.0) -> None:
        end = time.time() + bound
        while time.time() < end:
            if self.lighthouse is None or self.lighthouse.poll() is not None:
                break
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("lighthouse did not start: "
                           + (self.workdir / "lighthouse.log").read_text(errors="replace")[-2000:])

    def spawn(self, rid: str, group: int, lighthouse: str) -> subprocess.Popen:
        path = self.workdir / f"ev-{rid}.jsonl"
        self.trace.add(rid, path)
        max_s = max(30.0, self.deadline - time.time() + 30.0)
        cmd = [PY, "-m", WORKER, "--lighthouse", lighthouse, "--replica-id", rid, "--group", str(group),
               "--groups", str(self.groups), "--events", str(path), "--stop", str(self.stop),
               "--hidden", str(self.hidden), "--samples", str(SAMPLES), "--batch-size", str(BATCH),
               "--step-sleep", str(self.step_sleep), "--max-seconds", f"{max_s:.0f}"]
        proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log(rid), stderr=subprocess.STDOUT)
        self.procs[rid] = proc
        return proc

    def wait(self, cond, what: str, bound: float) -> None:
        """Poll the traces until ``cond()`` is true; raise Timeout after ``bound`` s or at the deadline."""
        end = min(time.time() + bound, self.deadline)
        while True:
            self.trace.poll()
            if cond():
                return
            for rid, p in self.procs.items():
                if p.poll() is not None and rid not in self.killed:
                    tail = (self.workdir / f"{rid}.log").read_text(errors="replace").strip().splitlines()[-1:]
                    raise Died(f"replica {rid} exited with {p.returncode} while waiting for {what}"
                               f" (last log line: {tail[0][:300] if tail else ''}; see {self.workdir / rid}.log)")
            if time.time() >= end:
                raise Timeout(f"{what}: not within {bound:.0f} s" if time.time() < self.deadline
                              else f"{what}: measure() timeout reached")
            time.sleep(0.05)

    def kill(self, rid: str) -> float:
        self.killed.add(rid)
        t = time.time()
        os.kill(self.procs[rid].pid, signal.SIGKILL)
        kill_and_reap(self.procs[rid])
        return t

    def close(self) -> None:
        try:
            self.stop.write_text("stop")
        except OSError:
            pass
        end = time.time() + 3.0
        for p in self.procs.values():  # a moment to exit on their own (the stop file)
            try:
                p.wait(timeout=max(0.0, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in list(self.procs.values()) + ([self.lighthouse] if self.lighthouse else []):
            kill_and_reap(p)
        for f in self.logs:
            f.close()


def _normal(steps: list[dict], before_t1: float) -> float | None:
    """Median of the 10 intervals between committed step ends up to ``before_t1``."""
    ends = [s["t1"] for s in steps if s["commit"] and s["t1"] <= before_t1][-11:]
    if len(ends) < 3:
        return None
    return statistics.median(b - a for a, b in zip(ends, ends[1:]))


def _idle(steps: list[dict], last_before: dict, first_after: dict, normal: float | None = None) -> float | None:
    """Survivor idle (see the module docstring); ``normal`` defaults to the 10 intervals before the event."""
    if normal is None:
        normal = _normal(steps, last_before["t1"])
    if normal is None:
        return None
    k = sum(1 for s in steps if s["commit"] and last_before["t1"] < s["t1"] <= first_after["t1"])
    return max(0.0, first_after["t1"] - last_before["t1"] - k * normal)


def _record(**kw: object) -> dict:
    rec = {"system": "torchft", "nodes": None, "state_mb": None, "rep": None, "event": None,
           "scale_out_cold_s": None, "scale_out_warm_s": None, "first_step_s": None, "idle_sum_s": None,
           "idle_max_s": None, "transfer_s": None, "samples_per_s": None, "notes": ""}
    rec.update(kw)
    return rec


def measure(*, nodes: int, hidden: int, reps: int, step_sleep: float, workdir: Path, timeout: float) -> list[dict]:
    """Run TorchFT with ``nodes`` replicas; ``reps`` steady windows, then ``reps`` x (join, kill -9).

    One record per event.  ``timeout`` bounds the whole call (seconds); what
    was measured before it ran out is returned, and the record of the event it
    cut short says so in ``notes``.  Raises only if the cluster cannot start.
    """
    if nodes < 1 or reps < 1:
        raise ValueError("nodes and reps must be >= 1")
    # a fresh folder of our own inside workdir: an earlier run's stop file
    # there would end every replica at its first look (measured: the second
    # configuration of a sweep sharing the folder failed at once)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="torchft-", dir=workdir))
    deadline = time.time() + timeout
    cl = Cluster(workdir, hidden, step_sleep, groups=nodes + reps, deadline=deadline)
    tr = cl.trace
    out: list[dict] = []
    try:
        lh, port = cl.start_lighthouse()
        members = [f"replica_{i}" for i in range(nodes)]
        for i, rid in enumerate(members):
            cl.spawn(rid, i, lh)
        cl.wait_lighthouse(port)

        def full(rid: str, n: int, since: float = 0.0) -> list[dict]:
            """Committed steps of ``rid`` ending after ``since`` in which all ``n`` replicas contributed."""
            return [s for s in tr.committed(rid) if s["part"] and s["n"] == n and s["world"] == n and s["t1"] > since]

        cl.wait(lambda: all(len(full(r, nodes)) >= SETTLE for r in members), f"{nodes} replicas in one quorum",
                START_WAIT)
        st = tr.first(members[0], "state")
        base = {"state_mb": st["bytes"] / 1e6 if st else None}

        # -- steady: reps consecutive windows, all replicas contributing, nothing else running --------
        for rep in range(reps):
            mark = {r: len(full(r, nodes)) for r in members}
            t_mark = time.time()

            def window_done() -> bool:
                return all(len(full(r, nodes)) >= mark[r] + STEADY_STEPS for r in members) and (
                    time.time() - t_mark >= STEADY_SECONDS or all(len(full(r, nodes)) >= mark[r] + 4 * STEADY_STEPS
                                                                  for r in members))

            cl.wait(window_done, f"steady window {rep}", EVENT_WAIT)
            rates, counts = [], []
            for r in members:
                win = full(r, nodes)[mark[r]:]
                counts.append(len(win))
                rates.append(nodes * BATCH * (len(win) - 1) / (win[-1]["t1"] - win[0]["t1"]))
            out.append(_record(**base, nodes=nodes, rep=rep, event="steady", samples_per_s=statistics.median(rates),
                               notes=f"median over {nodes} replicas of windows of {min(counts)}-{max(counts)} steps"))
        steady = [r["samples_per_s"] for r in out if r["event"] == "steady"]
        event_wait = max(EVENT_WAIT, EVENT_STEPS * nodes * BATCH / min(steady))

        for rep in range(reps):
            # -- join: a new replica process ---------------------------------------------------------
            joiner = f"replica_{nodes + rep}"
            rec = _record(**base, nodes=nodes, rep=rep, event="join")
            out.append(rec)
            t_spawn = time.time()
            cl.spawn(joiner, nodes + rep, lh)
            everyone = members + [joiner]
            cl.wait(lambda: all(full(r, nodes + 1, t_spawn) for r in everyone), f"join {rep}: {joiner} contributing",
                    event_wait)
            start, built = tr.first(joiner, "start"), tr.first(joiner, "built")
            imported, recv = tr.first(joiner, "imported"), tr.first(joiner, "recv")
            contrib = full(joiner, nodes + 1)[0]
            rec["scale_out_cold_s"] = contrib["t1"] - start["create_time"]
            rec["scale_out_warm_s"] = contrib["t1"] - built["t"]
            rec["transfer_s"] = recv["t1"] - recv["t0"] if recv else None
            idles, ends, baseline, spans = [], [contrib["t1"]], [], {}
            for r in members:
                steps = tr.steps[r]
                first_new = next(s for s in steps if s["commit"] and s["world"] == nodes + 1 and s["t1"] > t_spawn)
                last_before = [s for s in steps if s["commit"] and s["t1"] < first_new["t1"]][-1]
                first_after = full(r, nodes + 1, t_spawn)[0]
                spans[r] = (last_before, first_after)
                ends.append(first_after["t1"])
                idles.append(_idle(steps, last_before, first_after))
                baseline.append(len([s for s in steps if s["commit"] and s["t1"] <= last_before["t1"]][-11:]) - 1)
            rec["first_step_s"] = max(ends) - built["t"]
            if None not in idles:
                rec["idle_sum_s"], rec["idle_max_s"] = sum(idles), max(idles)
            heal = next((s for s in tr.steps[joiner] if s["heal"]), None)
            rec["notes"] = (
                f"joiner: python start {start['main'] - start['create_time']:.2f} s, import torch+torchft "
                f"{imported['torchft'] - start['main']:.2f} s, import workload (lightning) "
                f"{imported['t'] - imported['torchft']:.2f} s, build {built['t'] - imported['t']:.2f} s, "
                + (f"healing step ends {heal['t1'] - built['t']:.2f} s after built, " if heal else "no healing step, ")
                + (f"fetched {recv['bytes'] / 1e6:.1f} MB over HTTP from one peer" if recv else "fetched nothing")
                + f"; idle baseline: {min(baseline)} step intervals")

            # -- kill -9 of that joiner, after WINDOW steps with it (the survivors' idle baseline) -------
            cl.wait(lambda: all(len(full(r, nodes + 1, t_spawn)) >= WINDOW for r in everyone),
                    f"join {rep}: {WINDOW} steps after the join", event_wait)
            # the same idle against the step time of the new membership (nodes + 1 processes share the
            # cores and the all-reduce has one more peer, so its steps are slower than before the join)
            alt = []
            for r in members:
                new_ends = [s["t1"] for s in full(r, nodes + 1, t_spawn)][:WINDOW]
                alt.append(_idle(tr.steps[r], *spans[r], normal=statistics.median(
                    b - a for a, b in zip(new_ends, new_ends[1:]))))
            if None not in alt and None not in idles:
                # the reported idle is against the new membership's step time (the rule of every system,
                # chaos_lightning.scenario.report: the steps before the join ran beside the joiner's start-up)
                rec["notes"] += (f"; idle against the step time before the join: sum {sum(idles):.3f} s, "
                                 f"max {max(idles):.3f} s")
                rec["idle_sum_s"], rec["idle_max_s"] = sum(alt), max(alt)
            rec = _record(**base, nodes=nodes + 1, rep=rep, event="kill")
            out.append(rec)
            qid_old = {r: tr.steps[r][-1]["qid"] for r in members}
            t_kill = cl.kill(joiner)

            def after_kill(r: str) -> list[dict]:
                return [s for s in full(r, nodes, t_kill) if s["qid"] != qid_old[r]]

            cl.wait(lambda: all(after_kill(r) for r in members), f"kill {rep}: every survivor's next committed step",
                    event_wait)
            idles, ends, failed, slow = [], [], 0, []
            for r in members:
                steps = tr.steps[r]
                first_after = after_kill(r)[0]
                before = [s for s in steps if s["commit"] and s["t1"] <= t_kill]
                bad = [s for s in steps if not s["commit"] and t_kill < s["t1"] <= first_after["t1"]]
                failed += len(bad)
                slow += [s["t1"] - s["t0"] for s in bad if s["t1"] - s["t0"] > 2.0]
                ends.append(first_after["t1"])
                idles.append(_idle(steps, before[-1], first_after) if before else None)
            rec["first_step_s"] = max(ends) - t_kill
            if None not in idles:
                rec["idle_sum_s"], rec["idle_max_s"] = sum(idles), max(idles)
            rec["notes"] = (f"victim: the joiner of rep {rep}; {failed} survivor step(s) failed (not committed)"
                            + (f", {len(slow)} of them blocked {', '.join(f'{x:.1f}' for x in slow)} s in gloo"
                               if slow else ""))
            cl.wait(lambda: all(len(after_kill(r)) >= SETTLE for r in members), f"kill {rep}: settle", event_wait)
    except Stop as e:
        if out:
            out[-1]["notes"] = (out[-1]["notes"] + "; " if out[-1]["notes"] else "") + f"stopped: {e}"
        else:
            raise
    finally:
        cl.close()
    return out


# ---------------------------------------------------------------------- printing
COLUMNS = ["event", "nodes", "rep", "state_mb", "scale_out_cold_s", "scale_out_warm_s", "first_step_s", "idle_sum_s",
           "idle_max_s", "transfer_s", "samples_per_s"]


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def medians(records: list[dict]) -> list[dict]:
    rows = []
    for ev in ("steady", "join", "kill"):
        group = [r for r in records if r["event"] == ev]
        if not group:
            continue
        row = {"event": ev, "nodes": group[0]["nodes"], "rep": f"med/{len(group)}", "state_mb": group[0]["state_mb"]}
        for c in COLUMNS[4:]:
            vals = [r[c] for r in group if r[c] is not None]
            row[c] = statistics.median(vals) if vals else None
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    cells = [[_fmt(r.get(c)) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(x[i]) for x in cells)) for i, c in enumerate(COLUMNS)]
    print("  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths)))
    print("  ".join("-" * w for w in widths))
    for x in cells:
        print("  ".join(v.rjust(w) for v, w in zip(x, widths)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/_torchft.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--timeout", type=float, default=300.0, help="bound on the whole run, s")
    p.add_argument("--workdir", type=Path, default=None, help="keep the traces and logs here (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="write the records here")
    args = p.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="torchft-bench-") as tmp:
        workdir = args.workdir or Path(tmp)
        records = measure(nodes=args.nodes, hidden=args.hidden, reps=args.reps, step_sleep=args.step_sleep,
                          workdir=workdir, timeout=args.timeout)
    took = time.time() - t0
    print_table(records)
    print()
    print_table(medians(records))
    print()
    for r in records:
        if r["notes"]:
            print(f"{r['event']:>6} rep {r['rep']}: {r['notes']}")
    print(f"\nmeasure() took {took:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"records": records, "took_s": took}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
