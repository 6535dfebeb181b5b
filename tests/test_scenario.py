"""Scripted churn scenarios, end to end: ``python -m chaos_lightning.scenario``.

The timeline parser is tested on its own; then two real runs, each a
subprocess of the command users run, with real training processes: one on
loopback (join, graceful leave, kill -9, SIGSTOP, a link cut and restore) and
one on the network-namespace testbed (real shaped links, a real link cut,
a throttle).  Both must end with bit-identical replicas, every sample trained
once per epoch, and a report whose every event has its DESIGN metrics.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from chaos_lightning.scenario.timeline import DEFAULT, TimelineError, parse, rate_bps

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- the timeline format
def test_the_default_timeline_has_the_readme_events() -> None:
    t = parse(DEFAULT)
    assert t.initial == ("n0", "n1", "n2", "n3")
    assert [a.action for a in t.actions] == ["start", "join", "leave", "kill", "cut", "restore", "end"]
    assert t.names == ["n0", "n1", "n2", "n3", "n4"]
    assert t.settings == {"hidden": 768}
    assert rate_bps("20mbit") == 20e6 and rate_bps("500kbit") == 5e5


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("", None, "no actions"),
        ("0 start a\n", None, "the last action must be"),
        ("3 join a\n9 end\n", 1, "the first action must be '0 start"),
        ("0 start a b\n1 start c\n9 end\n", 2, "'start' comes once"),
        ("0 start a\n5 kil a\n9 end\n", 2, "unknown action 'kil'"),
        ("0 start a\n5 kill b\n9 end\n", 2, "b was never started"),
        ("0 start a b\n5 kill b\n6 leave b\n9 end\n", 3, "b has left or was killed already"),
        ("0 start a b\n5 join a\n9 end\n", 2, "a is already started"),
        ("0 start a b\n5 kill b\n4 kill a\n9 end\n", 3, "times must not go backwards"),
        ("0 start a b\nsoon kill b\n9 end\n", 2, "'soon' is not a time"),
        ("0 start a b\n5 restore a b\n9 end\n", 2, "that link is not cut"),
        ("0 start a b\n5 cut a a\n9 end\n", 2, "a link joins two different nodes"),
        ("0 start a b\n5 stop a -1\n9 end\n", 2, "not a positive number"),
        ("0 start a b\n5 throttle a fast\n9 end\n", 2, "bad rate 'fast'"),
        ("0 start a\n9 end\n10 kill a\n", 3, "nothing may follow 'end'"),
        ("0 start a\nset hidden 3\n9 end\n", 2, "settings come before"),
        ("set colour blue\n0 start a\n9 end\n", 1, "expected 'set KEY VALUE'"),
        ("set hidden many\n0 start a\n9 end\n", 1, "bad value for hidden"),
        ("# a comment\n\n0 start 9lives\n9 end\n", 3, "bad node name"),
        ("0 start a b c\n5 partition a,b\n9 end\n", 2, "partition takes 2 argument(s)"),
        ("0 start a b c\n5 partition a,b b,c\n9 end\n", 2, "b on both sides"),
        ("0 start a b c\n5 partition a,,b c\n9 end\n", 2, "two non-empty comma-separated groups"),
        ("0 start a b c\n5 partition a,x b,c\n9 end\n", 2, "x was never started"),
        ("0 start a b c\n4 kill a\n5 partition a b,c\n9 end\n", 3, "a has left or was killed already"),
        ("0 start a b c\n5 partition a b,c\n6 partition b a,c\n9 end\n", 3, "the partition of line 2 is in effect"),
        ("0 start a b c\n5 heal\n9 end\n", 2, "no partition to heal"),
        ("0 start a b c\n5 partition a b,c\n6 heal\n7 heal\n9 end\n", 4, "no partition to heal"),
        ("0 start a b c\n5 heal a\n9 end\n", 2, "heal takes 0 argument(s)"),
        ("0 start a b\n5 restart\n9 end\n", 2, "restart takes 1 argument(s)"),
        ("0 start a b\n5 restart c\n9 end\n", 2, "c was never started"),
        ("0 start a b\n4 leave b\n5 restart b\n9 end\n", 3, "b has left or was killed already"),
    ],
)
def test_timeline_errors_name_the_file_and_line(text: str, line: int | None, why: str) -> None:
    with pytest.raises(TimelineError) as err:
        parse(text, "scenario.chaos")
    message = str(err.value)
    assert why in message
    assert message.startswith(f"scenario.chaos:{line}: " if line else "scenario.chaos: "), message


def test_partition_heal_and_restart() -> None:
    """A partition names two groups (comma-separated); its nodes are both
    groups, its cross pairs every pair with one end on each side; ``heal``
    ends it; ``restart`` keeps the name (the one reuse a timeline allows),
    also after a kill of another node and several times over."""
    t = parse("""\
0   start     a b c d e
5   partition d,e a,b,c   # 2 | 3
9   heal
12  restart   a
15  kill      b
18  restart   a
20  partition a c,d       # e in neither group keeps its links
22  cut       c e         # a cut beside a partition is its own
24  heal
26  restore   c e
30  end
""")
    p = t.actions[1]
    assert p.action == "partition" and p.groups == (("d", "e"), ("a", "b", "c"))
    assert p.nodes == ("d", "e", "a", "b", "c")
    assert sorted(p.cross_pairs()) == sorted((x, y) for x in "de" for y in "abc")
    assert str(p) == "partition d,e a,b,c"
    assert [a.action for a in t.actions] == ["start", "partition", "heal", "restart", "kill", "restart", "partition",
                                             "cut", "heal", "restore", "end"]
    assert t.actions[2].nodes == () and t.actions[3].nodes == ("a",)
    assert t.names == ["a", "b", "c", "d", "e"]  # a restart starts no new name
    assert t.uses_links()
    assert not parse("0 start a b c\n5 restart b\n9 end\n").uses_links()


def test_a_bad_timeline_file_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.chaos"
    bad.write_text("0 start a b\n5 explode a\n9 end\n")
    for argv in (
        [sys.executable, "-m", "chaos_lightning.scenario", str(bad)],
        [sys.executable, "-m", "chaos_lightning.launch", "scenario", str(tmp_path / "missing.chaos")],
    ):
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out
        assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "bad.chaos:2: unknown action 'explode'" in subprocess.run(
        [sys.executable, "-m", "chaos_lightning.scenario", str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60
    ).stderr


def test_throttle_on_loopback_is_refused_before_anything_starts(tmp_path: Path) -> None:
    t = tmp_path / "t.chaos"
    t.write_text("0 start a b\n5 throttle a 10mbit\n9 end\n")
    out = subprocess.run(
        [sys.executable, "-m", "chaos_lightning.scenario", str(t), "--run-dir", str(tmp_path / "run")],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 2 and "--testbed" in out.stderr, out
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- real runs
def run_scenario(tmp_path: Path, timeline: str, *extra: str, timeout: float) -> tuple[dict, str]:
    """Run the CLI on ``timeline``; the report (with invariants) and the printed output."""
    path = tmp_path / "scenario.chaos"
    path.write_text(timeline)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos_lightning.scenario", str(path), "--run-dir", str(run_dir), *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # the runner reaps its nodes on SIGTERM/SIGINT; make sure of it
            os.killpg(proc.pid, 9)
            proc.wait(10)
    if "--testbed" in extra:  # the runner's namespaces are gone with it
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
        assert f"chaos{proc.pid}x" not in listed, listed
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, out + "\n" + logs
    report = json.loads((run_dir / "report.json").read_text())
    png = run_dir / "timeline.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    return report, out


def assert_invariants(report: dict, finished: int) -> None:
    inv = report["invariants"]
    assert inv["problems"] == [], inv
    assert inv["identical_replicas"] and inv["no_sample_twice"] and inv["complete_epochs_exact"], inv
    assert len(inv["finished"]) == finished and len(inv["final_step"]) == 1, inv


def event(report: dict, action: str) -> dict:
    return next(a for a in report["actions"] if a["action"] == action)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_churn_scenario_on_loopback(tmp_path: Path) -> None:
    """Every kind of event on loopback: each gets its view committed at every
    member and a first step in the new view, the join its scale-out delay
    and a multi-source pull; SIGSTOP gets the node declared failed and back
    (it rejoins and pulls the state); the cut (the agents drop each other's
    traffic) sidelines the later member of the link, the restore brings it
    back."""
    report, out = run_scenario(tmp_path, """\
0   start   a b c d
4   join    e
9   leave   b
13  kill    c
17  stop    d 3
25  cut     a e
31  restore a e
37  end
""", timeout=220)
    # a, d and e finish; with three members left, the stopped node and the cut
    # link have a third party to tell a failure from a link down
    assert_invariants(report, finished=3)
    for action in ("join", "leave", "kill", "stop", "cut", "restore"):
        e = event(report, action)
        assert e["view_everywhere"]["s"] is not None, e
        assert e["first_step"]["s"] is not None, e
        assert e["survivor_idle"]["sum_s"] is not None, e
    join = event(report, "join")
    assert 0 < join["scale_out"]["e"]["warm_s"] < join["scale_out"]["e"]["cold_s"], join
    assert join["pulls"]["e"]["bytes"] > 0 and len(join["pulls"]["e"]["sources"]) >= 2, join
    assert event(report, "restore")["pulls"], "the sidelined node took the state back"
    assert report["totals"]["final_world"] == 3
    assert "replicas bit-identical: yes" in out and "every sample once per epoch: yes" in out, out
    assert "timeline.png" in out


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_two_nodes_leave_at_once(tmp_path: Path) -> None:
    """Two SIGTERMs at the same moment: each step's all-reduce carries one
    leave flag per rank, so every member knows who leaves at the boundary
    where a flag first shows; both leave gracefully (exit 0) and the other
    two train on in one smaller view."""
    report, out = run_scenario(tmp_path, """\
0   start   a b c d
4   leave   b
4   leave   c
10  end
""", timeout=160)
    assert_invariants(report, finished=2)
    for e in (a for a in report["actions"] if a["action"] == "leave"):
        assert e["view_everywhere"]["s"] is not None and e["first_step"]["s"] is not None, e
    assert report["totals"]["final_world"] == 2
    for name in ("b", "c"):
        assert '"ev": "left"' in (tmp_path / "run" / "trace" / f"{name}.jsonl").read_text(), name


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_scenario_on_the_namespace_testbed_with_a_real_link_cut(tmp_path: Path, need_netns: None) -> None:
    """Real links (100 Mbit/s each way) and a real cut: the pair's packets
    vanish, the members commit the link down, the later member is sidelined
    and training goes on without it; after the restore it pulls the state
    and trains again.  A throttle slows the cluster, never breaks it."""
    report, out = run_scenario(tmp_path, """\
set link 100mbit
0   start   a b c
4   join    d
10  cut     a c
17  restore a c
24  throttle d 30mbit
30  end
""", "--testbed", timeout=220)
    assert_invariants(report, finished=4)
    cut, restore = event(report, "cut"), event(report, "restore")
    assert cut["view_everywhere"]["s"] is not None and cut["first_step"]["s"] is not None, cut
    assert restore["view_everywhere"]["s"] is not None and restore["pulls"], restore
    join = event(report, "join")
    assert join["pulls"]["d"]["ratio"] is not None, join  # link rates known: a transfer bound
    assert report["totals"]["final_world"] == 4
    trace = (tmp_path / "run" / "trace" / "c.jsonl").read_text()
    assert '"ev": "sidelined"' in trace


def test_the_runners_own_control_calls_speak_the_nodes_encryption(tmp_path: Path, monkeypatch) -> None:
    """The runner's link faults go to the nodes' agents: with CHAOS_ENCRYPT=1
    (its environment or the nodes' extra one) its secret encrypts too, or
    every call would be refused for the mode."""
    from chaos_lightning.scenario.runner import Runner
    from chaos_lightning.wire.auth import encrypts

    monkeypatch.delenv("CHAOS_ENCRYPT", raising=False)
    timeline = parse(DEFAULT, "<default>")
    assert not encrypts(Runner(timeline, tmp_path / "a").control_secret)
    assert encrypts(Runner(timeline, tmp_path / "b", env={"CHAOS_ENCRYPT": "1"}).control_secret)
    monkeypatch.setenv("CHAOS_ENCRYPT", "1")
    runner = Runner(timeline, tmp_path / "c")
    assert encrypts(runner.control_secret) and runner.control_secret == runner.secret.encode()


def test_ports_handed_to_nodes_not_bound_yet_are_never_handed_out_again(monkeypatch) -> None:
    """A node binds its port seconds after it starts (Python's imports), so a
    bind test alone finds the port of a node started a moment ago free and
    may hand it out again: the second node then fails with "address already
    in use" (seen in benchmarks/_chaos.py, about once in a dozen runs).
    ``free_port(avoid=...)`` skips the ports handed out already (the runner
    keeps them), and ``free_ports`` never repeats one."""
    from chaos_lightning.testbed import procs

    draws = iter([21001, 21001, 21001, 21002, 21001, 21003])
    monkeypatch.setattr(procs, "_rng", SimpleNamespace(randrange=lambda lo, hi: next(draws)))
    assert procs.free_port(avoid={21001}) == 21002
    assert procs.free_ports(2) == [21001, 21003]
