#!/usr/bin/env python3
"""Per-step overhead on a rank: StepTelemetry.record(), and the step report the
scheduler patch builds for the controller, absolute and as a share of a step.

Prints three markdown tables: microseconds per record (median of several rounds,
each timing many records back to back, so file flushes and rotations are
amortised as in a real run), to the JSON lines of --balancer-log, to the
Prometheus counters of --enable-metrics (multiprocess mode, as SGLang runs
them), or both; what --enable-metrics adds to the DP controller (per loop turn
and per placement call); and microseconds to build one step report for a
rank running 64 to 1,024 requests (a step that runs the same requests as the
one before, as most do) with none or 2,000 waiting (4 admitted and 4 arriving
per step), each as a percentage of typical decode steps. The target is under
1% of a 10 ms step.

    .venv/bin/python scripts/bench_telemetry.py [--records 200000] [--rounds 5] [--report-running 64,256,1024] [--report-waiting 0,2000]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sglang_ext.argtypes import comma_list, nonneg_int, positive_float, positive_int, run_main  # noqa: E402
from sglang_ext.telemetry import StepTelemetry  # noqa: E402


def _prometheus():
    """prometheus_client in multiprocess mode (its values in files, as under SGLang's
    --enable-metrics): the directory must be set before its first import."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sglang_ext_bench_prom_")
    import prometheus_client

    return prometheus_client


def bench(records: int, rounds: int, use_nvml: bool, max_bytes: int, to_file: bool = True,
          metrics: bool = False) -> tuple[float, str]:
    """Median microseconds per record() over `rounds`, and the energy source used."""
    from sglang_ext.plugin.metrics import RankMetrics

    per_round = []
    source = ""
    on_line = RankMetrics(_prometheus(), 0, "bench").observe if metrics else None
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as d:
            tel = StepTelemetry(d if to_file else None, 0, use_nvml=use_nvml, max_bytes=max_bytes, on_line=on_line)
            source = tel.energy_source
            rec = tel.record
            t0 = time.perf_counter()
            for i in range(records):
                rec(step=i, batch_size=64, kv_tokens=100_000 + i, predicted_cost_s=0.0123,
                    step_time_s=0.0150, idle_s=0.0021, idle_source="measured")
            tel.close()  # the final flush is part of the cost
            per_round.append((time.perf_counter() - t0) / records * 1e6)
    return statistics.median(per_round), source


def bench_controller_metrics(rounds: int, turns: int = 100_000) -> list[tuple[str, float]]:
    """Microseconds the DP controller spends on its metrics: mirroring its counters
    once per loop turn (nothing new, or a placement and a report since the last turn),
    and observing one placement call's time."""
    from sglang_ext.plugin.metrics import CONTROLLER_COUNTERS, ControllerMetrics

    m = ControllerMetrics(_prometheus(), "bfio", "bench")
    stats = dict.fromkeys(CONTROLLER_COUNTERS, 0)

    def quiet(i):
        m.sync(stats, 0)

    def busy(i):
        stats["dispatched"] += 1
        stats["placements"] += 1
        stats["reports"] += 4
        m.sync(stats, i & 7)

    def call(i):
        m.placement_call(3e-4)

    out = []
    for name, fn in (("loop turn, nothing new", quiet), ("loop turn, a placement and 4 reports new", busy),
                     ("one placement call's time", call)):
        per_round = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(turns):
                fn(i)
            per_round.append((time.perf_counter() - t0) / turns * 1e6)
        out.append((name, statistics.median(per_round)))
    return out


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
    st = patch._RankState(SimpleNamespace(reporting=False, log_dir=None, metrics=False))
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

    rows = [("power model", "file", *bench(args.records, args.rounds, False, args.max_bytes)),
            ("power model", "file + /metrics", *bench(args.records, args.rounds, False, args.max_bytes,
                                                      metrics=True)),
            ("power model", "/metrics", *bench(args.records, args.rounds, False, args.max_bytes, to_file=False,
                                               metrics=True))]
    us_nvml, src = bench(min(args.records, 20_000), args.rounds, True, args.max_bytes)
    if src == "nvml":
        rows.append(("NVML every step", "file", us_nvml, src))

    head = "| energy path | to | source | us / record | " + " | ".join(f"% of {s:g} ms step" for s in steps) + " |"
    print(head)
    print("|" + "---|" * (4 + len(steps)))
    for name, to, us, source in rows:
        cells = " | ".join(f"{100 * us * 1e-6 / (s * 1e-3):.3f}%" for s in steps)
        print(f"| {name} | {to} | {source} | {us:.2f} | {cells} |")
    if len(rows) == 3:
        print("\n(no NVML device here: only the power-model path was measured)")

    print("\n| DP controller under --enable-metrics | us |")
    print("|---|---|")
    for name, us in bench_controller_metrics(args.rounds):
        print(f"| {name} | {us:.2f} |")

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
