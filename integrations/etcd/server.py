"""A real, throwaway etcd server: for the etcd baselines' benchmarks and tests.

The etcd rendezvous (and torchrun's etcd rendezvous in the checkpoint-restart
baseline) is only worth comparing if it runs against the real thing, so
:func:`etcd_server` starts ``etcd`` on loopback with free client/peer ports
and a temporary ``--data-dir``, waits for ``/health`` (bounded), hands out the
client endpoint and always kills and reaps the process afterwards, also when
the caller fails.  ``extra_args`` adds server flags (``--enable-v2`` for
torch's etcd-v2 rendezvous).  Importing this module does not import etcd3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

from chaos_lightning.testbed.procs import free_port, kill_and_reap

#: Bound on waiting for /health.  Measured 0.12-1.03 s (median 0.28 s) on a
#: 2-core machine; 15 s leaves room for a loaded CI box.
HEALTH_TIMEOUT = 15.0


def etcd_binary() -> str | None:
    """The etcd server binary, or None if it is not installed."""
    return shutil.which("etcd") or next((p for p in ("/usr/bin/etcd", "/usr/local/bin/etcd") if os.access(p, os.X_OK)), None)


def _healthy(client_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=1.0) as r:
            return json.loads(r.read().decode()).get("health") == "true"
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def etcd_server(
    workdir: Path, timeout: float = HEALTH_TIMEOUT, attempts: int = 3, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """Run etcd under ``workdir``; yields its client endpoint ``127.0.0.1:PORT``.

    A start that fails (most likely a port taken between picking and binding)
    is retried with fresh ports, up to ``attempts`` times.
    """
    binary = etcd_binary()
    if binary is None:
        raise FileNotFoundError("etcd binary not found (apt-get install etcd-server)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    for attempt in range(attempts):
        client, peer = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
        data_dir = workdir / f"data{attempt}"
        log_path = workdir / f"etcd{attempt}.log"
        cmd = [
            binary,
            "--name", "test",
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            "--initial-cluster-state", "new",
            *extra_args,
        ]
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and proc.poll() is None and not _healthy(client_url):
                time.sleep(0.05)
            if proc.poll() is None and _healthy(client_url):
                yield f"127.0.0.1:{client}"
                return
            tail = log_path.read_text(errors="replace")[-2000:]
            problems.append(f"attempt {attempt}: exit={proc.poll()} after {timeout}s; log tail:\n{tail}")
        finally:
            kill_and_reap(proc)
            shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError("etcd did not become healthy:\n" + "\n".join(problems))
