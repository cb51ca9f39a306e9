#!/usr/bin/env python
"""Moderate load over many runs: immediate-binding bfio against total_tokens
on idle and p99 TPOT, beside total_tokens against itself as the control.

A p99 over a few thousand requests rests on a few dozen of them, and every
barrier step's length depends on all earlier placements, so a single run says
little: total_tokens at an arrival rate 0.2% higher (the control) already
moves its own p99 TPOT by several percent. Each (trace, G) cell therefore runs
over disjoint windows of the trace at several moderate loads; the table gives
the geometric-mean ratio to total_tokens with a 95% interval (Student t over
the runs' log ratios) and how many runs came out worse."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats
from tqdm import tqdm

from sglang_ext.cost import cost_preset, power_preset
from sglang_ext.estimators import make_estimator
from sglang_ext.policies import make_policy, parse_policy_spec
from sglang_ext.sim.online import OnlineConfig, capacity_rps, native_rate, simulate_online
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
METRICS = (("idle_fraction", "idle"), ("tpot_ms_p99", "p99 TPOT"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", default="azure_conv_2023.csv,azure_code_2023.csv,mooncake_conversation.jsonl")
    ap.add_argument("--ranks", default="8,32")
    ap.add_argument("--batch", type=int, default=72)
    ap.add_argument("--loads", default="0.6,0.7,0.8", help="Arrival rate / capacity (moderate: 0.5 to 0.8).")
    ap.add_argument("--requests-per-rank", type=int, default=125,
                    help="Window size: this * G requests; the trace is cut into disjoint windows of it.")
    ap.add_argument("--max-windows", type=int, default=4, help="Windows per (trace, G) cell, from the start.")
    ap.add_argument("--policy", default="bfio", help="Policy spec run against total_tokens, e.g. bfio:full_wait=true.")
    ap.add_argument("--control-jitter", type=float, default=0.002,
                    help="The control reruns total_tokens at this relative arrival-rate change.")
    ap.add_argument("--estimator", default="oracle")
    ap.add_argument("--cost-preset", default="paper-dsv3")
    ap.add_argument("--power-preset", default="h100")
    ap.add_argument("--max-prompt-len", type=int, default=32768)
    ap.add_argument("--json", default=None, help="Write every run's metrics here.")
    args = ap.parse_args()
    loads = _floats(ap, "--loads", args.loads)
    if args.requests_per_rank < 1 or args.max_windows < 1:
        ap.error("--requests-per-rank and --max-windows must be >= 1")
    if not 0 < args.control_jitter < 0.1:
        ap.error(f"--control-jitter must be in (0, 0.1), got {args.control_jitter}")
    cost = cost_preset(args.cost_preset, args.batch)
    power = power_preset(args.power_preset)
    policy_name, policy_params = parse_policy_spec(args.policy)
    runs = {"total_tokens": ("total_tokens", {}, 1.0),
            "control": ("total_tokens", {}, 1.0 + args.control_jitter),
            args.policy: (policy_name, policy_params, 1.0)}

    jobs = []
    for tname in args.traces.split(","):
        full = load_trace(REPO / "data/traces" / tname)
        for G in (int(g) for g in args.ranks.split(",")):
            n = args.requests_per_rank * G
            for w in range(min(args.max_windows, max(1, len(full) // n))):
                jobs += [(tname, G, w, full.window(w * n, n), load) for load in loads]
    rows = []
    cap_cache = {}
    for tname, G, w, trace, load in tqdm(jobs, desc="runs"):
        key = (tname, G, w)
        if key not in cap_cache:
            cap_cache[key] = capacity_rps(trace, cost, G, args.batch, args.max_prompt_len)
        scale = load * cap_cache[key] / native_rate(trace)
        for label, (name, params, jitter) in runs.items():
            pol = make_policy(name, **{"horizon": 20, "seed": 0, "b": cost.b, "c": cost.c, **params})
            cfg = OnlineConfig(ranks=G, batch=args.batch, rate_scale=scale * jitter, cost=cost, power=power,
                               max_prompt_len=args.max_prompt_len)
            r = simulate_online(trace, pol, cfg, make_estimator(args.estimator, seed=0))
            rows.append(dict(trace=tname, G=G, window=w, requests=len(trace), load=load, run=label,
                             **r.to_dict(), **r.extra))
    print(f"\ncost preset {cost.name}, estimator {args.estimator}, loads {args.loads}, "
          f"windows of {args.requests_per_rank} x G requests (at most {args.max_windows}), "
          f"control: total_tokens at x{1 + args.control_jitter:g} arrival rate\n")
    print(summarize(rows, args.policy))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def _floats(ap, flag, text):
    try:
        vals = [float(x) for x in text.split(",")]
    except ValueError:
        ap.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not all(v > 0 for v in vals):
        ap.error(f"{flag}: every value must be > 0, got {text!r}")
    return vals


def ratio_ci(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float]:
    """Geometric-mean ratio and its 95% interval (t over the log ratios)."""
    lr = np.log(num / den)
    m = float(lr.mean())
    if lr.size < 2:
        return float(np.exp(m)), float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, lr.size - 1) * lr.std(ddof=1) / np.sqrt(lr.size))
    return float(np.exp(m)), float(np.exp(m - half)), float(np.exp(m + half))


def summarize(rows: list[dict], policy: str) -> str:
    cells: dict = {}
    for r in rows:
        cells.setdefault((r["trace"], r["G"]), {}).setdefault(r["run"], []).append(r)
    head = "| trace | G | runs |"
    for _, label in METRICS:
        head += f" {label}: {policy} / tt [95%] | worse | {label}: control / tt [95%] | worse |"
    lines = [head, "|---|---|---|" + "---|---|---|---|" * len(METRICS)]
    pooled: dict = {}
    for (trace, G), c in list(cells.items()) + [(("all cells", ""), None)]:
        if c is None:
            c = pooled
        n = len(c["total_tokens"])
        line = f"| {trace.split('.')[0]} | {G} | {n} |"
        for key, _ in METRICS:
            base = np.array([r[key] for r in c["total_tokens"]])
            for label in (policy, "control"):
                x = np.array([r[key] for r in c[label]])
                g, lo, hi = ratio_ci(x, base)
                line += f" {g:.3f} [{lo:.3f}, {hi:.3f}] | {int((x > base).sum())}/{n} |"
        lines.append(line)
        if (trace, G) != ("all cells", ""):
            for label, rs in c.items():
                pooled.setdefault(label, []).extend(rs)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
