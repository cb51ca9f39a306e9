#!/usr/bin/env python3
"""Per-record overhead of StepTelemetry.record(), absolute and as a share of a step.

Prints a markdown table: microseconds per record (median of several rounds,
each timing many records back to back, so file flushes and rotations are
amortised as in a real run) and that cost as a percentage of typical decode
steps. The target is under 1% of a 10 ms step.

    .venv/bin/python scripts/bench_telemetry.py [--records 200000] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_ext.argtypes import comma_list, positive_float, positive_int, run_main  # noqa: E402
from sglang_ext.telemetry import StepTelemetry  # noqa: E402


def bench(records: int, rounds: int, use_nvml: bool, max_bytes: int) -> tuple[float, str]:
    """Median microseconds per record() over `rounds`, and the energy source used."""
    per_round = []
    source = ""
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            tel = StepTelemetry(d, 0, use_nvml=use_nvml, max_bytes=max_bytes)
            source = tel.energy_source
            rec = tel.record
            t0 = time.perf_counter()
            for i in range(records):
                rec(step=i, batch_size=64, kv_tokens=100_000 + i, predicted_cost_s=0.0123,
                    step_time_s=0.0150, idle_s=0.0021, idle_source="measured")
            tel.close()  # the final flush is part of the cost
            per_round.append((time.perf_counter() - t0) / records * 1e6)
    return statistics.median(per_round), source


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=positive_int, default=100_000, help="records per round")
    ap.add_argument("--rounds", type=positive_int, default=5, help="rounds; the median is reported")
    ap.add_argument("--steps-ms", type=comma_list(positive_float), default="10,30",
                    help="typical step times (ms), comma-separated")
    ap.add_argument("--max-bytes", type=positive_int, default=4 << 20,
                    help="rotation size for the benchmark (small, so rotation is included)")
    args = ap.parse_args()
    steps = args.steps_ms

    rows = [("power model", *bench(args.records, args.rounds, False, args.max_bytes))]
    us_nvml, src = bench(min(args.records, 20_000), args.rounds, True, args.max_bytes)
    if src == "nvml":
        rows.append(("NVML every step", us_nvml, src))

    head = "| energy path | source | us / record | " + " | ".join(f"% of {s:g} ms step" for s in steps) + " |"
    print(head)
    print("|" + "---|" * (3 + len(steps)))
    for name, us, source in rows:
        cells = " | ".join(f"{100 * us * 1e-6 / (s * 1e-3):.3f}%" for s in steps)
        print(f"| {name} | {source} | {us:.2f} | {cells} |")
    if len(rows) == 1:
        print("\n(no NVML device here: only the power-model path was measured)")
    return 0


if __name__ == "__main__":
    run_main(main)
