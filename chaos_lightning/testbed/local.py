"""Rendezvous nodes as local processes: the harness of the contract tests,
the demo and the membership benchmark (a harness: not part of the runtime).

A :class:`Node` runs ``python -m chaos_lightning.rendezvous ...`` (one real
process, so a ``kill -9`` is a real crash), reads its JSON event lines on a
thread, and offers bounded waits on them.  ``stop()`` kills and reaps the
process; call it in a ``finally``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from chaos_lightning.testbed.procs import kill_and_reap

Record = dict[str, Any]


class NodeTimeout(AssertionError):
    """A node did not print what was waited for (an AssertionError, so a test
    using the harness fails rather than errors)."""


class Node:
    """One rendezvous process and the event lines it printed."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path | None = None):
        self.args = args
        self.log_path = log_path
        self._err = open(log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chaos_lightning.rendezvous", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            text=True,
            bufsize=1,
        )
        self.records: list[Record] = []
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.node_id: str | None = None
        self.addr: str | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "_raw", "line": line}
            with self._changed:
                self.records.append(record)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    # -- waiting --------------------------------------------------------------
    def wait_for(self, match: Callable[[Record], bool], timeout: float, what: str) -> Record:
        """The first record (from the beginning) that ``match``es; raises
        :class:`NodeTimeout` after ``timeout`` or as soon as the process has
        exited without it."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for record in self.records:
                    if match(record):
                        return record
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._changed.wait(remaining)
        reason = f"exited rc={self.proc.poll()}" if self._eof else f"timed out after {timeout:.0f}s"
        raise NodeTimeout(f"{self.name}: no {what} ({reason})\n{self.describe()}")

    def ready(self, timeout: float) -> None:
        record = self.wait_for(lambda r: r.get("event") == "ready", timeout, "ready line")
        self.node_id, self.addr = record["node"], record["addr"]

    def views(self) -> list[Record]:
        """Committed views this node reported (not ``status`` echoes)."""
        with self._changed:
            return [r for r in self.records if r.get("event") == "view" and not r.get("status")]

    def wait_view(self, match: Callable[[list[str]], bool], timeout: float, what: str, after: int = -1) -> Record:
        """The first committed view with epoch > ``after`` whose members ``match``."""
        return self.wait_for(
            lambda r: r.get("event") == "view"
            and not r.get("status")
            and r["epoch"] > after
            and match(r["members"]),
            timeout,
            what,
        )

    # -- acting ---------------------------------------------------------------
    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        kill_and_reap(self.proc)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._err.close()
        self._reader.join(timeout=5)

    @property
    def name(self) -> str:
        return self.node_id or " ".join(self.args)

    def describe(self) -> str:
        with self._changed:
            lines = [json.dumps(r) for r in self.records[-15:]]
        self._err.flush()
        err = self.log_path.read_text(errors="replace")[-3000:]
        return "stdout (last lines):\n  " + "\n  ".join(lines) + f"\nstderr (tail):\n{err}"
