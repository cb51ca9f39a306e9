"""sglang_ext.sim.runs: run specs as the benchmark scripts name them."""
import pytest

from sglang_ext.cost import cost_preset
from sglang_ext.policies.bfio import ONLINE_POOL_TAIL
from sglang_ext.sim.runs import RunSpec, parse_runs


def test_parse_make_policy_and_config():
    cost = cost_preset("paper-dsv3", 72)
    a, b = parse_runs("total_tokens@immediate, bfio:horizon=5:full_wait=true@pool")
    assert (a.policy, a.binding, b.policy, b.binding) == ("total_tokens", "immediate", "bfio:horizon=5:full_wait=true", "pool")
    pol = b.make_policy(cost)
    assert pol.name == "bfio" and pol.horizon == 5 and pol.full_wait  # its parameters over the defaults
    assert pol.weights[1:] == (cost.b, cost.c)
    assert RunSpec.parse("bfio@pool").make_policy(cost).horizon == 20  # the benchmark default
    # online pool decisions look past the pool horizon by default; a spec can turn it off
    assert RunSpec.parse("bfio@pool").make_policy(cost).pool_tail == ONLINE_POOL_TAIL > 0
    assert RunSpec.parse("bfio:pool_tail=0@pool").make_policy(cost).pool_tail == 0
    cfg = b.config(ranks=4, batch=8)
    assert (cfg.binding, cfg.ranks, cfg.batch) == ("pool", 4, 8)
    assert (cfg.view_lag, RunSpec.parse("bfio@immediate:view_lag=2").config().view_lag) == (0, 2)
    assert RunSpec.parse("bfio@pool:view_lag=1").config().view_lag == 1


@pytest.mark.parametrize("text, words", [("bfio", "POLICY"), ("bfio@later", "POLICY"),
                                         ("nosuch@pool", "unknown policy"), ("bfio:horizon@pool", "key=value"),
                                         ("bfio@pool:view_lag=x", "only :view_lag"),
                                         ("bfio@immediate:view_lag=-1", "only :view_lag"),
                                         ("bfio@immediate:lag=1", "only :view_lag")])
def test_bad_specs_name_the_problem(text, words):
    with pytest.raises(ValueError, match=words):
        RunSpec.parse(text)
