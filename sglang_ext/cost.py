"""Cost and power model of barrier-synchronized DP decode (design.md section 2).

A rank's local decode step takes  t_g = a + b * n_g + c * L_g  (n_g running
requests, L_g their KV tokens). Under DP attention every step ends in a
collective, so the step lasts  T = max_g t_g + sync  and rank g waits
T - sync - t_g at the barrier. Power has three levels: busy (computing),
barrier-wait (spinning in the collective: NOT idle power) and idle (nothing to
run).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np


@dataclass(frozen=True)
class CostModel:
    """Per-rank decode step time a + b*n + c*kv (seconds), plus prefill and sync."""

    name: str
    a: float  # fixed cost of a step (s)
    b: float  # per running request (s)
    c: float  # per KV token (s)
    sync: float = 0.0  # the collective itself (s)
    prefill_per_token: float = 0.0  # prefill cost per prompt token (s); 0 folds prefill into decode
    source: str = ""

    def step_time(self, num_running: np.ndarray, kv_tokens: np.ndarray) -> np.ndarray:
        """Local step time of each rank (vectorised over ranks)."""
        return self.a + self.b * np.asarray(num_running, dtype=np.float64) + self.c * np.asarray(
            kv_tokens, dtype=np.float64
        )

    def wait_floor(self, kv: np.ndarray, ranks: int) -> float:
        """A lower bound on one decode step's summed barrier wait over `ranks`
        ranks, whatever the placement of the running requests (KV lengths
        `kv`): the slowest rank is at least the mean rank, at least the rank
        holding the longest request, and, with more requests than ranks, at
        least a rank holding two of the ranks+1 longest (pigeonhole). The
        summed local time is the same for every placement (an empty rank
        still costs a), so the wait is at least ranks * bound - sum."""
        kv = np.asarray(kv, dtype=np.float64)
        n = kv.size
        if n == 0:
            return 0.0
        total = ranks * self.a + self.b * n + self.c * kv.sum()
        slowest = max(total / ranks, self.a + self.b + self.c * kv.max())
        if n > ranks:
            top = -np.partition(-kv, [ranks - 1, ranks])[ranks - 1:ranks + 1]  # the ranks-th and (ranks+1)-th longest
            slowest = max(slowest, self.a + 2 * self.b + self.c * top.sum())
        return max(ranks * slowest - total, 0.0)


def paper_deepseek_v3(batch: int = 72) -> CostModel:
    """The paper's released simulator: C = (B*0.6 ms + 35 ms)/16, t_l per KV token."""
    return CostModel(
        name="paper-dsv3",
        a=(batch * 0.6e-3 + 35e-3) / 16,
        b=0.0,
        c=1.5 * 2 * 576 * 61e-6 / 2**20,
        prefill_per_token=1.5 * 2 * 576 * 61e-6 / 2**20 * 8,  # estimate: a prompt token ~8x a cached one
        source="arXiv 2601.17855 released simulator (DeepSeek-V3, MLA 576-dim latent, 61 layers)",
    )


PRESETS = {
    "paper-dsv3": paper_deepseek_v3,
    "a100-llama3-8b": lambda batch=72: CostModel(
        "a100-llama3-8b", 9.80e-3, 0.0506e-3, 0.075e-6, sync=0.0, prefill_per_token=0.12e-3 / 1,
        source="fit to vidur decode profiles, R^2 0.992; prefill per token estimated",
    ),
    "h100-llama2-70b": lambda batch=72: CostModel(
        "h100-llama2-70b", 29.9e-3, 0.215e-3, 0.158e-6, sync=0.0, prefill_per_token=0.10e-3,
        source="fit to Splitwise measurements, R^2 0.974; prefill per token estimated",
    ),
}


def cost_preset(name: str, batch: int = 72, **overrides) -> CostModel:
    """A cost preset by name (see PRESETS); keyword overrides replace fields."""
    try:
        model = PRESETS[name](batch)
    except KeyError:
        raise ValueError(f"unknown cost preset {name!r}; choose from {', '.join(PRESETS)}") from None
    return replace(model, **overrides) if overrides else model


@dataclass(frozen=True)
class PowerModel:
    """Watts per rank while busy, waiting at the barrier, and idle (nothing to run)."""

    name: str
    busy_w: float
    wait_w: float
    idle_w: float

    def step_energy(self, step_time: float, busy_time: np.ndarray, has_work: np.ndarray) -> float:
        """Joules of one barrier step summed over ranks: busy for busy_time, then
        waiting (ranks with work) or idle (ranks without) for the rest."""
        busy_time = np.minimum(np.asarray(busy_time, dtype=np.float64), step_time)
        rest = step_time - busy_time
        rest_w = np.where(np.asarray(has_work), self.wait_w, self.idle_w)
        return float(np.sum(self.busy_w * busy_time + rest_w * rest))


#: Splitwise's H100 decode figures; waiting in NCCL counted ~25% above idle (a
#: conservative end of the reported range; keep it explicit in every report).
POWER_PRESETS = {
    "h100": PowerModel("h100", busy_w=380.0, wait_w=1.25 * 75.0, idle_w=75.0),
    "h100-spin": PowerModel("h100-spin", busy_w=380.0, wait_w=0.9 * 380.0, idle_w=75.0),
}


def power_preset(name: str) -> PowerModel:
    try:
        return POWER_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown power preset {name!r}; choose from {', '.join(POWER_PRESETS)}") from None


def paper_power(loads: np.ndarray) -> np.ndarray:
    """The paper's power model: P = 100 W + 300 W * u^0.7, u = L_g / max_g L."""
    loads = np.asarray(loads, dtype=np.float64)
    top = loads.max() if loads.size else 0.0
    u = loads / top if top > 0 else np.zeros_like(loads)
    return 100.0 + 300.0 * u**0.7
