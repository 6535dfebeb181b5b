"""The chaos systems of the head-to-head benchmark: the strategy, its etcd
control plane and its single-source transfer, measured by scenario runs.

One :class:`chaos_lightning.scenario.runner.Runner` run per configuration
plays ``reps`` rounds of events on the scenario workload (the same MLP and
data the baselines train), and :func:`chaos_lightning.scenario.report.analyze`
turns the nodes' traces into the design's metrics.  A round is: a node joins
(scale-out), leaves gracefully (scale-in), another joins and is killed
(failure) and, with three members or more on the peer backend, the link
between the first and the last original member is cut and restored.  The
cluster is back to ``nodes`` before each event, and events are spaced so
that the previous one has settled.

The single-source baseline needs no run of its own: ``CHAOS_MAX_SOURCES``
matters only to the node that pulls, so with ``single_source`` each round of
a ``chaos`` run also has a joiner (``s<r>``) started with
``CHAOS_MAX_SOURCES=1``, whose join is recorded as ``chaos-1src`` (same
members, same state; one start-up of the cluster less).

Systems (DESIGN.md "Baselines"):

- ``chaos``: the strategy, peer rendezvous, pull from up to 8 members;
- ``chaos-etcd``: the same with the etcd rendezvous on a real etcd server
  (the central control plane);
- ``chaos-1src``: the same with ``CHAOS_MAX_SOURCES=1`` (single-source
  transfer, EDL/Horovod-like);
- ``chaos-stopfree``: the same with ``CHAOS_STOP_FREE_JOIN=1`` on every node
  (a joiner trains as a shadow while it pulls, docs/join.md).  Its warm and
  cold scale-out run to the step from which the joiner *contributes* (its
  shadow steps carry weight 0), not to its first step.

``measure(...)`` has the signature of every baseline module's; each record is
one event of one round.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from chaos_lightning.scenario import report as scenario_report
from chaos_lightning.scenario.runner import Runner, check_invariants
from chaos_lightning.scenario.timeline import parse

SYSTEMS = ("chaos", "chaos-etcd", "chaos-1src", "chaos-stopfree")
#: seconds from a join to the next event, by state size.  The runner holds
#: an event on a joiner until it trains (start-up is 5-9 s here), so this is
#: the settling time after its first step, for the step time and the
#: pull to be back to normal
_JOIN_GAP = {0: 2.0, 100: 3.0, 500: 6.0}
#: seconds after a leave, kill, cut or restore: each settles within 1.5 s at
#: 203 MB (event -> first step in the new view), and a following join's
#: process start-up takes 5-9 s more before it asks to join
_GAP = 2.5


def state_mb(hidden: int, dim: int = 32) -> float:
    """Parameters + Adam's two moments of the workload's MLP, in MB."""
    params = dim * hidden + hidden + hidden * hidden + hidden + hidden + 1
    return 12 * params / 1e6


def timeline(nodes: int, hidden: int, reps: int, step_sleep: float, events: tuple[str, ...],
             single_source: bool = False) -> str:
    """The scenario text: ``reps`` rounds of ``events`` (join, leave, kill, link),
    and with ``single_source`` a joiner ``s<r>`` per round (started with
    ``CHAOS_MAX_SOURCES=1`` by :func:`measure`) that joins and leaves."""
    gap_join = next(g for mb, g in sorted(_JOIN_GAP.items(), reverse=True) if state_mb(hidden) >= mb)
    lines = [f"set hidden {hidden}", f"set step_sleep {step_sleep}", "0 start " + " ".join(f"n{i}" for i in range(nodes))]
    t = 2.0
    for r in range(reps):
        if "join" in events or "leave" in events:
            lines.append(f"{t:g} join j{r}")
            t += gap_join
            lines.append(f"{t:g} leave j{r}")
            t += _GAP
        if single_source:
            lines.append(f"{t:g} join s{r}")
            t += gap_join
            lines.append(f"{t:g} leave s{r}")
            t += _GAP
        if "kill" in events:
            lines.append(f"{t:g} join k{r}")
            t += gap_join
            lines.append(f"{t:g} kill k{r}")
            t += _GAP
        if "link" in events and nodes >= 3:
            lines.append(f"{t:g} cut n0 n{nodes - 1}")
            t += _GAP
            lines.append(f"{t:g} restore n0 n{nodes - 1}")
            t += _GAP
    lines.append(f"{t:g} end")
    return "\n".join(lines) + "\n"


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def records(result: dict[str, Any], system: str, nodes: int, hidden: int,
            systems: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One record per event from a scenario report (the baselines' schema);
    ``systems`` names another system for the events of some nodes."""
    out = []
    rounds: dict[tuple[str, str], int] = {}
    for a in result.get("actions", []):
        action = a.get("action")
        event = {"join": "join", "leave": "leave", "kill": "kill", "cut": "link-down", "restore": "link-up"}.get(action)
        if event is None:
            continue
        name = (a.get("nodes") or [""])[0]
        system_of = (systems or {}).get(name, system)
        rep = rounds.get((system_of, event), 0)
        rounds[(system_of, event)] = rep + 1
        idle = a.get("survivor_idle") or {}
        rec: dict[str, Any] = {
            "system": system_of, "nodes": nodes, "state_mb": round(state_mb(hidden), 1), "hidden": hidden, "rep": rep,
            "event": event, "scale_out_cold_s": None, "scale_out_warm_s": None,
            "view_everywhere_s": _num((a.get("view_everywhere") or {}).get("s")),
            "first_step_s": _num((a.get("first_step") or {}).get("s")),
            "idle_sum_s": _num(idle.get("sum_s")), "idle_max_s": _num(idle.get("max_s")),
            "transfer_s": None, "transfer_mb": None, "samples_per_s": None, "notes": "",
        }
        reasons = [x.get("reason") for x in (a.get("view_everywhere"), a.get("first_step"), idle) if isinstance(x, dict)]
        if event == "join":
            so = (a.get("scale_out") or {}).get(name) or {}
            rec["scale_out_cold_s"], rec["scale_out_warm_s"] = _num(so.get("cold_s")), _num(so.get("warm_s"))
            shadow = so.get("shadow")
            if isinstance(shadow, dict):  # a stop-free join: scale-out ends when it contributes
                rec["scale_out_cold_s"] = _num(shadow.get("cold_contributes_s"))
                rec["scale_out_warm_s"] = _num(shadow.get("warm_contributes_s"))
                rec["shadow_steps"] = shadow.get("replayed")
                rec["first_shadow_step_warm_s"] = _num(so.get("warm_s"))
            pull = (a.get("pulls") or {}).get(name) or {}
            rec["transfer_s"] = _num(pull.get("seconds"))
            rec["transfer_mb"] = round(pull["bytes"] / 1e6, 1) if _num(pull.get("bytes")) else None
            rec["sources"] = len([s for s in pull.get("sources", []) if _num(s.get("bytes"))])
            reasons.append(so.get("reason"))
        rec["notes"] = "; ".join(sorted({r for r in reasons if r}))
        out.append(rec)
    return out


def measure(
    *, nodes: int, hidden: int, reps: int, step_sleep: float, workdir: Path, timeout: float, system: str = "chaos",
    events: tuple[str, ...] = ("join", "leave", "kill", "link"), quiet: bool = True, single_source: bool = False,
) -> list[dict[str, Any]]:
    """Run the scenario for ``system``; its event records, plus a ``run`` record
    (invariants, totals).  With ``single_source`` (``chaos`` only), also the
    ``chaos-1src`` joins of the same run.  ``timeout`` bounds the run (the
    runner's own waits are bounded too)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}: one of {SYSTEMS}")
    if single_source and system != "chaos":
        raise ValueError("single_source joins ride on a 'chaos' run")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if system == "chaos-etcd":
        events = tuple(e for e in events if e != "link")  # etcd sees no links: no link-down events
    text = timeline(nodes, hidden, reps, step_sleep, events, single_source)
    one_source = {f"s{r}": {"CHAOS_MAX_SOURCES": "1"} for r in range(reps)} if single_source else {}
    run_dir = workdir / f"{system}-n{nodes}-h{hidden}"
    env: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        if system == "chaos-etcd":
            from chaos_lightning.integrations.etcd.server import etcd_server

            env = {"CHAOS_BACKEND": "etcd", "CHAOS_ETCD_ENDPOINTS": stack.enter_context(etcd_server(workdir / "etcd"))}
        if system == "chaos-1src":
            env = {"CHAOS_MAX_SOURCES": "1"}
        if system == "chaos-stopfree":
            env = {"CHAOS_STOP_FREE_JOIN": "1"}
        out = io.StringIO() if quiet else sys.stdout
        Runner(parse(text, f"<{system} benchmark>"), run_dir, env=env, node_env=one_source, out=out).run()
    result = scenario_report.analyze(run_dir)
    recs = records(result, system, nodes, hidden, {name: "chaos-1src" for name in one_source})
    inv = check_invariants(run_dir)
    recs.append({
        "system": system, "nodes": nodes, "state_mb": round(state_mb(hidden), 1), "hidden": hidden, "event": "run",
        "invariants_ok": not inv["problems"], "problems": inv["problems"], "totals": result.get("totals"),
        "run_dir": str(run_dir),
    })
    return recs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="chaos", choices=SYSTEMS)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.03)
    p.add_argument("--events", default="join,leave,kill,link")
    p.add_argument("--single-source", action="store_true", help="with --system chaos: also single-source joiners")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="chaos-bench-") as tmp:
        recs = measure(nodes=args.nodes, hidden=args.hidden, reps=args.reps, step_sleep=args.step_sleep,
                       workdir=Path(tmp), timeout=600, system=args.system, events=tuple(args.events.split(",")),
                       quiet=False, single_source=args.single_source)
    for r in recs:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
