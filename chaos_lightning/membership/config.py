"""Membership timing presets, in the manner of memberlist's Default*Config.

Every number the protocol waits for lives here.  Pick a preset by name
(``CHAOS_PRESET``: ``local``, ``lan``, ``edge``) and override single fields:
``Config.preset("lan", probe_interval=0.3)``.

How the numbers combine (n = members of the current view):

* a probe period lasts ``probe_interval``; a direct ping that is not acked
  within ``probe_timeout`` is retried through ``indirect_probes`` helpers;
* a member missed by both is *suspected*; the suspicion becomes a confirmed
  failure after ``suspicion_mult * max(1, log10(n)) * probe_interval``
  (memberlist's rule: gossip needs O(log n) periods to reach everyone, so the
  accused gets that long to refute);
* ``link_confirm`` consecutive periods of "direct failed, indirect succeeded"
  make a *link-down*, a single success a *link-up*;
* a proposed view that gets no majority within ``proposal_timeout`` is retried
  with a higher ballot;
* a joiner asks every ``join_retry``; its pending join is dropped where it
  was not heard asking for ``join_expiry`` (ten retries).

Crash detection time is therefore about one to two probe periods plus the
suspicion timeout; ``benchmarks/membership.py`` measures it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Config:
    #: seconds between two probes started by one node
    probe_interval: float = 0.5
    #: seconds a direct ping may take before indirect probes start
    probe_timeout: float = 0.2
    #: helpers asked to ping an unresponsive target on our behalf (SWIM's k)
    indirect_probes: int = 3
    #: suspicion lasts suspicion_mult * max(1, log10 n) probe intervals
    suspicion_mult: float = 4.0
    #: each fact is piggybacked gossip_mult * ceil(log10(n + 1)) times
    gossip_mult: int = 4
    #: at most this many facts ride on one message
    max_piggyback: int = 8
    #: consecutive direct-failed/indirect-ok periods that make a link-down
    #: (each period already tries the direct path twice)
    link_confirm: int = 3
    #: seconds a coordinator waits for a majority before retrying
    proposal_timeout: float = 1.0
    #: seconds between join (and leave) requests while not yet answered
    join_retry: float = 1.0
    #: seconds after which a pending join whose joiner was not heard asking
    #: again is dropped (0: never), so a standby that died while the size
    #: policy held it is never admitted (admitted, it costs one more view
    #: change, a rebuild of the training group, to remove it and admit a live
    #: standby in its place).  Ten retries in every
    #: preset: a joiner asks one contact per ``join_retry``, round robin, and
    #: every request that reaches a live member reaches the coordinator and
    #: the member next in line for it (the contact forwards it), so they hear
    #: a live joiner every retry, or every c-th one when only one of its c
    #: contacts lives; ten also outlasts a few lost requests.  A joiner
    #: expired anyway is news again at its next request.  Other members hear
    #: a joiner only when they learn it and may drop it sooner: they do not
    #: propose.  (``CHAOS_MEMBERSHIP`` takes values above 0 only; a large one
    #: turns expiry off in practice.)
    join_expiry: float = 10.0
    #: a node removed against its will (a healed partition) joins again
    auto_rejoin: bool = True
    #: seconds a coordinator waits after the first pending join (or learner
    #: promotion) before proposing, so nodes started together enter in one
    #: view change (failures, leaves and link changes are proposed at once)
    join_batch: float = 0.05
    #: a node that can reach only a minority of its view's voters (the rest
    #: silent, not proven dead) goes on anyway: it commits views with a
    #: majority of the voters it believes alive.  Off by default.  The risk:
    #: under a real partition *both* sides go on, each commits its own views
    #: for the same epochs and trains its own replica (split brain); after
    #: the partition heals they stay two clusters, and both write checkpoints.
    #: For a user who prefers availability over one consistent model, on a
    #: network where partitions are rare (``CHAOS_MEMBERSHIP=allow_minority=1``).
    #: Set it on every node alike: a node without it refuses such commits.
    allow_minority: bool = False
    #: a refused connection from a member's own address (TCP RST: its host
    #: answered, nothing listens) proves that member's process gone, so with
    #: exactly half of the voters proven dead the other half goes on (two
    #: members, one killed: the survivor trains on and admits newcomers).
    #: Turn it off on a network whose firewalls *reject* rather than drop
    #: (iptables' REJECT answers a TCP connect with an ICMP port-unreachable
    #: or a reset, which reads as refused): there a partition could pass for
    #: death, and both halves would go on.
    proof_of_death: bool = True
    #: the size policy a node *founding* a cluster writes into its first view
    #: (``membership/policy.py``; 0: no bound).  Joiners' values are ignored:
    #: the cluster's policy is the one in its views, so every proposer admits
    #: alike.  Set from ``CHAOS_TARGET_NODES``/``CHAOS_MAX_NODES``
    target_nodes: int = 0
    max_nodes: int = 0

    def suspicion_timeout(self, n: int) -> float:
        return self.suspicion_mult * max(1.0, math.log10(max(n, 1))) * self.probe_interval

    def retransmits(self, n: int) -> int:
        return max(2, self.gossip_mult * math.ceil(math.log10(n + 1)))

    @staticmethod
    def preset(name: str, **overrides: object) -> "Config":
        """The preset ``name`` (``local``, ``lan``, ``edge``) with single
        fields overridden: ``Config.preset("lan", probe_interval=0.3)``.

        Raises ``ValueError`` naming the choices for an unknown preset, and
        the offending names for unknown fields.  ``dataclasses.replace(LAN,
        ...)`` does the same from a preset object.
        """
        try:
            base = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown membership preset {name!r}; choose one of {', '.join(PRESETS)}") from None
        known = {f.name for f in fields(Config)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise ValueError(f"unknown membership setting(s) {', '.join(bad)}")
        return replace(base, **overrides)  # type: ignore[arg-type]


# The presets are derived from one base, as memberlist derives its WAN and
# local configs from DefaultLANConfig: each names only the fields it changes,
# so a reader sees at once how ``local`` and ``edge`` differ from ``lan``.

#: ``lan``: a rack or a site; memberlist's LAN profile scaled for faster
#: periods.  The dataclass defaults *are* this preset.
LAN = Config()

#: ``local``: processes on one machine (loopback).  Round trips are ~0.1 ms, but
#: the agent thread shares 2 cores with training that holds the GIL for tens of
#: milliseconds, so the timeout leaves room for scheduling delay, not for the network.
LOCAL = replace(
    LAN,
    probe_interval=0.2,
    probe_timeout=0.08,
    indirect_probes=2,
    suspicion_mult=2.0,
    gossip_mult=3,
    link_confirm=2,
    proposal_timeout=0.5,
    join_retry=0.5,
    join_expiry=5.0,
    join_batch=0.02,
)

#: ``edge``: nodes over Wi-Fi/WAN links with hundreds of ms of RTT and loss;
#: slower periods and longer suspicion to avoid false failures (memberlist WAN).
EDGE = replace(
    LAN,
    probe_interval=1.0,
    probe_timeout=0.5,
    suspicion_mult=5.0,
    proposal_timeout=3.0,
    join_retry=2.0,
    join_expiry=20.0,
    join_batch=0.2,
)

PRESETS: dict[str, Config] = {"local": LOCAL, "lan": LAN, "edge": EDGE}

#: the preset used when nobody names one and the node binds a loopback
#: address (the default bind); import this rather than restating "local".
#: A node bound to any other address gets ``lan`` (:func:`default_preset`).
DEFAULT_PRESET = "local"

#: the preset used when nobody names one and the node binds a non-loopback address
DEFAULT_NETWORK_PRESET = "lan"


def default_preset(host: str | None) -> str:
    """The preset a node bound at ``host`` gets when nobody names one.

    ``local`` on loopback (``127.0.0.0/8``, ``::1``, ``localhost``): every
    peer is a process of the same machine.  Anything else, a wildcard bind
    included, is a network: ``lan``.  ``local`` evicts a node silent for
    about 0.7 s (a GC pause or a slow checkpoint write on a real cluster
    would cost it its place); ``lan`` tolerates about 3 s
    (``docs/membership.md``, "Presets").
    """
    import ipaddress

    if host is None:
        return DEFAULT_PRESET
    name = host.strip("[]").lower()
    if name == "localhost":
        return DEFAULT_PRESET
    try:
        loopback = ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = False  # a host name other than localhost: it resolves on a network
    return DEFAULT_PRESET if loopback else DEFAULT_NETWORK_PRESET
