"""``View.connected()``: the members the data plane trains on when links are down."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chaos_lightning.membership.view import Member, View, link


def view(n: int, down: list[tuple[str, str]]) -> View:
    return View(3, tuple(Member(f"n{i}") for i in range(n)), tuple(sorted(link(a, b) for a, b in down)))


def test_without_down_links_every_member_trains() -> None:
    assert view(4, []).connected() == ("n0", "n1", "n2", "n3")


def test_one_down_link_sidelines_its_later_member() -> None:
    assert view(4, [("n3", "n0")]).connected() == ("n0", "n1", "n2")
    assert view(4, [("n1", "n2")]).connected() == ("n0", "n1", "n3")


def test_greedy_by_rank_keeps_the_oldest_members() -> None:
    # n0-n1 down: n1 out; n2-n3 down: n3 out; n1-n3 being down too changes nothing more
    assert view(5, [("n0", "n1"), ("n2", "n3"), ("n1", "n3")]).connected() == ("n0", "n2", "n4")


@given(st.integers(1, 8), st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), max_size=12))
def test_connected_members_are_pairwise_connected_and_maximal(n: int, pairs: list[tuple[int, int]]) -> None:
    down = [(f"n{a}", f"n{b}") for a, b in pairs if a != b and a < n and b < n]
    v = view(n, down)
    kept = v.connected()
    assert kept and kept[0] == "n0"  # the first member always trains
    assert list(kept) == [m for m in v.ids if m in kept]  # rank order
    assert all(v.link_up(a, b) for a in kept for b in kept if a != b)
    for m in v.ids:  # nobody left out could have joined them
        if m not in kept:
            assert any(not v.link_up(m, k) for k in kept)
