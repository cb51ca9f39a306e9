#!/usr/bin/env python3
"""Per-step overhead on a rank: StepTelemetry.record(), and the step report the
scheduler patch builds for the controller, absolute and as a share of a step.

Prints two markdown tables: microseconds per record (median of several rounds,
each timing many records back to back, so file flushes and rotations are
amortised as in a real run), and microseconds to build one step report for a
rank running 64 to 1,024 requests (a step that runs the same requests as the
one before, as most do) with none or 2,000 waiting (4 admitted and 4 arriving
per step), each as a percentage of typical decode steps. The target is under
1% of a 10 ms step.

    .venv/bin/python scripts/bench_telemetry.py [--records 200000] [--rounds 5] [--report-running 64,256,1024] [--report-waiting 0,2000]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_ext.argtypes import comma_list, nonneg_int, positive_float, positive_int, run_main  # noqa: E402
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


class _Req:
    """What the report reads of a SGLang request."""

    def __init__(self, i: int):
        self.seqlen, self.output_ids, self.origin_input_ids = 1000 + i, [7] * (i % 300), [1] * 900
        self.sampling_params = SimpleNamespace(max_new_tokens=2048, ignore_eos=i % 7 == 0)

    def finished(self) -> bool:
        return False


def bench_report(running: int, waiting: int, rounds: int, reports: int = 300, churn: int = 4) -> float:
    """Median microseconds per step report with `running` requests and `waiting` queued,
    over `rounds` rounds of `reports` reports; before each, `churn` requests leave the
    queue's head (admitted) and as many join its tail (arrivals), as on a busy rank."""
    from sglang_ext.patches import scheduler as patch

    reqs = [_Req(i) for i in range(running)]
    queue = [_Req(i) for i in range(waiting)]
    arrivals = iter([_Req(i) for i in range(rounds * reports * churn)])
    sched = SimpleNamespace(running_batch=SimpleNamespace(reqs=reqs), waiting_queue=queue,
                            max_running_requests=running + 64)
    patch._rank_info = lambda: (0, True)  # (no SGLang process context here)
    st = patch._RankState(SimpleNamespace(reporting=False, log_dir=None))
    per_round = []
    for _ in range(rounds):
        elapsed = 0.0
        for _ in range(reports):
            if waiting:
                sched.waiting_queue = sched.waiting_queue[churn:] + [next(arrivals) for _ in range(churn)]
            st.finished_pending = [(300, 900, 0)] * 2
            t0 = time.perf_counter()
            patch._build_report(sched, st, sched.running_batch)
            elapsed += time.perf_counter() - t0
        per_round.append(elapsed / reports * 1e6)
    return statistics.median(per_round)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=positive_int, default=100_000, help="records per round")
    ap.add_argument("--rounds", type=positive_int, default=5, help="rounds; the median is reported")
    ap.add_argument("--steps-ms", type=comma_list(positive_float), default="10,30",
                    help="typical step times (ms), comma-separated")
    ap.add_argument("--report-running", type=comma_list(positive_int), default="64,256,1024",
                    help="running requests per rank for the step-report rows, comma-separated")
    ap.add_argument("--report-waiting", type=comma_list(nonneg_int), default="0,2000",
                    help="waiting requests per rank for the step-report rows (4 admitted and 4 arriving "
                         "between two reports), comma-separated")
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

    print("\n| running | waiting | us / step report | " + " | ".join(f"% of {s:g} ms step" for s in steps) + " |")
    print("|" + "---|" * (3 + len(steps)))
    for running in args.report_running:
        for waiting in args.report_waiting:
            us = bench_report(running, waiting, args.rounds)
            cells = " | ".join(f"{100 * us * 1e-6 / (s * 1e-3):.3f}%" for s in steps)
            print(f"| {running} | {waiting} | {us:.1f} | {cells} |")
    return 0


if __name__ == "__main__":
    run_main(main)
