"""A scenario run's measurements: the design's metrics from the nodes' traces.

Role in the whole: the scenario runner starts the nodes, plays the timeline
and leaves a run directory; this module reads it back and computes what
DESIGN.md ("How performance is measured") defines, per action and for the
whole run, as a JSON document, a terminal table and a PNG.  It reads files
only: it never talks to a node, so a report can be recomputed from an old run.

Inputs (``RUN/``): ``trace/<name>.jsonl`` (one per node, written by
:mod:`chaos_lightning.strategy.trace`), ``actions.jsonl`` (what the runner did
and when, its first record ``training_started`` giving the time origin) and,
on the namespace testbed, ``links.json`` (the shaped link rates).

How the design's definitions are read here (the reasons are in the functions
that compute them):

- a global step is counted once, at the earliest time any node recorded it;
- *view everywhere*: the first view epoch ``E`` committed after the action
  that reflects it (``leave``/``kill``/``stop`` X: X not a member; ``join`` X:
  X a member; ``cut`` A B: the pair down; ``restore``: the pair not down),
  (``partition``: every pair across the groups down or one end removed;
  ``heal``: every node of both groups a member and no pair across down;
  ``restart`` X: X a member again after a view without its old slot), and
  the time the last live member of ``E`` recorded a view of epoch >= ``E``
  (a member that never recorded ``E`` itself knew of the change when it
  learned a later one).  ``E`` must be newer than every view recorded before
  the action, and first recorded before the next action on the same nodes
  (for a ``stop`` that is its ``cont``: no such view is "not detected"); a
  member of ``E`` that is killed or leaves later, or whose trace is cut
  short, without recording it is listed under ``excluded``, not waited for;
- *first step*: the trainers of the first group of epoch >= ``E``; the time the
  last of them completed a step after switching into it;
- *survivor idle*: per trainer of that group that was training before (not
  the node joining, leaving, killed or stopped, not a sidelined node; the end
  of a cut link that keeps training is a survivor): its first step in the new
  group minus its last step before switching into it, minus its median step
  interval (a join: over the 10 steps from that first one on, in the new
  group, since the steps before ran beside the joiner's start-up; else over
  the 10 steps before; ``baseline`` says which), floored at 0; for an
  undetected stop, each other trainer's first step after the action minus
  its last before;
- *phase* of a ``kill`` (and a ``restart``, a kill too): what the cluster
  was doing at the kill instant, from the markers the scenario workload
  writes with ``set val_every``/``set ckpt_every``: ``checkpoint`` when a
  node (the victim or a survivor) was between ``ckpt_start`` and
  ``ckpt_end``, else ``validation`` between ``val_start`` and ``val_end``,
  else ``step`` (training).  A marker with no end lasts to the process's
  end: the action that killed, restarted or let it leave, else its last
  record.  A save wins over a validation: it is the shorter window, and the
  one a kill lands in less often.  With markers, the idle and the first
  step also come *net* of the survivors' own validations and saves in
  their gap (each counted at its normal length, the median of that node's
  runs, so what a kill adds to a validation still counts): a survivor
  validating when a member dies idles through its validation either way;
- *scale-out*: the joiner's ``proc_start`` (cold) or ``join_request`` (warm)
  to its first step, and where the warm part went (``breakdown``: admission
  to the view, the group formed around it, the pull, the load, the first
  step); *transfer bound*: pull bytes / min(joiner downlink, sum
  of the sources' uplinks) with the rates of ``links.json`` and the
  ``throttle`` actions before the pull, in bits per second as the timeline's
  rates (``20mbit`` -> 20e6).

Every time in the result is seconds since training started (the first
committed step), every duration seconds; a value that cannot be computed is
``None`` next to a ``reason`` string, and unreadable input lines are skipped
and listed in ``warnings``.  Nothing here raises on a bad run directory.

    python -m chaos_lightning.scenario.report RUN   # writes RUN/report.json, RUN/timeline.png
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

SCHEMA = "chaos_lightning.scenario.report/1"
#: a gap between consecutive committed steps longer than this many median
#: step intervals is a stall (the scenario runner's definition; a factor, not
#: seconds, so it holds for any model and machine)
STALL_FACTOR = 3.0
#: the normal step time is the median interval over this many steps before
NORMAL_STEPS = 10
#: actions that change the cluster and get the event metrics
EVENTS = ("join", "leave", "kill", "stop", "cut", "restore", "partition", "heal", "restart")
#: actions that only mark the timeline (no row in the table)
MARKERS = ("start", "end", "cont")
_DIGITS = 6  # output rounding: microseconds
#: what a node does besides training, by the scenario workload's trace
#: markers (start, end); the first that holds at an instant names the phase
PHASES = {"checkpoint": ("ckpt_start", "ckpt_end"), "validation": ("val_start", "val_end")}
#: actions that kill a process, and get a phase
KILLS = ("kill", "restart")
#: a node's own runs of a phase that make its normal length (fewer: every node's)
NORMAL_RUNS = 3


# -- reading the run directory --------------------------------------------------------------------


@dataclass
class _Node:
    """One node's trace: records sorted by time, indexed by event."""

    name: str
    records: list[dict] = field(default_factory=list)
    members: list[str] = field(default_factory=list)  # member ids seen in its records

    def of(self, ev: str) -> list[dict]:
        return [r for r in self.records if r["ev"] == ev]

    def first(self, ev: str, after: float = -math.inf, pred: Callable[[dict], bool] | None = None) -> dict | None:
        for r in self.records:
            if r["ev"] == ev and r["t"] >= after and (pred is None or pred(r)):
                return r
        return None

    def last(self, ev: str, before: float, pred: Callable[[dict], bool] | None = None) -> dict | None:
        found = None
        for r in self.records:
            if r["t"] > before:
                break
            if r["ev"] == ev and (pred is None or pred(r)):
                found = r
        return found

    @property
    def ending(self) -> str | None:
        """``done`` or ``left`` when the trace ends normally, None when it is cut short (killed)."""
        for r in reversed(self.records):
            if r["ev"] in ("done", "left"):
                return r["ev"]
        return None


@dataclass
class _Run:
    run_dir: Path
    nodes: dict[str, _Node]
    actions: list[dict]
    origin: float
    links: dict | None
    warnings: list[str]
    member_names: dict[str, str]
    #: name -> phase -> (start, end, normal length, ended) of each run of it (:func:`_spans`)
    spans: dict[str, dict[str, list[tuple[float, float, float, bool]]]] = field(default_factory=dict)

    def name_of(self, member: str) -> str | None:
        return self.member_names.get(member)

    def rel(self, t: float) -> float:
        return _r(t - self.origin)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), _DIGITS)


def _num(x: Any) -> float | None:
    """A JSON number (not a bool), else None: a record's field may be missing or mistyped."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _whole(x: float) -> float | int:
    return int(x) if float(x).is_integer() else _r(x)


def _ids(x: Any) -> list[str]:
    """A list of member ids; anything else reads as empty."""
    return [str(m) for m in x if isinstance(m, (str, int))] if isinstance(x, list) else []


def _read_jsonl(path: Path, warnings: list[str], required: tuple[str, ...]) -> list[dict]:
    out: list[dict] = []
    bad: list[int] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        warnings.append(f"{path.name}: unreadable ({exc})")
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad.append(lineno)
            continue
        if (not isinstance(rec, dict) or not isinstance(rec.get("t"), (int, float))
                or any(not isinstance(rec.get(k), str) for k in required)):
            bad.append(lineno)
            continue
        rec["t"] = float(rec["t"])
        out.append(rec)
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        warnings.append(f"{path.parent.name}/{path.name}: skipped {len(bad)} unparsable line(s) (line {shown})")
    return out


def _load(run_dir: Path) -> _Run:
    warnings: list[str] = []
    nodes: dict[str, _Node] = {}
    trace_dir = run_dir / "trace"
    if not trace_dir.is_dir():
        warnings.append(f"no trace directory {trace_dir}")
    else:
        for path in sorted(trace_dir.glob("*.jsonl")):
            recs = _read_jsonl(path, warnings, ("ev",))
            recs.sort(key=lambda r: r["t"])  # stable: a node's records keep their order on ties
            node = _Node(path.stem, recs)
            for r in recs:
                m = r.get("node")
                if isinstance(m, str) and m and m not in node.members:
                    node.members.append(m)
            nodes[node.name] = node
            if not recs:
                warnings.append(f"trace/{path.name}: no records")

    actions: list[dict] = []
    origin: float | None = None
    path = run_dir / "actions.jsonl"
    if not path.exists():
        warnings.append("no actions.jsonl: no per-action metrics")
    else:
        for rec in _read_jsonl(path, warnings, ("action",)):
            if rec["action"] == "training_started":
                origin = rec["t"] if origin is None else origin
                continue
            rec["nodes"] = [str(n) for n in rec["nodes"]] if isinstance(rec.get("nodes"), list) else []
            if not isinstance(rec.get("members"), dict):
                rec["members"] = {}
            actions.append(rec)
    actions.sort(key=lambda a: a["t"])

    member_names: dict[str, str] = {}
    for a in actions:  # the runner's view first, the traces' own ids win on conflict
        for name, m in a["members"].items():
            if isinstance(m, str) and m:
                member_names[m] = str(name)
    for node in nodes.values():
        for m in node.members:
            if member_names.get(m, node.name) != node.name:
                warnings.append(f"member id {m} is {member_names[m]} in actions.jsonl but in trace/{node.name}.jsonl")
            member_names[m] = node.name

    if origin is None:
        steps = [r["t"] for n in nodes.values() for r in n.records if r["ev"] == "step"]
        origin = min(steps) if steps else (actions[0]["t"] if actions else 0.0)
        warnings.append("no training_started record in actions.jsonl: time origin is the first step record")

    links = None
    lpath = run_dir / "links.json"
    if lpath.exists():
        try:
            links = json.loads(lpath.read_text(encoding="utf-8"))
            if not isinstance(links, dict) or not isinstance(links.get("nodes"), dict):
                raise ValueError("no 'nodes' object")
        except ValueError as exc:
            warnings.append(f"links.json unreadable ({exc}): no transfer bounds")
            links = None
    run = _Run(run_dir, nodes, actions, origin, links, warnings, member_names)
    run.spans = _spans(run)
    return run


# -- the cluster's timeline -----------------------------------------------------------------------


def _global_steps(run: _Run) -> list[dict]:
    """Each committed global step once, at the earliest time a node recorded it, in time order."""
    first: dict[int, dict] = {}
    for node in run.nodes.values():
        for r in node.records:
            if r["ev"] != "step" or not isinstance(r.get("step"), int):
                continue
            seen = first.get(r["step"])
            if seen is None or r["t"] < seen["t"]:
                first[r["step"]] = r
    return sorted(first.values(), key=lambda r: r["t"])


def _intervals(ts: list[float]) -> list[float]:
    return [b - a for a, b in zip(ts, ts[1:])]


def _series(run: _Run, steps: list[dict], bin_s: float) -> tuple[dict, list[dict], float | None]:
    if not steps:
        return ({"throughput": {"bin_s": bin_s, "t": [], "samples_per_s": []}, "world": {"t": [], "world": []}},
                [], None)
    rel = [s["t"] - run.origin for s in steps]
    lo = min(0, math.floor(rel[0] / bin_s))
    hi = math.floor(rel[-1] / bin_s)
    samples = [0.0] * (hi - lo + 1)
    for s, x in zip(steps, rel):
        samples[math.floor(x / bin_s) - lo] += _num(s.get("samples")) or 0.0
    throughput = {
        "bin_s": bin_s,
        "t": [_r((lo + i) * bin_s) for i in range(len(samples))],
        "samples_per_s": [_r(v / bin_s) for v in samples],
    }
    wt: list[float] = []
    ww: list[int] = []
    for s, x in zip(steps, rel):
        w = s.get("world")
        if isinstance(w, int) and not isinstance(w, bool) and (not ww or ww[-1] != w):
            wt.append(_r(x))
            ww.append(w)
    if ww and wt[-1] != _r(rel[-1]):  # the step plot runs to the last step
        wt.append(_r(rel[-1]))
        ww.append(ww[-1])

    gaps = _intervals([s["t"] for s in steps])
    median = statistics.median(gaps) if gaps else None
    stalls = []
    if median:
        for a, b in zip(steps, steps[1:]):
            if b["t"] - a["t"] > STALL_FACTOR * median:
                stalls.append({"start": run.rel(a["t"]), "end": run.rel(b["t"]), "duration_s": _r(b["t"] - a["t"]),
                               "after_step": a["step"], "next_step": b["step"]})
    return {"throughput": throughput, "world": {"t": wt, "world": ww}}, stalls, median


# -- what the nodes were doing besides training ---------------------------------------------------


def _runs(run: _Run, node: _Node, begin: str, end: str) -> list[tuple[float, float, bool]]:
    """The node's runs from a ``begin`` to an ``end`` record: ``(start, end,
    ended)``.  Paired within one process (``pid``: a restart writes on in
    the same file); a run with no end (``ended`` false) lasts to the action
    that killed, restarted or let the process leave, else to its last record."""
    runs: list[tuple[float, float, bool]] = []
    open_at: float | None = None
    last_t = -math.inf
    pid = None

    def close_open() -> None:
        if open_at is not None:
            gone = next((a["t"] for a in run.actions if a["t"] >= open_at and a["action"] in ("kill", "restart", "leave")
                         and node.name in a["nodes"]), None)
            runs.append((open_at, gone if gone is not None else last_t, False))

    for r in node.records:
        if r.get("pid") != pid:
            close_open()
            open_at, pid = None, r.get("pid")
        if r["ev"] == begin and open_at is None:
            open_at = r["t"]
        elif r["ev"] == end and open_at is not None:
            runs.append((open_at, r["t"], True))
            open_at = None
        last_t = r["t"]
    close_open()
    return runs


def _spans(run: _Run) -> dict[str, dict[str, list[tuple[float, float, float, bool]]]]:
    """Per node and phase (:data:`PHASES`), each run of it: ``(start, end,
    normal, ended)`` (:func:`_runs`).  ``normal`` is the length the run
    would have had without an event: the median of the node's complete runs
    of that phase with at least :data:`NORMAL_RUNS` of them (one run that an
    event lengthened is then outvoted), else the median over every node's
    (they validate and save the same), else the run's own length."""
    raw = {name: {phase: _runs(run, node, *marks) for phase, marks in PHASES.items()} for name, node in run.nodes.items()}
    everyone = {phase: [e - b for per in raw.values() for b, e, done in per[phase] if done] for phase in PHASES}
    out: dict[str, dict[str, list[tuple[float, float, float, bool]]]] = {}
    for name, per in raw.items():
        out[name] = {}
        for phase, runs in per.items():
            own = [e - b for b, e, done in runs if done]
            pool = own if len(own) >= NORMAL_RUNS else everyone[phase]
            normal = statistics.median(pool) if pool else None
            if runs:
                out[name][phase] = [(b, e, normal if normal is not None else e - b, done) for b, e, done in runs]
    return out


def _phase_at(run: _Run, name: str, t: float) -> tuple[str, float | None]:
    """What ``name`` was doing at ``t``: a phase of :data:`PHASES` and since
    when, else ``("step", None)``."""
    for phase in PHASES:
        for b, e, _, ended in run.spans.get(name, {}).get(phase, ()):
            if b <= t < e or (not ended and b <= t <= e):  # a process killed in it was in it at its kill
                return phase, b
    return "step", None


def _phase(run: _Run, act: dict) -> dict:
    """The phase of a kill: what the cluster was doing at the kill instant
    (module docstring), from the traces of every node alive then (one with
    a record before the kill and one after it, or the victim)."""
    t = act["t"]
    per_node: dict[str, str] = {}
    since: dict[str, float] = {}
    for name, node in run.nodes.items():
        if not node.records or node.records[0]["t"] > t:
            continue
        if name not in act["nodes"] and node.records[-1]["t"] < t:
            continue  # gone before the kill
        per_node[name], b = _phase_at(run, name, t)
        if b is not None:
            since[name] = b
    phase = next((p for p in PHASES if p in per_node.values()), "step")
    if phase == "step":
        last = [r["t"] for n in per_node for r in [run.nodes[n].last("step", t)] if r is not None]
        began = max(last) if last else None  # the step in progress began when the last one ended
    else:
        began = min(since[n] for n, p in per_node.items() if p == phase)
    return {"phase": phase, "per_node": per_node, "since_s": None if began is None else _r(t - began)}


def _work(run: _Run, name: str, a: float, b: float) -> float:
    """Seconds of ``name``'s validations and saves inside ``[a, b]``, each
    at its normal length from its start: the node's own scheduled work in
    a gap, not time a membership event cost it."""
    total = 0.0
    for runs in run.spans.get(name, {}).values():
        for start, _, normal, _ in runs:
            total += max(0.0, min(b, start + normal) - max(a, start))
    return total


# -- one action -----------------------------------------------------------------------------------


def _pair(a: str, b: str) -> frozenset:
    return frozenset((a, b))


def _down(view: dict) -> set[frozenset]:
    out = set()
    links = view.get("down_links")
    for link in links if isinstance(links, list) else []:
        if isinstance(link, list) and len(link) == 2:
            out.add(_pair(str(link[0]), str(link[1])))
    return out


def _member_ids(run: _Run, act: dict) -> tuple[dict[str, str], str | None]:
    """name -> member id for the action's nodes (the runner's map, else the node's own trace)."""
    ids: dict[str, str] = {}
    for name in act["nodes"]:
        m = act["members"].get(name)
        if not m and name in run.nodes and run.nodes[name].members:
            m = run.nodes[name].members[0]
        if not isinstance(m, str) or not m:
            return ids, f"member id of {name} unknown (not in the action's members, no id in its trace)"
        ids[name] = m
    return ids, None


def _reflects(action: str, ids: list[str], groups: list[list[str]] | None = None) -> Callable[[dict], bool]:
    if action in ("partition", "heal"):
        a, b = groups or ([], [])
        cross = [_pair(x, y) for x in a for y in b]

        def split(v: dict) -> bool:
            members, down = set(_ids(v.get("members"))), _down(v)
            return all(p in down or not p <= members for p in cross)

        def healed(v: dict) -> bool:
            members, down = set(_ids(v.get("members"))), _down(v)
            return set(a) | set(b) <= members and not any(p in down for p in cross)

        return split if action == "partition" else healed
    if action in ("join", "restart"):
        return lambda v: all(m in _ids(v.get("members")) for m in ids)
    if action in ("leave", "kill", "stop"):
        return lambda v: all(m not in _ids(v.get("members")) for m in ids)
    pair = _pair(*ids)
    if action == "cut":
        return lambda v: pair in _down(v)
    return lambda v: pair not in _down(v)  # restore


def _window_end(run: _Run, act: dict) -> float:
    """The next action on any of this action's nodes (or the run's end): a view after it answers that one."""
    names = set(act["nodes"])
    for a in run.actions:
        if a["t"] > act["t"] and (a["action"] == "end" or names & set(a["nodes"])):
            return a["t"]
    return math.inf


def _gone(run: _Run, name: str, since: float) -> str | None:
    """Why ``name`` may never record what we wait for: a later kill/leave, or a trace cut short."""
    for a in run.actions:
        if a["t"] >= since and a["action"] in ("kill", "leave", "restart") and name in a["nodes"]:
            return f"{a['action']} at {run.rel(a['t'])} s"
    node = run.nodes.get(name)
    if node is not None and node.records and node.ending is None:
        return f"trace ends at {run.rel(node.records[-1]['t'])} s without done (killed?)"
    return None


def _view_everywhere(run: _Run, act: dict, ids: dict[str, str]) -> dict:
    """(a) of the event handling latency: the action to its view committed at every live member."""
    cell: dict[str, Any] = {"s": None, "epoch": None, "last_node": None, "per_node": {}, "excluded": {}, "reason": None}
    t0 = act["t"]
    views = sorted((r for n in run.nodes.values() for r in n.records
                    if r["ev"] == "view_committed" and isinstance(r.get("epoch"), int)), key=lambda r: r["t"])
    groups = [[ids.get(n, n) for n in g] for g in act.get("groups") or []] or None
    reflects = _reflects(act["action"], list(ids.values()), groups)
    before = [v for v in views if v["t"] < t0]
    current = max(before, key=lambda v: v["epoch"]) if before else None
    if act["action"] == "restart":  # the old slot goes first: the view without it is the floor
        gone = [v for v in views if v["t"] >= t0 and (current is None or v["epoch"] > current["epoch"])
                and not all(m in _ids(v.get("members")) for m in ids.values())]
        current = min(gone, key=lambda v: v["epoch"]) if gone else current
        if not gone:
            cell["reason"] = "no view without the old process's slot was committed"
            return cell
    if current is not None and reflects(current):
        cell["reason"] = f"already reflected in the view of epoch {current['epoch']} before the action"
        return cell
    floor = current["epoch"] if current is not None else -math.inf
    end = _window_end(run, act)
    found = [v for v in views if t0 <= v["t"] < end and v["epoch"] > floor and reflects(v)]
    if not found:
        if act["action"] == "stop":
            cell["reason"] = "not detected"
        else:
            cell["reason"] = "no view reflecting the change was committed" + (
                f" before the next action on {', '.join(act['nodes'])} at {run.rel(end)} s" if end < math.inf else "")
        return cell
    epoch = min(v["epoch"] for v in found)
    first = min((v for v in found if v["epoch"] == epoch), key=lambda v: v["t"])
    members = _ids(first.get("members"))
    cell["epoch"] = epoch
    cell["members"] = [run.name_of(m) or m for m in members]
    times: dict[str, float] = {}
    for m in members:
        name = run.name_of(m)
        node = run.nodes.get(name) if name else None
        if node is None:
            cell["reason"] = f"member {m} of epoch {epoch} has no trace"
            return cell
        rec = node.first("view_committed", after=t0, pred=lambda v: isinstance(v.get("epoch"), int) and v["epoch"] >= epoch)
        if rec is not None:
            times[name] = rec["t"]
            continue
        why = _gone(run, name, t0)
        if why is None:
            cell["reason"] = f"{name} recorded no view of epoch >= {epoch}"
            return cell
        cell["excluded"][name] = why
    if not times:
        cell["reason"] = f"no live member of epoch {epoch} recorded it"
        return cell
    last = max(times, key=lambda n: times[n])
    cell.update(s=_r(times[last] - t0), last_node=last, per_node={n: _r(t - t0) for n, t in times.items()})
    return cell


def _new_group(run: _Run, act: dict, epoch: int) -> tuple[dict[str, dict], dict | None, str | None]:
    """The first trainers group of epoch >= ``epoch``: each trainer's own switch record into it."""
    t0 = act["t"]
    recs = sorted((r for n in run.nodes.values() for r in n.records
                   if r["ev"] == "trainers" and isinstance(r.get("epoch"), int) and r["epoch"] >= epoch and r["t"] >= t0),
                  key=lambda r: (r["epoch"], r["t"]))
    if not recs:
        return {}, None, f"no node recorded a trainers group of epoch >= {epoch}"
    group = recs[0]
    switches: dict[str, dict] = {}
    for m in _ids(group.get("trainers")):
        name = run.name_of(m)
        node = run.nodes.get(name) if name else None
        if node is None:
            return {}, group, f"trainer {m} of epoch {group['epoch']} has no trace"
        rec = node.first("trainers", after=t0, pred=lambda r: isinstance(r.get("epoch"), int) and r["epoch"] >= epoch)
        if rec is not None:
            switches[name] = rec
    return switches, group, None


def _first_step(run: _Run, act: dict, view: dict) -> tuple[dict, dict[str, dict]]:
    """(b) of the event handling latency: the action to the last live trainer's first step in the new group."""
    cell: dict[str, Any] = {"s": None, "epoch": None, "last_node": None, "per_node": {}, "switch_stall_s": {},
                            "excluded": {}, "reason": None}
    if view["epoch"] is None:
        cell["reason"] = view["reason"]
        return cell, {}
    t0 = act["t"]
    switches, group, why = _new_group(run, act, view["epoch"])
    if why is not None:
        cell["reason"] = why
        return cell, {}
    cell["epoch"] = group["epoch"]
    cell["trainers"] = [run.name_of(m) or m for m in _ids(group.get("trainers"))]
    times: dict[str, float] = {}
    for name in cell["trainers"]:
        rec = switches.get(name)
        step = run.nodes[name].first("step", after=rec["t"]) if rec is not None else None
        if step is not None:
            times[name] = step["t"]
            if _num(rec.get("stall_s")) is not None:
                cell["switch_stall_s"][name] = _r(rec["stall_s"])
            continue
        gone = _gone(run, name, t0)
        if gone is None:
            cell["reason"] = f"{name} has no step after switching into epoch >= {view['epoch']}" if rec is not None \
                else f"{name} has no trainers record of epoch >= {view['epoch']}"
            return cell, switches
        cell["excluded"][name] = gone
    if not times:
        cell["reason"] = f"no trainer of epoch {group['epoch']} completed a step"
        return cell, switches
    last = max(times, key=lambda n: times[n])
    cell.update(s=_r(times[last] - t0), last_node=last, per_node={n: _r(t - t0) for n, t in times.items()})
    if any(run.spans.values()):  # net of each trainer's own validations and saves since the event
        cell["net_s"] = _r(max(max(0.0, t - t0 - _work(run, n, t0, t)) for n, t in times.items()))
    return cell, switches


def _normal_step(node: _Node, last: dict) -> float | None:
    ts = [r["t"] for r in node.records if r["ev"] == "step" and r["t"] <= last["t"]][-(NORMAL_STEPS + 1):]
    gaps = _intervals(ts)
    return statistics.median(gaps) if gaps else None


def _normal_after(node: _Node, first: dict, until: float) -> float | None:
    """Median of up to ``NORMAL_STEPS`` step intervals from ``first`` on,
    before ``until`` (the next action); None with fewer than 3."""
    ts = [r["t"] for r in node.records if r["ev"] == "step" and first["t"] <= r["t"] < until][: NORMAL_STEPS + 1]
    gaps = _intervals(ts)
    return statistics.median(gaps) if len(gaps) >= 3 else None


def _was_training(node: _Node, before: float) -> bool:
    """Stepped before ``before`` and not sidelined since its last step."""
    step = node.last("step", before)
    if step is None:
        return False
    side = node.last("sidelined", before)
    return side is None or side["t"] < step["t"]


def _survivor_idle(run: _Run, act: dict, view: dict, first: dict, switches: dict[str, dict]) -> dict:
    """Survivor idle time: per surviving trainer, its gap in stepping around the switch minus one normal step.

    The gap runs from the last step before the node switched into the new
    group (not before the action: around a join or a graceful leave the
    survivors go on training until the step boundary where they switch) to its
    first step in that group.  With no new view (an undetected stop) it runs
    from the last step before the action to the first after it.
    """
    cell: dict[str, Any] = {"sum_s": None, "max_s": None, "max_node": None, "per_node": {}, "normal_step_s": {},
                            "reason": None}
    t0 = act["t"]
    # the subject of a join/leave/kill/stop is no survivor; both ends of a cut link stay members, and the
    # one kept training is one (the sidelined end is ruled out below, as it was not training)
    own = set() if act["action"] in ("cut", "restore", "partition", "heal") else set(act["nodes"])
    spans: dict[str, tuple[dict, dict]] = {}  # name -> (last step before, first step after)
    if first["epoch"] is not None:
        for name in first["trainers"]:
            rec = switches.get(name)
            if name in own or name in first["excluded"] or rec is None:
                continue
            node = run.nodes[name]
            if not _was_training(node, min(t0, rec["t"])) or not _was_training(node, rec["t"]):
                continue  # a joiner or a sidelined node coming back: not a survivor
            before = node.last("step", rec["t"])
            after = node.first("step", after=rec["t"])
            if after is None:
                cell["reason"] = f"{name} has no step after the switch"
                return cell
            spans[name] = (before, after)
    elif view["reason"] == "not detected":
        for name, node in run.nodes.items():
            if name in own:
                continue
            group = node.last("trainers", t0)
            if group is None or not _was_training(node, t0) or node.last("step", t0)["t"] < group["t"]:
                continue
            before = node.last("step", t0)
            after = node.first("step", after=t0 + 1e-9)
            if after is None:
                if _gone(run, name, t0) is None:
                    cell["reason"] = f"{name} has no step after the action"
                    return cell
                continue
            spans[name] = (before, after)
    else:
        cell["reason"] = first["reason"]
        return cell
    if not spans:
        cell["reason"] = "no surviving trainer"
        return cell
    idle: dict[str, float] = {}
    # A join's baseline is the survivor's steps in the new group, after its
    # first one: the steps before it ran beside the joiner's start-up
    # (imports, model build: 5-9 s of CPU on this 2-core machine), which
    # slowed them and so shrank the idle; the steps after are the world the
    # survivor trains in now.  Every other event: the steps before it.  The
    # baselines of benchmarks/_torchft.py and _ckpt_restart.py follow the
    # same rule (issue 13).
    until = min((a["t"] for a in run.actions if a["t"] > t0), default=math.inf)
    cell["baseline"] = "after" if act["action"] == "join" else "before"
    for name, (before, after) in spans.items():
        node = run.nodes[name]
        normal = _normal_after(node, after, until) if act["action"] == "join" else None
        if normal is None:
            if act["action"] == "join":
                cell["baseline"] = "before"  # too few steps in the new group before the next action
            normal = _normal_step(node, before)
        if normal is None:
            cell["reason"] = f"{name} has too few steps before the event for a normal step time"
            return cell
        cell["normal_step_s"][name] = _r(normal)
        idle[name] = max(0.0, after["t"] - before["t"] - normal)
    worst = max(idle, key=lambda n: idle[n])
    cell.update(per_node={n: _r(v) for n, v in idle.items()}, sum_s=_r(sum(idle.values())), max_s=_r(idle[worst]),
                max_node=worst)
    if any(run.spans.values()):  # net of each survivor's own validations and saves in its gap
        work = {n: _work(run, n, before["t"], after["t"]) for n, (before, after) in spans.items()}
        net = {n: max(0.0, idle[n] - work[n]) for n in idle}
        cell.update(work_s={n: _r(v) for n, v in work.items()}, net_per_node={n: _r(v) for n, v in net.items()},
                    net_max_s=_r(max(net.values())))
    return cell


def _rates(run: _Run, until: float) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Per node ``down_bps``/``up_bps`` from links.json, capped by the throttle actions before ``until``."""
    rates: dict[str, dict[str, float]] = {}
    for name, r in ((run.links or {}).get("nodes") or {}).items():
        if isinstance(r, dict):
            rates[name] = {k: _num(r[k]) for k in ("down_bps", "up_bps") if _num(r.get(k))}
    applied = []
    for a in run.actions:
        if a["action"] == "throttle" and a["t"] <= until and _num(a.get("rate_bps")):
            for name in a["nodes"]:  # a throttle shapes the node's link, both directions
                rates[name] = {"down_bps": float(a["rate_bps"]), "up_bps": float(a["rate_bps"])}
                applied.append(f"throttle {name} at {run.rel(a['t'])} s")
    return rates, applied


def _pull(run: _Run, name: str, rec: dict) -> dict:
    """A state pull, its rate, and its ratio to the design's transfer bound."""
    nbytes, secs = _num(rec.get("bytes")), _num(rec.get("seconds"))
    cell: dict[str, Any] = {"t": run.rel(rec["t"]), "bytes": None if nbytes is None else int(nbytes), "seconds": _r(secs),
                            "mb_per_s": None,
                            "sources": [], "bound_s": None, "ratio": None, "rates_bps": None, "reason": None,
                            "bound_reason": None}
    ok = nbytes is not None and secs is not None
    if not ok:
        cell["reason"] = "pull record without bytes/seconds"
    elif secs > 0:
        cell["mb_per_s"] = _r(nbytes / secs / 1e6)
    sources = rec.get("sources")
    for src in sources if isinstance(sources, list) else []:
        if isinstance(src, dict) and isinstance(src.get("node"), str):
            m = src["node"]
            cell["sources"].append({"node": run.name_of(m) or m, "member": m, "bytes": _num(src.get("bytes")),
                                    "seconds": _num(src.get("seconds"))})
    if not ok:
        cell["bound_reason"] = cell["reason"]
        return cell
    rates, applied = _rates(run, rec["t"])
    if not rates:
        cell["bound_reason"] = "no link rates (no links.json: loopback)"
        return cell
    down = rates.get(name, {}).get("down_bps")
    ups = {s["node"]: rates.get(s["node"], {}).get("up_bps") for s in cell["sources"]}
    missing = ([f"{name} down"] if down is None else []) + [f"{s} up" for s, u in ups.items() if u is None]
    if not ups:
        cell["bound_reason"] = "pull record lists no sources"
    elif missing:
        cell["bound_reason"] = "no rate for " + ", ".join(missing)
    else:
        limit = min(down, sum(ups.values()))
        bound = nbytes * 8 / limit  # rates are bits per second, as the timeline's (20mbit -> 20e6)
        cell.update(bound_s=_r(bound), ratio=_r(secs / bound) if bound > 0 else None,
                    rates_bps={"joiner_down": down, "sources_up": ups, "limit": limit, "throttles": applied})
    return cell


def _scale_out(run: _Run, name: str, act: dict) -> tuple[dict, dict | None]:
    """Scale-out delay (cold: process start; warm: join request) to the joiner's first step, and its pull."""
    cell: dict[str, Any] = {"cold_s": None, "warm_s": None, "first_step": None, "reason": None}
    node = run.nodes.get(name)
    if node is None or not node.records:
        cell["reason"] = f"no trace for {name}"
        return cell, {"reason": cell["reason"]}
    reasons = []
    group = node.first("trainers", after=act["t"], pred=lambda r: r.get("joined") is True)
    group = group or node.first("trainers", after=act["t"])
    step = node.first("step", after=group["t"]) if group is not None else None
    if step is None:
        gone = _gone(run, name, act["t"])
        reasons.append(f"{name} completed no step" + (f" ({gone})" if gone else ""))
    else:
        cell["first_step"] = run.rel(step["t"])
        start = node.first("start", after=act["t"]) or node.first("start")
        if start is None:
            reasons.append("no start record")
        elif _num(start.get("proc_start")) is None:
            reasons.append("start record has no proc_start")
        else:
            cell["cold_s"] = _r(step["t"] - start["proc_start"])
        request = node.first("join_request", after=act["t"]) or node.first("join_request")
        if request is None:
            reasons.append("no join_request record")
        else:
            cell["warm_s"] = _r(step["t"] - request["t"])
            cell["breakdown"] = _warm_breakdown(node, request, group, step)
        # a stop-free join: the first step above is a shadow's (weight 0);
        # it contributes once every rank's digest agreed
        promoted = node.first("shadows_promoted", after=group["t"])
        caught = node.first("caught_up", after=group["t"])
        if node.first("shadow_switch", after=act["t"]) is not None:
            cell["shadow"] = {
                "caught_up": run.rel(caught["t"]) if caught is not None else None,
                "replayed": caught.get("replayed") if caught is not None else None,
                "contributes": run.rel(promoted["t"]) if promoted is not None else None,
                "warm_contributes_s": _r(promoted["t"] - request["t"]) if promoted is not None and request else None,
                "cold_contributes_s": _r(promoted["t"] - start["proc_start"])
                if promoted is not None and start is not None and _num(start.get("proc_start")) is not None else None,
            }
    cell["reason"] = "; ".join(reasons) or None
    rec = node.first("pull", after=act["t"])
    return cell, (_pull(run, name, rec) if rec is not None else {"reason": f"no pull record from {name}"})


def _warm_breakdown(node: _Node, request: dict, group: dict, step: dict) -> dict[str, float | None]:
    """Where a warm scale-out went, from the joiner's trace: ``admission_s``
    (join request -> the view with it committed), ``group_s`` (-> its group
    formed: the members finish the step they are in, then meet it),
    ``pull_s`` and ``load_s`` (the state transfer and its copy into place),
    ``rest_s`` (the other work of the switch: claims, the holders' snapshot,
    flags) and ``first_step_s`` (the group formed -> its first step)."""
    view = node.first("view_committed", after=request["t"] - 1e-9)
    pull = node.first("pull", after=request["t"])
    admission = view["t"] - request["t"] if view is not None else None
    switch = group["t"] - view["t"] if view is not None else None
    init = _num(group.get("group_init_s"))
    pulled = _num(pull.get("seconds")) if pull is not None else None
    load = _num(pull.get("load_s")) if pull is not None else None
    behind = node.first("shadow_switch", after=request["t"]) is not None  # stop-free: the pull is not in the switch
    rest = None
    if switch is not None and init is not None:
        rest = max(0.0, switch - init - (0.0 if behind else (pulled or 0.0) + (load or 0.0)))
    return {"admission_s": _r(admission), "group_s": _r(init), "pull_s": _r(pulled), "load_s": _r(load),
            "rest_s": _r(rest), "first_step_s": _r(step["t"] - group["t"])}


def _action(run: _Run, index: int, act: dict) -> dict:
    kind = act["action"]
    out: dict[str, Any] = {"index": index, "line": act.get("line"), "at": act.get("at"), "t": run.rel(act["t"]),
                           "action": kind, "nodes": act["nodes"]}
    if act.get("groups"):
        out["groups"] = act["groups"]
    for k in ("seconds", "rate_bps"):
        if k in act:
            out[k] = act[k]
    if kind not in EVENTS:
        out["note"] = "not a membership event: no event metrics"
        return out
    ids, why = _member_ids(run, act)
    out["members"] = ids
    if why is not None or (kind in ("cut", "restore") and len(ids) != 2):
        why = why or f"{kind} needs two nodes"
        out["view_everywhere"] = {"s": None, "reason": why}
        out["first_step"] = {"s": None, "reason": why}
        out["survivor_idle"] = {"sum_s": None, "max_s": None, "reason": why}
    else:
        view = _view_everywhere(run, act, ids)
        first, switches = _first_step(run, act, view)
        if view["reason"] == "not detected":
            nxt = next((s for s in _global_steps(run) if s["t"] > act["t"]), None)
            first["next_step_s"] = _r(nxt["t"] - act["t"]) if nxt is not None else None
        out["view_everywhere"] = view
        out["first_step"] = first
        out["survivor_idle"] = _survivor_idle(run, act, view, first, switches)
    if kind in KILLS:
        phase = _phase(run, act)
        out["phase"], out["phase_nodes"], out["phase_since_s"] = phase["phase"], phase["per_node"], phase["since_s"]
    if kind in ("join", "restart"):
        out["scale_out"], out["pulls"] = {}, {}
        for name in out["nodes"]:
            out["scale_out"][name], out["pulls"][name] = _scale_out(run, name, act)
    elif kind == "restore":  # the sidelined side pulls the state like a joiner
        end = _window_end(run, act)
        out["pulls"] = {}
        for name in out["nodes"]:
            node = run.nodes.get(name)
            rec = node.first("pull", after=act["t"]) if node is not None else None
            if rec is not None and rec["t"] < end:
                out["pulls"][name] = _pull(run, name, rec)
    return out


# -- public API -----------------------------------------------------------------------------------


def analyze(run_dir: str | Path, *, bin_s: float = 1.0) -> dict:
    """The run's metrics (module docstring) as a JSON-serialisable dict; never raises on bad input."""
    run = _load(Path(run_dir))
    steps = _global_steps(run)
    series, stalls, median = _series(run, steps, bin_s)
    actions = [_action(run, i, a) for i, a in enumerate(run.actions) if a["action"] not in MARKERS]
    failed = {r["step"] for n in run.nodes.values() for r in n.of("step_failed") if isinstance(r.get("step"), int)}
    end = next((a for a in run.actions if a["action"] == "end"), None)
    nodes = {}
    for name, node in sorted(run.nodes.items()):
        nodes[name] = {"members": node.members, "records": len(node.records), "ending": node.ending or "cut short",
                       "steps": sum(1 for r in node.records if r["ev"] == "step")}
    return {
        "schema": SCHEMA,
        "run_dir": str(run.run_dir),
        "origin_t": run.origin,
        "median_step_s": _r(median),
        "stall_factor": STALL_FACTOR,
        "nodes": nodes,
        "markers": [{"t": run.rel(a["t"]), "at": a.get("at"), "action": a["action"], "nodes": a["nodes"]}
                    for a in run.actions if a["action"] in MARKERS],
        "series": series,
        "stalls": stalls,
        "actions": actions,
        "totals": {
            "steps": len(steps),
            "last_step": steps[-1]["step"] if steps else None,
            "samples": _whole(sum(_num(s.get("samples")) or 0.0 for s in steps)),
            "failed_steps": len(failed),
            "final_world": steps[-1].get("world") if steps else None,
            "stalls": len(stalls),
            "stall_s": _r(sum(s["duration_s"] for s in stalls)),
            "wall_s": run.rel(steps[-1]["t"]) if steps else None,
            "end_t": run.rel(end["t"]) if end else None,
        },
        "warnings": run.warnings,
    }


def write_json(result: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _ms(x: float | None) -> str | None:
    return None if x is None else f"{x * 1e3:.0f}"


def _rows(result: dict) -> tuple[list[list[str]], list[str]]:
    """Table cells and footnotes (a None cell shows ``?n``, n pointing at its reason)."""
    notes: list[str] = []

    def cell(value: str | None, reason: str | None) -> str:
        if value is not None:
            return value
        if not reason:
            return "-"
        if reason == "not detected":
            return "not detected"
        if reason not in notes:
            notes.append(reason)
        return f"?{notes.index(reason) + 1}"

    rows = []
    for a in result.get("actions", []):
        at = a.get("at")
        action = a["action"] + (f" ({a['phase']})" if a.get("phase") else "")  # what a kill hit
        row = [f"{at:g}" if isinstance(at, (int, float)) else f"{a['t']:.1f}", action, " ".join(a["nodes"])]
        if "view_everywhere" not in a:
            rows.append(row + ["-"] * 5)
            continue
        v, f, s = a["view_everywhere"], a["first_step"], a["survivor_idle"]
        row.append(cell(_ms(v.get("s")), v.get("reason")))
        first = _ms(f.get("s"))
        if first is not None and f.get("last_node"):
            first += f" ({f['last_node']})"
        if first is None and f.get("next_step_s") is not None:
            first = f"next {_ms(f['next_step_s'])}"
        row.append(cell(first, f.get("reason")))
        idle = None if s.get("sum_s") is None else f"{_ms(s['sum_s'])} / {_ms(s['max_s'])}"
        row.append(cell(idle, s.get("reason")))
        scale, transfer = [], []
        for name, so in (a.get("scale_out") or {}).items():
            cold, warm = (None if so.get(k) is None else f"{so[k]:.2f}" for k in ("cold_s", "warm_s"))
            if cold is None and warm is None:
                scale.append(cell(None, so.get("reason")))
            else:
                scale.append(f"{cell(cold, so.get('reason'))} / {cell(warm, so.get('reason'))}")
        for name, p in (a.get("pulls") or {}).items():
            if p.get("bytes") is None or p.get("seconds") is None:
                transfer.append(cell(None, p.get("reason")))
                continue
            text = f"{p['bytes'] / 1e6:.1f} MB {p['seconds']:.2f} s"
            text += f" {p['ratio']:.2f}x" if p.get("ratio") is not None else f" {cell(None, p.get('bound_reason'))}"
            transfer.append(text)
        row.append(", ".join(scale) or "-")
        row.append(", ".join(transfer) or "-")
        rows.append(row)
    return rows, notes


HEADERS = ["at (s)", "action", "nodes", "view everywhere (ms)", "first step (ms)", "survivor idle sum/max (ms)",
           "scale-out cold/warm (s)", "transfer (MB, s, x bound)"]


def _totals_line(result: dict) -> str:
    t = result.get("totals", {})
    wall = t.get("wall_s")
    rate = f", {t['samples'] / wall:.1f} samples/s" if wall else ""
    wall_text = f"{wall:.1f}" if isinstance(wall, (int, float)) else "?"
    stall = t.get("stall_s")
    stall_text = f"{stall:.2f}" if isinstance(stall, (int, float)) else "?"
    return (f"totals: {t.get('steps')} steps, {t.get('samples', 0):.0f} samples{rate} in {wall_text} s of training, "
            f"{t.get('failed_steps')} failed steps, final world {t.get('final_world')}, "
            f"{t.get('stalls')} stalls ({stall_text} s)")


def summary_table(result: dict, *, use_rich: bool | None = None) -> str:
    """The per-action table and a totals line, as text (rendered by rich when importable, else plain)."""
    rows, notes = _rows(result)
    tail = [_totals_line(result)] + [f"?{i + 1}: {n}" for i, n in enumerate(notes)]
    tail += [f"warning: {w}" for w in result.get("warnings", [])]
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            if use_rich:
                raise
        else:
            table = Table(title="scenario events")
            for h in HEADERS:
                table.add_column(h, justify="left" if h in ("action", "nodes") else "right")
            for row in rows:
                table.add_row(*row)
            buf = io.StringIO()
            Console(file=buf, width=200, force_terminal=False, color_system=None).print(table)
            return buf.getvalue() + "\n".join(tail) + "\n"
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADERS)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(HEADERS, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines + tail) + "\n"


def plot(result: dict, path: str | Path) -> Path:
    """Throughput and world size against seconds since training started; actions marked, stalls shaded."""
    try:
        import matplotlib
    except ImportError as exc:
        raise RuntimeError("plot needs matplotlib: pip install 'chaos_lightning[bench]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result.get("series", {})
    thr, world = series.get("throughput", {}), series.get("world", {})
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(11, 6), height_ratios=(2, 1))
    if thr.get("t"):
        bin_s = thr.get("bin_s", 1.0)
        xs = list(thr["t"]) + [thr["t"][-1] + bin_s]
        ys = list(thr["samples_per_s"]) + [thr["samples_per_s"][-1]]
        top.step(xs, ys, where="post", color="tab:blue")
        top.set_ylim(0, max(ys) * 1.35 or 1)  # headroom for the action labels
    if world.get("t"):
        bottom.step(world["t"], world["world"], where="post", color="tab:green")
        bottom.set_ylim(0, max(world["world"]) + 1)
        bottom.yaxis.get_major_locator().set_params(integer=True)
    for s in result.get("stalls", []):
        for ax in (top, bottom):
            ax.axvspan(s["start"], s["end"], color="tab:red", alpha=0.15, lw=0)
    for m in result.get("markers", []):
        if m["action"] in ("cont", "end"):
            for ax in (top, bottom):
                ax.axvline(m["t"], color="0.6", ls=":", lw=0.8)
    for a in result.get("actions", []):
        for ax in (top, bottom):
            ax.axvline(a["t"], color="0.3", ls="--", lw=0.8)
        top.annotate(f"{a['action']} {' '.join(a['nodes'])}", (a["t"], 1.0), xycoords=("data", "axes fraction"),
                     rotation=90, va="top", ha="right", fontsize=7)
    top.set(ylabel="samples/s", title="throughput (stalls shaded)")
    bottom.set(ylabel="world size", xlabel="seconds since training started")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(run_dir: str | Path, *, bin_s: float = 1.0) -> dict:
    """Analyze ``run_dir``, write ``report.json`` and ``timeline.png`` there, return the result."""
    run_dir = Path(run_dir)
    result = analyze(run_dir, bin_s=bin_s)
    write_json(result, run_dir / "report.json")
    try:
        plot(result, run_dir / "timeline.png")
    except RuntimeError as exc:  # matplotlib missing: the JSON is the record, the plot is a view of it
        result["warnings"].append(str(exc))
        write_json(result, run_dir / "report.json")
    return result


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m chaos_lightning.scenario.report RUN_DIR", file=sys.stderr)
        return 2
    print(summary_table(report(args[0])), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
