"""`sglang-ext watch`: the balancer's state on a live server, from its /metrics.

Reads the server's `/metrics` (SGLang launched with `--enable-metrics` and the
plugin in) every `--interval` seconds and prints, per interval, each DP rank's
barrier-idle fraction, steps a second, power, running requests and KV tokens,
and the controller's placements a second, pooled requests and placement time
(p50 / p99 from the histogram's buckets, as Prometheus' `histogram_quantile`
interpolates them). Rates are differences of the counters between two reads, so
the first table comes one interval after the start.

    sglang-ext watch --url http://127.0.0.1:30000 [--interval 5] [--count N] [--rows 16] [--json OUT.jsonl]
"""
from __future__ import annotations

import argparse
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

from sglang_ext.argtypes import output_file, positive_float, positive_int, server_url
from sglang_ext.plugin.metrics import CONTROLLER_COUNTERS, parse_metrics

RANK_COUNTERS = ("steps_total", "step_seconds_total", "barrier_idle_seconds_total", "energy_joules_total")
#: the controller's counters, as `plugin.metrics` names them (without the prefix)
CONTROLLER_SERIES = tuple(name.removeprefix("sglang_ext:") for name, _ in CONTROLLER_COUNTERS.values())


@dataclass
class Snapshot:
    """One read of /metrics: the time, and the sglang_ext samples (`parse_metrics`),
    indexed once by name and by rank (a 256-rank page has ~1,600 samples)."""

    t: float
    samples: dict

    def __post_init__(self):
        self._series: dict[str, dict[frozenset, float]] = {}
        self._by_rank: dict[str, dict[int, float]] = {}
        for (name, labels), v in self.samples.items():
            name = name.removeprefix("sglang_ext:")
            self._series.setdefault(name, {})[labels] = v
            rank = dict(labels).get("dp_rank")
            if rank is not None:
                per = self._by_rank.setdefault(name, {})
                per[int(rank)] = per.get(int(rank), 0.0) + v

    def series(self, name: str) -> dict[frozenset, float]:
        return self._series.get(name, {})

    def ranks(self) -> list[int]:
        return sorted(self._by_rank.get("steps_total", {}))

    def rank_value(self, name: str, rank: int) -> float:
        return self._by_rank.get(name, {}).get(rank, 0.0)

    def total(self, name: str) -> float:
        return sum(self.series(name).values())

    def buckets(self) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of the placement-time histogram, all series summed."""
        out: dict[float, float] = {}
        for labels, v in self.series("placement_seconds_bucket").items():
            le = float(dict(labels)["le"])
            out[le] = out.get(le, 0.0) + v
        return sorted(out.items())


def read_snapshot(url: str, timeout: float = 10.0) -> Snapshot:
    """The server's sglang_ext series now; ValueError naming --url when it cannot be
    read or carries none."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        raise ValueError(f"--url {url}: GET /metrics answered {exc.code} (was the server launched with "
                         "--enable-metrics?)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"--url {url}: cannot read /metrics ({reason})") from None
    samples = parse_metrics(text)
    if not any(name == "sglang_ext:steps_total" for name, _ in samples):
        raise ValueError(f"--url {url}: /metrics has no sglang_ext series: launch the server with --enable-metrics "
                         "and the sglang-ext plugin in (--balancer NAME, or --balancer-log DIR)")
    return Snapshot(time.monotonic(), samples)


def histogram_quantile(q: float, before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float | None:
    """The q-quantile of the observations between two reads of a cumulative histogram,
    interpolated linearly inside its bucket (Prometheus' rule; the +Inf bucket gives
    the largest finite bound). None when nothing was observed."""
    prev = dict(before)
    counts = [(le, c - prev.get(le, 0.0)) for le, c in after]
    if not counts or counts[-1][1] <= 0:
        return None
    rank = q * counts[-1][1]
    lower, below = 0.0, 0.0
    for le, c in counts:
        if c >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * ((rank - below) / (c - below) if c > below else 1.0)
        lower, below = le, c
    return lower


def increase(before: float, after: float) -> float:
    """A counter's increase between two reads; a counter that went down was reset (the
    server restarted), so all of its new value is the increase (as Prometheus' rate)."""
    return after - before if after >= before else after


def interval_stats(a: Snapshot, b: Snapshot) -> dict:
    """What happened between two reads: per rank and for the controller (JSON-able)."""
    dt = max(b.t - a.t, 1e-9)
    ranks = []
    for g in b.ranks():
        d = {k: increase(a.rank_value(k, g), b.rank_value(k, g)) for k in RANK_COUNTERS}
        ranks.append({
            "dp_rank": g,
            "steps_per_s": d["steps_total"] / dt,
            "idle_fraction": d["barrier_idle_seconds_total"] / d["step_seconds_total"]
            if d["step_seconds_total"] > 0 else None,
            "power_w": d["energy_joules_total"] / dt,
            "energy_j": d["energy_joules_total"],
            "running_requests": b.rank_value("running_requests", g),
            "kv_tokens": b.rank_value("kv_tokens", g),
            "step_s": d["step_seconds_total"],
            "idle_s": d["barrier_idle_seconds_total"],
        })
    step_s = sum(r["step_s"] for r in ranks)
    idle_s = sum(r["idle_s"] for r in ranks)
    counts = {k.removesuffix("_total"): increase(a.total(k), b.total(k)) for k in CONTROLLER_SERIES}
    ctl = {k + "_per_s": n / dt for k, n in counts.items()} | {k: n for k, n in counts.items()}
    ctl["pooled_requests"] = b.total("pooled_requests")
    for q in (0.5, 0.99):
        ctl[f"placement_ms_p{round(q * 100)}"] = _ms(histogram_quantile(q, a.buckets(), b.buckets()))
    energy_j = sum(r["energy_j"] for r in ranks)
    return {"seconds": dt, "idle_fraction": idle_s / step_s if step_s > 0 else None, "energy_j": energy_j,
            "power_w": energy_j / dt, "ranks": ranks, "controller": ctl}


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _row(r: dict) -> str:
    return (f"| {r['dp_rank']} | {_f(r['idle_fraction'], '.3f')} | {r['steps_per_s']:.1f} | "
            f"{r['power_w']:.0f} | {r['running_requests']:.0f} | {r['kv_tokens']:.0f} |")


def format_interval(st: dict, rows: int = 16) -> str:
    """A line for the interval and the controller, and a table per rank: every rank up
    to `rows` of them; past that the rows/2 most idle and the rows/2 least idle, with
    the spread over all ranks (with 256 ranks a full table every few seconds is noise)."""
    ctl = st["controller"]
    head = (f"last {st['seconds']:.1f} s: barrier idle {_f(st['idle_fraction'], '.3f')} of step time, "
            f"{st['power_w']:.0f} W; placed {ctl['requests_placed_per_s']:.1f}/s in "
            f"{ctl['placement_calls_per_s']:.1f} calls/s (placement p50 {_f(ctl['placement_ms_p50'], '.2f')} ms, "
            f"p99 {_f(ctl['placement_ms_p99'], '.2f')} ms), pooled {ctl['pooled_requests']:.0f}")
    ranks = st["ranks"]
    lines = [head]
    if len(ranks) > rows:
        idle = sorted(ranks, key=lambda r: (-(r["idle_fraction"] if r["idle_fraction"] is not None else -1.0),
                                            r["dp_rank"]))
        fractions = [r["idle_fraction"] for r in ranks if r["idle_fraction"] is not None]
        kv = [r["kv_tokens"] for r in ranks]
        if fractions:
            lines.append(f"{len(ranks)} ranks: idle min {min(fractions):.3f}, median "
                         f"{sorted(fractions)[len(fractions) // 2]:.3f}, max {max(fractions):.3f}; "
                         f"KV tokens min {min(kv):.0f}, max {max(kv):.0f}")
        k = max(1, rows // 2)
        shown = idle[:k] + [None] + idle[-k:]
    else:
        shown = ranks
    lines += ["| rank | idle | steps/s | W | running | KV tokens |", "|---|---|---|---|---|---|"]
    for r in shown:
        lines.append(f"| ... {len(ranks) - 2 * max(1, rows // 2)} ranks between | | | | | |" if r is None else _row(r))
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, type=server_url,
                   help="server base URL (launched with --enable-metrics), e.g. http://127.0.0.1:30000")
    p.add_argument("--interval", type=positive_float, default=5.0, metavar="SECONDS",
                   help="seconds between two reads of /metrics (default 5)")
    p.add_argument("--count", type=positive_int, default=None, metavar="N",
                   help="stop after N intervals (default: until interrupted)")
    p.add_argument("--rows", type=positive_int, default=16, metavar="N",
                   help="list every rank up to N of them; past that the N/2 most idle and the N/2 least idle, "
                        "with the spread over all (default 16)")
    p.add_argument("--json", type=output_file, default=None, dest="json_out", metavar="PATH",
                   help="also append each interval as one JSON line to PATH (every rank)")


def main(args: argparse.Namespace) -> int:
    before = read_snapshot(args.url)
    out = open(args.json_out, "a") if args.json_out else None
    try:
        n = 0
        while args.count is None or n < args.count:
            time.sleep(max(0.0, before.t + args.interval - time.monotonic()))
            try:
                now = read_snapshot(args.url)
            except ValueError as exc:  # (the server went away mid-watch: not bad input)
                print(f"sglang-ext watch: {exc}", flush=True)
                return 1
            st = interval_stats(before, now)
            print(format_interval(st, args.rows) + "\n", flush=True)
            if out is not None:
                out.write(json.dumps(st) + "\n")
                out.flush()
            before, n = now, n + 1
    finally:
        if out is not None:
            out.close()
    return 0
