#!/usr/bin/env python
"""How does bfio's advantage over FCFS grow with scale? (design.md section 3:
the paper proves the imbalance ratio FCFS / BF-IO grows like sqrt(B log G).)

Sweeps G x B in paper mode on a length trace (default BurstGPT), running FCFS
and bfio (default horizon 20) per cell, and reports the imbalance ratio
(mean over counted steps of G * max_g L_g - sum_g L_g, FCFS over bfio), both
idle fractions and bfio's decision time p50.

Requests per cell: N = min(--max-n, --per-slot * G * B) (default 4 * G * B, so
the run refills every slot about 4 times). The trace has 8000 requests: for
N <= 8000 the paper's order (default_rng(42).choice(8000, N, replace=False));
beyond, sampled WITH replacement: default_rng(42).choice(8000, size=N, replace=True).

    python scripts/bench_scale.py --json docs/results/scale.json \\
        --plot docs/img/scale_heatmap.png --theory-plot docs/img/scale_vs_theory.png
    python scripts/bench_scale.py --quick      # G in {16, 32, 64} x B in {32, 72, 128}
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sglang_ext.argtypes import (write_json, comma_list, output_file, nonneg_int, plot_file, positive_float, positive_int,  # noqa: E402
                                 run_main, trace_file)
from sglang_ext.policies import make_policy  # noqa: E402
from sglang_ext.sim.paper import PaperConfig, simulate_paper  # noqa: E402
from sglang_ext.traces import load_trace, paper_order  # noqa: E402

FULL_G = [16, 32, 64, 128, 256]
FULL_B = [32, 72, 128, 256]
QUICK_G = [16, 32, 64]
QUICK_B = [32, 72, 128]
TRACES = REPO / "data" / "traces"


def cell_trace(trace, N: int):
    if N <= len(trace):
        return paper_order(trace, N, 42), False
    idx = np.random.default_rng(42).choice(len(trace), size=N, replace=True)
    return trace.subset(idx), True


def run_cell(trace, G: int, B: int, N: int, horizon: int) -> dict:
    tr, replaced = cell_trace(trace, N)
    row = dict(G=G, B=B, N=N, with_replacement=replaced, theory=math.sqrt(B * math.log(G)))
    for name in ("fcfs", "bfio"):
        t0 = time.perf_counter()
        r = simulate_paper(tr, make_policy(name, horizon=horizon), PaperConfig(ranks=G, batch=B))
        row[name] = dict(imbalance=r.imbalance, idle=r.idle_fraction, throughput=r.throughput_tok_s,
                         decision_us_p50=r.decision_us_p50, finished=r.requests_finished,
                         wall_s=time.perf_counter() - t0)
    row["ratio"] = row["fcfs"]["imbalance"] / row["bfio"]["imbalance"] if row["bfio"]["imbalance"] > 0 else float("inf")
    return row


def markdown(rows: list[dict]) -> str:
    out = ["| G | B | N | sqrt(B ln G) | imbalance FCFS | imbalance bfio | ratio FCFS/bfio | idle FCFS | idle bfio "
           "| bfio decision p50 |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        n = f"{r['N']}{'*' if r['with_replacement'] else ''}"
        out.append(f"| {r['G']} | {r['B']} | {n} | {r['theory']:.1f} | {r['fcfs']['imbalance']:.4g} | "
                   f"{r['bfio']['imbalance']:.4g} | {r['ratio']:.2f} | {r['fcfs']['idle']*100:.1f}% | "
                   f"{r['bfio']['idle']*100:.1f}% | {r['bfio']['decision_us_p50']/1e3:.2f} ms |")
    out.append("")
    out.append("N marked * = sampled with replacement (default_rng(42).choice(8000, N, replace=True)).")
    return "\n".join(out)


def heatmap(rows, Gs, Bs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.full((len(Gs), len(Bs)), np.nan)
    for r in rows:
        M[Gs.index(r["G"]), Bs.index(r["B"])] = r["ratio"]
    fig, ax = plt.subplots(figsize=(1.3 * len(Bs) + 2.5, 0.8 * len(Gs) + 1.8))
    im = ax.imshow(M, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(Bs)), [str(b) for b in Bs])
    ax.set_yticks(range(len(Gs)), [str(g) for g in Gs])
    ax.set_xlabel("B (running requests per rank)")
    ax.set_ylabel("G (DP ranks)")
    for i in range(len(Gs)):
        for j in range(len(Bs)):
            if np.isfinite(M[i, j]):
                ax.text(j, i, f"{M[i, j]:.1f}", ha="center", va="center",
                        color="white" if M[i, j] < np.nanmax(M) * 0.6 else "black")
    fig.colorbar(im, ax=ax, label="imbalance ratio FCFS / bfio")
    ax.set_title("Paper mode, BurstGPT: imbalance FCFS / bfio")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def theory_plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([r["theory"] for r in rows])
    y = np.array([r["ratio"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for G in sorted({r["G"] for r in rows}):
        sel = np.array([r["G"] == G for r in rows])
        ax.scatter(x[sel], y[sel], label=f"G={G}", s=36)
    k = float(x @ y / (x @ x))  # least squares through the origin
    xs = np.linspace(0, x.max() * 1.05, 50)
    ax.plot(xs, k * xs, "k--", lw=1, label=f"{k:.2f} * sqrt(B ln G)")
    ax.set_xlabel("sqrt(B ln G)")
    ax.set_ylabel("imbalance ratio FCFS / bfio")
    ax.set_title("Scaling of bfio's advantage vs the sqrt(B log G) theory")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return k


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", type=trace_file(TRACES), default="burstgpt_lengths_8000.json",
                    help="length trace (a name under data/traces, or a path)")
    # (space- or comma-separated, as the other bench scripts take them: --ranks 128 256, --ranks 128,256)
    ap.add_argument("--ranks", type=comma_list(positive_int), nargs="+",
                    help=f"G values, space- or comma-separated (default {FULL_G})")
    ap.add_argument("--batches", "--batch", type=comma_list(positive_int), nargs="+",
                    help=f"B values, space- or comma-separated (default {FULL_B})")
    ap.add_argument("--quick", action="store_true", help=f"G in {QUICK_G} x B in {QUICK_B}")
    ap.add_argument("--per-slot", type=positive_float, default=4.0, help="N = per_slot * G * B (capped by --max-n)")
    ap.add_argument("--max-n", type=positive_int, default=10**9, help="cap on the requests per cell N")
    ap.add_argument("--horizon", type=nonneg_int, default=20, help="bfio look-ahead horizon H (steps)")
    ap.add_argument("--json", type=output_file, dest="json_out", help="write the config and every cell here")
    ap.add_argument("--plot", type=plot_file, help="heat map PNG")
    ap.add_argument("--theory-plot", type=plot_file, help="ratio vs sqrt(B log G) PNG")
    args = ap.parse_args(argv)

    Gs = [G for part in args.ranks for G in part] if args.ranks else (QUICK_G if args.quick else FULL_G)
    Bs = [B for part in args.batches for B in part] if args.batches else (QUICK_B if args.quick else FULL_B)
    trace = load_trace(args.trace)
    cells = [(G, B) for G in Gs for B in Bs]
    rows = []
    t0 = time.perf_counter()
    for G, B in tqdm(cells, desc="cells", unit="cell"):
        N = int(min(args.max_n, args.per_slot * G * B))
        rows.append(run_cell(trace, G, B, N, args.horizon))
    wall = time.perf_counter() - t0

    print(f"\nPaper mode, {Path(args.trace).name}, bfio horizon {args.horizon}, "
          f"N = min({args.max_n}, {args.per_slot:g} * G * B); grid G={Gs} x B={Bs}"
          f"{' (--quick)' if args.quick else ''}; wall {wall:.0f} s\n")
    print(markdown(rows))
    x = np.array([r["theory"] for r in rows])
    y = np.array([r["ratio"] for r in rows])
    corr = float(np.corrcoef(x, y)[0, 1]) if len(rows) > 2 else float("nan")
    print(f"\nPearson correlation of the ratio with sqrt(B ln G): {corr:.3f}")
    if args.plot:
        heatmap(rows, Gs, Bs, args.plot)
        print(f"heat map: {args.plot}")
    k = None
    if args.theory_plot:
        k = theory_plot(rows, args.theory_plot)
        print(f"theory plot: {args.theory_plot} (fit ratio = {k:.3f} * sqrt(B ln G))")
    if args.json_out:
        write_json(args.json_out, dict(
            config=dict(trace=Path(args.trace).name, G=Gs, B=Bs, quick=args.quick, horizon=args.horizon,
                        per_slot=args.per_slot, max_n=args.max_n,
                        sampling="paper order (no replacement) for N <= 8000, else "
                                 "default_rng(42).choice(8000, size=N, replace=True)"),
            wall_s=wall, corr_with_theory=corr, fit_slope=k, cells=rows), indent=1)
    return 0


if __name__ == "__main__":
    run_main(main)
