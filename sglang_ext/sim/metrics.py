"""Result record shared by both simulator modes (the JSON contract of
`sglang-ext simulate`: every key always present, null where a mode has none)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

RESULT_KEYS = (
    "idle_fraction", "throughput_tok_s", "tpot_ms", "tpot_ms_p99", "ttft_ms_p50", "ttft_ms_p99",
    "imbalance", "energy_j_per_token", "decision_us_p50", "decision_us_p99", "requests_finished", "steps",
)


@dataclass
class SimResult:
    idle_fraction: float | None = None
    throughput_tok_s: float | None = None
    tpot_ms: float | None = None
    tpot_ms_p99: float | None = None
    ttft_ms_p50: float | None = None
    ttft_ms_p99: float | None = None
    imbalance: float | None = None  # mean over counted steps of G*max L - sum L (tokens)
    energy_j_per_token: float | None = None
    decision_us_p50: float | None = None
    decision_us_p99: float | None = None
    requests_finished: int | None = None
    steps: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if v is None else (float(v) if not isinstance(v, int) else v)) for k, v in d.items()}


def pct(values, q: float) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    return float(np.percentile(values, q)) if values.size else None


class DecisionTimer:
    """Wall time of each policy call, in microseconds."""

    def __init__(self):
        self.samples: list[float] = []

    def add(self, seconds: float) -> None:
        self.samples.append(seconds * 1e6)

    def p50(self):
        return pct(self.samples, 50)

    def p99(self):
        return pct(self.samples, 99)
