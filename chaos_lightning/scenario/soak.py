"""Soak: random valid timelines from a seed, played on real training nodes.

``python -m chaos_lightning.scenario.soak --seed S --events N --nodes K [--testbed] [--json PATH]``

:func:`generate` draws a timeline (:mod:`.timeline`) of ``N`` events on a
cluster of about ``K`` training nodes: joins, graceful leaves, ``kill -9``,
SIGSTOP, a link cut and its restore, a partition and its heal, a restart
under the same id.  The :class:`~chaos_lightning.scenario.runner.Runner`
plays it with ``settle=True`` (each action waits until the cluster absorbed
the previous one; a cluster that never does is a *hang*), and
:func:`~chaos_lightning.scenario.runner.check_invariants` checks the end:
identical replicas, every sample of every epoch trained exactly once (the
ledgers of every process, killed ones included), and no process exiting
non-zero unless the timeline killed it.

What makes a timeline valid (the protocol's stated limits, DESIGN.md):

- **a majority stays alive and connected**: before each event, the members
  that can vote (not stopped, not the sidelined end of a cut link, not on
  the small side of a partition) must stay at least ``M // 2 + 1`` of the
  ``M`` current members after it (a minority side waits; a kill that left
  a minority would stop the cluster for good, by design);
- at least three members at all times (with two, a cut cannot be told
  from a failure: docs/scenarios.md), at most ``K`` processes;
- a partition splits every current member into two sides, the smaller of
  ``1 .. (M - 1) // 2`` nodes, and the next event heals it; one cut link at
  a time, restored within a few events; nothing else touches a node while
  its link is cut or it is stopped;
- a name is never reused except by ``restart``; events are ``gap`` seconds
  apart (jittered), a stop's SIGCONT counts as one (the next event comes
  ``gap`` after it, unless ``--overlap``), and the runner waits besides
  until each one settled;
- every cut is restored and the partition healed before ``end``.

The numbers of the design's limits live here; the generator is pure (no
processes), so its rules are unit-tested on thousands of seeds
(``tests/test_soak.py``).
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the event kinds and their weights (a cut's restore and a partition's heal follow their own)
WEIGHTS = {"join": 3, "leave": 1, "kill": 2, "stop": 2, "cut": 1, "partition": 1, "restart": 2}
KINDS = ("join", "leave", "kill", "stop", "cut", "restore", "partition", "heal", "restart")
#: the smallest cluster the generator keeps
MIN_MEMBERS = 3
#: the workload: a small MLP, so that 8 training processes fit on 2 cores
SETTINGS = {"hidden": 64, "samples": 1024, "batch_size": 8, "step_sleep": 0.05}
#: a stopped node counts as back (its SIGCONT sent) this long after its stop ends
CONT_MARGIN_S = 1.0


@dataclass
class _State:
    members: list[str]
    next_id: int
    stopped: dict[str, float] = field(default_factory=dict)  # name -> nominal time of its SIGCONT
    cut: tuple[str, str] | None = None
    cut_age: int = 0
    partition: tuple[list[str], list[str]] | None = None

    def impaired(self, t: float) -> set[str]:
        out = {n for n, until in self.stopped.items() if until + CONT_MARGIN_S > t}
        if self.cut is not None:
            out |= set(self.cut)
        if self.partition is not None:
            out |= set(self.partition[0])
        return out

    def voters_after(self, t: float, lose: int) -> bool:
        """Would the members able to vote still be a majority after ``lose`` more stop voting?"""
        m = len(self.members)
        impaired = {n for n, until in self.stopped.items() if until + CONT_MARGIN_S > t}
        impaired |= {self.cut[1]} if self.cut else set()
        if self.partition is not None:
            impaired |= set(self.partition[0])
        return m - len(impaired & set(self.members)) - lose >= m // 2 + 1


def generate(seed: int, events: int, nodes: int, *, gap: float = 3.0, settings: dict[str, Any] | None = None,
             overlap: bool = False) -> str:
    """A valid timeline (module docstring) of ``events`` events on about ``nodes`` nodes, as text.

    A stopped node's SIGCONT is an event too (it rejoins): the next event
    comes ``gap`` after it, so the runner's settle wait covers the rejoin.
    ``overlap=True`` lets events fall while a node is stopped (its SIGCONT
    and rejoin may then coincide with a kill or a restart: how the bug in
    ``tests/data/soak_kill_at_rejoin.chaos`` was found); the majority rule
    still holds."""
    if nodes < MIN_MEMBERS + 1:
        raise ValueError(f"a soak needs at least {MIN_MEMBERS + 1} nodes (a majority must survive each event)")
    if events < 1:
        raise ValueError("at least one event")
    rng = random.Random(seed)
    st = _State([f"n{i}" for i in range(nodes)], nodes)
    how = ", overlapping stops" if overlap else ""
    lines = [f"# soak: seed {seed}, {events} events, {nodes} nodes{how} (python -m chaos_lightning.scenario.soak)"]
    lines += [f"set {k} {v}" for k, v in {**SETTINGS, **(settings or {})}.items()]
    lines.append(f"0 start {' '.join(st.members)}")
    t = 2.0
    done = 0

    def emit(at: float, text: str) -> None:
        nonlocal done
        lines.append(f"{at:.1f} {text}")
        done += 1

    while done < events:
        t = round(t + gap + rng.uniform(0, gap / 2), 1)
        left = events - done
        healthy = [n for n in st.members if n not in st.impaired(t)]
        # closers first: a partition heals at the next event, a cut within 1-3 events
        if st.partition is not None:
            emit(t, "heal")
            st.partition = None
            continue
        if st.cut is not None:
            st.cut_age += 1
            if left <= 1 or st.cut_age >= 3 or rng.random() < 0.4:
                emit(t, f"restore {st.cut[0]} {st.cut[1]}")
                st.cut = None
                continue
        for n in [n for n, until in st.stopped.items() if until + CONT_MARGIN_S <= t]:
            del st.stopped[n]
        options: dict[str, float] = {}
        procs = len(st.members)
        if procs < nodes:
            options["join"] = WEIGHTS["join"] * (2 if procs < nodes - 1 else 1)
        if len(st.members) > MIN_MEMBERS and healthy and st.voters_after(t, 1):
            options["leave"] = WEIGHTS["leave"]
            options["kill"] = WEIGHTS["kill"]
        if healthy and st.voters_after(t, 1):
            options["stop"] = WEIGHTS["stop"]
            options["restart"] = WEIGHTS["restart"]
        if st.cut is None and not st.stopped and len(healthy) >= 2 and len(st.members) >= MIN_MEMBERS + 1 \
                and st.voters_after(t, 1) and left >= 2:
            options["cut"] = WEIGHTS["cut"]
        if st.cut is None and not st.stopped and len(healthy) == len(st.members) >= MIN_MEMBERS and left >= 2:
            options["partition"] = WEIGHTS["partition"]
        if not options:
            continue  # nothing valid now (a stop still running): let time pass
        kind = rng.choices(list(options), weights=list(options.values()))[0]
        if kind == "join":
            name = f"n{st.next_id}"
            st.next_id += 1
            st.members.append(name)
            emit(t, f"join {name}")
        elif kind in ("leave", "kill"):
            victim = rng.choice(healthy)
            st.members.remove(victim)
            emit(t, f"{kind} {victim}")
        elif kind == "stop":
            victim = rng.choice(healthy)
            secs = round(rng.uniform(2.0, 4.0), 1)
            st.stopped[victim] = t + secs
            emit(t, f"stop {victim} {secs:g}")
            if not overlap:
                t = round(t + secs + CONT_MARGIN_S, 1)
        elif kind == "restart":
            emit(t, f"restart {rng.choice(healthy)}")
        elif kind == "cut":
            a, b = rng.sample(healthy, 2)
            st.cut, st.cut_age = (a, b), 0
            emit(t, f"cut {a} {b}")
        elif kind == "partition":
            small = rng.randint(1, (len(st.members) - 1) // 2)
            minority = rng.sample(st.members, small)
            majority = [n for n in st.members if n not in minority]
            st.partition = (minority, majority)
            emit(t, f"partition {','.join(minority)} {','.join(majority)}")
            t = round(t + gap, 1)  # the minority is declared failed before the heal
    # anything still open is closed after the last event (not counted)
    if st.partition is not None:
        t += gap
        lines.append(f"{t:.1f} heal")
    if st.cut is not None:
        t += gap
        lines.append(f"{t:.1f} restore {st.cut[0]} {st.cut[1]}")
    t += max(gap, max(st.stopped.values(), default=0.0) - t) + 4.0
    lines.append(f"{t:.1f} end")
    return "\n".join(lines) + "\n"


def validate(text: str, nodes: int) -> list[str]:
    """Replay a timeline with the rules of the module docstring, written
    apart from :func:`generate` (the tests check one against the other):
    the reasons it breaks them, one per offending line, or []."""
    from chaos_lightning.scenario.timeline import parse

    t = parse(text, "<soak>")
    members = list(t.initial)
    stopped: dict[str, float] = {}
    cut: tuple[str, str] | None = None
    part: tuple[str, ...] | None = None  # the smaller side
    problems = []
    for a in t.actions[1:-1]:
        for n in [n for n, until in stopped.items() if until + CONT_MARGIN_S <= a.at]:
            del stopped[n]
        touched = set(a.nodes)
        busy = set(stopped) | set(cut or ()) | set(part or ())
        if a.action not in ("restore", "heal") and touched & busy:
            problems.append(f"line {a.line}: '{a}' touches {sorted(touched & busy)} (stopped, cut or partitioned)")
        if part is not None and a.action != "heal":
            problems.append(f"line {a.line}: '{a}' while partitioned (the next event must heal)")
        lose = {"leave": 1, "kill": 1, "stop": 1, "restart": 1, "cut": 1}.get(a.action, 0)
        if a.action == "partition":
            sides = sorted(a.groups, key=len)
            if set(a.nodes) != set(members) or len(sides[0]) >= len(sides[1]):
                problems.append(f"line {a.line}: a partition splits every member, the smaller side a minority")
            lose = len(sides[0])
        voting = len(members) - len(set(stopped) & set(members)) - (1 if cut else 0) - lose
        if voting < len(members) // 2 + 1:
            problems.append(f"line {a.line}: '{a}' leaves {voting} of {len(members)} members voting: no majority")
        if a.action == "join":
            members.append(a.args[0])
        elif a.action in ("leave", "kill"):
            members.remove(a.args[0])
        elif a.action == "stop":
            stopped[a.args[0]] = a.at + float(a.args[1])
        elif a.action == "cut":
            cut = (a.args[0], a.args[1])
        elif a.action == "restore":
            cut = None
        elif a.action == "partition":
            part = tuple(min(a.groups, key=len))
        elif a.action == "heal":
            part = None
        if len(members) < MIN_MEMBERS:
            problems.append(f"line {a.line}: '{a}' leaves {len(members)} members (at least {MIN_MEMBERS})")
        if len(members) > nodes:
            problems.append(f"line {a.line}: '{a}' makes {len(members)} processes (at most {nodes})")
    if cut is not None or part is not None:
        problems.append("a cut or partition still in effect at the end")
    return problems


# ---------------------------------------------------------------------- running one
def play(seed: int, events: int, nodes: int, run_dir: Path, *, testbed: bool = False, gap: float = 3.0,
         out: Any = None, report: bool = False, overlap: bool = False) -> dict[str, Any]:
    """Generate, run and check one schedule; the result (see :func:`table`)."""
    from chaos_lightning.scenario.runner import Runner, ScenarioError, check_invariants
    from chaos_lightning.scenario.timeline import parse

    text = generate(seed, events, nodes, gap=gap, overlap=overlap)
    timeline = parse(text, f"<soak seed {seed}>")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "timeline.chaos").write_text(text)
    planned = Counter(a.action for a in timeline.actions[1:-1])
    runner = Runner(timeline, run_dir / "run", testbed=testbed, out=out, settle=True)
    started = time.monotonic()
    failure = None
    try:
        runner.run()
    except ScenarioError as exc:
        failure = str(exc)
    except Exception as exc:  # noqa: BLE001  (the harness itself: reported, the next schedule still runs)
        failure = f"harness error {type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        failure = "interrupted"
        raise
    finally:
        wall = time.monotonic() - started
    carried = Counter(runner.carried)
    # an event survived when the cluster settled after it: all of them on a
    # finished run, all but the last carried out when a settle timed out
    survived = Counter(runner.carried if failure is None else runner.carried[:-1])
    checks = check_invariants(run_dir / "run") if failure is None else {"problems": []}
    violations = list(checks["problems"])
    if failure is not None:
        violations.insert(0, f"run did not finish: {failure}")
    result: dict[str, Any] = {
        "seed": seed, "events": events, "nodes": nodes, "testbed": testbed, "gap_s": gap, "overlap": overlap,
        "timeline": str(run_dir / "timeline.chaos"), "run_dir": str(run_dir / "run"),
        "wall_s": round(wall, 1),
        "planned": dict(planned), "run": dict(carried), "survived": dict(survived),
        "violations": violations, "invariants": checks,
    }
    if report and failure is None:
        from chaos_lightning.scenario import report as rep

        try:
            r = rep.report(run_dir / "run")
            result["totals"] = r["totals"]
        except Exception as exc:  # the soak's verdict does not depend on the metrics
            result["report_error"] = f"{type(exc).__name__}: {exc}"
    return result


def table(results: list[dict[str, Any]]) -> str:
    """Events run and survived per kind over ``results``, and the violations."""
    run, survived, planned = Counter(), Counter(), Counter()
    for r in results:
        run.update(r["run"])
        survived.update(r["survived"])
        planned.update(r["planned"])
    rows = [("event", "planned", "run", "survived")]
    for k in KINDS:
        if planned[k] or run[k]:
            rows.append((k, str(planned[k]), str(run[k]), str(survived[k])))
    rows.append(("all", str(sum(planned.values())), str(sum(run.values())), str(sum(survived.values()))))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    bad = [r for r in results if r["violations"]]
    lines.append("")
    lines.append(f"schedules: {len(results)}, with violations: {len(bad)}; "
                 f"violations found: {sum(len(r['violations']) for r in results)}")
    for r in bad:
        for v in r["violations"]:
            lines.append(f"  seed {r['seed']}: {v}")
    for r in results:
        inv = r["invariants"]
        if "identical_replicas" in inv:
            lines.append(f"  seed {r['seed']}: {r['wall_s']:.0f} s, replicas identical: "
                         f"{'yes' if inv['identical_replicas'] else 'NO'} ({len(inv['finished'])} finished at step "
                         f"{inv['final_step']}), exact cover: "
                         f"{'yes' if inv['no_sample_twice'] and inv['complete_epochs_exact'] else 'NO'} "
                         f"({inv['epochs']} epochs, {inv['ledgers']} process ledgers), clean exits: "
                         f"{'yes' if inv['clean_exits'] else 'NO'}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.scenario.soak", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--schedules", type=int, default=1, help="schedules to run: seeds SEED, SEED+1, ... (default 1)")
    p.add_argument("--events", type=int, default=12, help="events per schedule (default 12)")
    p.add_argument("--nodes", type=int, default=5, help="training nodes at the start and at most (default 5)")
    p.add_argument("--gap", type=float, default=3.0, help="seconds between events, before jitter (default 3)")
    p.add_argument("--overlap", action="store_true",
                   help="events may fall while a node is stopped (its rejoin may meet a kill: finds races)")
    p.add_argument("--testbed", action="store_true", help="one network namespace per node, real link cuts (root)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--run-dir", type=Path, default=None, help="default: runs/soak-<time>")
    p.add_argument("--report", action="store_true", help="also compute each run's scenario report (slow for long runs)")
    p.add_argument("--quiet", action="store_true", help="the runner's progress lines go to RUN/runner.log only")
    p.add_argument("--print-timeline", action="store_true", help="print the generated timeline(s) and exit")
    args = p.parse_args(argv)
    try:
        texts = [generate(args.seed + i, args.events, args.nodes, gap=args.gap, overlap=args.overlap)
                 for i in range(args.schedules)]
    except ValueError as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    if args.print_timeline:
        print("\n".join(texts), end="")
        return 0
    root = args.run_dir or Path("runs") / time.strftime("soak-%Y%m%d-%H%M%S")
    results: list[dict[str, Any]] = []

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # the runner's finally reaps every node (and the testbed its namespaces)

    signal.signal(signal.SIGTERM, terminated)
    try:
        _run_all(args, root, results)
    except KeyboardInterrupt:
        print(f"{p.prog}: interrupted (every node reaped)", file=sys.stderr)
        return 130
    print()
    print(table(results), end="")
    if args.json:
        print(f"json: {args.json}")
    return 1 if any(r["violations"] for r in results) else 0


def _run_all(args: argparse.Namespace, root: Path, results: list[dict[str, Any]]) -> None:
    for i in range(args.schedules):
        seed = args.seed + i
        run_dir = root / f"seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "runner.log", "w") as log:
            out = log if args.quiet else _Tee(sys.stdout, log)
            print(f"== seed {seed}: {args.events} events on {args.nodes} nodes "
                  f"({'namespace testbed' if args.testbed else 'loopback'}), timeline {run_dir / 'timeline.chaos'}", flush=True)
            results.append(play(seed, args.events, args.nodes, run_dir, testbed=args.testbed, gap=args.gap, out=out,
                                report=args.report, overlap=args.overlap))
        if args.json:
            args.json.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=1) + "\n")


class _Tee:
    def __init__(self, *streams: Any) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


if __name__ == "__main__":
    sys.exit(main())
