"""Membership presets and the enums: same values and same bytes as before they were restructured."""

from __future__ import annotations

import dataclasses

import pytest

from chaos_lightning.membership.config import DEFAULT_PRESET, EDGE, LAN, LOCAL, PRESETS, Config
from chaos_lightning.membership.detector import Status
from chaos_lightning.membership.messages import ALIVE, DEAD, JOIN, LEAVE, LINK, SUSPECT, Fact, FactKind, Ping
from chaos_lightning.membership.view import Member
from chaos_lightning.wire.schema import decode, encode

# the values each preset had when each was written out in full
BEFORE = {
    "local": dict(probe_interval=0.2, probe_timeout=0.08, indirect_probes=2, suspicion_mult=2.0, gossip_mult=3,
                  max_piggyback=8, link_confirm=2, proposal_timeout=0.5, join_retry=0.5, auto_rejoin=True,
                  join_batch=0.02),
    "lan": dict(probe_interval=0.5, probe_timeout=0.2, indirect_probes=3, suspicion_mult=4.0, gossip_mult=4,
                max_piggyback=8, link_confirm=3, proposal_timeout=1.0, join_retry=1.0, auto_rejoin=True,
                join_batch=0.05),
    "edge": dict(probe_interval=1.0, probe_timeout=0.5, indirect_probes=3, suspicion_mult=5.0, gossip_mult=4,
                 max_piggyback=8, link_confirm=3, proposal_timeout=3.0, join_retry=2.0, auto_rejoin=True,
                 join_batch=0.2),
}


# fields added since (issues 14, 16), the same in every preset: the safe defaults
ADDED = dict(allow_minority=False, proof_of_death=True, target_nodes=0, max_nodes=0)  # issue 16: no size bound
# added since, per preset: pending joins expire after ten join retries (issue 16)
EXPIRY = {"local": dict(join_expiry=5.0), "lan": dict(join_expiry=10.0), "edge": dict(join_expiry=20.0)}


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_each_preset_keeps_its_values(name):
    assert dataclasses.asdict(PRESETS[name]) == {**BEFORE[name], **ADDED, **EXPIRY[name]}


def test_presets_are_lan_with_named_changes_and_overridable_by_name():
    assert LAN == Config() and PRESETS == {"local": LOCAL, "lan": LAN, "edge": EDGE}
    assert DEFAULT_PRESET in PRESETS and DEFAULT_PRESET == "local"
    tuned = Config.preset("lan", probe_interval=0.3)
    assert tuned == dataclasses.replace(LAN, probe_interval=0.3)
    with pytest.raises(ValueError, match="choose one of local, lan, edge"):
        Config.preset("wan")
    with pytest.raises(ValueError, match="probe_intervl"):
        Config.preset("lan", probe_intervl=0.3)


# a Ping carrying one fact of each kind, encoded when the kinds were plain strings
PING_BYTES = bytes.fromhex(
    "92a66d2e70696e67940703a09692a66d2e6661637496a5616c697665a16101a0c3c092a66d2e6661637496a773757370656374"
    "a16202a0c3c092a66d2e6661637496a464656164a16303a0c3c092a66d2e6661637496a46a6f696ea16400a0c392a66d656d"
    "62657294a164a3683a31900092a66d2e6661637496a56c65617665a16504a0c3c092a66d2e6661637496a46c696e6ba16605"
    "a167c2c0"
)


def test_fact_kinds_are_the_same_bytes_on_the_wire():
    facts = (Fact(ALIVE, "a", 1), Fact(SUSPECT, "b", 2), Fact(DEAD, "c", 3),
             Fact(JOIN, "d", 0, member=Member("d", "h:1")), Fact(LEAVE, "e", 4), Fact(LINK, "f", 5, "g", False))
    assert encode(Ping(7, 3, "", facts)) == PING_BYTES
    back = decode(PING_BYTES)
    assert back.gossip == facts, "a decoded plain-str kind equals the enum member"
    assert [FactKind(f.kind) for f in back.gossip] == [k for k in FactKind if k != FactKind.SYNCED]  # added since


def test_statuses_are_the_fact_kinds_of_the_same_name():
    assert [s.value for s in Status] == ["alive", "suspect", "dead"]
    assert Status.DEAD == DEAD == "dead" and hash(Status.SUSPECT) == hash("suspect")


@pytest.mark.parametrize("host, preset", [
    ("127.0.0.1", "local"), ("127.3.2.1", "local"), ("::1", "local"), ("[::1]", "local"), ("localhost", "local"),
    ("10.0.0.5", "lan"), ("192.168.1.2", "lan"), ("0.0.0.0", "lan"), ("::", "lan"), ("node7.cluster", "lan"),
])
def test_the_default_preset_follows_the_bind_address(host, preset):
    from chaos_lightning.membership.config import default_preset

    assert default_preset(host) == preset
