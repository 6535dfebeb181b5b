"""More than one process per node (``devices=N``): who starts them, and how each binds.

Role in the whole: the strategy runs one chaos member per process.  This
module decides, at ``_configure_launcher``, whether this process must start
its node's other processes itself.  Today it never does: one process per
device, started by the user (issue 12 tracks ``devices=N``).
"""

from __future__ import annotations

from typing import Any


def launcher_for(strategy: Any) -> Any:
    """The launcher the strategy uses (``None``: the processes are the user's)."""
    return None
