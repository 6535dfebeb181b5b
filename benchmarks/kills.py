"""The "30 kills" benchmark (issue 14, "Faults without tails"): ``kill -9``
mid-step, during validation and during a checkpoint save, and what each one
cost the survivors; TorchFT's kills from the same run beside them.

    python benchmarks/kills.py [--kills 30] [--hidden 1024|4096] [--nodes 4] [--torchft-kills K]
                               [--json PATH] [--markdown PATH]

Role in the whole: the issue asks for `kill -9` to the first step within
0.3 s plus one step time at 13 MB and 203 MB, over 30 kills landing in every
phase of a Lightning loop, with no survivor stalled over 2 s.  This script
plays one scenario (:mod:`chaos_lightning.scenario`) with the workload's
validation and checkpoints on (``set val_every``, ``val_sleep``,
``ckpt_every``): ``--nodes`` members train, and ``--kills`` times a node
``k<r>`` joins and, once it trains, is killed.  The kill's time in the
timeline varies from round to round; on top of that (unless ``--no-aim``)
the runner holds each kill back, bounded by ``AIM_TIMEOUT``, until its
victim is in the phase aimed at, in turn: a training step (a fraction of a
step after one ended), a validation (a fraction of one in), a checkpoint
save (as soon as the victim enters one).  The aim only steers; the phase
reported is what the nodes' traces say they were doing at the kill
instant (:func:`chaos_lightning.scenario.report.analyze`: ``checkpoint``
when any node was between its save's start and end, else ``validation``,
else ``step``).

Per kill: the phase, kill -> the last survivor's first step in the new view
(DESIGN.md's event handling latency (b)), the survivors' max idle (the
design's definition: a survivor's gap in stepping around the switch minus
one normal step) and the normal step.  A survivor that was validating or
saving when the kill came spends that time off training whatever happens,
so both figures are also given *net* of the survivors' own validations and
saves at their normal length (the report's ``net_s``/``net_max_s``): what
the kill added to a validation counts, the validation itself does not.
The summary: per phase the count, median and max; "kills stalling a
survivor over 2 s: N of M" (on the idle, and net); and the target "kill ->
first step <= 0.3 s + one step time" (the step: the median of the
survivors' normal steps before the kill).

TorchFT (``--torchft-kills K``): ``benchmarks/_torchft.py``'s ``measure``
on the same model, data and stand-in compute, which plays K rounds of a
join and a ``kill -9`` of the joiner; its kill rows go beside chaos'.  Its
loop (torchft's Manager around a plain training loop) has no Lightning
validation or checkpoint, so every one of its kills is mid-step; the note
column says so.  Its step time for the target is its steady one at
``--nodes`` replicas.

One system failing keeps the other's results (an ``error`` record); a
scenario that fails part-way is still analysed as far as it ran.  Every
process is reaped by the runner and by ``_torchft``'s cluster, every wait
is bounded.  Timings are noisy on a shared 2-core machine: compare within
one run.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

import _chaos  # noqa: E402
import _machine  # noqa: E402

from chaos_lightning.scenario import report as scenario_report  # noqa: E402
from chaos_lightning.scenario.runner import Runner, check_invariants  # noqa: E402
from chaos_lightning.scenario.timeline import Action, Timeline, parse  # noqa: E402
from chaos_lightning.scenario.workload import VAL_BATCHES  # noqa: E402

PHASES = ("step", "validation", "checkpoint")
#: the issue's bounds: kill -> first step within this plus one step time; no survivor idle over STALL_S
FIRST_STEP_MARGIN_S = 0.3
STALL_S = 2.0
#: seconds a kill may be held back for its aim (a validation comes every
#: ``val_every`` steps, a save every ``ckpt_every``: a few seconds here, more
#: at 203 MB); past it the kill goes ahead, wherever the victim is
AIM_TIMEOUT = 30.0
#: the kill's offset in the timeline beyond the join's settling time varies
#: over [0, OFFSET_SPAN) s from round to round (a golden-ratio sequence)
OFFSET_SPAN = 1.5
_GOLDEN = 0.6180339887


def _spread(r: int) -> float:
    """A fraction in [0, 1) for round ``r``, evenly spread over the rounds."""
    return (r * _GOLDEN) % 1.0


# ---------------------------------------------------------------------- the scenario
def timeline(kills: int, nodes: int, hidden: int, step_sleep: float, val_every: int, val_sleep: float,
             ckpt_every: int) -> str:
    """``kills`` rounds of ``join k<r>`` and, at a varying offset once it
    trains, ``kill k<r>``; validation and checkpoints on."""
    gap_join = next(g for mb, g in sorted(_chaos._JOIN_GAP.items(), reverse=True) if _chaos.state_mb(hidden) >= mb)
    lines = [f"set hidden {hidden}", f"set step_sleep {step_sleep}", f"set val_every {val_every}",
             f"set val_sleep {val_sleep}", f"set ckpt_every {ckpt_every}",
             "0 start " + " ".join(f"n{i}" for i in range(nodes))]
    t = 2.0
    for r in range(kills):
        lines.append(f"{t:g} join k{r}")
        t += gap_join + round(OFFSET_SPAN * _spread(r), 2)
        lines.append(f"{t:g} kill k{r}")
        t += _chaos._GAP
    lines.append(f"{t:g} end")
    return "\n".join(lines) + "\n"


def aims(kills: int, val_every: int = 1, ckpt_every: int = 1) -> list[str]:
    """The phase each kill aims at, in turn (of those the run has: 0 turns validation or checkpoints off)."""
    phases = [p for p, on in zip(PHASES, (True, val_every > 0, ckpt_every > 0)) if on]
    return [phases[r % len(phases)] for r in range(kills)]


class AimedRunner(Runner):
    """The scenario runner, with each ``kill`` held back (at most
    :data:`AIM_TIMEOUT`) until its victim's trace says it is in the phase
    aimed at.  The wait moves the rest of the timeline back, as the
    runner's own wait for a joiner to train does."""

    def __init__(self, timeline: Timeline, run_dir: Path, aimed: dict[int, str], **kwargs: Any) -> None:
        super().__init__(timeline, run_dir, **kwargs)
        self.aimed = aimed  # timeline line -> phase
        self.aim_log: dict[int, dict[str, Any]] = {}  # line -> what the aim found, and its wait
        self._round = 0

    def before(self, a: Action) -> float:
        if a.action != "kill" or a.line not in self.aimed:
            return 0.0
        t0 = time.time()
        found = self._aim(a.args[0], self.aimed[a.line], _spread(self._round) * 0.6 + 0.2)
        waited = time.time() - t0
        self._round += 1
        self.aim_log[a.line] = {"aim": self.aimed[a.line], "found": found, "wait_s": round(waited, 3)}
        return waited

    def _aim(self, name: str, phase: str, frac: float) -> bool:
        """Wait until ``name`` is ``frac`` into a training step (``step``),
        ``frac`` into a validation (``validation``) or inside a save
        (``checkpoint``); False when :data:`AIM_TIMEOUT` ran out first."""
        node = self.nodes[name]
        deadline = time.monotonic() + AIM_TIMEOUT
        seen = len(node.records)  # aim at what starts from now on: the records before may be stale
        settings = self.timeline.settings
        val_s = VAL_BATCHES * float(settings.get("val_sleep", 0.0))
        every = int(settings.get("ckpt_every", 0))
        while time.monotonic() < deadline and node.alive:
            self._poll()
            recs = node.records[seen:]
            marks = [r for r in recs if r.get("ev") in ("step", "val_start", "val_end", "ckpt_start", "ckpt_end")]
            last = marks[-1] if marks else None
            now = time.time()
            if phase == "checkpoint" and last is not None and last["ev"] == "ckpt_start":
                return True
            if phase == "validation" and last is not None and last["ev"] == "val_start" and now >= last["t"] + frac * val_s:
                return True
            if phase == "step" and last is not None and last["ev"] == "step":
                steps = [r["t"] for r in node.records if r.get("ev") == "step"][-11:]
                step_s = statistics.median(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 2 else 0.05
                if now >= last["t"] + frac * step_s:
                    return True  # no validation or save began since that step ended
            # a save begins a few ms after the record of the step it follows and
            # may last only tens of ms: poll fast from the step before it on
            due = (phase == "checkpoint" and last is not None and last["ev"] == "step" and every > 0
                   and int(last.get("step", -1)) % every in (0, every - 1))
            time.sleep(0.002 if due else 0.01)
        return False


def run_chaos(args: argparse.Namespace, workdir: Path, out: IO[str]) -> list[dict[str, Any]]:
    """Play the kills scenario; one record per kill (with what its aim
    found) and a ``run`` record (invariants, totals).  A run that fails
    part-way is analysed as far as it went, with an ``error`` record."""
    text = timeline(args.kills, args.nodes, args.hidden, args.step_sleep, args.val_every, args.val_sleep,
                    args.ckpt_every)
    tl = parse(text, "<kills benchmark>")
    kill_lines = [a.line for a in tl.actions if a.action == "kill"]
    aimed = dict(zip(kill_lines, aims(args.kills, args.val_every, args.ckpt_every))) if args.aim else {}
    run_dir = workdir / f"chaos-n{args.nodes}-h{args.hidden}"
    runner = AimedRunner(tl, run_dir, aimed, out=out)
    recs: list[dict[str, Any]] = []
    error = None
    try:
        runner.run()
    except Exception as exc:  # the traces up to the failure are still measurements
        error = {"system": "chaos", "event": "error", "error": f"{type(exc).__name__}: {exc}",
                 "traceback": traceback.format_exc()[-4000:]}
    if (run_dir / "actions.jsonl").exists():
        result = scenario_report.analyze(run_dir)
        recs = kill_records(result, args.nodes, args.hidden, runner.aim_log)
        inv = check_invariants(run_dir)
        recs.append({"system": "chaos", "event": "run", "nodes": args.nodes, "hidden": args.hidden,
                     "state_mb": round(_chaos.state_mb(args.hidden), 1), "invariants_ok": not inv["problems"],
                     "problems": inv["problems"], "totals": result.get("totals"), "median_step_s": result.get("median_step_s"),
                     "run_dir": str(run_dir), "timeline": text})
    if error is not None:
        recs.append(error)
    return recs


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def kill_records(result: dict[str, Any], nodes: int, hidden: int,
                 aim_log: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One record per ``kill`` of a scenario report."""
    out = []
    for a in result.get("actions", []):
        if a.get("action") != "kill":
            continue
        first, idle = a.get("first_step") or {}, a.get("survivor_idle") or {}
        normals = [v for v in (idle.get("normal_step_s") or {}).values() if _num(v) is not None]
        step_s = statistics.median(normals) if normals else _num(result.get("median_step_s"))
        first_s, net_s = _num(first.get("s")), _num(first.get("net_s"))
        target = FIRST_STEP_MARGIN_S + step_s if step_s is not None else None
        aim = (aim_log or {}).get(a.get("line"), {})
        reasons = sorted({r for r in (first.get("reason"), idle.get("reason")) if r})
        out.append({
            "system": "chaos", "event": "kill", "kill": len(out), "victim": (a.get("nodes") or [None])[0],
            "nodes": nodes, "hidden": hidden, "state_mb": round(_chaos.state_mb(hidden), 1),
            "at_s": a.get("t"), "aim": aim.get("aim"), "aim_found": aim.get("found"), "aim_wait_s": aim.get("wait_s"),
            "phase": a.get("phase"), "phase_since_s": a.get("phase_since_s"), "phase_nodes": a.get("phase_nodes"),
            "first_step_s": first_s, "first_step_net_s": net_s,
            "idle_max_s": _num(idle.get("max_s")), "idle_max_net_s": _num(idle.get("net_max_s")),
            "idle_sum_s": _num(idle.get("sum_s")), "step_s": step_s,
            "target_s": target, "target_met": None if first_s is None or target is None else first_s <= target,
            "target_met_net": None if net_s is None or target is None else net_s <= target,
            "notes": "; ".join(reasons),
        })
    return out


def run_torchft(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """TorchFT's join-and-kill rounds on the same workload; its kill rows in this benchmark's shape."""
    import _torchft

    recs = _torchft.measure(nodes=args.nodes, hidden=args.hidden, reps=args.torchft_kills, step_sleep=args.step_sleep,
                            workdir=workdir / "torchft", timeout=120.0 + 90.0 * args.torchft_kills)
    steady = [r["samples_per_s"] for r in recs if r.get("event") == "steady" and _num(r.get("samples_per_s"))]
    # steps per second = samples per second / (replicas x batch)
    step_s = args.nodes * _torchft.BATCH / statistics.median(steady) if steady else None
    out = []
    for r in recs:
        if r.get("event") != "kill":
            continue
        first_s = _num(r.get("first_step_s"))
        target = FIRST_STEP_MARGIN_S + step_s if step_s is not None else None
        out.append({
            "system": "torchft", "event": "kill", "kill": r.get("rep"),
            "victim": f"replica_{args.nodes + r['rep']}" if isinstance(r.get("rep"), int) else None,  # the rep's joiner
            "nodes": args.nodes, "hidden": args.hidden,
            "state_mb": round(r["state_mb"], 1) if _num(r.get("state_mb")) else None,
            "aim": None, "phase": "step", "first_step_s": first_s, "first_step_net_s": None,
            "idle_max_s": _num(r.get("idle_max_s")), "idle_max_net_s": None, "idle_sum_s": _num(r.get("idle_sum_s")),
            "step_s": step_s, "target_s": target,
            "target_met": None if first_s is None or target is None else first_s <= target,
            "notes": "TorchFT's loop has no Lightning validation or checkpoint: a mid-step kill; step time: steady, "
                     f"{args.nodes} replicas" + (f"; {r['notes']}" if r.get("notes") else ""),
        })
    if not out:
        why = "; ".join(r["notes"] for r in recs if r.get("notes")) or "no kill completed"
        out.append({"system": "torchft", "event": "error", "error": f"no kill rows: {why}"})
    return out


# ---------------------------------------------------------------------- summary and output
def _stat(values: list[float | None]) -> dict[str, float] | None:
    vals = [v for v in values if v is not None]
    return {"n": len(vals), "median": statistics.median(vals), "max": max(vals)} if vals else None


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system: per phase the count, median and max of each figure; the
    kills stalling a survivor over :data:`STALL_S`; the first-step target."""
    out: dict[str, Any] = {}
    for system in dict.fromkeys(r["system"] for r in records if r.get("event") == "kill"):
        kills = [r for r in records if r.get("system") == system and r.get("event") == "kill"]
        per_phase = {}
        for phase in PHASES:
            rows = [r for r in kills if r.get("phase") == phase]
            if rows:
                per_phase[phase] = {"kills": len(rows), **{k: _stat([r.get(k) for r in rows]) for k in
                                    ("first_step_s", "first_step_net_s", "idle_max_s", "idle_max_net_s")}}
        judged = [r for r in kills if r.get("idle_max_s") is not None]
        netted = [r for r in kills if r.get("idle_max_net_s") is not None]
        timed = [r for r in kills if r.get("target_met") is not None]
        timed_net = [r for r in kills if r.get("target_met_net") is not None]
        mid = [r for r in timed if r.get("phase") == "step"]
        aimed = [r for r in kills if r.get("aim")]
        out[system] = {
            "kills": len(kills),
            "phases": per_phase,
            "unclassified": sum(1 for r in kills if r.get("phase") not in PHASES),
            "stalled_over_2s": sum(1 for r in judged if r["idle_max_s"] > STALL_S), "stall_judged": len(judged),
            "stalled_over_2s_net": sum(1 for r in netted if r["idle_max_net_s"] > STALL_S), "stall_judged_net": len(netted),
            "target_met": sum(1 for r in timed if r["target_met"]), "target_judged": len(timed),
            "target_met_mid_step": sum(1 for r in mid if r["target_met"]), "target_judged_mid_step": len(mid),
            "target_met_net": sum(1 for r in timed_net if r["target_met_net"]), "target_judged_net": len(timed_net),
            "step_s": _stat([r.get("step_s") for r in kills]),
            "aim_hits": sum(1 for r in aimed if r.get("phase") == r["aim"]), "aimed": len(aimed),
        }
    return out


def _s(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _med_max(stat: dict[str, float] | None) -> str:
    return "-" if not stat else f"{stat['median']:.2f} [{stat['max']:.2f}]"


def _verdict(s: dict[str, Any]) -> str:
    """One system's line on the issue's two bounds."""
    net = "net of their own validations and saves"
    stalls = f"kills stalling a survivor over {STALL_S:g} s: **{s['stalled_over_2s']} of {s['stall_judged']}**"
    if s["stall_judged_net"]:
        stalls += f" ({net}: {s['stalled_over_2s_net']} of {s['stall_judged_net']})"
    step = s["step_s"]
    target = (f"kill -> first step <= {FIRST_STEP_MARGIN_S:g} s + one step time (step {_s(step['median'] if step else None, 3)}"
              f" s): **{s['target_met']} of {s['target_judged']}**")
    also = []
    if s["target_judged_mid_step"] != s["target_judged"]:
        also.append(f"mid-step kills: {s['target_met_mid_step']} of {s['target_judged_mid_step']}")
    if s["target_judged_net"]:
        also.append(f"{net}: {s['target_met_net']} of {s['target_judged_net']}")
    parts = [stalls, target + (f" ({'; '.join(also)})" if also else "")]
    if s["aimed"]:
        parts.append(f"aimed phase hit {s['aim_hits']} of {s['aimed']}")
    if s["unclassified"]:
        parts.append(f"{s['unclassified']} kill(s) without a phase")
    return "; ".join(parts)


def markdown(doc: dict[str, Any]) -> str:
    cfg, summary = doc["config"], doc["summary"]
    mb = _chaos.state_mb(cfg["hidden"])
    size = f"{mb:.1f}" if mb < 10 else f"{mb:.0f}"
    lines = [
        "# Kills: `kill -9` mid-step, during validation, during a checkpoint save",
        "",
        f"Generated by `{doc['command']}` on {doc['machine']['when']} ({doc['machine']['cpus']} CPUs, "
        f"{doc['machine']['platform']}; {doc['wall_s']:.0f} s). {cfg['nodes']} processes train and a joiner is killed "
        f"each round ({cfg['nodes'] + 1} at the kill), {size} MB of state (hidden {cfg['hidden']}); "
        + (f"validation every {cfg['val_every']} batches ({VAL_BATCHES} batches of {cfg['val_sleep']:g} s per node)"
           if cfg["val_every"] else "no validation")
        + (f", a checkpoint every {cfg['ckpt_every']} steps" if cfg["ckpt_every"] else ", no checkpoints")
        + f"; {cfg['step_sleep']:g} s of stand-in compute per step. Method: "
        "docs/benchmarks.md (\"Kills\").",
        "",
        "## Summary",
        "",
        "| system | phase | kills | kill -> first step (s), median [max] | net | survivors' max idle (s), median [max] | net |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for system, s in summary.items():
        for phase, p in s["phases"].items():
            lines.append(f"| {system} | {phase} | {p['kills']} | {_med_max(p['first_step_s'])} | "
                         f"{_med_max(p['first_step_net_s'])} | {_med_max(p['idle_max_s'])} | {_med_max(p['idle_max_net_s'])} |")
    lines.append("")
    for system, s in summary.items():
        lines.append(f"- {system}: " + _verdict(s))
    lines += ["", "## Every kill", "",
              "| system | # | aimed | phase | in it for (s) | kill -> first step (s) | net | survivors' max idle (s) | net "
              "| step (s) | <= 0.3 s + step | notes |",
              "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | --- |"]
    for r in doc["records"]:
        if r.get("event") != "kill":
            continue
        met = "-" if r.get("target_met") is None else ("yes" if r["target_met"] else "NO")
        if r.get("target_met_net") is not None and r["target_met_net"] != r.get("target_met"):
            met += f" (net {'yes' if r['target_met_net'] else 'NO'})"
        lines.append(f"| {r['system']} | {r.get('kill', '-')} | {r.get('aim') or '-'} | {r.get('phase') or '-'} | "
                     f"{_s(r.get('phase_since_s'))} | {_s(r.get('first_step_s'))} | {_s(r.get('first_step_net_s'))} | "
                     f"{_s(r.get('idle_max_s'))} | {_s(r.get('idle_max_net_s'))} | {_s(r.get('step_s'), 3)} | {met} | "
                     f"{(r.get('notes') or '').replace('|', '/')} |")
    runs = [r for r in doc["records"] if r.get("event") == "run"]
    errors = [r for r in doc["records"] if r.get("event") == "error"]
    if runs or errors:
        lines += ["", "## Runs", ""]
        lines += [f"- {r['system']}: invariants " + ("held (identical replicas, every sample once per epoch)"
                                                      if r.get("invariants_ok") else f"BROKEN: {r.get('problems')}")
                  for r in runs]
        lines += [f"- {r['system']}: FAILED: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kills.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=30, help="kill -9 rounds of chaos (default %(default)s)")
    ap.add_argument("--hidden", type=int, default=1024, help="MLP width: 1024 is 13 MB of state, 4096 203 MB")
    ap.add_argument("--nodes", type=int, default=4, help="processes training before each joiner (default %(default)s)")
    ap.add_argument("--torchft-kills", type=int, default=0, help="TorchFT join-and-kill rounds (default 0: none)")
    ap.add_argument("--step-sleep", type=float, default=0.03, help="stand-in compute per step, s (default %(default)s)")
    ap.add_argument("--val-every", type=int, default=10, help="validate every N batches (default %(default)s; 0: never)")
    ap.add_argument("--val-sleep", type=float, default=0.1,
                    help=f"s per validation batch, {VAL_BATCHES} batches per node (default %(default)s)")
    ap.add_argument("--ckpt-every", type=int, default=6,
                    help="a checkpoint every N steps (default %(default)s; 0: never)")
    ap.add_argument("--no-aim", dest="aim", action="store_false",
                    help="kill at the timeline's offsets only, not held back for a phase")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="write the records and the summary here")
    ap.add_argument("--markdown", type=Path, default=None, help="write the tables here")
    ap.add_argument("--prefault-gib", type=float, default=0.0,
                    help="memory to fault in once before anything is timed (benchmarks/_machine.py; run.py uses 8)")
    ap.add_argument("--quiet", action="store_true", help="no scenario progress lines")
    args = ap.parse_args(argv)
    if args.kills < 1 or args.nodes < 2 or args.torchft_kills < 0:
        ap.error("--kills >= 1, --nodes >= 2 and --torchft-kills >= 0")
    if args.val_every < 0 or args.ckpt_every < 0 or args.val_sleep < 0:
        ap.error("--val-every, --val-sleep and --ckpt-every must not be negative")
    t0 = time.monotonic()

    def say(msg: str) -> None:
        print(f"[{time.monotonic() - t0:6.0f}s] {msg}", flush=True)

    if args.prefault_gib > 0:
        pre = _machine.prefault(args.prefault_gib)
        say(f"memory faulted in: {pre['gib']:.1f} GiB in {pre['seconds']:.1f} s")
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="chaos-kills-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        say(f"chaos: {args.kills} kills, {args.nodes} nodes, {_chaos.state_mb(args.hidden):.0f} MB of state")
        try:
            recs = run_chaos(args, workdir, io.StringIO() if args.quiet else sys.stdout)
        except Exception as exc:  # one system failing must not lose the other's results
            recs = [{"system": "chaos", "event": "error", "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-4000:]}]
        records += recs
        say(f"chaos: {sum(1 for r in recs if r.get('event') == 'kill')} kills measured"
            + "".join(f"; FAILED: {r['error']}" for r in recs if r.get("event") == "error"))
        if args.torchft_kills > 0:
            say(f"torchft: {args.torchft_kills} join-and-kill rounds")
            try:
                recs = run_torchft(args, workdir)
            except Exception as exc:
                recs = [{"system": "torchft", "event": "error", "error": f"{type(exc).__name__}: {exc}",
                         "traceback": traceback.format_exc()[-4000:]}]
            records += recs
            say(f"torchft: {sum(1 for r in recs if r.get('event') == 'kill')} kills measured"
                + "".join(f"; FAILED: {r['error']}" for r in recs if r.get("event") == "error"))
    command = "python benchmarks/kills.py " + " ".join(argv if argv is not None else sys.argv[1:])
    doc = {
        "benchmark": "kills", "command": command.strip(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "markdown", "workdir")},
        "machine": {"when": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "wall_s": time.monotonic() - t0,
        "records": records,
        "summary": summarize(records),
    }
    text = markdown(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    if args.markdown:
        args.markdown.write_text(text)
    print()
    print(text)
    return 1 if any(r.get("event") == "error" for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
