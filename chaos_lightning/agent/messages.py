"""Messages the agent adds on top of the membership protocol.

``Envelope`` carries one membership message with its sender's id and address
(the transport's connection says *where* bytes came from, not *who* sent
them).  The rest are request/response pairs served on their own connection:
``StatusRequest`` (the monitor's snapshot, for ``chaos-run status`` and
tests) and ``BandwidthProbe`` (an active bandwidth measurement: a blob of
``nbytes`` follows the request, the reply says when it was all read) and
``LinkFault`` (the fault injector: cut or restore this agent's link to another
member, for loopback scenarios where there is no cable to pull; answered by
``LinkFaultRefused`` unless the agent was started with
``allow_fault_injection``).
"""

from __future__ import annotations

from dataclasses import dataclass

from chaos_lightning.wire.schema import message


@message("a.env")
@dataclass(frozen=True)
class Envelope:
    src: str
    src_addr: str
    body: object


@message("a.status?")
@dataclass(frozen=True)
class StatusRequest:
    pass


@message("a.status")
@dataclass(frozen=True)
class StatusReply:
    #: the monitor snapshot (plain data) packed with msgpack; the schema types
    #: messages, and a snapshot is free-form by design
    snapshot: bytes


@message("a.bw?")
@dataclass(frozen=True)
class BandwidthProbe:
    nbytes: int


@message("a.bw")
@dataclass(frozen=True)
class BandwidthReply:
    #: seconds the receiver spent reading the blob
    recv_seconds: float


@message("a.fault?")
@dataclass(frozen=True)
class LinkFault:
    #: the agent address of the other end of the link
    peer_addr: str
    #: True cuts the link, False restores it
    down: bool


@message("a.fault")
@dataclass(frozen=True)
class LinkFaultDone:
    #: addresses whose link is cut now
    blocked: tuple[str, ...]


@message("a.fault!")
@dataclass(frozen=True)
class LinkFaultRefused:
    #: why (fault injection is off on this agent)
    reason: str
