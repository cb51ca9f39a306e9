#!/usr/bin/env python
"""How well each output-length estimator predicts, trace by trace.

Each estimator learns from a trace's first --fit requests (as finished, in
arrival order) and then predicts the next --test requests: their length at
arrival (the guess a placement makes for a new request) and, at each age in
--ages, the residual life of those still running at that age (the guess for
a running request). The table gives the mean absolute error in tokens and its
ratio to the first estimator's. Only what a live balancer knows is read: a
request's prompt length, and the lengths of requests that finished before it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sglang_ext.argtypes import (write_json, output_file, ONLINE_TRACES, comma_list, estimator_spec, nonneg_int, positive_int, run_main,
                                 trace_file)
from sglang_ext.errors import UsageError
from sglang_ext.estimators import make_estimator
from sglang_ext.traces import load_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "data" / "traces"


def errors(spec: str, prompt: np.ndarray, out: np.ndarray, fit: int, test: int, ages: list[int]) -> dict:
    """Mean absolute errors of one estimator on one trace (None where no test
    request lives to an age)."""
    est = make_estimator(spec, seed=0)
    est.observe(out[:fit], prompt[:fit])
    p, o = prompt[fit:fit + test], out[fit:fit + test]
    row = {"estimator": spec, "arrival": float(np.abs(est.initial(p, o, None) - o).mean())}
    for a in ages:
        alive = o > a
        if not alive.any():
            row[f"age_{a}"] = None
            continue
        guess = est.initial(p[alive], o[alive], None)
        left = est.remaining(np.full(int(alive.sum()), a), guess, p[alive])
        row[f"age_{a}"] = float(np.abs(left - (o[alive] - a)).mean())
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--traces", type=comma_list(trace_file(TRACES)), default=ONLINE_TRACES,
                    help="Comma list of trace files (names under data/traces, or paths).")
    ap.add_argument("--estimators", type=comma_list(estimator_spec), default="empirical,empirical-prompt",
                    help="Comma list of estimators; the first is the baseline of the ratios.")
    ap.add_argument("--fit", type=positive_int, default=4096, help="Requests learned from (the first of the trace).")
    ap.add_argument("--test", type=positive_int, default=4096, help="Requests predicted (the ones after those).")
    ap.add_argument("--ages", type=comma_list(nonneg_int), default="20,100",
                    help="Comma list of ages (tokens generated) at which to predict the residual life.")
    ap.add_argument("--json", type=output_file, default=None, help="Write the rows here.")
    args = ap.parse_args()
    if "cap" in args.estimators:
        raise UsageError("--estimators cap: traces carry no max_new_tokens to predict from")
    rows = []
    for path in args.traces:
        trace = load_trace(path)
        if len(trace) <= args.fit:
            raise UsageError(f"--fit {args.fit}: {path.name} has only {len(trace)} requests")
        prompt, out = trace.prompt_len.astype(np.int64), trace.output_len.astype(np.int64)
        for spec in args.estimators:
            row = errors(spec, prompt, out, args.fit, args.test, args.ages)
            rows.append(dict(trace=path.name, fit=args.fit, test=min(args.test, len(trace) - args.fit), **row))
    print(f"\nMean absolute error (tokens), learned from the first {args.fit} requests of each trace, "
          f"predicting the next {args.test}; ratio to {args.estimators[0]}\n")
    cols = ["arrival"] + [f"age_{a}" for a in args.ages]
    heads = ["length at arrival"] + [f"residual life at age {a}" for a in args.ages]
    print("| trace | estimator | " + " | ".join(f"{h} | ratio" for h in heads) + " |")
    print("|---|---|" + "---|---|" * len(heads))
    for r in rows:
        base = next(b for b in rows if b["trace"] == r["trace"] and b["estimator"] == args.estimators[0])
        cells = []
        for c in cols:
            if r[c] is None:
                cells += ["-", "-"]
            else:
                cells += [f"{r[c]:.1f}", f"{r[c] / base[c]:.2f}" if base[c] else "-"]
        print(f"| {r['trace'].split('.')[0]} | {r['estimator']} | " + " | ".join(cells) + " |")
    if args.json:
        write_json(args.json, rows, indent=1)


if __name__ == "__main__":
    run_main(main)
