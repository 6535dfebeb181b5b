"""The checkpoint-restart baseline (Pollux-like), measured with real processes.

    python benchmarks/_ckpt_restart.py --nodes 3 --hidden 1024 --reps 3 [--step-sleep 0.05] [--json PATH]

DESIGN.md's first baseline: torchrun's elastic agents (one per node, one
worker each) rendezvous through torch's ``etcd-v2`` handler on a real etcd
server started here (``--enable-v2``; the client is ``python-etcd``), and run
:mod:`chaos_lightning.integrations.ckpt_restart.worker`: the scenario
workload's ``MLP``/``Synthetic`` under Lightning's ``strategy="ddp"``, a
``last.ckpt`` every ``ckpt_every`` steps on local disk, ``fit(ckpt_path="last")``
on every (re)start.  Any membership change makes every agent stop its worker,
run a new rendezvous round and start a fresh worker, which imports torch and
Lightning again, rebuilds the model and resumes from the last checkpoint.

One run plays, ``reps`` times, a pair of independent events, each from a
steady state (every node has at least 11 step ends in its current worker):

``join``  a new agent starts while ``nodes`` train (world ``nodes`` -> ``nodes+1``);
``kill``  SIGKILL of that node's agent and worker together (``nodes+1`` -> ``nodes``),
          so both events have ``nodes`` survivors.

Measured from the workers' ``time.time()`` stamps (DESIGN "How performance is
measured"): ``scale_out_cold_s`` new agent's process creation -> end of the
joiner's first step in world ``nodes+1``; ``scale_out_warm_s`` the joiner's
worker has built its model -> that step; ``first_step_s`` event -> first step
end in the new world at the joiner (join) or at every survivor (kill, the
latest); ``idle_sum_s``/``idle_max_s`` per survivor, its last step end in the
old worker -> its first step end in the new world, minus the median of the 10
step intervals before (a join: of the new world's steps from that first one
on, the steps before having run beside the joiner's start-up); ``steps_lost`` the survivors' last completed global
step before the restart minus the step the new world resumed from.

Rendezvous settings (``RDZV_CONF``) are tuned in the baseline's favour:
torch's defaults (30 s last call, 5 s x 3 keep-alive) would add up to 45 s
to every event.  See docs/baselines_ckpt_restart.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chaos_lightning.integrations.etcd.server import etcd_server  # noqa: E402

PY = sys.executable
WORKER = "chaos_lightning.integrations.ckpt_restart.worker"

#: torch's dynamic rendezvous on etcd, tuned for fast changes: complete a round
#: 2 s after the last participant arrived (below MAX nodes), declare an agent
#: dead after 3 missed 1 s heartbeats.  Shorter ones race the agents' own
#: 1 s state-polling and the joiner's slow start on 2 cores.
RDZV_CONF = {"last_call_timeout": 2, "keep_alive_interval": 1, "keep_alive_max_attempt": 3, "join_timeout": 300}
#: step ends a node needs in its current worker before an event (11: the 10 intervals of the median)
STEADY_STEPS = 11
POLL = 0.1


def state_bytes(hidden: int, dim: int = 32) -> int:
    """Parameters + Adam's two moments (float32) of ``MLP(dim, hidden)``: the checkpoint-relevant state."""
    params = (dim * hidden + hidden) + (hidden * hidden + hidden) + (hidden + 1)
    return 12 * params


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun's workers live in their own sessions)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)


class Cluster:
    """torchrun agents on loopback, their event logs, their reaping."""

    def __init__(self, endpoint: str, workdir: Path, nodes: int, hidden: int, step_sleep: float, ckpt_every: int) -> None:
        self.endpoint, self.workdir, self.nodes = endpoint, workdir, nodes
        self.worker_args = ["--workdir", str(workdir), "--hidden", str(hidden), "--step-sleep", str(step_sleep),
                            "--ckpt-every", str(ckpt_every)]
        self.agents: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.count = 0
        (workdir / "logs").mkdir(parents=True, exist_ok=True)
        (workdir / "events").mkdir(parents=True, exist_ok=True)

    def start(self) -> str:
        name = f"n{self.count}"
        self.count += 1
        conf = ",".join(f"{k}={v}" for k, v in RDZV_CONF.items())
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", f"{self.nodes}:{self.nodes + 1}", "--nproc-per-node", "1",
               "--rdzv-backend", "etcd-v2", "--rdzv-endpoint", self.endpoint, "--rdzv-id", "ckpt-restart",
               "--rdzv-conf", conf, "--max-restarts", "1000", "--monitor-interval", "0.1",
               "--local-addr", "127.0.0.1", "--log-dir", str(self.workdir / "torchelastic" / name),
               "-m", WORKER, *self.worker_args]
        env = {**os.environ, "CKPT_NODE": name, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO",
               # torch 2.13: with the shared TCPStore (the default) a joiner waits forever for the
               # bootstrap address that the old rank 0 never re-publishes in the new round
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        t = time.time()
        with open(self.workdir / "logs" / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=REPO, start_new_session=True)
        self.agents[name] = proc
        # the agent's process start: the stamp just before the fork (psutil's create_time is
        # whole-second boot time plus ticks, up to 1 s off against time.time())
        self.started[name] = t
        return name

    def kill(self, name: str) -> float:
        """kill -9 the node's agent and worker together; returns the event time."""
        proc = self.agents.pop(name)
        t = time.time()
        _kill_tree(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        return t

    def events(self, name: str) -> list[dict]:
        path = self.workdir / "events" / f"{name}.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def _progress(self, names: list[str], world: int, after: float) -> tuple[int, int, int] | None:
        """(fewest step ends of a node's current worker in world ``world`` after ``after``, the step it
        resumed from, the highest global step so far), or None while some node has none."""
        counts, resumed, top = [], [], 0
        for n in names:
            ev = self.events(n)
            steps = [e for e in ev if e["ev"] == "step" and e["t"] > after and e["ws"] == world]
            if not steps:
                return None
            pid = steps[-1]["pid"]
            counts.append(sum(1 for e in steps if e["pid"] == pid))
            resumed += [e["gs"] for e in ev if e["ev"] == "resume" and e["pid"] == pid]
            top = max(top, steps[-1]["gs"])
        return min(counts), min(resumed, default=0), top

    def wait_steady(self, names: list[str], world: int, after: float, timeout: float, what: str,
                    phase: int | None = None, every: int = 10, steps: int = STEADY_STEPS) -> None:
        """Until every node has ``steps`` step ends in world ``world`` after ``after`` from one worker
        and, with ``phase``, the global step has reached the first ``gs % every == phase`` past that."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._progress(names, world, after)
            if got is not None and got[0] >= steps:
                if phase is None:
                    return
                first = got[1] + STEADY_STEPS
                if got[2] >= first + (phase - first) % every:
                    return
            dead = [n for n, p in self.agents.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{what}: agent(s) {dead} exited; see {self.workdir / 'logs'}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: nodes {names} not steady in world {world} within {timeout:.0f} s; "
                                   f"see {self.workdir / 'logs'}")
            time.sleep(POLL)

    def stop(self) -> None:
        pids = {e["pid"] for n in list(self.started) for e in self.events(n)}
        for proc in self.agents.values():
            _kill_tree(proc.pid)
        for pid in pids:  # orphaned workers of agents killed earlier, if any survived
            _kill_tree(pid)
        for proc in self.agents.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        self.agents.clear()


def _survivor(events: list[dict], t0: float, world: int, join: bool = False) -> dict:
    """One survivor around an event at ``t0``: last step of its old worker, first in world ``world``, idle.

    The normal step of a join is the median of up to 10 intervals of the new
    world's steps from that first one on (at least 3; else the old worker's):
    the old worker's last steps ran beside the joiner's start-up, which slowed
    them (the rule of every system, chaos_lightning.scenario.report)."""
    steps = [e for e in events if e["ev"] == "step"]
    before = [e for e in steps if e["t"] <= t0]
    if not before:
        raise RuntimeError("survivor has no step before the event")
    old_pid = before[-1]["pid"]
    old = [e for e in steps if e["pid"] == old_pid]
    last = old[-1]
    after = [e for e in steps if e["t"] > last["t"] and e["pid"] != old_pid and e["ws"] == world]
    if not after:
        raise RuntimeError("survivor has no step in the new world")
    first = after[0]
    tail = [e["t"] for e in old[-(STEADY_STEPS):]]
    new = [e["t"] for e in after if e["pid"] == first["pid"]][: STEADY_STEPS]
    if join and len(new) >= 4:
        tail = new
    normal = statistics.median(b - a for a, b in zip(tail, tail[1:])) if len(tail) > 1 else 0.0
    workers = {e["pid"] for e in events if e["ev"] == "start" and last["t"] < e["t"] <= first["t"]} | {first["pid"]}
    resume = next((e for e in events if e["ev"] == "resume" and e["pid"] == first["pid"]), None)
    return {"last": last, "first": first, "normal": normal, "idle": first["t"] - last["t"] - normal,
            "generations": len(workers), "resume_gs": resume["gs"] if resume else None}


def _common(cluster: Cluster, survivors: list[str], t0: float, world: int, join: bool = False) -> tuple[list[dict], dict]:
    per = [_survivor(cluster.events(s), t0, world, join) for s in survivors]
    idles = [p["idle"] for p in per]
    resumed = [p["resume_gs"] for p in per if p["resume_gs"] is not None]
    last_gs = max(p["last"]["gs"] for p in per)
    extra = {
        "idle_sum_s": sum(idles), "idle_max_s": max(idles),
        "steps_lost": (last_gs - min(resumed)) if resumed else None,
        "normal_step_s": statistics.median(p["normal"] for p in per),
        "resumed_from": min(resumed) if resumed else None,
        "generations": max(p["generations"] for p in per),
    }
    return per, extra


def _record(nodes: int, hidden: int, rep: int, event: str, **kw: object) -> dict:
    base = {"system": "ckpt-restart", "nodes": nodes, "state_mb": state_bytes(hidden) / 1e6, "rep": rep, "event": event,
            "scale_out_cold_s": None, "scale_out_warm_s": None, "first_step_s": None, "idle_sum_s": None,
            "idle_max_s": None, "steps_lost": None, "notes": ""}
    base.update(kw)
    return base


def measure(*, nodes: int, hidden: int, reps: int, step_sleep: float, workdir: Path, timeout: float,
            ckpt_every: int = 10) -> list[dict]:
    """Join and kill events on a torchrun + etcd + Lightning-DDP cluster; one record per event.

    ``timeout`` bounds each wait (the first start, each event's recovery) in seconds.
    """
    if nodes < 1 or reps < 1:
        raise ValueError("nodes and reps must be >= 1")
    # a fresh folder of our own inside workdir: fit(ckpt_path="last") must never find an older run's
    # checkpoint, and the caller's other files are left alone; logs stay, checkpoints are removed
    Path(workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ckpt-restart-", dir=workdir))
    records: list[dict] = []
    # torch's etcd rendezvous speaks the v2 API only (python-etcd)
    with etcd_server(workdir / "etcd", extra_args=("--enable-v2",)) as endpoint:
        cluster = Cluster(endpoint, workdir, nodes, hidden, step_sleep, ckpt_every)
        try:
            # each event comes at a random point of the checkpoint interval (seeded): right after a
            # checkpoint every time would lose the fewest steps, the baseline's best case
            rng = random.Random(0)
            members = [cluster.start() for _ in range(nodes)]
            cluster.wait_steady(members, nodes, 0.0, timeout, "first start", rng.randrange(ckpt_every), ckpt_every)
            for rep in range(reps):
                # -- join: nodes -> nodes + 1 ------------------------------------------------
                t0 = time.time()
                joiner = cluster.start()
                cluster.wait_steady([*members, joiner], nodes + 1, t0, timeout, f"join {rep}",
                                    rng.randrange(ckpt_every), ckpt_every)
                ev = cluster.events(joiner)
                first = next(e for e in ev if e["ev"] == "step" and e["ws"] == nodes + 1)
                built = next(e for e in ev if e["ev"] == "built" and e["pid"] == first["pid"])
                start = next(e for e in ev if e["ev"] == "start" and e["pid"] == first["pid"])
                per, extra = _common(cluster, members, t0, nodes + 1, join=True)
                notes = (f"all {nodes} survivors restarted (new worker processes, imports, checkpoint load); "
                         f"resumed from step {extra['resumed_from']}; normal step {extra['normal_step_s']:.3f} s; "
                         f"joiner: agent start -> worker start {start['t'] - cluster.started[joiner]:.2f} s, "
                         f"imports {start['imported'] - start['t']:.2f} s")
                if extra["generations"] > 1:
                    notes += f"; survivors went through {extra['generations']} worker generations"
                records.append(_record(
                    nodes, hidden, rep, "join",
                    scale_out_cold_s=first["t"] - cluster.started[joiner], scale_out_warm_s=first["t"] - built["t"],
                    first_step_s=first["t"] - t0, idle_sum_s=extra["idle_sum_s"], idle_max_s=extra["idle_max_s"],
                    steps_lost=extra["steps_lost"], notes=notes))
                # -- kill -9 of the joiner's agent and worker: nodes + 1 -> nodes ----------------
                t0 = cluster.kill(joiner)
                if rep + 1 < reps:  # steady again, for the next join
                    cluster.wait_steady(members, nodes, t0, timeout, f"kill {rep}", rng.randrange(ckpt_every), ckpt_every)
                else:  # the last event only needs every survivor's first step
                    cluster.wait_steady(members, nodes, t0, timeout, f"kill {rep}", steps=1)
                per, extra = _common(cluster, members, t0, nodes)
                notes = (f"killed {joiner} (agent + worker, SIGKILL); all {nodes} survivors restarted; "
                         f"resumed from step {extra['resumed_from']}; normal step {extra['normal_step_s']:.3f} s; "
                         "no scale-out in a kill")
                if extra["generations"] > 1:
                    notes += f"; survivors went through {extra['generations']} worker generations"
                records.append(_record(
                    nodes + 1, hidden, rep, "kill",
                    first_step_s=max(p["first"]["t"] for p in per) - t0, idle_sum_s=extra["idle_sum_s"],
                    idle_max_s=extra["idle_max_s"], steps_lost=extra["steps_lost"], notes=notes))
        finally:
            cluster.stop()
            shutil.rmtree(workdir / "ckpt", ignore_errors=True)
    return records


COLUMNS = ("event", "nodes", "state_mb", "rep", "scale_out_cold_s", "scale_out_warm_s", "first_step_s",
           "idle_sum_s", "idle_max_s", "steps_lost")


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def table(records: list[dict]) -> str:
    """Every record, then the per-event medians."""
    rows = [list(COLUMNS)] + [[_fmt(r[c]) for c in COLUMNS] for r in records]
    for event in ("join", "kill"):
        rs = [r for r in records if r["event"] == event]
        if rs:
            med = ["median " + event, _fmt(rs[0]["nodes"]), _fmt(rs[0]["state_mb"]), str(len(rs))]
            for c in COLUMNS[4:]:
                vals = [r[c] for r in rs if r[c] is not None]
                med.append(_fmt(statistics.median(vals)) if vals else "-")
            rows.append(med)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--ckpt-every", type=int, default=10)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per wait")
    p.add_argument("--workdir", type=Path, default=None, help="run in a fresh subfolder of it (logs kept)")
    p.add_argument("--json", type=Path, default=None, help="also write the records here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckpt-restart-") as tmp:
        workdir = args.workdir or Path(tmp)
        t = time.monotonic()
        records = measure(nodes=args.nodes, hidden=args.hidden, reps=args.reps, step_sleep=args.step_sleep,
                          workdir=workdir, timeout=args.timeout, ckpt_every=args.ckpt_every)
        took = time.monotonic() - t
    print(table(records))
    print(f"measure() took {took:.1f} s")
    for r in records:
        print(f"{r['event']} rep {r['rep']}: {r['notes']}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
