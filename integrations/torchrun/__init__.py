"""``torchrun --rdzv-backend chaos``: torchrun launches chaos training, the peers own membership.

Registered with torch through the ``torchrun.handlers`` entry point
(``pyproject.toml``); see :mod:`.rendezvous` for the design and
docs/torchrun.md for how to run it.  Importing this package imports torch's
elastic rendezvous API (torchrun has already imported it).
"""

from __future__ import annotations

from chaos_lightning.integrations.torchrun.rendezvous import (
    BACKEND,
    CONF_KEYS,
    ChaosRendezvousError,
    ChaosRendezvousHandler,
    create_handler,
    handler_creator,
)

__all__ = ["BACKEND", "CONF_KEYS", "ChaosRendezvousError", "ChaosRendezvousHandler", "create_handler", "handler_creator"]
