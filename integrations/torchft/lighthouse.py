"""The TorchFT Lighthouse in a process of its own.

``python -m chaos_lightning.integrations.torchft.lighthouse --port P [options]``

Runs ``torchft._torchft.LighthouseServer`` (the same Rust server as the
``torchft_lighthouse`` binary, which a wheel install may or may not have put
on PATH) bound to ``127.0.0.1:P``, prints ``READY <address>`` once it serves,
and stays up until killed or until its parent process dies (checked every
0.2 s), so a crashed benchmark never leaves it behind.

Defaults are torchft's README invocation (``--min_replicas 1
--quorum_tick_ms 100 --join_timeout_ms 10000``) except the heartbeat
timeout; see ``docs/baselines_torchft.md`` for why 1000 ms.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.integrations.torchft.lighthouse")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--min-replicas", type=int, default=1)
    p.add_argument("--join-timeout-ms", type=int, default=10000)
    p.add_argument("--quorum-tick-ms", type=int, default=100)
    p.add_argument("--heartbeat-timeout-ms", type=int, default=1000)
    args = p.parse_args(argv)

    from torchft._torchft import LighthouseServer

    parent = os.getppid()
    server = LighthouseServer(
        bind=f"127.0.0.1:{args.port}", min_replicas=args.min_replicas, join_timeout_ms=args.join_timeout_ms,
        quorum_tick_ms=args.quorum_tick_ms, heartbeat_timeout_ms=args.heartbeat_timeout_ms,
    )
    print(f"READY http://127.0.0.1:{args.port}", flush=True)
    try:
        while os.getppid() == parent:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
