"""Which members a joiner pulls from: measured bandwidth first, then RTT, then view order."""

from __future__ import annotations

import pytest

from chaos_lightning.monitor.links import LinkEstimate
from chaos_lightning.replication.neighbors import Holder, choose_sources


def est(peer: str, rtt: float | None = None, bw_down: float | None = None) -> LinkEstimate:
    return LinkEstimate(peer, rtt, None, rtt, None, bw_down, 0.0)


def test_bandwidth_then_rtt_then_view_order_and_the_cap():
    cands = [Holder(f"n{i}", f"127.0.0.1:{7000 + i}") for i in range(5)]
    estimates = {
        "n1": est("n1", rtt=0.010),
        "n2": est("n2", rtt=0.001),
        "n3": est("n3", rtt=0.050, bw_down=50e6),
        "n4": est("n4", rtt=0.050, bw_down=100e6),
    }
    chosen, rates = choose_sources(cands, estimates, cap=4)
    assert [c.node for c in chosen] == ["n4", "n3", "n2", "n1"]
    assert rates == [100e6, 50e6, None, None]
    chosen, _ = choose_sources(cands, {}, cap=2)
    assert [c.node for c in chosen] == ["n0", "n1"], "nothing measured: the view's order"


def test_a_cap_below_one_is_refused():
    with pytest.raises(ValueError, match="cap"):
        choose_sources([Holder("a", "x:1")], {}, cap=0)


def test_a_member_cut_off_from_the_joiner_comes_last():
    """The view's down links (the monitor's topology) outrank any measurement:
    the fastest member is useless if the link to it is cut."""
    cands = [Holder(f"n{i}", f"127.0.0.1:{7000 + i}") for i in range(3)]
    estimates = {"n0": est("n0", bw_down=900e6), "n1": est("n1", bw_down=10e6)}
    chosen, rates = choose_sources(cands, estimates, cap=2, cut={"n0"})
    assert [c.node for c in chosen] == ["n1", "n2"]
    assert rates == [10e6, None]
    chosen, _ = choose_sources(cands, estimates, cap=3, cut={"n0"})
    assert [c.node for c in chosen] == ["n1", "n2", "n0"], "cut members are a last resort, not dropped"


def test_the_cut_set_comes_from_the_monitors_topology():
    from chaos_lightning.membership.view import Member, View
    from chaos_lightning.monitor import Monitor
    from chaos_lightning.strategy.state_sync import _cut_from

    monitor = Monitor("j")
    assert _cut_from(monitor, "j") == set(), "no view yet: nothing is known to be cut"
    monitor.set_view(View(3, tuple(Member(i) for i in ("a", "b", "j")), (("a", "j"),)))
    assert _cut_from(monitor, "j") == {"a"}
    assert _cut_from(None, "j") == set()
