"""Each epoch's process group is built from the rendezvous' store: three
processes form a gloo group of epoch e, one leaves, and the two survivors
build the group of the next epoch in the same processes (fresh keys per epoch),
on both backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_store_worker.py")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("backend", ["peer", "etcd"])
def test_three_ranks_then_two_build_each_epochs_group_from_the_rendezvous_store(backend, request):
    etcd = request.getfixturevalue("etcd_endpoint") if backend == "etcd" else ""
    procs: list[subprocess.Popen] = []

    def spawn(peers: str, role: str) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, str(WORKER), backend, peers, etcd, "3", role],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        procs.append(p)
        return p

    def line(p: subprocess.Popen) -> dict:
        text = p.stdout.readline()
        assert text, f"worker exited rc={p.poll()}"
        return json.loads(text)

    try:
        first = spawn("", "survivor")
        addr = line(first)["addr"]
        others = [spawn(addr, "survivor"), spawn(addr, "leaver")]
        for p in others:
            line(p)
        sums = [line(p) for p in [first] + others]
        assert {s["value"] for s in sums} == {3.0}
        assert len({s["epoch"] for s in sums}) == 1
        leaver = others[1]
        leaver.stdin.write("go\n")
        leaver.stdin.flush()
        assert line(leaver)["event"] == "left"
        after = [line(p) for p in (first, others[0])]
        assert {s["value"] for s in after} == {2.0}
        assert after[0]["epoch"] == after[1]["epoch"] > sums[0]["epoch"]
        for p in procs:
            assert p.wait(timeout=30) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
            p.stdout.close()
            p.stdin.close()
