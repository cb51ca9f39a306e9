"""One online run as the benchmark scripts name it: 'POLICY[:key=val...]@BINDING'
(e.g. 'bfio:full_wait=true@immediate', 'jsq@pool'), made into a policy and a
simulator configuration the same way everywhere. The binding may add
':view_lag=N' (OnlineConfig.view_lag: each placement sees the requests N decode
steps old, as the live controller's --balancer-view-lag at its worst)."""
from __future__ import annotations

from dataclasses import dataclass

from ..cost import CostModel
from ..policies import Policy, make_policy, parse_policy_spec
from ..policies.bfio import ONLINE_POOL_TAIL
from .online import OnlineConfig

BINDINGS = ("immediate", "pool")


@dataclass(frozen=True)
class RunSpec:
    text: str
    policy: str  # the policy spec, parameters included ('bfio:full_wait=true')
    binding: str
    view_lag: int = 0

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        policy, at, binding = text.strip().rpartition("@")
        binding, _, lag = binding.partition(":")
        if not at or binding not in BINDINGS:
            raise ValueError(f"{text!r} is not POLICY[:key=val...]@immediate or POLICY[:key=val...]@pool "
                             "(either with :view_lag=N)")
        parse_policy_spec(policy)  # unknown policy or malformed parameter: raise now
        view_lag = 0
        if lag:
            key, _, value = lag.partition("=")
            if key != "view_lag" or not value.isdigit():
                raise ValueError(f"{text!r}: after the binding only :view_lag=N (N >= 0 decode steps) may follow")
            view_lag = int(value)
        return cls(text.strip(), policy, binding, view_lag)

    def make_policy(self, cost: CostModel) -> Policy:
        """The policy, with the online defaults (pool horizon 20, seed 0, the
        cost model's per-request and per-token weights, bfio's pool tail) under
        its own parameters."""
        name, params = parse_policy_spec(self.policy)
        defaults = {"horizon": 20, "seed": 0, "b": cost.b, "c": cost.c, "pool_tail": ONLINE_POOL_TAIL}
        return make_policy(name, **{**defaults, **params})  # a policy takes the defaults it has

    def config(self, **kw) -> OnlineConfig:
        return OnlineConfig(binding=self.binding, view_lag=self.view_lag, **kw)


def parse_runs(text: str) -> list[RunSpec]:
    """Comma list of run specs (ValueError naming the bad one)."""
    return [RunSpec.parse(t) for t in text.split(",") if t.strip()]
