"""`sglang-ext simulate`: compare placement policies on a trace.

    sglang-ext simulate --trace PATH --mode {paper,online} --ranks G --batch B
        --policies p1,p2,... [--horizon H] [--seed S] [--requests N]
        [--rate-scale X] [--trace-repeat K] [--estimator NAME] [--max-new-tokens N] [--cost-preset NAME]
        [--json OUT.json] [--plot OUT.png]

Prints one row per policy and writes the JSON contract
{"config": {...}, "results": {"<policy>": {<RESULT_KEYS>}}}.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..argtypes import (batch_size, cost_preset_name, horizon_steps, rank_count, repeat_count, estimator_spec, nonneg_int, output_file, plot_file, positive_float, positive_int,
                        power_preset_name, write_json)
from ..cost import POWER_PRESETS, PRESETS, cost_preset, power_preset
from ..errors import UsageError
from ..estimators import make_estimator
from ..policies import REGISTRY, make_policy, parse_policy_spec
from ..policies.bfio import ONLINE_POOL_TAIL
from ..traces import load_trace, paper_order
from .online import OnlineConfig, capacity_rps, native_rate, scale_for_load, simulate_online
from .paper import PaperConfig, simulate_paper

logger = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", required=True, help="Trace file: Azure .csv, Mooncake .jsonl or the paper's length .json.")
    p.add_argument("--mode", choices=("paper", "online"), default="paper",
                   help="paper: the released simulator's saturated setting; online: timed arrivals.")
    p.add_argument("--ranks", type=rank_count, default=32, help="DP ranks G.")
    p.add_argument("--batch", type=batch_size, default=72, help="Max running requests per rank B.")
    p.add_argument("--policies", default="fcfs,round_robin,jsq,bfio",
                   help=f"Comma-separated policies, each NAME or NAME:key=val:key=val. Valid: {', '.join(REGISTRY)}.")
    p.add_argument("--horizon", type=horizon_steps, default=20, help="Lookahead H of bfio (steps).")
    p.add_argument("--seed", type=nonneg_int, default=42, help="Request-order seed (paper mode) and policy/estimator seed.")
    p.add_argument("--requests", type=positive_int, default=None, help="Use the first N requests (paper: N drawn in the paper's order).")
    p.add_argument("--trace-repeat", type=repeat_count, default=1,
                   help="Online: replay the trace this many times back to back (same rate), so the steady state "
                        "outweighs the drain after the last arrival.")
    p.add_argument("--rate-scale", type=positive_float, default=1.0, help="Online: multiply the recorded arrival rate by X.")
    p.add_argument("--load", type=positive_float, default=None,
                   help="Online: set the arrival rate to X times the ranks' capacity (overrides --rate-scale).")
    p.add_argument("--binding", choices=("immediate", "pool"), default="immediate",
                   help="Online: bind each request to a rank on arrival (SGLang) or hold a central pool (late binding).")
    p.add_argument("--max-pool-wait", type=positive_float, default=5.0, help="Online pool: seconds before a pooled request is bound immediately.")
    p.add_argument("--kv-capacity", type=positive_int, default=None, help="Online: KV tokens per rank.")
    p.add_argument("--max-prompt-len", type=positive_int, default=None, help="Clip prompts to this context limit (e.g. longbench).")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="Online: every request's max_new_tokens (longer outputs stop there; the cap estimator reads it).")
    p.add_argument("--estimator", type=estimator_spec, default="oracle", help="Output-length estimator: oracle, noisy:<delta>, cap, empirical, empirical-prompt.")
    p.add_argument("--cost-preset", type=cost_preset_name, default="paper-dsv3", help=f"Cost model: {', '.join(PRESETS)}.")
    p.add_argument("--power-preset", type=power_preset_name, default="h100", help=f"Online power model (busy/barrier-wait/idle W): {', '.join(POWER_PRESETS)}.")
    p.add_argument("--skip-bad-rows", action="store_true", help="Skip malformed trace rows (counted) instead of failing.")
    p.add_argument("--json", type=output_file, dest="json_out", default=None, help="Write results JSON here.")
    p.add_argument("--plot", type=plot_file, default=None,
                   help="Write a comparison plot here (PNG, or another type matplotlib writes, by extension).")
    p.add_argument("--progress", action="store_true", help="Show a progress bar per policy.")


def parse_policies(text: str) -> list[tuple[str, str, dict]]:
    specs = [s.strip() for s in text.split(",")]
    if not any(specs):
        raise UsageError("--policies: give at least one policy")
    out = []
    for i, spec in enumerate(specs, start=1):
        if not spec:
            raise UsageError(f"--policies {text!r}: entry {i} is empty")
        if spec in specs[:i - 1]:  # (results are keyed by the spec: the second would overwrite the first)
            raise UsageError(f"--policies {text!r}: {spec!r} is given twice")
        try:
            name, params = parse_policy_spec(spec)
        except ValueError as exc:
            raise UsageError(f"--policies: {exc}") from None
        out.append((spec, name, params))
    return out


def run(args) -> dict:
    policies = parse_policies(args.policies)
    estimator_probe = make_estimator(args.estimator, seed=args.seed)  # spec checked by argparse
    cost = cost_preset(args.cost_preset, args.batch)  # names checked by argparse
    power = power_preset(args.power_preset)
    trace = load_trace(args.trace, skip_bad=args.skip_bad_rows)
    if args.max_new_tokens and args.mode != "online":
        raise UsageError("--max-new-tokens: online mode only (paper mode replays the lengths as they are)")
    if args.trace_repeat > 1 and args.mode != "online":
        raise UsageError("--trace-repeat: online mode only (paper mode draws its requests from the trace)")
    if args.estimator == "cap" and not args.max_new_tokens:
        raise UsageError("--estimator cap: give --max-new-tokens in online mode (traces carry no max_new_tokens "
                         "of their own)")
    config = {
        "trace": str(args.trace), "mode": args.mode, "ranks": args.ranks, "batch": args.batch,
        "policies": [s for s, _, _ in policies], "horizon": args.horizon, "seed": args.seed,
        "requests": args.requests, "rate_scale": args.rate_scale, "estimator": estimator_probe.name,
        "cost_preset": cost.name, "cost": {"a": cost.a, "b": cost.b, "c": cost.c, "sync": cost.sync,
                                            "prefill_per_token": cost.prefill_per_token},
    }
    if args.mode == "paper":
        if args.max_prompt_len:
            trace.prompt_len = trace.prompt_len.clip(max=args.max_prompt_len)
        trace = paper_order(trace, args.requests, args.seed)
        config["power_model"] = "paper: 100 W + 300 W * (L_g / max L)^0.7"
    else:
        if trace.arrival_s is None:
            raise UsageError(f"--trace {args.trace}: online mode needs a timed trace (.csv or .jsonl)")
        trace = trace.repeat(args.trace_repeat).head(args.requests)
        if args.trace_repeat > 1:
            config["trace_repeat"] = args.trace_repeat
        cap = capacity_rps(trace, cost, args.ranks, args.batch, args.max_prompt_len, args.max_new_tokens)
        rate = native_rate(trace)
        if args.load is not None:
            args.rate_scale = scale_for_load(trace, args.load, cap)
        config.update(rate_scale=args.rate_scale, binding=args.binding, capacity_rps=cap,
                      arrival_rps=rate * args.rate_scale, load=rate * args.rate_scale / cap,
                      power_model={"name": power.name, "busy_w": power.busy_w, "wait_w": power.wait_w,
                                   "idle_w": power.idle_w},
                      kv_capacity=args.kv_capacity, max_prompt_len=args.max_prompt_len,
                      max_new_tokens=args.max_new_tokens)
    results = {}
    for spec, name, params in policies:
        kw = {"horizon": args.horizon, "seed": args.seed}
        if name == "bfio" and args.mode == "online":
            kw.update(a=0.0, b=cost.b, c=cost.c, pool_tail=ONLINE_POOL_TAIL)  # cost-model weights, online pool tail
        kw.update(params)
        try:
            policy = make_policy(name, **kw)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"--policies {spec}: {exc}") from None
        estimator = make_estimator(args.estimator, seed=args.seed)
        if args.mode == "paper":
            res = simulate_paper(trace, policy, PaperConfig(args.ranks, args.batch, cost=cost, progress=args.progress),
                                 estimator)
        else:
            ocfg = OnlineConfig(ranks=args.ranks, batch=args.batch, binding=args.binding,
                                rate_scale=args.rate_scale, cost=cost, power=power,
                                max_pool_wait_s=args.max_pool_wait, max_prompt_len=args.max_prompt_len,
                                max_new_tokens=args.max_new_tokens, progress=args.progress)
            if args.kv_capacity:
                ocfg.kv_capacity = args.kv_capacity
            res = simulate_online(trace, policy, ocfg, estimator)
        row = res.to_dict()
        row.update(getattr(res, "extra", {}) or {})
        results[spec] = row
        logger.info("%s: %s", spec, row)
    return {"config": config, "results": results}


def format_table(doc: dict) -> str:
    cols = [("policy", None), ("idle", "idle_fraction"), ("tok/s", "throughput_tok_s"), ("TPOT ms", "tpot_ms"),
            ("TPOT p99", "tpot_ms_p99"), ("TTFT p50", "ttft_ms_p50"), ("TTFT p99", "ttft_ms_p99"),
            ("J/tok", "energy_j_per_token"), ("dec us p50", "decision_us_p50"), ("done", "requests_finished")]
    rows = []
    for spec, r in doc["results"].items():
        row = [spec]
        for _, key in cols[1:]:
            v = r.get(key)
            row.append("-" if v is None else (f"{v:.4f}" if key in ("idle_fraction", "energy_j_per_token")
                                             else f"{v:,.0f}" if key in ("throughput_tok_s", "requests_finished")
                                             else f"{v:.2f}"))
        rows.append(row)
    widths = [max(len(c[0]), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    out = [line([c[0] for c in cols]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(doc["results"])
    metrics = [("idle_fraction", "idle fraction (lower is better)"), ("throughput_tok_s", "throughput tok/s"),
               ("tpot_ms", "mean TPOT ms"), ("energy_j_per_token", "J per output token")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    colors = plt.cm.tab10.colors
    for ax, (key, title) in zip(axes, metrics):
        vals = [doc["results"][s].get(key) or 0.0 for s in specs]
        ax.bar(range(len(specs)), vals, color=[colors[i % 10] for i in range(len(specs))])
        ax.set_xticks(range(len(specs)), specs, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    c = doc["config"]
    fig.suptitle(f"{Path(c['trace']).name}: {c['mode']} mode, G={c['ranks']}, B={c['batch']}, "
                 f"estimator {c['estimator']}, cost {c['cost_preset']}", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    doc = run(args)
    print(format_table(doc))
    if args.json_out:
        write_json(args.json_out, doc, indent=1)
        print(f"wrote {args.json_out}")
    if args.plot:
        plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0
