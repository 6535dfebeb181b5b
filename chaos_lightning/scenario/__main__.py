"""``python -m chaos_lightning.scenario [TIMELINE] [--testbed] [--run-dir DIR]``

Runs a churn scenario (the default one without TIMELINE: 4 nodes, a join, a
graceful leave, a kill -9, a link cut and restore), prints a summary table of
the design's metrics and the invariants (identical replicas, every sample
trained once per epoch), and writes the report and the plot into the run
directory.  Exit code 0 when the run held its invariants, 1 when not, 2 for
a bad timeline or setup.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from chaos_lightning.scenario.timeline import DEFAULT, TimelineError, load, parse


def build_parser(prog: str = "python -m chaos_lightning.scenario") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("timeline", nargs="?", help="timeline file (default: the built-in scenario; see --show-default)")
    p.add_argument("--testbed", action="store_true",
                   help="one network namespace per node with real links (root, iproute2); default: loopback")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where traces, logs, report.json and timeline.png go (default: runs/scenario-<time>)")
    p.add_argument("--show-default", action="store_true", help="print the built-in timeline and exit")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m chaos_lightning.scenario") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.show_default:
        print(DEFAULT, end="")
        return 0
    try:
        timeline = load(args.timeline) if args.timeline else parse(DEFAULT, "<default scenario>")
    except TimelineError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    from chaos_lightning.scenario.runner import Runner, ScenarioError, check_invariants

    run_dir = args.run_dir or Path("runs") / time.strftime("scenario-%Y%m%d-%H%M%S")
    try:
        runner = Runner(timeline, run_dir, testbed=args.testbed)
        runner.run()
    except ScenarioError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2 if not run_dir.exists() else 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    from chaos_lightning.scenario import report

    result = report.report(run_dir)
    checks = check_invariants(run_dir)
    result["invariants"] = checks
    report.write_json(result, run_dir / "report.json")
    print()
    print(report.summary_table(result))
    print()
    print(f"replicas bit-identical: {'yes' if checks['identical_replicas'] else 'NO'} "
          f"({len(checks['finished'])} finished at step {checks['final_step']}); "
          f"every sample once per epoch: {'yes' if checks['no_sample_twice'] and checks['complete_epochs_exact'] else 'NO'} "
          f"({checks['epochs']} epochs)")
    for problem in checks["problems"]:
        print(f"problem: {problem}")
    print(f"report: {run_dir / 'report.json'}\nplot:   {run_dir / 'timeline.png'}")
    return 0 if not checks["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
