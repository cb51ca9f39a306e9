"""One online run as the benchmark scripts name it: 'POLICY[:key=val...]@BINDING'
(e.g. 'bfio:full_wait=true@immediate', 'jsq@pool'), made into a policy and a
simulator configuration the same way everywhere."""
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

    @classmethod
    def parse(cls, text: str) -> "RunSpec":
        policy, at, binding = text.strip().rpartition("@")
        if not at or binding not in BINDINGS:
            raise ValueError(f"{text!r} is not POLICY[:key=val...]@immediate or POLICY[:key=val...]@pool")
        parse_policy_spec(policy)  # unknown policy or malformed parameter: raise now
        return cls(text.strip(), policy, binding)

    def make_policy(self, cost: CostModel) -> Policy:
        """The policy, with the online defaults (pool horizon 20, seed 0, the
        cost model's per-request and per-token weights, bfio's pool tail) under
        its own parameters."""
        name, params = parse_policy_spec(self.policy)
        defaults = {"horizon": 20, "seed": 0, "b": cost.b, "c": cost.c, "pool_tail": ONLINE_POOL_TAIL}
        return make_policy(name, **{**defaults, **params})  # a policy takes the defaults it has

    def config(self, **kw) -> OnlineConfig:
        return OnlineConfig(binding=self.binding, **kw)


def parse_runs(text: str) -> list[RunSpec]:
    """Comma list of run specs (ValueError naming the bad one)."""
    return [RunSpec.parse(t) for t in text.split(",") if t.strip()]
