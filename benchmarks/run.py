"""Head-to-head benchmarks: chaos against checkpoint-restart (torchrun + etcd),
its own etcd control plane, single-source transfer and TorchFT.

    python benchmarks/run.py --quick    # about 10 minutes on 2 cores
    python benchmarks/run.py --full     # the sweep: state sizes, cluster sizes, the shaped testbed

Every system trains the same model on the same data (the scenario workload:
an MLP whose width sets the state, Adam, synthetic regression data, 16
samples per process and step, a fixed stand-in compute per step) on this
machine, in this run, and is measured by DESIGN.md's definitions from its
processes' own wall-clock stamps:

- scale-out delay, cold (the new process started -> the end of its first
  step that contributes gradients) and warm (from its join request, model
  built);
- survivors' idle time per event (sum and max over survivors, one normal
  step subtracted);
- event handling latency: event -> new view at every member (where the
  system has views) and -> the first step in the new world;
- steady-state overhead: ``strategy="chaos"`` against ``strategy="ddp"``
  (``benchmarks/steady_state.py``'s ABBA runs);
- transfer against the bound on shaped links (``benchmarks/scale_out.py``,
  namespace testbed; skipped where namespaces are not available).

Output (``--out DIR``, default ``docs/results/bench_quick`` or ``..._full``):
``results.json`` (every record, the aggregates, the machine), PNG plots, and
``BENCHMARKS.md`` at the repository root (the tables, the targets and
whether each is met).  Repetitions: 3 of every event (medians, min-max).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import _chaos  # noqa: E402
import _machine  # noqa: E402

SYSTEM_ORDER = ("chaos", "chaos-stopfree", "chaos-etcd", "chaos-1src", "ckpt-restart", "torchft")
SYSTEM_LABEL = {
    "chaos": "chaos (peer, multi-source)",
    "chaos-etcd": "chaos, etcd control plane",
    "chaos-1src": "chaos, single-source pull",
    "chaos-stopfree": "chaos, stop-free join (CHAOS_STOP_FREE_JOIN=1)",
    "ckpt-restart": "torchrun + etcd, checkpoint-restart",
    "torchft": "TorchFT 0.2.0 (lighthouse)",
}


@dataclass
class Job:
    """One measurement: a system at one configuration."""

    system: str
    nodes: int
    hidden: int
    reps: int = 3
    events: tuple[str, ...] = ("join", "leave", "kill", "link")
    #: chaos only: the run also measures chaos-1src's joins (``_chaos.measure``)
    single_source: bool = False

    @property
    def label(self) -> str:
        also = " (+ chaos-1src joins)" if self.single_source else ""
        return f"{self.system}{also} n={self.nodes} state={_chaos.state_mb(self.hidden):.0f} MB"


@dataclass
class Plan:
    name: str
    jobs: list[Job]
    step_sleep: float = 0.03
    steady: dict[str, int] = field(default_factory=dict)  # steady_state.Params overrides; empty: skip
    scale_out: dict[str, Any] = field(default_factory=dict)  # scale_out.run kwargs; empty: skip
    membership: dict[str, Any] = field(default_factory=dict)  # membership.run sizes; empty: skip


#: the headline configuration: 4 processes, 201 MB of state (hidden 4096)
BIG = 4096
QUICK = Plan(
    "quick",
    [
        Job("chaos", 4, BIG, events=("join", "leave", "kill"), single_source=True),
        Job("chaos-stopfree", 4, BIG, events=("join",)),
        Job("chaos-etcd", 4, BIG, events=("kill",)),
        Job("ckpt-restart", 4, BIG, events=("join", "kill")),
        Job("torchft", 4, BIG, events=("join", "kill")),
        # the 100 ms target: 8 processes, a small state (one step is tens of ms)
        Job("chaos", 8, 256, events=("leave", "link")),
    ],
    steady={"nodes": 3, "rounds": 2, "warmup": 10, "steps": 100},
    scale_out={"sizes": [200.0], "counts": [4], "kinds": ["equal"], "base": 200.0},
    membership={"sim_sizes": [(8, 3)], "real_sizes": [(8, 3)]},
)
#: the sweep (about 40 minutes here): state size for every system (13 MB and
#: 201 MB at 4 processes, 1 GB at 3: five processes holding 1 GB of state, its
#: gradients and their checkpoint or snapshot buffers would not fit in 24 GB;
#: join and kill, the events every system handles), cluster size for chaos
#: (2, 4, 8 processes at 13 MB, every event),
#: the etcd control plane at 4 and 8, and the shaped-link pulls with equal and
#: unequal links up to 1 GB
SMALL, GIANT = 1024, 9216
FULL = Plan(
    "full",
    [
        *(Job("chaos", n, SMALL, events=("join", "leave", "kill") + (("link",) if n >= 3 else ()), single_source=n == 4)
          for n in (2, 4, 8)),
        *(Job(s, 4 if h == BIG else 3, h, events=("join", "kill"), single_source=s == "chaos")
          for h in (BIG, GIANT) for s in ("chaos", "ckpt-restart", "torchft")),
        *(Job("chaos-stopfree", 4 if h != GIANT else 3, h, events=("join",)) for h in (SMALL, BIG, GIANT)),
        *(Job(s, 4, SMALL, events=("join", "kill")) for s in ("ckpt-restart", "torchft")),
        Job("chaos-etcd", 4, SMALL, events=("join", "leave", "kill")),
        Job("chaos-etcd", 8, SMALL, events=("leave", "kill")),
    ],
    steady={"nodes": 3, "rounds": 4, "warmup": 20, "steps": 200},
    scale_out={"sizes": [200.0, 1000.0], "counts": [1, 4, 8], "kinds": ["equal", "unequal"], "base": 200.0},
    membership={"sim_sizes": [(8, 5), (64, 5)], "real_sizes": [(8, 5)]},
)


# ---------------------------------------------------------------------- measuring
def _measure_fn(system: str) -> Callable[..., list[dict[str, Any]]]:
    if system in _chaos.SYSTEMS:
        return lambda **kw: _chaos.measure(system=system, **kw)
    if system == "ckpt-restart":
        import _ckpt_restart

        return _ckpt_restart.measure
    if system == "torchft":
        import _torchft

        return _torchft.measure
    raise ValueError(f"unknown system {system!r}")


def run_job(job: Job, plan: Plan, workdir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    t0 = time.monotonic()
    kwargs: dict[str, Any] = dict(nodes=job.nodes, hidden=job.hidden, reps=job.reps, step_sleep=plan.step_sleep,
                                  workdir=workdir / job.system, timeout=900.0)
    if job.system in _chaos.SYSTEMS:
        kwargs["events"] = job.events
    if job.single_source:
        kwargs["single_source"] = True
    try:
        recs = _measure_fn(job.system)(**kwargs)
    except Exception as exc:  # one system failing must not lose the others' results
        say(f"{job.label}: FAILED ({type(exc).__name__}: {exc})")
        return [{"system": job.system, "nodes": job.nodes, "hidden": job.hidden, "event": "error",
                 "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}]
    wanted = {"link": ("link-down", "link-up")}
    keep = {e for ev in job.events for e in wanted.get(ev, (ev,))} | {"run", "steady"}
    recs = [r for r in recs if (r.get("event") in keep or job.system not in _chaos.SYSTEMS)
            and (r.get("system") != "chaos-1src" or r.get("event") == "join")]  # its joiners leave only to make room
    for r in recs:
        r.setdefault("hidden", job.hidden)
        # the configured cluster size; a baseline may count the joiner it kills
        r["nodes_before"], r["nodes"] = r.get("nodes"), job.nodes
    say(f"{job.label}: {len(recs)} records in {time.monotonic() - t0:.0f} s")
    return recs


def run_steady(plan: Plan, workdir: Path, say: Callable[[str], None]) -> list[dict[str, Any]]:
    import steady_state

    p = steady_state.Params("bench", event_repeats=1, settle=10, **plan.steady)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = steady_state.steady_state(p, workdir, lambda m: say("steady: " + m))
    return [{"system": "steady", "event": "steady", **{k: v for k, v in r.items() if k != "samples"}} for r in rows]


def run_scale_out(plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    from chaos_lightning.testbed import available

    ok, why = available()
    if not ok:
        say(f"scale-out on shaped links skipped: {why}")
        return [{"system": "testbed", "event": "skipped", "why": why}]
    import scale_out

    rows = scale_out.run(**plan.scale_out)
    return [{"system": "testbed", "event": "pull", **r} for r in rows]


def run_membership(plan: Plan, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """The peer membership's decision time per event (``benchmarks/membership.py``):
    the coordinator's time from the event's first evidence to its proposal."""
    import logging

    import membership

    logging.getLogger("chaos_lightning").setLevel(logging.ERROR)
    rows = membership.run(seed=0, progress=lambda m: say("membership: " + m), **plan.membership)
    return [{"system": "membership", **{k: v for k, v in r.items() if k != "samples"}} for r in rows]


# ---------------------------------------------------------------------- aggregating
METRICS = ("scale_out_cold_s", "scale_out_warm_s", "view_everywhere_s", "first_step_s", "idle_sum_s", "idle_max_s",
           "transfer_s", "steps_lost")


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median, min and max of every metric per (system, nodes, state, event)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r.get("event") in ("join", "leave", "kill", "link-down", "link-up"):
            key = (r["system"], r["nodes"], round(float(r.get("state_mb") or 0)), r["event"])
            groups.setdefault(key, []).append(r)
    out = []
    for (system, nodes, mb, event), rs in sorted(groups.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1:])):
        row: dict[str, Any] = {"system": system, "nodes": nodes, "state_mb": mb, "event": event, "n": len(rs)}
        for m in METRICS:
            vals = [float(r[m]) for r in rs if isinstance(r.get(m), (int, float))]
            if vals:
                row[m] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}
        out.append(row)
    return out


def _order(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)


def _find(agg: list[dict[str, Any]], system: str, event: str, metric: str, mb: int | None = None,
          nodes: int | None = None) -> dict[str, float] | None:
    rows = [r for r in agg if r["system"] == system and r["event"] == event and metric in r
            and (mb is None or r["state_mb"] == mb) and (nodes is None or r["nodes"] == nodes)]
    if not rows:
        return None
    return max(rows, key=lambda r: (r["state_mb"], r["nodes"]))[metric]


def _cell(stat: dict[str, float] | None, unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
    if not stat:
        return "-"
    f = f"{{:.{digits}f}}"
    med, lo, hi = (f.format(stat[k] * scale) for k in ("median", "min", "max"))
    return f"{med} {unit} [{lo}-{hi}]" if stat["n"] > 1 else f"{med} {unit}"


# ---------------------------------------------------------------------- targets
def targets(agg: list[dict[str, Any]], extra: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """DESIGN/issue targets, each with the measured figure and whether it holds."""
    out: list[dict[str, Any]] = []
    big = round(_chaos.state_mb(BIG))

    def ratio(target: str, num: dict | None, den: dict | None, need: float, what: str) -> None:
        if not num or not den or den["median"] <= 0:
            out.append({"target": target, "measured": None, "met": None, "what": what + " (not measured in this run)"})
            return
        value = num["median"] / den["median"]
        out.append({"target": target, "measured": round(value, 2), "met": value >= need, "what": what})

    for kind in ("cold", "warm"):
        m = f"scale_out_{kind}_s"
        ratio(f"scale-out ({kind}) >= 10x faster than checkpoint-restart, {big} MB",
              _find(agg, "ckpt-restart", "join", m, big), _find(agg, "chaos", "join", m, big), 10.0,
              f"median ckpt-restart / chaos {kind} scale-out")
        ratio(f"scale-out ({kind}) faster than TorchFT, {big} MB",
              _find(agg, "torchft", "join", m, big), _find(agg, "chaos", "join", m, big), 1.0,
              f"median TorchFT / chaos {kind} scale-out")
    loop = (_find(agg, "chaos-1src", "join", "transfer_s", big), _find(agg, "chaos", "join", "transfer_s", big))
    if all(loop):
        out.append({"target": f"(information) single-source / multi-source pull, {big} MB, unshaped loopback",
                    "measured": round(loop[0]["median"] / loop[1]["median"], 2), "met": None,
                    "what": "no link limits the pull on loopback (memory copies do): the target is judged on shaped links"})
    pulls = [r for r in extra if r.get("system") == "testbed" and r.get("event") == "pull" and r.get("sources") == 4
             and r.get("kind") == "equal" and r.get("state_mb", 0) >= 200]
    if pulls:
        sp = max(pulls, key=lambda r: r["state_mb"])
        out.append({"target": f"transfer >= 3x faster than single-source, 4 equal links, {sp['state_mb']:.0f} MB (testbed)",
                    "measured": round(sp["speedup"], 2), "met": sp["speedup"] >= 3.0,
                    "what": f"single / multi pull seconds on tbf-shaped links; multi at {sp['ratio']:.2f}x the bound"})
    for event in ("join", "kill"):
        ratio(f"survivors' idle time ({event}) below TorchFT's, {big} MB",
              _find(agg, "torchft", event, "idle_sum_s", big), _find(agg, "chaos", event, "idle_sum_s", big), 1.0,
              f"median TorchFT / chaos idle sum around a {event}")
    for event in ("leave", "link-down", "link-up"):
        rows = [r for r in agg if r["system"] == "chaos" and r["event"] == event and r["nodes"] == 8 and "first_step_s" in r]
        row = min(rows, key=lambda r: r["state_mb"]) if rows else None
        stat = row["first_step_s"] if row else None
        out.append({"target": f"training resumed within 100 ms of a {event} at 8 nodes",
                    "measured": round(stat["median"] * 1000) if stat else None,
                    "met": (stat["median"] <= 0.1) if stat else None,
                    "what": (f"median event -> first step in the new view, ms ({row['state_mb']} MB of state)" if row
                             else "not measured in this run")})
    decided = [r for r in extra if r.get("system") == "membership" and r.get("nodes") == 8
               and r.get("event") in ("leave", "failure", "link-down", "link-up")]
    if decided:
        worst = max(decided, key=lambda r: r["decision_us"])
        out.append({"target": "scale-in, failure and link events decided within 1 ms at 8 nodes",
                    "measured": round(worst["decision_us"] / 1000, 3), "met": worst["decision_us"] <= 1000,
                    "what": "slowest median decision, ms: " + ", ".join(
                        f"{r['event']} {r['decision_us'] / 1000:.3f} ({r['mode']})" for r in decided)})
    steady = next((r for r in extra if r.get("event") == "steady" and r.get("kind") == "ratio"), None)
    if steady:
        out.append({"target": "steady state >= 0.97 of ddp", "measured": round(steady["ratio"], 3),
                    "met": steady["ratio"] >= 0.97, "what": "median chaos/ddp samples/s over ABBA rounds"})
    return out


# ---------------------------------------------------------------------- output
EVENT_COLS = [
    ("join", "scale_out_cold_s", "scale-out cold"),
    ("join", "scale_out_warm_s", "scale-out warm"),
    ("join", "idle_sum_s", "idle sum, join"),
    ("kill", "first_step_s", "kill -> first step"),
    ("kill", "idle_sum_s", "idle sum, kill"),
    ("leave", "first_step_s", "leave -> first step"),
]


def _sweep_nodes(agg: list[dict[str, Any]]) -> dict[int, int]:
    """Per state size, the cluster size of its sweep (the baselines run there only)."""
    return {mb: min((r["nodes"] for r in agg if r["state_mb"] == mb and r["system"] in ("ckpt-restart", "torchft")),
                    default=4) for mb in {r["state_mb"] for r in agg}}


def headline(agg: list[dict[str, Any]], mb: int, nodes: int) -> str:
    lines = [f"| system ({nodes} processes, {mb} MB of state) | " + " | ".join(c for _, _, c in EVENT_COLS) + " |",
             "| --- |" + " ---: |" * len(EVENT_COLS)]
    for system in SYSTEM_ORDER:
        at = mb
        sizes = {r["state_mb"] for r in agg if r["system"] == system and r["nodes"] == nodes}
        if mb not in sizes and system == "chaos-etcd" and sizes:  # the sweep runs the control plane at one size
            at = min(sizes)
        cells = [_cell(_find(agg, system, event, metric, at, nodes)) for event, metric, _ in EVENT_COLS]
        if any(c != "-" for c in cells):
            label = SYSTEM_LABEL[system] + ("" if at == mb else f" (at {at} MB)")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(agg: list[dict[str, Any]], big: int) -> list[str]:
    """The headline table at every other state size that every baseline ran at (the --full sweep)."""
    out = []
    for mb, nodes in sorted(_sweep_nodes(agg).items()):
        if mb != big and any(r["system"] in ("ckpt-restart", "torchft") and r["state_mb"] == mb for r in agg):
            out += [f"### {mb} MB of state, {nodes} processes", "", headline(agg, mb, nodes), ""]
    return ["## State sweep", "", *out] if out else []


def detail(agg: list[dict[str, Any]]) -> str:
    cols = [("view_everywhere_s", "view everywhere"), ("first_step_s", "first step"), ("idle_sum_s", "idle sum"),
            ("idle_max_s", "idle max"), ("scale_out_cold_s", "cold"), ("scale_out_warm_s", "warm"),
            ("transfer_s", "transfer"), ("steps_lost", "steps lost")]
    lines = ["| system | nodes | state (MB) | event | n | " + " | ".join(c for _, c in cols) + " |",
             "| --- | ---: | ---: | --- | ---: |" + " ---: |" * len(cols)]
    for r in agg:
        cells = [_cell(r.get(m), "" if m == "steps_lost" else "s", digits=0 if m == "steps_lost" else 2) for m, _ in cols]
        lines.append(f"| {r['system']} | {r['nodes']} | {r['state_mb']} | {r['event']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    agg, tg = doc["aggregates"], doc["targets"]
    big = round(_chaos.state_mb(BIG))
    mode = doc["plan"]["name"]
    out = [
        "# Benchmarks",
        "",
        f"Generated by `python benchmarks/run.py --{mode}` on {doc['machine']['when']} "
        f"({doc['machine']['cpus']} CPUs, {doc['machine']['platform']}; {doc['wall_s']:.0f} s). "
        "Every system in one run, on the same model and data (the scenario workload: an MLP with Adam on synthetic "
        "data, 16 samples per process and step); definitions in DESIGN.md \"How performance is measured\", "
        "method in [docs/benchmarks.md](docs/benchmarks.md). Cells: median [min-max] over the repetitions."
        + (f" Memory faulted in first: {doc['machine']['prefaulted']['gib']:.1f} GiB."
           if doc["machine"].get("prefaulted", {}).get("gib") else ""),
        *(["", f"Re-measured in a second run and merged (`--merge`): {', '.join(doc['merged']['remeasured'])}."]
          if doc.get("merged") else []),
        "",
        "## Headline",
        "",
        headline(agg, big, 4),
        "",
        *sweep(agg, big),
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | ---: | :---: |",
        *(f"| {t['target']} | {'-' if t['measured'] is None else t['measured']} ({t['what']}) | "
          f"{'-' if t['met'] is None else ('yes' if t['met'] else 'NO')} |" for t in tg),
        "",
        "## Every configuration",
        "",
        detail(agg),
        "",
    ]
    steady = [r for r in doc["extra"] if r.get("event") == "steady" and r.get("kind") == "steady"]
    if steady:
        out += ["## Steady state (no events; `benchmarks/steady_state.py` model, ABBA rounds)", "",
                "| strategy | samples/s median [min-max] | ms per step |", "| --- | ---: | ---: |"]
        out += [f"| {r['strategy']} | {r['samples_per_s']:.0f} [{r['samples_per_s_min']:.0f}-{r['samples_per_s_max']:.0f}]"
                f" | {r['step_ms']:.1f} |" for r in steady]
        out.append("")
    pulls = [r for r in doc["extra"] if r.get("system") == "testbed" and r.get("event") == "pull"]
    if pulls:
        out += ["## State transfer on shaped links (`benchmarks/scale_out.py`, network namespaces)", "",
                "| state (MB) | sources | rates (Mbit/s) | multi (s) | single (s) | bound (s) | multi / bound | single / multi |",
                "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in pulls:
            out.append(f"| {r['state_mb']:.0f} | {r['sources']} | {', '.join(f'{x:g}' for x in r['rates_mbit'])} | "
                       f"{r['multi_s']:.2f} | {r['single_s']:.2f} | {r['bound_s']:.2f} | {r['ratio']:.2f} | {r['speedup']:.2f} |")
        out.append("")
    errors = [r for r in doc["records"] if r.get("event") == "error"]
    runs = [r for r in doc["records"] if r.get("event") == "run"]
    out += ["## Runs", ""]
    held = "held (identical replicas, every sample once per epoch)"
    out += [f"- {r['system']} n={r['nodes']} hidden={r['hidden']}: invariants "
            f"{held if r.get('invariants_ok') else 'BROKEN: ' + str(r.get('problems'))}" for r in runs]
    out += [f"- {r['system']} n={r['nodes']} hidden={r['hidden']}: FAILED: {r['error']}" for r in errors]
    if doc.get("plots"):
        out += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in doc["plots"]]
    return "\n".join(out) + "\n"


def plot(agg: list[dict[str, Any]], out: Path) -> list[str]:
    """Bar charts: scale-out (cold, warm) and survivors' idle by system and state size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    panels = [("join", "scale_out_cold_s", "scale-out, cold (s)"), ("join", "scale_out_warm_s", "scale-out, warm (s)"),
              ("join", "idle_sum_s", "survivors' idle, join (s)"), ("kill", "idle_sum_s", "survivors' idle, kill (s)")]
    nodes_at = _sweep_nodes(agg)
    sizes = sorted({r["state_mb"] for r in agg if r["event"] == "join" and r["nodes"] == nodes_at[r["state_mb"]]})
    systems = [s for s in SYSTEM_ORDER if any(r["system"] == s for r in agg)]
    if sizes and systems:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
        width = 0.8 / len(systems)
        for ax, (event, metric, title) in zip(axes, panels):
            for i, system in enumerate(systems):
                meds, los, his = [], [], []
                for mb in sizes:
                    st = _find(agg, system, event, metric, mb, nodes_at[mb])
                    meds.append(st["median"] if st else 0.0)
                    los.append(st["median"] - st["min"] if st else 0.0)
                    his.append(st["max"] - st["median"] if st else 0.0)
                xs = [j + (i - (len(systems) - 1) / 2) * width for j in range(len(sizes))]
                ax.bar(xs, meds, width, yerr=[los, his], label=system, capsize=2)
            ax.set_xticks(range(len(sizes)), [f"{mb} MB\n{nodes_at[mb]} proc." for mb in sizes])
            ax.set_title(title, fontsize=10)
            ax.set_yscale("symlog", linthresh=0.1)
        axes[0].legend(fontsize=7)
        fig.suptitle("median and min-max over repetitions")
        fig.tight_layout()
        path = out / "systems.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    return paths


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="headline configuration only (about 10 minutes)")
    mode.add_argument("--full", action="store_true", help="the sweep (state 13 MB to 1 GB, 2-8 processes, testbed)")
    mode.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                      help="only rebuild the markdown (and targets) from an earlier run's results.json")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default docs/results/bench_<mode>)")
    ap.add_argument("--markdown", type=Path, default=REPO / "BENCHMARKS.md", help="generated report (default %(default)s)")
    ap.add_argument("--systems", default=",".join(SYSTEM_ORDER), help="comma-separated subset (default: all)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every event (default 3)")
    ap.add_argument("--no-steady", action="store_true", help="skip the steady-state ddp comparison")
    ap.add_argument("--no-testbed", action="store_true", help="skip the shaped-link transfer runs")
    ap.add_argument("--no-membership", action="store_true", help="skip the membership decision times")
    ap.add_argument("--prefault-gib", type=float, default=8.0,
                    help="memory to fault in once before anything is timed (a VM backs guest pages lazily; "
                         "benchmarks/_machine.py); 0 skips (default %(default)s)")
    ap.add_argument("--merge", type=Path, metavar="RESULTS_JSON",
                    help="keep an earlier run's records of what this run does not measure (re-measure one system "
                         "after a fix: --systems torchft --no-steady --no-membership --no-testbed --merge ...)")
    args = ap.parse_args(argv)
    if args.render:
        doc = json.loads(args.render.read_text())
        doc["targets"] = targets(doc["aggregates"], doc["extra"])
        args.markdown.write_text(markdown(doc))
        print(f"wrote {args.markdown}")
        return 0
    plan = QUICK if args.quick else FULL
    chosen = set(args.systems.split(","))
    unknown = chosen - set(SYSTEM_ORDER)
    if unknown:
        ap.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEM_ORDER)}")
    # chaos-1src rides on the chaos jobs (its joiners in the same run)
    jobs = [j for j in plan.jobs if j.system in chosen or (j.single_source and "chaos-1src" in chosen)]
    for j in jobs:
        j.single_source = j.single_source and "chaos-1src" in chosen
    if args.reps:
        for j in jobs:
            j.reps = args.reps
    out = args.out or REPO / "docs" / "results" / f"bench_{plan.name}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    records: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    prefaulted = _machine.prefault(args.prefault_gib) if args.prefault_gib > 0 else {"gib": 0.0, "seconds": 0.0}
    say(f"memory faulted in: {prefaulted['gib']:.1f} GiB in {prefaulted['seconds']:.1f} s")

    def measured(what: str, fn: Callable[[], list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """One of the extra measurements; its failure loses only its own rows."""
        say(what)
        try:
            return fn()
        except Exception as exc:
            say(f"{what}: FAILED: {exc}")
            return []

    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as tmp:
        if plan.steady and not args.no_steady:
            # first, on a quiet machine: the ratio is the one figure here that
            # the previous job's exiting processes would skew
            extra += measured("steady state: chaos against ddp", lambda: run_steady(plan, Path(tmp) / "steady", say))
        for job in jobs:
            say(f"{job.label}: {job.reps} repetitions of {', '.join(job.events)}")
            records += [r for r in run_job(job, plan, Path(tmp), say)
                        if r.get("system") in chosen or r.get("event") in ("run", "error")]
        if plan.membership and not args.no_membership:
            extra += measured("membership decision times", lambda: run_membership(plan, say))
        if plan.scale_out and not args.no_testbed:
            extra += measured("state transfer on shaped links (namespace testbed)", lambda: run_scale_out(plan, say))
    plan_doc = {"name": plan.name, "jobs": [asdict(j) for j in jobs], "step_sleep": plan.step_sleep}
    wall_s = time.monotonic() - t0
    merged = None
    if args.merge:
        earlier = json.loads(args.merge.read_text())
        ran = {j.system for j in jobs} | ({"chaos-1src"} if any(j.single_source for j in jobs) else set())
        kinds = {e.get("system") for e in extra}  # steady, membership, testbed: measured again or not
        records = [r for r in earlier["records"] if r.get("system") not in ran] + records
        extra = [e for e in earlier["extra"] if e.get("system") not in kinds] + extra
        merged = {"from": str(args.merge), "earlier_wall_s": earlier["wall_s"], "remeasured": sorted(ran | kinds)}
        plan_doc, wall_s = earlier["plan"], earlier["wall_s"] + wall_s
    agg = aggregate(records)
    doc = {
        "plan": plan_doc,
        "machine": {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "prefaulted": prefaulted},
        "wall_s": wall_s, "merged": merged,
        "records": records, "extra": extra, "aggregates": agg,
    }
    doc["targets"] = targets(agg, extra)
    doc["plots"] = [os.path.relpath(p, args.markdown.parent) for p in plot(agg, out)]
    (out / "results.json").write_text(json.dumps(doc, indent=1, default=str))
    args.markdown.write_text(markdown(doc))
    print()
    print(headline(agg, round(_chaos.state_mb(BIG)), 4))
    print()
    for t in doc["targets"]:
        print(f"{'-' if t['met'] is None else 'MET ' if t['met'] else 'MISS'}  {t['target']}: {t['measured']} ({t['what']})")
    print(f"\nwrote {out / 'results.json'} and {args.markdown}")
    failed = [r for r in records if r.get("event") == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
