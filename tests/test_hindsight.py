"""sim/hindsight.py: the drain of held requests, and their re-placement with hindsight."""
import numpy as np
import pytest

from sglang_ext.cost import CostModel
from sglang_ext.policies import Policy
from sglang_ext.sim.hindsight import drain, rank_loads, replace
from sglang_ext.sim.online import OnlineConfig, simulate_online
from sglang_ext.traces import Trace

UNIT = CostModel("unit", a=0.0, b=0.0, c=1.0)  # loads in KV tokens


class Fixed(Policy):
    """Each request, in arrival order, to a given rank."""

    name = "fixed"

    def __init__(self, ranks):
        self.ranks, self.k = ranks, 0

    def assign(self, view, cands, must_place=False):
        out = self.ranks[self.k:self.k + len(cands)]
        self.k += len(cands)
        return out


def test_drain_is_the_simulators_decode_wait():
    # A burst that fits: one prefill step, then decode to the end with fixed
    # requests. After the prefill a request holds prompt + 1 KV tokens and has
    # output - 1 decode steps left; the drain of exactly those is the run's decode.
    rng = np.random.default_rng(3)
    G, n = 4, 30
    prompt, out = rng.integers(1, 400, n), rng.integers(1, 120, n)
    ranks = rng.integers(0, G, n)
    cost = CostModel("t", a=2e-3, b=1e-4, c=1e-6, sync=5e-4)
    trace = Trace("burst", prompt, out, np.zeros(n))
    r = simulate_online(trace, Fixed(ranks), OnlineConfig(ranks=G, batch=n, cost=cost))
    d = drain(rank_loads(ranks, prompt + 1, out - 1, G, cost), cost)
    assert d.steps == r.extra["decode_steps"]
    assert d.time_s == pytest.approx(r.extra["decode_s"], rel=1e-9)
    assert d.idle(G) == pytest.approx(r.idle_fraction, rel=1e-9)


def test_rank_loads_grow_a_token_a_step_and_drop_at_the_end():
    L = rank_loads(np.array([0, 0, 1]), np.array([10, 5, 7]), np.array([3, 1, 2]), 3, UNIT)
    assert L.tolist() == [[15, 7, 0], [11, 8, 0], [12, 0, 0]]
    d = drain(L, UNIT)
    assert d.wait_s == 3 * 15 - 22 + 3 * 11 - 19 + 3 * 12 - 12 and d.steps == 3


def test_replace_pairs_long_with_short():
    kv = np.full(4, 100)
    left = np.array([10, 10, 1, 1])
    out = replace(kv, left, ranks=2, slots=2, cost=UNIT, swaps=0)
    assert sorted(out[:2]) == [0, 1] and sorted(out[2:]) == [0, 1]
    assert drain(rank_loads(out, kv, left, 2, UNIT), UNIT).wait_s == 0


def test_swaps_mend_what_the_greedy_leaves():
    # One step each, sizes 3,3,2,2,2 on two ranks of 3 slots: the greedy ends
    # at 7 against 5; swapping a 3 for a 2 gives 6 and 6.
    kv, left = np.array([3, 3, 2, 2, 2]), np.ones(5, np.int64)
    greedy = replace(kv, left, ranks=2, slots=3, cost=UNIT, swaps=0)
    assert drain(rank_loads(greedy, kv, left, 2, UNIT), UNIT).wait_s == 2
    better = replace(kv, left, ranks=2, slots=3, cost=UNIT, swaps=200)
    assert drain(rank_loads(better, kv, left, 2, UNIT), UNIT).wait_s == 0
    assert np.bincount(better, minlength=2).tolist() == np.bincount(greedy, minlength=2).tolist()


def test_replace_keeps_slots_and_never_loses_to_its_start():
    rng = np.random.default_rng(0)
    kv, left = rng.integers(1, 2000, 300), rng.integers(1, 500, 300)
    start = replace(kv, left, ranks=8, slots=40, cost=UNIT, swaps=0)
    out = replace(kv, left, ranks=8, slots=40, cost=UNIT, swaps=3000)
    assert np.bincount(out, minlength=8).max() <= 40
    assert drain(rank_loads(out, kv, left, 8, UNIT), UNIT).wait_s <= drain(rank_loads(start, kv, left, 8, UNIT),
                                                                           UNIT).wait_s


def test_replace_refuses_more_requests_than_slots():
    with pytest.raises(ValueError, match="5 requests do not fit 2 ranks x 2 slots"):
        replace(np.ones(5), np.ones(5), ranks=2, slots=2, cost=UNIT)


def test_empty_drain():
    assert drain(rank_loads(np.zeros(0), np.zeros(0), np.zeros(0), 4, UNIT), UNIT).steps == 0


def test_replace_starts_from_a_given_placement_when_it_drains_better():
    kv, left = np.array([3, 3, 2, 2, 2]), np.ones(5, np.int64)
    best = np.array([1, 1, 0, 0, 0])  # 6 and 6
    assert replace(kv, left, ranks=2, slots=3, cost=UNIT, swaps=0, start=best).tolist() == best.tolist()
    worse = np.array([0, 0, 0, 1, 1])  # 8 and 4: the greedy (7 and 5) wins
    out = replace(kv, left, ranks=2, slots=3, cost=UNIT, swaps=0, start=worse)
    assert drain(rank_loads(out, kv, left, 2, UNIT), UNIT).wait_s == 2
