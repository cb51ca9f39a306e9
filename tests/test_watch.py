"""`sglang-ext watch`: rates between two reads of /metrics, against a fake server."""
from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from sglang_ext.plugin.metrics import parse_metrics
from sglang_ext.watch import Snapshot, format_interval, histogram_quantile, increase, interval_stats

REPO = Path(__file__).resolve().parents[1]


def page(k: int, ranks: int = 2) -> str:
    """The k-th read of a server where each rank steps 100 times a read, rank g idling
    (g + 1) / 10 of its step time, and the controller places 30 requests in 10 calls."""
    lines = []
    for g in range(ranks):
        lab = f'dp_rank="{g}",model_name="m"'
        lines += [f"sglang_ext:steps_total{{{lab}}} {100 * k}",
                  f"sglang_ext:step_seconds_total{{{lab}}} {2.0 * k}",
                  f"sglang_ext:barrier_idle_seconds_total{{{lab}}} {0.2 * (g + 1) * k}",
                  f"sglang_ext:energy_joules_total{{{lab}}} {500.0 * k}",
                  f"sglang_ext:running_requests{{{lab}}} {10 + g}",
                  f"sglang_ext:kv_tokens{{{lab}}} {1000 * (g + 1)}"]
    lab = 'balancer="bfio",model_name="m"'
    lines += [f"sglang_ext:requests_placed_total{{{lab}}} {30 * k}",
              f"sglang_ext:placement_calls_total{{{lab}}} {10 * k}",
              f"sglang_ext:pooled_requests{{{lab}}} 3",
              f'sglang_ext:placement_seconds_bucket{{{lab},le="0.001"}} {5 * k}',
              f'sglang_ext:placement_seconds_bucket{{{lab},le="0.01"}} {10 * k}',
              f'sglang_ext:placement_seconds_bucket{{{lab},le="+Inf"}} {10 * k}',
              "sglang:num_requests_total 7"]
    return "\n".join(lines) + "\n"


def test_interval_stats_are_the_counters_increase_over_the_interval():
    a = Snapshot(100.0, parse_metrics(page(1)))
    b = Snapshot(102.0, parse_metrics(page(2)))
    st = interval_stats(a, b)
    assert st["seconds"] == 2.0
    assert [r["dp_rank"] for r in st["ranks"]] == [0, 1]
    assert [r["idle_fraction"] for r in st["ranks"]] == pytest.approx([0.1, 0.2])
    assert st["idle_fraction"] == pytest.approx(0.15)
    assert [r["steps_per_s"] for r in st["ranks"]] == [50.0, 50.0]
    assert [r["power_w"] for r in st["ranks"]] == [250.0, 250.0] and st["power_w"] == 500.0
    assert [(r["running_requests"], r["kv_tokens"]) for r in st["ranks"]] == [(10, 1000), (11, 2000)]
    ctl = st["controller"]
    assert (ctl["requests_placed_per_s"], ctl["placement_calls_per_s"], ctl["pooled_requests"]) == (15.0, 5.0, 3)
    assert ctl["requests_pinned_per_s"] == 0.0  # (a series the server does not have yet)
    assert ctl["placement_ms_p50"] == pytest.approx(1.0) and ctl["placement_ms_p99"] == pytest.approx(9.82)
    json.dumps(st)  # (the --json lines)


def test_histogram_quantile_follows_prometheus():
    before = [(0.001, 2.0), (0.01, 4.0), (float("inf"), 4.0)]
    after = [(0.001, 6.0), (0.01, 12.0), (float("inf"), 12.0)]  # this interval: 4 below 1 ms, 4 in 1-10 ms
    assert histogram_quantile(0.5, before, after) == pytest.approx(0.001)
    assert histogram_quantile(0.25, before, after) == pytest.approx(0.0005)
    assert histogram_quantile(0.75, before, after) == pytest.approx(0.001 + 0.009 * 2 / 4)
    tail = [(0.001, 6.0), (0.01, 12.0), (float("inf"), 13.0)]  # and one past the last bound
    assert histogram_quantile(0.99, before, tail) == 0.01  # (in +Inf: the largest finite bound)
    assert histogram_quantile(0.5, after, after) is None  # nothing observed


def test_a_counter_that_went_down_was_reset():
    assert increase(10.0, 25.0) == 15.0 and increase(10.0, 4.0) == 4.0


class _Server:
    """Serves page(k) on the k-th GET /metrics; `pages` limits how many (then 500)."""

    def __init__(self, make_page=page, pages=None):
        outer = self
        self.reads = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.reads += 1
                ok = self.path == "/metrics" and (pages is None or outer.reads <= pages)
                body = make_page(outer.reads).encode() if ok else b"gone"
                self.send_response(200 if ok else 500)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _watch(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang_ext.cli", "watch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_watch_prints_each_interval_and_writes_json_lines(tmp_path):
    srv = _Server()
    try:
        out = _watch("--url", srv.url, "--interval", "0.2", "--count", "2", "--json", str(tmp_path / "w.jsonl"))
    finally:
        srv.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("| rank | idle | steps/s | W | running | KV tokens |") == 2
    assert "| 1 | 0.200 |" in out.stdout and "placement p50 1.00 ms" in out.stdout
    lines = [json.loads(x) for x in (tmp_path / "w.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["idle_fraction"] == pytest.approx(0.15) for x in lines)


def test_watch_says_what_is_wrong_with_the_server(tmp_path):
    plain = _Server(make_page=lambda k: "sglang:num_requests_total 7\n")  # no --enable-metrics plugin series
    try:
        out = _watch("--url", plain.url, "--count", "1")
    finally:
        plain.close()
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "/metrics has no sglang_ext series: launch the server with --enable-metrics" in out.stderr
    out = _watch("--url", plain.url, "--count", "1")  # (nothing listens there now)
    assert out.returncode == 2 and f"--url {plain.url}: cannot read /metrics" in out.stderr
    out = _watch("--url", "localhost:30000")
    assert out.returncode == 2 and "argument --url: expected http://HOST:PORT" in out.stderr
    dying = _Server(pages=1)  # answers once, then 500: the server went away mid-watch
    try:
        out = _watch("--url", dying.url, "--interval", "0.1", "--count", "3")
    finally:
        dying.close()
    assert out.returncode == 1 and "GET /metrics answered 500" in out.stdout and "Traceback" not in out.stderr


def test_many_ranks_show_the_most_and_least_idle_and_the_spread():
    ranks = [{"dp_rank": g, "steps_per_s": 40.0, "idle_fraction": ((g * 7) % 40) / 100, "power_w": 300.0,
              "running_requests": 8, "kv_tokens": 1000 + g} for g in range(40)]
    ctl = {"requests_placed_per_s": 1.0, "placement_calls_per_s": 1.0, "placement_ms_p50": None,
           "placement_ms_p99": None, "pooled_requests": 0}
    st = {"seconds": 5.0, "idle_fraction": 0.2, "power_w": 12000.0, "ranks": ranks, "controller": ctl}
    lines = format_interval(st, rows=4).splitlines()
    assert lines[1] == "40 ranks: idle min 0.000, median 0.200, max 0.390; KV tokens min 1000, max 1039"
    shown = [int(x.split("|")[1]) for x in lines[4:] if not x.startswith("| ...")]
    assert shown == [17, 34, 23, 0]  # (idle 0.39, 0.38, then 0.01, 0.00)
    assert "| ... 36 ranks between |" in lines[6]
    assert len(format_interval(st, rows=40).splitlines()) == 3 + 40  # (all of them: no summary line)
