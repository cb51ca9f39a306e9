"""End-to-end: the stock SGLang HTTP server with the sglang-ext plugin and the
GPU-free stand-in backend (issue 3).

Three servers, each started once (class-scoped fixtures, so at most one runs at
a time on a 2-core machine; startup is import-bound: ~100 s plain DP, ~175 s
with DP attention):

- bfio, immediate binding, plain DP (--dp-size 4), with --enable-metrics;
- round_robin, same flags but the metrics: the same 200 requests, for the
  KV-spread comparison;
- bfio, pool binding, --enable-dp-attention (--tp-size 4 --dp-size 4), with a
  small --max-running-requests so the pool actually holds requests and its
  deadline path is exercised, lengths learned per prompt size
  (--balancer-estimator empirical-prompt) from answers that end by EOS, and
  --enable-metrics.

Every server is run from a temporary cwd (the repository's top-level
triton_kernels/ would shadow the real package) with a private TMPDIR, and its
process group is killed and its files removed in teardown whatever happens.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests

from e2e_helpers import CONTEXT_LEN, kv_spread, make_jobs, run_job, run_workload, start_server, \
    telemetry_imbalance, Job
from sglang_ext.patches.controller import STATS_LINE, read_stats
from sglang_ext.plugin.metrics import parse_metrics

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DP = 4
SIM = ["--dp-size", str(DP), "--balancer-sim-backend", "paper-dsv3", "--balancer-sim-time-scale", "1.0"]
JOBS = make_jobs(200, seed=0)
#: results of the shared workload per server name, for the cross-server comparison
RESULTS: dict[str, dict] = {}


def _malformed(url: str) -> list:
    """Requests that must fail cleanly, mixed into the workload."""
    return [
        # not a token list: rejected by request validation
        lambda: requests.post(url + "/generate", json={"input_ids": "abc",
                                                       "sampling_params": {"max_new_tokens": 4}}, timeout=60),
        # longer than the context: rejected by the tokenizer manager
        lambda: requests.post(url + "/generate", json={"input_ids": [5] * (CONTEXT_LEN + 10),
                                                       "sampling_params": {"max_new_tokens": 4}}, timeout=60),
        # pinned to a rank that does not exist
        lambda: requests.post(url + "/generate", json={"input_ids": [5, 6, 7], "routed_dp_rank": DP + 5,
                                                       "sampling_params": {"max_new_tokens": 4}}, timeout=60),
        # not JSON at all
        lambda: requests.post(url + "/generate", data=b"{not json", timeout=60,
                              headers={"content-type": "application/json"}),
    ]


def _server(tmp_path_factory, name: str, args: list[str]):
    server = start_server(tmp_path_factory.mktemp(name), args)
    try:
        yield server
    finally:
        server.stop(timeout=5)  # idempotent after test_shutdown_is_clean
        server.cleanup_files()


def _check_workload(server, name: str):
    t0 = time.monotonic()
    results, bad = run_workload(server.url, JOBS, extra=_malformed(server.url))
    elapsed = time.monotonic() - t0
    wrong = [(j, r) for j, r in zip(JOBS, results) if r["tokens"] != j.max_new or r["finishes"] != 1
             or r["finish_reason"] != "length"]
    assert not wrong, f"{len(wrong)} requests came back wrong, e.g. {wrong[:3]}"
    for resp in bad:
        assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    # and the server still serves afterwards
    assert run_job(server.url, Job(9999, 16, 5, "generate"))["tokens"] == 5
    spread, load = kv_spread(JOBS, results, DP)
    RESULTS[name] = {"spread": spread, "load": load.tolist(), "elapsed_s": elapsed,
                     "telemetry_imbalance": telemetry_imbalance(server.log_dir, DP)}
    print(f"\n{name}: 200 requests in {elapsed:.1f} s; placed KV per rank {load.tolist()}, "
          f"spread {spread:.0f}; telemetry imbalance {RESULTS[name]['telemetry_imbalance']:.0f}")


def _check_pinned(server):
    for route in ("generate", "stream"):
        for rank in range(DP):
            payload = {"input_ids": list(range(10, 40)), "routed_dp_rank": rank,
                       "sampling_params": {"max_new_tokens": 3}}
            if route == "stream":
                payload["stream"] = True
                with requests.post(server.url + "/generate", json=payload, stream=True, timeout=60) as r:
                    r.raise_for_status()
                    chunks = [json.loads(line[5:]) for line in r.iter_lines()
                              if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
                meta = chunks[-1]["meta_info"]
            else:
                r = requests.post(server.url + "/generate", json=payload, timeout=60)
                r.raise_for_status()
                meta = r.json()["meta_info"]
            assert meta["dp_rank"] == rank


def _stream_until_done(url: str, payload: dict) -> dict:
    """Stream one request to its end: how many chunks said it finished, how, and the tokens."""
    finishes, reason, tokens = 0, None, 0
    with requests.post(url + "/generate", json={**payload, "stream": True}, stream=True, timeout=120) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            chunk = json.loads(line[5:])
            meta = chunk.get("meta_info", {})
            tokens = len(chunk.get("output_ids", [])) or tokens
            if meta.get("finish_reason") or "error" in chunk:
                finishes += 1
                reason = (meta.get("finish_reason") or {}).get("type", "error")
    return {"finishes": finishes, "reason": reason, "tokens": tokens}


def _check_aborts(server, n: int = 12, max_new: int = 400):
    # Requests aborted right after they are sent (some read by the controller in the
    # same turn as their abort): each ends exactly once, aborted or, if the abort
    # came too early or too late to find it, complete; the others complete.
    rids = [f"abort-{os.getpid()}-{time.monotonic_ns()}-{i}" for i in range(n)]
    payloads = [{"rid": rid, "input_ids": list(range(10, 60 + 7 * i)),
                 "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True}} for i, rid in enumerate(rids)]
    with ThreadPoolExecutor(n) as pool:
        futs = [pool.submit(_stream_until_done, server.url, p) for p in payloads]
        time.sleep(0.3)  # (the tokenizer ignores an abort for a request it has not registered yet)
        for rid in rids[::2]:
            requests.post(server.url + "/abort_request", json={"rid": rid}, timeout=30).raise_for_status()
        results = [f.result() for f in futs]
    assert all(r["finishes"] == 1 for r in results), results
    assert all(r["reason"] == "length" and r["tokens"] == max_new for r in results[1::2]), results
    aborted = [r for r in results[::2] if r["reason"] != "length"]
    assert all(r["reason"] == "abort" and r["tokens"] < max_new for r in aborted), results
    # Sent 0.3 s after their requests, on whichever rank each runs (under DP attention
    # the abort reaches the first rank only, which passes it on): nearly all must land.
    assert len(aborted) >= len(results[::2]) - 2, results
    print(f"\n{len(aborted)} of {len(results[::2])} aborted requests ended aborted, after "
          f"{sorted(r['tokens'] for r in aborted)} tokens; the other {len(results[1::2])} ran to {max_new}")
    assert run_job(server.url, Job(9998, 16, 5, "generate"))["tokens"] == 5  # and it still serves


def _check_batch_placed_in_one_call(server, n: int = 16):
    # A batch of prompts in one /generate call reaches the controller as one message:
    # its requests are read in one turn of the loop and placed in one policy call.
    def totals():
        lines = read_stats(server.log_path.read_text(errors="replace"))
        return sum(x["placed"] for x in lines), sum(x["calls"] for x in lines)

    time.sleep(2.5)  # (the window of the earlier tests' requests is logged by then)
    placed0, calls0 = totals()
    payload = {"input_ids": [list(range(10, 30 + 9 * i)) for i in range(n)],
               "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    r = requests.post(server.url + "/generate", json=payload, timeout=120)
    r.raise_for_status()
    assert [len(x["output_ids"]) for x in r.json()] == [6] * n
    deadline = time.monotonic() + 10
    while totals()[0] < placed0 + n and time.monotonic() < deadline:
        time.sleep(0.5)
    assert totals() == (placed0 + n, calls0 + 1), (placed0, calls0, totals(), server.log_tail())


def _idle_controller_cpu(server, seconds: float = 5.0) -> float:
    ctrl = server.controller()
    time.sleep(1.0)  # let the last reports drain
    ctrl.cpu_percent(None)
    time.sleep(seconds)
    return ctrl.cpu_percent(None)


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _check_eos_answers(server, n: int = 60, cap: int = 64):
    """Answers that end by EOS: the stand-in model's answer length rides in
    custom_params (what `sglang-ext replay --max-new-tokens` sends), hidden from
    the balancer, which sees max_new_tokens only. Each comes back once, at that
    length with reason stop (EOS last, left out of the text), or at the cap with
    reason length; a malformed length is refused with a 4xx."""
    from sglang_ext.plugin.protocol import ANSWER_LEN_KEY

    rng = np.random.default_rng(3)
    answers = rng.integers(1, 2 * cap, n)
    prompts = np.where(rng.random(n) < 0.3, rng.integers(600, 2000, n), rng.integers(8, 100, n))

    def one(i):
        r = requests.post(server.url + "/generate", timeout=120, json={
            "input_ids": [(i * 11 + k) % 30000 + 10 for k in range(int(prompts[i]))],
            "sampling_params": {"max_new_tokens": cap, "temperature": 0,
                                "custom_params": {ANSWER_LEN_KEY: int(answers[i])}}})
        r.raise_for_status()
        return r.json()

    with ThreadPoolExecutor(24) as pool:
        bodies = list(pool.map(one, range(n)))
    for a, body in zip(answers, bodies):
        meta, ids = body["meta_info"], body["output_ids"]
        if a <= cap:
            assert len(ids) == a and meta["finish_reason"] == {"type": "stop", "matched": 2}, (a, meta)
            assert ids[-1] == 2 and "t2" not in body["text"].split()
        else:
            assert len(ids) == cap and meta["finish_reason"]["type"] == "length", (a, meta)
    bad = requests.post(server.url + "/generate", timeout=60, json={
        "input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 4, "custom_params": {ANSWER_LEN_KEY: "x"}}})
    assert 400 <= bad.status_code < 500, (bad.status_code, bad.text[:300])
    assert "falling back" not in server.log_path.read_text(errors="replace"), "the policy failed on the way"


def _check_metrics(server):
    # --enable-metrics: SGLang's /metrics carries each rank's counters (the same steps as
    # its --balancer-log file) and the controller's, once the work is done.
    time.sleep(2.0)  # (the files flush each second; no step runs while the ranks are idle)
    page = requests.get(server.url + "/metrics", timeout=30).text
    s = parse_metrics(page)
    ranks = {}
    for (name, labels), v in s.items():
        lab = dict(labels)
        if "dp_rank" in lab:
            ranks.setdefault(int(lab["dp_rank"]), {})[name] = v
    assert sorted(ranks) == list(range(DP)), sorted(s)[:10]
    for g, m in ranks.items():
        lines = [json.loads(x) for x in (server.log_dir / f"rank{g}.jsonl").read_text().splitlines()]
        assert m["sglang_ext:steps_total"] == len(lines) > 0
        assert m["sglang_ext:barrier_idle_seconds_total"] == pytest.approx(sum(r["idle_s"] for r in lines))
        assert m["sglang_ext:step_seconds_total"] == pytest.approx(sum(r["step_time_s"] for r in lines))
        assert m["sglang_ext:energy_joules_total"] == pytest.approx(sum(r["energy_j"] for r in lines))
    ctl = {name: v for (name, labels), v in s.items() if ("balancer", "bfio") in labels}
    assert ctl["sglang_ext:requests_placed_total"] >= len(JOBS)  # (and the other checks' requests)
    assert ctl["sglang_ext:requests_pinned_total"] >= 2 * DP  # (the pinned-rank check)
    assert 0 < ctl["sglang_ext:placement_calls_total"] <= ctl["sglang_ext:requests_placed_total"]
    assert ctl["sglang_ext:placement_seconds_count"] == ctl["sglang_ext:placement_calls_total"]
    assert ctl["sglang_ext:pooled_requests"] == 0  # (immediate binding pools nothing; a pool has drained)
    assert ctl["sglang_ext:rank_reports_total"] >= sum(m["sglang_ext:steps_total"] for m in ranks.values())
    # the shipped Grafana dashboard queries only series this page has (SGLang's own too)
    from test_metrics import dashboard_metric_names

    on_page = {name for name, _ in parse_metrics(page, prefix="sglang")}
    assert dashboard_metric_names(prefix="sglang") <= on_page
    # and `sglang-ext watch` reads it: one interval of an idle server, every rank listed
    out = subprocess.run([sys.executable, "-m", "sglang_ext.cli", "watch", "--url", server.url, "--interval", "1",
                          "--count", "1", "--json", str(server.base / "watch.jsonl")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    st = json.loads((server.base / "watch.jsonl").read_text())
    assert [r["dp_rank"] for r in st["ranks"]] == list(range(DP))
    assert st["controller"]["pooled_requests"] == 0


def _check_shutdown(server):
    own_ipc = [p for p in os.listdir(server.tmpdir) if p.startswith("sglang_ext_")]
    assert own_ipc, "the controller's report socket should exist while serving"
    procs = server.processes()
    rc = server.stop(timeout=60)
    still = [p.pid for p in procs if _alive(p)]
    assert not still, f"processes left after shutdown: {still} (launcher rc {rc})"
    # The server's private TMPDIR holds every IPC file it made: SGLang's own ZMQ sockets
    # (which a SIGTERM'd stock server leaves behind) and the plugin's; all must be gone.
    leftover = [p for p in os.listdir(server.tmpdir)
                if p.startswith(("tmp", "sglang")) and not os.path.isdir(os.path.join(server.tmpdir, p))]
    assert not leftover, f"IPC files left behind in TMPDIR: {leftover}"
    new_shm = {n for n in os.listdir("/dev/shm") if n.startswith("sglang_")} - server.shm_before
    assert not new_shm, f"/dev/shm files left behind: {sorted(new_shm)}"
    server.cleanup_files()
    assert not os.path.exists(server.tmpdir)


class TestBfioImmediate:
    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        yield from _server(tmp_path_factory, "bfio", SIM + ["--balancer", "bfio", "--balancer-stats-interval", "1",
                                                           "--enable-metrics"])

    def test_workload_completes_exactly_once(self, server):
        _check_workload(server, "bfio")

    def test_controller_logs_what_it_did(self, server):
        # One line per second with requests: every request of the workload counted,
        # and the step's reports estimated while the loop was idle, ahead of arrivals.
        deadline = time.monotonic() + 10
        while True:  # (the last second's line comes at the loop's next wake-up)
            lines = read_stats(server.log_path.read_text(errors="replace"))
            if sum(x["placed"] for x in lines) >= len(JOBS) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert sum(x["placed"] for x in lines) >= len(JOBS), server.log_tail()
        # (requests read in one turn of the loop share a placement call)
        assert sum(x["prepared"] for x in lines) > 0 and 0 < sum(x["calls"] for x in lines) <= sum(
            x["placed"] for x in lines)
        assert all(x["p99_ms"] is not None for x in lines if x["calls"])
        # (placements before the newest reports were estimated: some, never more than all)
        assert all(x["lagged"] is not None and 0 <= x["lagged"] <= x["calls"] for x in lines)
        # (idle estimates paused for a message from the tokenizer: counted in every line)
        assert all(x["paused"] is not None and x["paused"] >= 0 for x in lines)
        print("\n" + STATS_LINE.search(server.log_path.read_text(errors="replace")).group(0))

    def test_controller_freezes_its_startup_heap(self, server):
        # Out of the collector's full passes: when its loop starts, and again when
        # SGLang's post-warm-up /freeze_gc passes through it to the ranks.
        frozen = re.compile(r"sglang-ext: (\d+) objects taken out of the garbage collector's passes \((.+)\)")
        deadline = time.monotonic() + 10
        while True:
            found = frozen.findall(server.log_path.read_text(errors="replace"))
            if len(found) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert [why for _, why in found] == ["the loop starts", "/freeze_gc"], server.log_tail()
        assert all(int(n) > 100_000 for n, _ in found)

    def test_a_batch_of_prompts_is_placed_in_one_call(self, server):
        _check_batch_placed_in_one_call(server)

    def test_pinned_rank_is_honoured(self, server):
        _check_pinned(server)

    def test_aborted_requests_end_exactly_once(self, server):
        _check_aborts(server)

    def test_idle_controller_cpu(self, server):
        cpu = _idle_controller_cpu(server)
        print(f"\nidle DP controller (bfio, plain DP): {cpu:.1f}% of a core")
        assert cpu < 10.0

    def test_telemetry_written(self, server):
        files = sorted(p.name for p in server.log_dir.glob("rank*.jsonl"))
        assert files == [f"rank{g}.jsonl" for g in range(DP)]
        rec = json.loads((server.log_dir / "rank0.jsonl").read_text().splitlines()[-1])
        assert rec["source"] == "standin" and rec["idle_source"] == "predicted"
        # Every step is one barrier: the slowest rank waits ~0, the others wait max - own.
        by_step = {}
        for g in range(DP):
            for line in (server.log_dir / f"rank{g}.jsonl").read_text().splitlines():
                r = json.loads(line)
                assert 0.0 <= r["idle_s"] <= r["step_time_s"] + 1e-12
                by_step.setdefault(r["step"], []).append(r)
        full = [rs for rs in by_step.values() if len(rs) == DP]
        assert full, "no step logged by every rank"
        for rs in full:
            assert min(r["idle_s"] for r in rs) == pytest.approx(0.0, abs=1e-9)
            assert len({round(r["step_time_s"], 9) for r in rs}) == 1  # one collective, one step time

    def test_metrics_page_shows_each_rank_and_the_controller(self, server):
        _check_metrics(server)

    def test_shutdown_is_clean(self, server):
        _check_shutdown(server)


class TestRoundRobin:
    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        yield from _server(tmp_path_factory, "round_robin", SIM + ["--balancer", "round_robin"])

    def test_workload_completes_exactly_once(self, server):
        _check_workload(server, "round_robin")

    def test_bfio_spreads_kv_less_than_round_robin(self, server):
        if "bfio" not in RESULTS or "round_robin" not in RESULTS:
            pytest.skip("needs both workloads")
        bfio, rr = RESULTS["bfio"], RESULTS["round_robin"]
        # The measured objective: per synchronized step, G * max_g KV_g - sum_g KV_g, summed over
        # the run, from the ranks' telemetry. (The response-side total of prompt + output tokens
        # per dp_rank is printed above for reference: it misses /v1/completions, which carries no
        # dp_rank, and ignores when the tokens were held, so it is too coarse to assert on.)
        assert bfio["telemetry_imbalance"] < rr["telemetry_imbalance"], (bfio, rr)

    def test_shutdown_is_clean(self, server):
        _check_shutdown(server)


class TestDpAttentionPool:
    """--enable-dp-attention: SGLang pre-launches the schedulers and the controller hands
    them their ranks; the stand-in runs there on CPU unchanged."""

    @pytest.fixture(scope="class")
    def server(self, tmp_path_factory):
        yield from _server(tmp_path_factory, "dp_attention", SIM + [
            "--tp-size", str(DP), "--enable-dp-attention", "--balancer", "bfio", "--balancer-binding", "pool",
            "--balancer-pool-max-wait", "0.3", "--max-running-requests", "24",
            "--balancer-estimator", "empirical-prompt", "--enable-metrics",
        ])

    def test_workload_completes_exactly_once(self, server):
        _check_workload(server, "dp_attention_pool")

    def test_answers_end_by_eos_at_their_hidden_length(self, server):
        _check_eos_answers(server)

    def test_pinned_rank_is_honoured(self, server):
        _check_pinned(server)

    def test_aborted_requests_end_exactly_once(self, server):
        _check_aborts(server)

    def test_idle_controller_cpu(self, server):
        cpu = _idle_controller_cpu(server)
        print(f"\nidle DP controller (bfio pool, DP attention): {cpu:.1f}% of a core")
        assert cpu < 10.0

    def test_metrics_page_shows_each_rank_and_the_controller(self, server):
        _check_metrics(server)

    def test_shutdown_is_clean(self, server):
        _check_shutdown(server)
