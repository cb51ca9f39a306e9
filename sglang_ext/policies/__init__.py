"""Placement policies, registered by name.

    policy = make_policy("bfio", horizon=20)
    ranks = policy.assign(view, candidates, must_place=True)

A variant is a parameter: `parse_policy_spec("bfio:horizon=0:variant=paper")` (the
paper's own heuristic at H=0); a parameter the policy does not take is an error.
"""
from __future__ import annotations

import inspect
import math

from .base import Candidates, ClusterView, Policy
from .baselines import FCFS, JSQ, PowerOfTwo, RoundRobin, TotalRequests, TotalTokens

REGISTRY: dict[str, type[Policy]] = {}


def register(cls: type[Policy]) -> type[Policy]:
    REGISTRY[cls.name] = cls
    return cls


for _cls in (FCFS, RoundRobin, JSQ, TotalRequests, TotalTokens, PowerOfTwo):
    register(_cls)

from .bfio import BFIO  # noqa: E402  (registers itself after the baselines)

register(BFIO)


def policy_names() -> list[str]:
    return list(REGISTRY)


def _signature(name: str) -> dict[str, inspect.Parameter]:
    """The parameters a registered policy takes (those of its constructor), by name."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; valid: {', '.join(REGISTRY)}") from None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self" and p.kind in named}


def _parameters(name: str) -> list[str]:
    return list(_signature(name))


def _typed(name: str, key: str, value, param: inspect.Parameter):
    """`value` (as `_coerce` read it) in the parameter's type (its default's, or for a
    default of None its annotation's), or a ValueError naming the parameter:
    `horizon=abc` must not reach the constructor."""
    want = type(param.default)
    if param.default is None:  # e.g. `overflow: float | None = None`
        text = str(param.annotation)
        want = next((t for t in (bool, int, float) if t.__name__ in text), str)
    if want is bool:
        if isinstance(value, bool):
            return value
        kind = "true or false"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        kind = "an integer"
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        kind = "a finite number"
    else:
        return value if isinstance(value, str) else str(value)
    raise ValueError(f"{name} parameter {key!r} takes {kind}, got {value!r}")


def make_policy(name: str, **params) -> Policy:
    """Build a registered policy; parameters it does not take are ignored, so a
    caller can pass the common ones (horizon, seed, cost) to every policy. (A
    user's spec is checked by `parse_policy_spec`, which rejects them.)"""
    accepted = _parameters(name)
    return REGISTRY[name](**{k: v for k, v in params.items() if k in accepted})


def _coerce(text: str):
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_policy_spec(spec: str) -> tuple[str, dict]:
    """'bfio:horizon=0:variant=paper' -> ('bfio', {'horizon': 0, 'variant': 'paper'}); a
    parameter the policy does not take, or a value not of its type (that of its
    default), raises ValueError naming it."""
    name, _, rest = spec.partition(":")
    params = {}
    for item in filter(None, rest.split(":")):
        key, eq, val = item.partition("=")
        if not eq:
            raise ValueError(f"policy parameter {item!r} in {spec!r} is not key=value")
        params[key.strip().replace("-", "_")] = _coerce(val.strip())
    accepted = _signature(name)
    unknown = [k for k in params if k not in accepted]
    if unknown:  # a typo would otherwise run the defaults under the typo's name
        raise ValueError(f"{name} takes no parameter {unknown[0]!r}; valid: {', '.join(accepted) or 'none'}")
    return name, {k: _typed(name, k, v, accepted[k]) for k, v in params.items()}


__all__ = [
    "Candidates", "ClusterView", "Policy", "REGISTRY", "register", "make_policy",
    "policy_names", "parse_policy_spec",
]
