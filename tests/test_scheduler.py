"""Scenarios for the shard scheduler (chaos_lightning.replication.scheduler).

A joiner pulls state shards from several neighbors at once; the plan must make
them finish together, respect the joiner's downlink and the sources' uplinks,
stay close to the transfer bound, and be cheap enough to compute on every join.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest

from chaos_lightning.replication.scheduler import (
    MIN_SHARD_BYTES,
    Source,
    cut_shards,
    exact_plan,
    lower_bound,
    plan,
    shard_target,
)

MiB = 1 << 20


def _check_consistent(p, sizes):
    """Every shard is assigned once; per-source bytes and finish times add up."""
    assert len(p.assignment) == len(sizes)
    for name in p.sources:
        ks = p.shards_of(name)
        assert p.bytes_of(name) == sum(sizes[k] for k in ks)
        if ks:
            assert p.rate_of(name) > 0
            assert p.finish_of(name) <= p.makespan * (1 + 1e-12)
        else:
            assert p.finish_of(name) == 0.0
    assert sum(p.bytes_per_source) == sum(sizes)
    assert p.makespan >= p.lower_bound * (1 - 1e-9)


def _random_small(rng: random.Random):
    n = rng.randint(1, 8)
    m = rng.randint(1, 4)
    sizes = [rng.randint(1, 100) for _ in range(n)]
    sources = [
        Source(
            i,
            rng.choice([0.5, 1.0, 1.5, 2.0, 3.0, 5.0]),
            latency=rng.choice([0.0, 0.0, 0.5, 2.0]),
        )
        for i in range(m)
    ]
    downlink = rng.choice([math.inf, math.inf, 4.0, 2.5])
    return sizes, sources, downlink


def test_lpt_with_improvement_matches_exhaustive_search_on_small_random_cases():
    rng = random.Random(20250)
    cases, equal, worst = 300, 0, 1.0
    for _ in range(cases):
        sizes, sources, downlink = _random_small(rng)
        exact = exact_plan(sizes, sources, downlink)
        heur = plan(sizes, sources, downlink)
        _check_consistent(heur, sizes)
        _check_consistent(exact, sizes)
        ratio = heur.makespan / exact.makespan
        assert ratio >= 1 - 1e-9, "exact_plan must be optimal"
        assert ratio <= 1.1, (sizes, sources, downlink, heur, exact)
        worst = max(worst, ratio)
        equal += ratio <= 1 + 1e-9
    assert equal >= 0.85 * cases, (
        f"only {equal}/{cases} optimal, worst ratio {worst:.3f}"
    )


@pytest.mark.parametrize(
    "sizes, rates, expected",
    [
        ([4, 4, 4, 4], [1, 1], 8.0),  # even split
        ([3, 3, 2, 2, 2], [1, 1], 6.0),  # plain LPT gives 7; the swap pass fixes it
        ([10, 6, 4], [2, 1], 7.0),  # the fast source takes the big shard and one more
        ([7, 1], [1], 8.0),  # one source takes everything
    ],
)
def test_simple_cases_are_optimal(sizes, rates, expected):
    sources = [Source(f"s{i}", r) for i, r in enumerate(rates)]
    heur = plan(sizes, sources)
    assert heur.makespan == pytest.approx(expected)
    assert heur.makespan == pytest.approx(exact_plan(sizes, sources).makespan)


def test_k_equal_sources_finish_near_total_over_k_rates():
    rng = np.random.default_rng(1)
    k, rate = 8, 50e6
    sizes = rng.integers(MiB, 16 * MiB, 200).tolist()
    p = plan(sizes, [Source(i, rate) for i in range(k)])
    _check_consistent(p, sizes)
    ideal = sum(sizes) / (k * rate)
    assert p.makespan >= ideal * (1 - 1e-12)
    assert p.makespan <= 1.05 * ideal + max(sizes) / rate


def test_unequal_rates_all_sources_finish_together():
    rates = [10e6 * (1 + i % 10) for i in range(20)]  # 1x..10x spread
    sources = [Source(i, r, latency=0.001) for i, r in enumerate(rates)]
    tensors = [int(x) for x in np.random.default_rng(2).integers(1, 40 * MiB, 300)]
    shards = cut_shards(tensors, n_sources=len(sources))
    sizes = [s.nbytes for s in shards]
    p = plan(sizes, sources)
    _check_consistent(p, sizes)
    finishes = [f for f in p.finish_per_source if f > 0]
    assert len(finishes) == len(sources), "every source should help"
    assert min(finishes) >= 0.9 * max(finishes)
    # Faster sources carry proportionally more bytes.
    assert p.bytes_of(9) > 5 * p.bytes_of(0)


def test_joiner_downlink_is_the_bottleneck():
    rng = np.random.default_rng(3)
    sizes = rng.integers(MiB, 8 * MiB, 400).tolist()
    sources = [Source(i, float(r)) for i, r in enumerate(rng.uniform(50e6, 100e6, 10))]
    downlink = 100e6  # about a seventh of what the sources could send together
    p = plan(sizes, sources, downlink)
    _check_consistent(p, sizes)
    floor = sum(sizes) / downlink
    assert sum(p.rates) <= downlink * (1 + 1e-9)
    assert p.lower_bound == pytest.approx(floor)
    assert floor * (1 - 1e-12) <= p.makespan <= 1.03 * floor


def test_a_late_source_gets_fewer_bytes():
    sizes = [MiB] * 40
    p = plan(sizes, [Source("near", 10e6), Source("far", 10e6, latency=1.0)])
    assert p.bytes_of("near") > p.bytes_of("far") > 0


def _large_instance(m=1000, n=10_000, seed=5):
    rng = np.random.default_rng(seed)
    sources = [
        Source(i, float(r), latency=float(lat))
        for i, (r, lat) in enumerate(
            zip(rng.uniform(10e6, 100e6, m), rng.uniform(0, 0.002, m))
        )
    ]
    sizes = rng.integers(MiB, 64 * MiB, n).tolist()
    return sizes, sources


def test_large_instance_ratio_to_transfer_bound():
    sizes, sources = _large_instance()
    p = plan(sizes, sources)
    _check_consistent(p, sizes)
    assert p.lower_bound == pytest.approx(lower_bound(sizes, sources))
    print(f"\n1000 sources x 10000 shards: makespan/lower bound = {p.ratio:.4f}")
    assert p.ratio <= 1.05


def test_planning_1000_sources_10000_shards_is_fast():
    sizes, sources = _large_instance()
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        plan(sizes, sources)
        best = min(best, time.perf_counter() - t0)
    print(f"\nplan(1000 sources, 10000 shards): best of 3 = {best * 1e3:.1f} ms")
    # Target is 50 ms (measured ~25 ms); generous here because CI machines are noisy.
    assert best <= 0.2


def test_cut_shards_covers_every_byte_once_near_the_target():
    rng = np.random.default_rng(6)
    tensors = (
        [0, 3] + rng.integers(1, 5 * MiB, 200).tolist() + [37 * MiB + 5, 100 * MiB]
    )
    target = 4 * MiB
    shards = cut_shards(tensors, target)
    covered = {t: [] for t in range(len(tensors))}
    for sh in shards:
        assert sh.nbytes <= target
        for t, off, n in sh.pieces:
            covered[t].append((off, n))
    for t, size in enumerate(tensors):
        spans = sorted(covered[t])
        assert spans, f"tensor {t} missing"
        pos = 0
        for off, n in spans:
            assert off == pos
            pos += n
        assert pos == size
    # Big tensors are cut into near-equal pieces; small ones are packed tightly.
    pieces_of_big = [
        n for sh in shards for t, _, n in sh.pieces if t == len(tensors) - 1
    ]
    assert len(pieces_of_big) == 25 and max(pieces_of_big) - min(pieces_of_big) <= 1
    assert len(shards) <= math.ceil(sum(tensors) / target) * 1.3 + 1


def test_shard_target_scales_with_sources_but_not_below_one_mib():
    assert shard_target(10 * MiB, 100) == MIN_SHARD_BYTES
    total = 800 * MiB
    t = shard_target(total, 10)
    assert total / t >= 4 * 10  # at least 4 shards per source for balance
    assert len(cut_shards([total], n_sources=10)) >= 40


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError):
        plan([1, 2], [Source("a", 0.0)])
    with pytest.raises(ValueError):
        plan([1], [Source("a", 1.0), Source("a", 2.0)])
    with pytest.raises(ValueError):
        exact_plan([1] * 9, [Source("a", 1.0)])
    with pytest.raises(ValueError):
        Source("a", 1.0, latency=-1.0)
    empty = plan([], [Source("a", 1.0)])
    assert empty.makespan == 0.0 and empty.assignment == ()
