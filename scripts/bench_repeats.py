#!/usr/bin/env python
"""Online mode over many runs: a policy against baselines, with a ratio, a 95%
interval and a count of worse runs per (trace, G) cell, beside the first
baseline against itself as the control.

A p99 over a few thousand requests rests on a few dozen of them, and every
barrier step's length depends on all earlier placements, so one run says
little: the control (the first run at an arrival rate 0.2% higher) already
moves p99 TPOT and idle by several percent. Each cell runs over disjoint
windows of the trace at several loads; ratios are geometric means over the
runs with a Student-t interval on the log ratios."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from sglang_ext.argtypes import (write_json, saved_rows, output_file, add_online_grid, add_online_model,
                                 check_online_model, comma_list, existing_file, nonneg_int,
                                 plot_file, positive_float, positive_int, repeat_note, run_main, run_specs)
from sglang_ext.cost import cost_preset, power_preset
from sglang_ext.estimators import make_estimator
from sglang_ext.sim.online import capacity_rps, scale_for_load, simulate_online
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"
LABELS = {"idle_fraction": "idle", "idle_arrivals": "idle while arriving", "idle_drain": "idle in the drain",
          "idle_above_floor": "idle above the floor",
          "tpot_ms_p99": "p99 TPOT", "latency_ms_p99": "p99 e2e",
          "ttft_ms_p99": "p99 TTFT", "tpot_ms": "mean TPOT", "energy_j_per_token": "J/token"}
CONTROL = "control"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_online_grid(ap, TRACES)
    ap.add_argument("--loads", type=comma_list(positive_float), default="0.6,0.7,0.8",
                    help="Comma list of loads: arrival rate / capacity (moderate: 0.5 to 0.8).")
    ap.add_argument("--runs", type=run_specs, default="total_tokens@immediate,bfio@immediate",
                    help="Comma list of POLICY[:key=val...]@BINDING (the binding may add :view_lag=N, the "
                         "placements seeing the requests N decode steps old): the first is the baseline (and the "
                         "control's policy), each run is compared with it, and the last also with every other.")
    ap.add_argument("--metrics", default="idle_fraction,tpot_ms_p99",
                    help=f"Comma list, lower is better: {', '.join(LABELS)}.")
    ap.add_argument("--requests-per-rank", type=positive_int, default=125,
                    help="Window size: this * G requests; the trace is cut into disjoint windows of it.")
    ap.add_argument("--max-windows", type=positive_int, default=4, help="Windows per (trace, G) cell, from the start.")
    ap.add_argument("--control-jitter", type=float, default=0.002,
                    help="The control reruns the baseline at this relative arrival-rate change.")
    ap.add_argument("--max-pool-wait", type=positive_float, default=5.0, help="Pool binding deadline, seconds.")
    ap.add_argument("--pool-window", type=nonneg_int, default=0,
                    help="Candidates offered per pool call (0: the simulator's default, 4 x G).")
    add_online_model(ap)
    ap.add_argument("--json", type=output_file, default=None, help="Write every run's metrics here.")
    ap.add_argument("--summary-from", type=existing_file, default=None,
                    help="Print the summary of a saved --json file (its runs, in their order) and exit.")
    ap.add_argument("--plot", type=plot_file, default=None,
                    help="Write a PNG: each run's ratio to the baseline with its 95%% interval, per cell and metric.")
    args = ap.parse_args()
    check_online_model(ap, args)
    loads = args.loads
    metrics = args.metrics.split(",")
    if unknown := [m for m in metrics if m not in LABELS]:
        ap.error(f"--metrics: unknown {', '.join(unknown)} (choose from {', '.join(LABELS)})")
    if args.summary_from:
        rows = saved_rows(args.summary_from, strings=("trace", "run"), numbers=("G",), nullable=tuple(metrics))
        saved = [r for r in dict.fromkeys(x["run"] for x in rows) if r != CONTROL]
        print(summarize(rows, saved, metrics))
        if args.plot:
            plot(rows, saved, metrics, args.plot)
        return
    specs = args.runs
    runs = [s.text for s in specs]
    if len(runs) < 2 or len(set(runs)) != len(runs):
        ap.error("--runs: give at least two distinct runs (baseline first, the policy under test last)")
    if not 0 < args.control_jitter < 0.1:
        ap.error(f"--control-jitter must be in (0, 0.1), got {args.control_jitter}")
    cost = cost_preset(args.cost_preset, args.batch)
    power = power_preset(args.power_preset)
    plan = [(s.text, s, 1.0) for s in specs] + [(CONTROL, specs[0], 1.0 + args.control_jitter)]

    jobs = []
    for path in args.traces:
        tname, full = path.name, load_trace(path).repeat(args.trace_repeat)
        for G in args.ranks:
            n = args.requests_per_rank * G
            for w in range(min(args.max_windows, max(1, len(full) // n))):
                jobs += [(tname, G, w, full.window(w * n, n), load) for load in loads]
    rows, capacity = [], {}
    for tname, G, w, trace, load in tqdm(jobs, desc="runs"):
        if (tname, G, w) not in capacity:
            capacity[tname, G, w] = capacity_rps(trace, cost, G, args.batch, args.max_prompt_len, args.max_new_tokens)
        scale = scale_for_load(trace, load, capacity[tname, G, w])
        for label, spec, jitter in plan:
            cfg = spec.config(ranks=G, batch=args.batch, rate_scale=scale * jitter, cost=cost, power=power,
                              max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                              max_pool_wait_s=args.max_pool_wait,
                              pool_window=args.pool_window or None)
            r = simulate_online(trace, spec.make_policy(cost), cfg, make_estimator(args.estimator, seed=0))
            rows.append(dict(trace=tname, G=G, window=w, requests=len(trace), trace_repeat=args.trace_repeat,
                             load=load, run=label, **r.to_dict(), **r.extra))
    print(f"\ncost preset {cost.name}, estimator {args.estimator}, loads {','.join(f'{x:g}' for x in loads)}, windows of "
          f"{args.requests_per_rank} x G requests (at most {args.max_windows}), pool max wait {args.max_pool_wait:g} s, "
          f"control: {runs[0]} at x{1 + args.control_jitter:g} arrival rate{repeat_note(args.trace_repeat)}\n")
    print(summarize(rows, runs, metrics))
    if args.plot:
        plot(rows, runs, metrics, args.plot)
    if args.json:
        write_json(args.json, rows, indent=1)


def ratio_ci(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    """Geometric-mean ratio and its 95% interval (t over the log ratios)."""
    lr = np.log(num / den)
    m = float(lr.mean())
    if lr.size < 2:
        return float(np.exp(m)), float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, lr.size - 1) * lr.std(ddof=1) / np.sqrt(lr.size))
    return float(np.exp(m)), float(np.exp(m - half)), float(np.exp(m + half))


def paired(a: list[dict], b: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The metric in two runs' rows, run by run, without the runs where either
    has none (e.g. idle_drain when a run ends without decode steps after its last arrival)."""
    def values(rows):
        return np.array([np.nan if r.get(metric) is None else r[metric] for r in rows], float)

    x, y = values(a), values(b)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def by_cell(rows: list[dict]) -> dict:
    """{(trace, G): {run: [rows]}} in first-seen order, then the pooled
    ("all cells", "") entry holding every row."""
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["trace"], r["G"]), {}).setdefault(r["run"], []).append(r)
    pooled: dict = {}
    for r in rows:
        pooled.setdefault(r["run"], []).append(r)
    cells["all cells", ""] = pooled
    return cells


def summarize(rows: list[dict], runs: list[str], metrics: list[str]) -> str:
    """One line per (cell, comparison): every run against the baseline (the
    first), the policy under test (the last) against the runs between, then
    the control against the baseline; the pooled lines ("all cells") take
    every run of every cell."""
    cells = by_cell(rows)
    policy = runs[-1]
    pairs = ([(r, runs[0]) for r in runs[1:]] + [(policy, other) for other in runs[1:-1]]
             + [(CONTROL, runs[0])])
    head = "| trace | G | runs | comparison |" + "".join(f" {LABELS[m]} ratio [95%] | worse |" for m in metrics)
    lines = [head, "|---|---|---|---|" + "---|---|" * len(metrics)]
    for (trace, G), c in cells.items():
        for num, den in pairs:
            a, b = c[num], c[den]
            line = f"| {trace.split('.')[0]} | {G} | {len(b)} | {num} / {den} |"
            for m in metrics:
                x, y = paired(a, b, m)
                g, lo, hi = ratio_ci(x, y)
                line += f" {g:.3f} [{lo:.3f}, {hi:.3f}] | {int((x > y).sum())}/{len(y)} |"
            lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], runs: list[str], metrics: list[str], path: str) -> None:
    """Forest plot: one panel per metric, one row per cell (pooled last), each
    run against the baseline and the control, with 95% intervals, and
    a line at 1 (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = by_cell(rows)
    keys = list(cells)
    labels = [f"{t.split('.')[0]} G={G}" if G != "" else t for t, G in keys]
    series = runs[1:] + [CONTROL]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 0.3 * len(keys) * len(series) + 1.8),
                             sharey=True, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for k, label in enumerate(series):
            ys, xs, lo, hi = [], [], [], []
            for i, key in enumerate(keys):
                c = cells[key]
                g, a, b = ratio_ci(*paired(c[label], c[runs[0]], m))
                ys.append(i + (k - (len(series) - 1) / 2) * 0.8 / len(series))
                xs.append(g)
                lo.append(g - a if np.isfinite(a) else 0.0)
                hi.append(b - g if np.isfinite(b) else 0.0)
            ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, label=f"{label} / {runs[0]}",
                        color="0.6" if label == CONTROL else None)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{LABELS[m]} ratio (lower is better)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(keys)), labels)
    axes[0][0].invert_yaxis()  # shared: the first cell on top, the pooled line last
    axes[0][0].legend(loc="lower left", bbox_to_anchor=(0, 1.06), fontsize=8, ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
