"""Scenario reports from hand-built traces: every number follows from the records.

The run: n0, n1, n2 train in lockstep, a step every 0.1 s (n1 records each
step 2 ms after n0, n2 4 ms, n3 6 ms); n3 joins and pulls 40 MB in 0.4 s from
n0 and n1; n2 is killed; the link n0-n3 is cut (n3 is sidelined) and restored
(n3 pulls again and trains); n1 is stopped for 0.3 s, too short to be
detected.  Times below are seconds since training started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chaos_lightning.scenario import report as rep

T0 = 1_700_000_000.0
ID = {"n0": "10.9.0.1:7000", "n1": "10.9.0.2:7000", "n2": "10.9.0.3:7000", "n3": "10.9.0.4:7000"}
PID = {"n0": 101, "n1": 102, "n2": 103, "n3": 104}
OFF = {"n0": 0.0, "n1": 0.002, "n2": 0.004, "n3": 0.006}
BATCH = 32
LINKS = {"nodes": {"n0": {"down_bps": 1e9, "up_bps": 800e6}, "n1": {"down_bps": 1e9, "up_bps": 800e6},
                   "n2": {"down_bps": 1e9, "up_bps": 800e6}, "n3": {"down_bps": 1e9, "up_bps": 800e6}}}


class Scenario:
    """Records per node and the runner's actions, written as a run directory."""

    def __init__(self) -> None:
        self.records: dict[str, list[dict]] = {n: [] for n in ID}
        self.actions: list[dict] = [{"action": "training_started", "t": T0}]

    def rec(self, name: str, rel: float, ev: str, **fields) -> None:
        self.records[name].append({"t": T0 + round(rel, 6), "ev": ev, "node": ID[name], "pid": PID[name], **fields})

    def steps(self, names: list[str], first: int, start: float, count: int) -> float:
        world = len(names)
        for k in range(count):
            t = round(start + 0.1 * k, 6)
            for n in names:
                self.rec(n, t + OFF[n], "step", step=first + k, samples=BATCH * world, world=world)
        return round(start + 0.1 * (count - 1), 6)

    def view(self, epoch: int, members: list[str], at: dict[str, float], down: list[list[str]] = ()) -> None:
        links = sorted(sorted([ID[a], ID[b]]) for a, b in down)
        for n, t in at.items():
            self.rec(n, t, "view_committed", epoch=epoch, members=sorted(ID[m] for m in members), down_links=links)

    def trainers(self, epoch: int, names: list[str], t: float, stall_s: float, joined: tuple[str, ...] = ()) -> None:
        for n in names:
            self.rec(n, t, "trainers", epoch=epoch, world=len(names), trainers=[ID[m] for m in names], stall_s=stall_s,
                     joined=n in joined, failed_step=False)

    def action(self, rel: float, action: str, nodes: list[str], **fields) -> None:
        known = {n: ID[n] for n in ID if n != "n3" or rel >= 1.0}
        self.actions.append({"t": T0 + rel, "action": action, "nodes": nodes, "at": round(rel), "line": len(self.actions),
                             "members": known, **fields})

    def write(self, run: Path, links: dict | None = LINKS, torn: bool = True) -> Path:
        (run / "trace").mkdir(parents=True, exist_ok=True)
        for n, recs in self.records.items():
            lines = [json.dumps(r) for r in sorted(recs, key=lambda r: r["t"])]
            if torn and n == "n2":  # killed mid-write
                lines.append('{"t": 1700000004.05, "ev": "st')
            (run / "trace" / f"{n}.jsonl").write_text("\n".join(lines) + ("" if torn and n == "n2" else "\n"))
        (run / "actions.jsonl").write_text("".join(json.dumps(a) + "\n" for a in self.actions))
        if links is not None:
            (run / "links.json").write_text(json.dumps(links))
        return run


def scenario() -> Scenario:
    s = Scenario()
    first3 = ["n0", "n1", "n2"]
    for n in first3:
        s.rec(n, -6.0, "start", proc_start=T0 - 8.0)
        s.rec(n, -3.0, "join_request")
    s.action(-6.0, "start", first3)
    s.view(1, first3, {"n0": -2.0, "n1": -2.0, "n2": -2.0})
    s.trainers(1, first3, -0.5, 0.0, joined=tuple(first3))
    s.steps(first3, 1, 0.0, 22)  # steps 1-22 at 0.0 .. 2.1

    # join n3 at 1.0: process started 10 ms before the runner logged it
    s.action(1.0, "join", ["n3"])
    s.rec("n3", 1.5, "start", proc_start=T0 + 0.99)
    s.rec("n3", 2.0, "join_request")
    all4 = ["n0", "n1", "n2", "n3"]
    s.view(2, all4, {"n0": 2.05, "n1": 2.06, "n2": 2.07, "n3": 2.08})
    s.rec("n3", 2.5, "pull", bytes=40_000_000, seconds=0.4,
          sources=[{"node": ID["n0"], "bytes": 20_000_000, "seconds": 0.4},
                   {"node": ID["n1"], "bytes": 20_000_000, "seconds": 0.38}])
    s.trainers(2, all4, 2.55, 0.45, joined=("n3",))
    s.steps(all4, 23, 2.65, 14)  # steps 23-36 at 2.65 .. 3.95

    # kill n2 at 4.0: step 37 fails at the survivors
    s.action(4.0, "kill", ["n2"])
    alive = ["n0", "n1", "n3"]
    for n in alive:
        s.rec(n, 4.5, "step_failed", step=37)
    s.view(3, alive, {"n0": 4.6, "n1": 4.61, "n3": 4.62})
    s.trainers(3, alive, 4.7, 0.75)
    s.steps(alive, 37, 4.8, 12)  # steps 37-48 at 4.8 .. 5.9

    # cut n0-n3 at 6.0: n3 sidelined
    s.action(6.0, "cut", ["n0", "n3"])
    for n in alive:
        s.rec(n, 6.3, "step_failed", step=49)
    s.view(4, alive, {"n0": 6.4, "n1": 6.41, "n3": 6.42}, down=[["n0", "n3"]])
    s.rec("n3", 6.45, "sidelined", epoch=4, down_links=[sorted([ID["n0"], ID["n3"]])])
    s.trainers(4, ["n0", "n1"], 6.5, 0.6)
    s.steps(["n0", "n1"], 49, 6.6, 19)  # steps 49-67 at 6.6 .. 8.4

    # restore at 8.0: n3 pulls 40 MB from n1 and trains again
    s.action(8.0, "restore", ["n0", "n3"])
    s.view(5, alive, {"n0": 8.2, "n1": 8.21, "n3": 8.22})
    s.rec("n3", 8.5, "pull", bytes=40_000_000, seconds=0.45, sources=[{"node": ID["n1"], "bytes": 40_000_000, "seconds": 0.45}])
    s.trainers(5, alive, 8.55, 0.15)
    s.steps(alive, 68, 8.65, 4)  # steps 68-71 at 8.65 .. 8.95

    # stop n1 for 0.3 s at 9.0: nobody notices, the steps just wait
    s.action(9.0, "stop", ["n1"], seconds=0.3)
    s.action(9.3, "cont", ["n1"])
    s.steps(alive, 72, 9.35, 7)  # steps 72-78 at 9.35 .. 9.95
    s.action(10.0, "end", [])
    for n in alive:
        s.rec(n, 10.0, "done", step=78)
    return s


def by_action(result: dict, action: str) -> dict:
    [row] = [a for a in result["actions"] if a["action"] == action]
    return row


@pytest.fixture
def result(tmp_path: Path) -> dict:
    return rep.analyze(scenario().write(tmp_path / "run"))


def approx(x):
    return pytest.approx(x, abs=1e-5)


def test_throughput_world_and_stalls_count_each_global_step_once(result):
    thr = result["series"]["throughput"]
    assert thr["t"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0]
    # e.g. 2-3 s: steps 21, 22 at world 3 (96 samples) and four at world 4 (128)
    assert thr["samples_per_s"] == [960, 960, 704, 1280, 192, 960, 256, 640, 704, 672]
    assert result["series"]["world"] == {"t": approx([0.0, 2.65, 4.8, 6.6, 8.65, 9.95]), "world": [3, 4, 3, 2, 3, 3]}
    assert result["median_step_s"] == approx(0.1)
    # the restore's 0.25 s gap is under 3x the median step: not a stall
    assert [(s["start"], s["end"]) for s in result["stalls"]] == [approx((2.1, 2.65)), approx((3.95, 4.8)),
                                                                  approx((5.9, 6.6)), approx((8.95, 9.35))]
    assert result["totals"] == {
        "steps": 78, "last_step": 78, "samples": 2112 + 1792 + 1152 + 1216 + 1056, "failed_steps": 2, "final_world": 3,
        "stalls": 4, "stall_s": approx(2.5), "wall_s": approx(9.95), "end_t": 10.0,
    }


def test_join_latency_idle_scale_out_and_transfer_bound(result):
    join = by_action(result, "join")
    assert join["t"] == 1.0 and join["nodes"] == ["n3"] and join["members"] == {"n3": ID["n3"]}
    view = join["view_everywhere"]
    assert (view["s"], view["epoch"], view["last_node"], view["reason"]) == (approx(1.08), 2, "n3", None)
    first = join["first_step"]
    assert (first["s"], first["epoch"], first["last_node"]) == (approx(1.656), 2, "n3")
    assert first["switch_stall_s"] == {"n0": 0.45, "n1": 0.45, "n2": 0.45, "n3": 0.45}
    # survivors train on while n3 imports: idle runs from their last step before the switch (2.1) to 2.65
    idle = join["survivor_idle"]
    assert idle["per_node"] == {"n0": approx(0.45), "n1": approx(0.45), "n2": approx(0.45)}
    assert (idle["sum_s"], idle["max_s"]) == (approx(1.35), approx(0.45))
    scale = join["scale_out"]["n3"]
    assert (scale["cold_s"], scale["warm_s"], scale["reason"]) == (approx(1.666), approx(0.656), None)
    pull = join["pulls"]["n3"]
    assert (pull["bytes"], pull["seconds"], pull["mb_per_s"]) == (40_000_000, 0.4, approx(100.0))
    assert [s["node"] for s in pull["sources"]] == ["n0", "n1"]
    # bound: 320 Mbit / min(1 Gbit/s down, 2 x 800 Mbit/s up) = 0.32 s
    assert (pull["bound_s"], pull["ratio"], pull["bound_reason"]) == (approx(0.32), approx(1.25), None)


def test_kill_latency_and_survivor_idle(result):
    kill = by_action(result, "kill")
    assert kill["view_everywhere"]["s"] == approx(0.62) and kill["view_everywhere"]["members"] == ["n0", "n1", "n3"]
    assert (kill["first_step"]["s"], kill["first_step"]["last_node"]) == (approx(0.806), "n3")
    idle = kill["survivor_idle"]
    assert idle["per_node"] == {"n0": approx(0.75), "n1": approx(0.75), "n3": approx(0.75)}
    assert idle["sum_s"] == approx(2.25) and idle["normal_step_s"]["n0"] == approx(0.1)


def test_cut_sidelines_one_side_and_restore_brings_it_back(result):
    cut = by_action(result, "cut")
    assert cut["view_everywhere"]["s"] == approx(0.42)
    assert cut["first_step"]["trainers"] == ["n0", "n1"]
    assert (cut["first_step"]["s"], cut["first_step"]["last_node"]) == (approx(0.602), "n1")
    assert cut["survivor_idle"]["per_node"] == {"n0": approx(0.6), "n1": approx(0.6)}

    restore = by_action(result, "restore")
    assert (restore["view_everywhere"]["s"], restore["view_everywhere"]["epoch"]) == (approx(0.22), 5)
    assert (restore["first_step"]["s"], restore["first_step"]["last_node"]) == (approx(0.656), "n3")
    # n3 was sidelined, not training: it is not a survivor
    assert restore["survivor_idle"]["per_node"] == {"n0": approx(0.15), "n1": approx(0.15)}
    pull = restore["pulls"]["n3"]
    assert (pull["bound_s"], pull["ratio"]) == (approx(0.4), approx(1.125))  # one source: 800 Mbit/s up


def test_undetected_stop_reports_not_detected_and_the_survivors_wait(result):
    stop = by_action(result, "stop")
    assert stop["seconds"] == 0.3
    assert stop["view_everywhere"]["s"] is None and stop["view_everywhere"]["reason"] == "not detected"
    assert stop["first_step"]["s"] is None and stop["first_step"]["next_step_s"] == approx(0.35)
    assert stop["survivor_idle"]["per_node"] == {"n0": approx(0.3), "n3": approx(0.3)}
    assert [a["action"] for a in result["actions"]] == ["join", "kill", "cut", "restore", "stop"]


def test_torn_last_line_of_a_killed_node_is_skipped_with_a_warning(result):
    assert result["nodes"]["n2"]["ending"] == "cut short" and result["nodes"]["n0"]["ending"] == "done"
    assert any("n2.jsonl: skipped 1 unparsable line" in w for w in result["warnings"])


def test_missing_records_give_none_with_a_reason(tmp_path):
    s = scenario()
    s.records["n3"] = [r for r in s.records["n3"] if r["ev"] != "start"]
    # n1 (alive to the end) records no view from the one that drops n2 on
    s.records["n1"] = [r for r in s.records["n1"] if not (r["ev"] == "view_committed" and r["epoch"] >= 3)]
    result = rep.analyze(s.write(tmp_path / "run", links=None))
    join = by_action(result, "join")
    scale = join["scale_out"]["n3"]
    assert scale["cold_s"] is None and scale["warm_s"] == approx(0.656) and "no start record" in scale["reason"]
    pull = join["pulls"]["n3"]
    assert pull["ratio"] is None and pull["bound_s"] is None and "no links.json" in pull["bound_reason"]
    assert pull["mb_per_s"] == approx(100.0)
    view = by_action(result, "kill")["view_everywhere"]
    assert view["s"] is None and view["reason"] == "n1 recorded no view of epoch >= 3"
    # (b) and the idle time do not need that record
    assert by_action(result, "kill")["first_step"]["s"] == approx(0.806)
    assert by_action(result, "kill")["survivor_idle"]["sum_s"] == approx(2.25)
    assert "?" in rep.summary_table(result, use_rich=False)


def test_joiner_killed_before_its_first_step(tmp_path):
    s = scenario()
    s.records["n3"] = [r for r in s.records["n3"] if r["t"] < T0 + 2.3]  # dies during its pull
    result = rep.analyze(s.write(tmp_path / "run"))
    join = by_action(result, "join")
    assert join["scale_out"]["n3"]["cold_s"] is None
    assert "n3 completed no step (trace ends at 2.08 s without done (killed?))" == join["scale_out"]["n3"]["reason"]
    assert join["pulls"]["n3"] == {"reason": "no pull record from n3"}
    assert join["first_step"]["excluded"] == {"n3": "trace ends at 2.08 s without done (killed?)"}


def test_throttle_before_the_pull_caps_the_bound(tmp_path):
    s = scenario()
    s.action(0.5, "throttle", ["n3"], rate_bps=400e6)
    result = rep.analyze(s.write(tmp_path / "run"))
    assert by_action(result, "throttle")["note"].startswith("not a membership event")
    pull = by_action(result, "join")["pulls"]["n3"]
    assert (pull["bound_s"], pull["ratio"]) == (approx(0.8), approx(0.5))  # 320 Mbit / 400 Mbit/s
    assert pull["rates_bps"]["throttles"] == ["throttle n3 at 0.5 s"]


def test_joiner_member_id_from_its_own_trace(tmp_path):
    s = scenario()
    for a in s.actions:
        a.get("members", {}).pop("n3", None)
    result = rep.analyze(s.write(tmp_path / "run"))
    assert by_action(result, "join")["view_everywhere"]["s"] == approx(1.08)


def test_bad_or_empty_run_directories_never_raise(tmp_path):
    empty = rep.analyze(tmp_path)
    assert empty["actions"] == [] and empty["totals"]["steps"] == 0
    assert any("no trace directory" in w for w in empty["warnings"])
    run = scenario().write(tmp_path / "run")
    with open(run / "actions.jsonl", "a") as f:
        f.write("not json\n[1, 2]\n")
    (run / "links.json").write_text("{broken")
    (run / "trace" / "n9.jsonl").write_text("")
    result = rep.analyze(run)
    assert any("actions.jsonl: skipped 2" in w for w in result["warnings"])
    assert any("links.json unreadable" in w for w in result["warnings"])
    assert by_action(result, "join")["pulls"]["n3"]["bound_reason"] == "no link rates (no links.json: loopback)"
    (run / "actions.jsonl").unlink()
    no_actions = rep.analyze(run)
    assert no_actions["actions"] == [] and no_actions["totals"]["steps"] == 78
    assert any("training_started" in w for w in no_actions["warnings"])
    json.dumps(no_actions)


def test_table_plot_and_report_files(tmp_path, result):
    plain = rep.summary_table(result, use_rich=False)
    lines = plain.splitlines()
    assert lines[0].startswith("at (s)") and len([ln for ln in lines if ln.startswith(("1 ", "4 ", "6 ", "8 ", "9 "))]) == 5
    join_row = next(ln for ln in lines if ln.startswith("1 "))
    assert "1080" in join_row and "1656 (n3)" in join_row and "1350 / 450" in join_row and "1.67 / 0.66" in join_row
    assert "40.0 MB 0.40 s 1.25x" in join_row
    assert "not detected" in next(ln for ln in lines if ln.startswith("9 "))
    assert "totals: 78 steps, 7328 samples" in plain
    fancy = rep.summary_table(result)
    assert "view everywhere" in fancy and "1656 (n3)" in fancy

    png = rep.plot(result, tmp_path / "timeline.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    run = scenario().write(tmp_path / "run2")
    out = rep.report(run)
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(out))
    assert (run / "timeline.png").stat().st_size > 10_000
    assert rep.main([str(run)]) == 0


@pytest.mark.parametrize("ev", ["start", "join_request", "view_committed", "trainers", "step", "step_failed", "pull", "sidelined",
                                "done"])
def test_a_field_missing_or_mistyped_never_raises(tmp_path, ev):
    fields = {k for recs in scenario().records.values() for r in recs if r["ev"] == ev for k in r if k not in ("t", "ev")}
    for i, key in enumerate(sorted(fields)):
        for bad in (None, "x", [1], {"a": 1}):
            s = scenario()
            for recs in s.records.values():
                for r in recs:
                    if r["ev"] == ev:
                        if bad is None:
                            r.pop(key, None)
                        else:
                            r[key] = bad
            result = rep.analyze(s.write(tmp_path / f"{key}-{type(bad).__name__}"))
            json.dumps(result)
            rep.summary_table(result, use_rich=False)


@pytest.mark.parametrize("key", ["nodes", "members", "at", "rate_bps", "seconds", "line"])
def test_an_action_field_missing_or_mistyped_never_raises(tmp_path, key):
    for bad in (None, "x", [1], {"a": 1}, True):
        s = scenario()
        s.action(0.5, "throttle", ["n3"], rate_bps=400e6)
        for a in s.actions[1:]:
            if bad is None:
                a.pop(key, None)
            else:
                a[key] = bad
        result = rep.analyze(s.write(tmp_path / f"{key}-{type(bad).__name__}"))
        json.dumps(result)
        rep.summary_table(result, use_rich=False)


def test_graceful_leave_costs_the_survivors_only_the_switch(tmp_path):
    """n2 asks to leave at 1.0 and trains on to the step boundary at 1.3; the survivors idle only through the switch."""
    s = Scenario()
    three = ["n0", "n1", "n2"]
    s.view(1, three, {n: -2.0 for n in three})
    s.trainers(1, three, -0.5, 0.0, joined=tuple(three))
    s.steps(three, 1, 0.0, 14)  # steps 1-14 at 0.0 .. 1.3
    s.action(1.0, "leave", ["n2"])
    s.view(2, ["n0", "n1"], {"n0": 1.31, "n1": 1.312})
    s.rec("n2", 1.32, "left")
    s.trainers(2, ["n0", "n1"], 1.33, 0.03)
    s.steps(["n0", "n1"], 15, 1.45, 10)  # steps 15-24 at 1.45 .. 2.35
    s.action(2.4, "end", [])
    result = rep.analyze(s.write(tmp_path / "run", links=None, torn=False))
    leave = by_action(result, "leave")
    assert (leave["view_everywhere"]["s"], leave["view_everywhere"]["last_node"]) == (approx(0.312), "n1")
    assert (leave["first_step"]["s"], leave["first_step"]["last_node"]) == (approx(0.452), "n1")
    # from the last step before the switch (1.3), not before the leave request (1.0): 0.15 - 0.1
    assert leave["survivor_idle"]["per_node"] == {"n0": approx(0.05), "n1": approx(0.05)}
    assert result["nodes"]["n2"]["ending"] == "left"


def test_a_joins_idle_is_against_the_new_groups_steps_and_its_warm_time_is_broken_down(tmp_path):
    """Issue 13: the members' steps before a join ran beside the joiner's
    start-up and were slow (0.3 s here against 0.1 s), which made the idle
    look small; the baseline of a join is the first steps in the new group.
    The warm scale-out is split into admission, group, pull, load, the rest
    of the switch and the first step."""
    s = Scenario()
    three, four = ["n0", "n1", "n2"], ["n0", "n1", "n2", "n3"]
    s.action(-6.0, "start", three)
    s.view(1, three, {n: -2.0 for n in three})
    s.trainers(1, three, -0.5, 0.0, joined=tuple(three))
    for k in range(12):  # slowed by the joiner's start-up: a step every 0.3 s
        for n in three:
            s.rec(n, round(0.3 * k, 6) + OFF[n], "step", step=1 + k, samples=BATCH * 3, world=3)
    s.action(0.5, "join", ["n3"])
    s.rec("n3", 0.6, "start", proc_start=T0 + 0.5)
    s.rec("n3", 3.0, "join_request")
    s.view(2, four, {"n0": 3.04, "n1": 3.04, "n2": 3.04, "n3": 3.05})
    s.rec("n3", 3.8, "pull", bytes=40_000_000, seconds=0.4, load_s=0.02, sources=[])
    for n in four:  # the group formed at 4.0 (the members' last step was at 3.3)
        s.rec(n, 4.0, "trainers", epoch=2, world=4, trainers=[ID[m] for m in four], stall_s=0.7 if n != "n3" else 1.0,
              joined=n == "n3", failed_step=False, group_init_s=0.3)
    s.steps(four, 13, 4.25, 12)  # the new group: a step every 0.1 s
    s.action(6.0, "end", [])
    result = rep.analyze(s.write(tmp_path / "run", torn=False))
    join = by_action(result, "join")
    idle = join["survivor_idle"]
    assert idle["baseline"] == "after" and idle["normal_step_s"]["n0"] == approx(0.1)
    # 3.3 -> 4.25 minus one normal step of the new group (was minus 0.3: 0.65)
    assert idle["per_node"]["n0"] == approx(0.85)
    parts = join["scale_out"]["n3"]["breakdown"]
    assert parts == {"admission_s": approx(0.05), "group_s": approx(0.3), "pull_s": approx(0.4), "load_s": approx(0.02),
                     "rest_s": approx(0.23), "first_step_s": approx(0.256)}
    assert join["scale_out"]["n3"]["warm_s"] == approx(1.256)


# -- what a kill hit: the phase of the cluster at the kill instant ------------------------------------
#
# The scenario workload marks validations (val_start/val_end) and checkpoint
# saves (ckpt_start/ckpt_end) in each node's trace.  Below, every node has
# validated three times before (0.3 s each, its normal length); n2 is
# killed at 4.0 (its trace stops inside what it was doing), the survivors'
# collective with it fails and they switch at 4.7, train again from 4.8.


def marked(s: Scenario, phase: str, names: list[str], start: float, end: float | None) -> None:
    begin, finish = rep.PHASES[phase]
    for n in names:
        s.rec(n, start, begin, step=0)
        if end is not None:
            s.rec(n, end, finish, step=0)


def with_validations(s: Scenario) -> Scenario:
    for start in (0.2, 0.9, 1.6):
        marked(s, "validation", ["n0", "n1", "n2"], start, start + 0.3)
    return s


def test_a_kill_between_two_steps_is_a_step_kill(result):
    kill = by_action(result, "kill")
    assert kill["phase"] == "step" and kill["phase_nodes"] == {n: "step" for n in ("n0", "n1", "n2", "n3")}
    assert kill["phase_since_s"] == approx(0.044)  # n3 recorded step 36 last, at 3.956
    assert "net_s" not in kill["first_step"] and "net_max_s" not in kill["survivor_idle"]  # no markers: as before
    assert "phase" not in by_action(result, "join") and "kill (step)" in rep.summary_table(result, use_rich=False)


def test_a_kill_during_validation_and_the_survivors_idle_net_of_their_own_validation(tmp_path):
    s = with_validations(scenario())
    # the survivors validate from 3.96; the kill makes their metric reduction
    # wait for its detection: they end at 4.5, 0.24 s late
    marked(s, "validation", ["n0", "n1", "n3"], 3.96, 4.5)
    marked(s, "validation", ["n2"], 3.96, None)  # killed in it
    kill = by_action(rep.analyze(s.write(tmp_path / "run")), "kill")
    assert kill["phase"] == "validation" and set(kill["phase_nodes"].values()) == {"validation"}
    assert kill["phase_since_s"] == approx(0.04)
    idle = kill["survivor_idle"]
    assert idle["per_node"]["n0"] == approx(0.75)  # as ever: 3.95 -> 4.8, minus a 0.1 s step
    # its validation at its normal length (0.3 s) was its own work; the 0.24 s the kill added to it was not
    assert idle["work_s"]["n0"] == approx(0.3) and idle["net_per_node"]["n0"] == approx(0.45)
    # n3 validated once only (0.54 s, lengthened): its normal length is every node's, 0.3 s
    assert idle["work_s"]["n3"] == approx(0.3) and idle["net_max_s"] == approx(0.45)
    # kill -> first step (0.806 s at n3) less what a normal validation had left at the kill (0.3 - 0.04)
    assert kill["first_step"]["s"] == approx(0.806) and kill["first_step"]["net_s"] == approx(0.546)


def test_a_save_in_progress_makes_a_checkpoint_kill_even_where_a_node_validates(tmp_path):
    s = with_validations(scenario())
    marked(s, "checkpoint", ["n0", "n1", "n3"], 1.2, 1.25)  # one save before: 50 ms is its normal length
    marked(s, "checkpoint", ["n1", "n3"], 3.97, 4.45)
    marked(s, "checkpoint", ["n2"], 3.97, None)
    marked(s, "validation", ["n0"], 3.96, 4.5)
    kill = by_action(rep.analyze(s.write(tmp_path / "run")), "kill")
    assert kill["phase"] == "checkpoint" and kill["phase_since_s"] == approx(0.03)
    assert kill["phase_nodes"] == {"n0": "validation", "n1": "checkpoint", "n2": "checkpoint", "n3": "checkpoint"}
    assert kill["survivor_idle"]["work_s"]["n3"] == approx(0.05)


def test_a_killed_processs_unfinished_validation_ends_at_its_kill(tmp_path):
    s = with_validations(scenario())
    marked(s, "validation", ["n2"], 3.96, None)
    s.action(9.5, "kill", ["n3"])  # much later, between two steps
    result = rep.analyze(s.write(tmp_path / "run"))
    first, later = [a for a in result["actions"] if a["action"] == "kill"]
    assert first["phase"] == "validation" and first["phase_nodes"]["n2"] == "validation"
    assert later["phase"] == "step" and "n2" not in later["phase_nodes"]  # n2 is long gone
