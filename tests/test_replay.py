"""Trace replay against a fake SGLang-compatible streaming server with injected failures."""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from sglang_ext import cli
from sglang_ext.plugin.protocol import ANSWER_LEN_KEY
from sglang_ext.replay import ReplayConfig, plan_requests, replay

# Behaviour per trace index (attempt numbers from the rid "replay-<i>-a<k>").
FAIL_FIRST_500 = 1  # 500 on the first attempt only
TIMEOUT_FIRST = 2  # first attempt stalls past the client timeout
ALWAYS_500 = 3  # permanently failing
BAD_REQUEST = 4  # 400: a client error, not retried
CUT_STREAM_FIRST = 5  # first attempt closes the stream without [DONE]
STREAM_ERROR_FIRST = 6  # first attempt reports a retryable error inside the stream
N_REQUESTS = 10
OUTPUT_LEN = 6


class FakeServer:
    """aiohttp.web server on 127.0.0.1:<random port> in its own thread and event loop."""

    def __init__(self, metrics=None):
        self.metrics = metrics  # k -> the k-th /metrics page (None: no such route, as without --enable-metrics)
        self.metrics_reads = 0
        self.attempts: dict[int, int] = {}
        self.bodies: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        _, idx, att = body["rid"].rsplit("-", 2)
        idx, att = int(idx), int(att[1:])
        self.attempts[idx] = max(self.attempts.get(idx, 0), att)
        if (idx == FAIL_FIRST_500 and att == 1) or idx == ALWAYS_500:
            return web.json_response({"error": "boom"}, status=500)
        if idx == BAD_REQUEST:
            return web.json_response({"error": "bad"}, status=400)
        if idx == TIMEOUT_FIRST and att == 1:
            await asyncio.sleep(2.0)  # client timeout is 0.4 s
            return web.json_response({})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["sampling_params"]["max_new_tokens"]
        answer = (body["sampling_params"].get("custom_params") or {}).get(ANSWER_LEN_KEY)
        if answer is not None:  # a model that ends its answer by EOS there (the stand-in's)
            n = min(n, answer)
        try:
            for k in range(1, n + 1):
                await asyncio.sleep(0.005)
                if idx == CUT_STREAM_FIRST and att == 1 and k == 3:
                    return resp  # ends the response without [DONE]
                if idx == STREAM_ERROR_FIRST and att == 1 and k == 2:
                    err = {"error": {"message": "scheduler died", "code": 503, "retryable": True}}
                    await resp.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                    await resp.write(b"data: [DONE]\n\n")
                    return resp
                chunk = {"output_ids": list(range(k)), "meta_info": {
                    "completion_tokens": k, "prompt_tokens": len(body["input_ids"]), "dp_rank": idx % 4}}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.metrics_reads += 1
        return web.Response(text=self.metrics(self.metrics_reads))

    def _run(self):
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        if self.metrics is not None:
            app.router.add_get("/metrics", self.metrics_page)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self.started.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def write_trace(path, n=N_REQUESTS, gap_ms=20, prompt=(40, 9000), output=OUTPUT_LEN):
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    for i in range(n):
        ms = i * gap_ms
        rows.append(f"2023-11-16 18:15:{46 + ms // 1000:02d}.{(ms % 1000) * 10000:07d},{prompt[i % 2]},{output}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def trace(tmp_path):
    return write_trace(tmp_path / "trace.csv")


def test_replay_accounts_for_every_request(tmp_path, trace):
    out = tmp_path / "run"
    with FakeServer() as srv:
        cfg = ReplayConfig(url=srv.url, trace=str(trace), out=str(out), retries=2, timeout=0.4,
                           backoff=0.01, max_prompt_len=100, progress=False)
        summary = replay(cfg)

    lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    by_rid = {r["rid"]: r for r in lines}
    assert sorted(by_rid) == list(range(N_REQUESTS))  # every request accounted for, once
    for r in lines:
        assert set(r) >= {"rid", "prompt_len", "max_new_tokens", "tokens_received", "ttft_s", "tpot_s",
                          "latency_s", "dp_rank", "attempts", "ok", "error"}

    assert summary["sent"] == N_REQUESTS
    assert summary["ok"] == N_REQUESTS - 2 and summary["failed"] == 2
    assert summary["failure_reasons"] == {"http_500": 1, "http_400": 1}
    assert by_rid[ALWAYS_500]["attempts"] == 3 and by_rid[ALWAYS_500]["error"] == "http_500"
    assert by_rid[BAD_REQUEST]["attempts"] == 1  # 4xx is not retried
    for idx in (FAIL_FIRST_500, TIMEOUT_FIRST, CUT_STREAM_FIRST, STREAM_ERROR_FIRST):
        assert by_rid[idx]["ok"] and by_rid[idx]["attempts"] == 2, by_rid[idx]
    assert by_rid[TIMEOUT_FIRST]["retry_reasons"] == ["timeout"]
    assert by_rid[CUT_STREAM_FIRST]["retry_reasons"] == ["incomplete_stream"]
    assert by_rid[STREAM_ERROR_FIRST]["retry_reasons"] == ["stream_error_503"]
    assert summary["retries"] == 1 + 1 + 2 + 1 + 1
    assert summary["retry_reasons"] == {"http_500": 3, "timeout": 1, "incomplete_stream": 1, "stream_error_503": 1}

    ok = [r for r in lines if r["ok"]]
    assert all(r["tokens_received"] == OUTPUT_LEN for r in ok)
    assert summary["output_tokens"] == OUTPUT_LEN * len(ok)
    assert all(0 < r["ttft_s"] <= r["latency_s"] and r["tpot_s"] > 0 for r in ok)
    assert all(r["dp_rank"] == r["rid"] % 4 for r in ok)
    assert all(r["prompt_len"] <= 100 for r in lines)  # --max-prompt-len clipping
    assert summary["throughput_tok_s"] > 0
    for key in ("ttft_s", "tpot_s", "latency_s"):
        assert summary[key]["p50"] <= summary[key]["p99"]
    assert json.loads((out / "summary.json").read_text())["ok"] == summary["ok"]
    assert summary["server_metrics"] is None  # (the server has no /metrics)
    # The request body is what SGLang expects.
    body = srv.bodies[0]
    assert body["stream"] is True and body["sampling_params"] == {
        "max_new_tokens": OUTPUT_LEN, "temperature": 0, "ignore_eos": True}
    assert all(isinstance(t, int) for t in body["input_ids"])


def test_replay_reads_the_balancers_metrics_around_the_window(tmp_path, trace, capsys):
    # A server with --enable-metrics: its /metrics is read before the first request and
    # after the last answer, and the summary carries the balancer's view of the window.
    from test_watch import page

    out = tmp_path / "run"
    with FakeServer(metrics=page) as srv:
        assert cli.main(["replay", "--url", srv.url, "--trace", str(trace), "--out", str(out), "--retries", "2",
                         "--timeout", "0.4", "--backoff", "0.01", "--max-prompt-len", "100", "--no-progress"]) == 0
        assert srv.metrics_reads == 2
    summary = json.loads((out / "summary.json").read_text())
    sm = summary["server_metrics"]
    assert sm["idle_fraction"] == pytest.approx(0.15)
    assert sm["rank_idle_fraction"] == pytest.approx({"0": 0.1, "1": 0.2})
    assert sm["energy_j"] == pytest.approx(1000.0)  # (500 J per rank between the two reads)
    assert sm["energy_j_per_output_token"] == pytest.approx(1000.0 / summary["output_tokens"])
    assert sm["requests_placed"] == 30 and sm["placement_ms_p50"] == pytest.approx(1.0)
    printed = capsys.readouterr().out
    assert "server /metrics over the replay: barrier idle 0.150 of step time (ranks 0.100-0.200)" in printed


def test_replay_server_down_never_crashes(tmp_path, trace):
    # A port nobody listens on: every attempt is a connection error, all counted.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ReplayConfig(url=f"http://127.0.0.1:{port}", trace=str(trace), out=str(tmp_path / "down"),
                       retries=1, timeout=0.5, backoff=0.01, max_requests=3, progress=False)
    summary = replay(cfg)
    assert summary["sent"] == 3 and summary["failed"] == 3
    assert summary["failure_reasons"] == {"connect_error": 3}
    assert summary["retries"] == 3


def test_plan_scaling_clipping_duration(tmp_path, trace):
    cfg = ReplayConfig(url="http://x", trace=str(trace), out="", time_scale=0.5, max_prompt_len=1000,
                       max_output_len=4)
    specs = plan_requests(cfg)
    assert len(specs) == N_REQUESTS
    assert specs[1].arrival_s == pytest.approx(0.010, abs=1e-6)  # 20 ms gap, twice as fast
    assert max(s.prompt_len for s in specs) == 1000 and specs[0].prompt_len == 40
    assert all(s.max_new_tokens == 4 for s in specs)
    cfg.duration, cfg.max_requests = 0.035, 8
    assert [s.index for s in plan_requests(cfg)] == [0, 1, 2, 3]


def test_plan_trace_repeat(tmp_path, trace):
    cfg = ReplayConfig(url="http://x", trace=str(trace), out="", trace_repeat=3)
    specs = plan_requests(cfg)
    assert [s.index for s in specs] == list(range(3 * N_REQUESTS))  # one id per request, none reused
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(specs, specs[1:])]
    assert gaps == pytest.approx([0.020] * len(gaps), abs=1e-6)  # the copies keep the 20 ms rhythm
    assert [s.prompt_len for s in specs[N_REQUESTS:2 * N_REQUESTS]] == [s.prompt_len for s in specs[:N_REQUESTS]]
    cfg.trace_repeat = 0
    with pytest.raises(Exception, match="--trace-repeat"):
        plan_requests(cfg)


def test_hidden_lengths_send_the_cap_and_the_answer_length_apart(tmp_path):
    """--max-new-tokens: the server is asked for up to N tokens without ignore_eos,
    and the recorded length rides in custom_params for the stand-in model; a
    complete answer is the recorded length (clipped to N), not N."""
    trace = write_trace(tmp_path / "t.csv", n=4, output=6)
    with FakeServer() as srv:
        for cap in (16, 4):
            out = tmp_path / f"cap{cap}"
            cfg = ReplayConfig(url=srv.url, trace=str(trace), out=str(out), retries=0, timeout=5,
                               max_new_tokens=cap, progress=False, rid_prefix=f"replay{cap}")
            specs = plan_requests(cfg)
            for spec in specs:
                spec.index += 100  # past the indices the fake server fails on purpose
            summary = replay(cfg, specs)
            sent = srv.bodies[-4:]
            assert all(b["sampling_params"]["max_new_tokens"] == cap for b in sent)
            assert all(b["sampling_params"]["custom_params"] == {ANSWER_LEN_KEY: 6} for b in sent)
            assert not any("ignore_eos" in b["sampling_params"] for b in sent)
            assert summary["ok"] == 4 and summary["short_outputs"] == 0
            assert summary["output_tokens"] == 4 * min(6, cap)
            lines = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
            assert {(x["max_new_tokens"], x["expected_tokens"]) for x in lines} == {(cap, min(6, cap))}
    with pytest.raises(Exception, match="--max-new-tokens"):
        plan_requests(ReplayConfig(url="http://x", trace=str(trace), out="", max_new_tokens=0))
    rc = cli.main(["replay", "--url", "http://127.0.0.1:1", "--trace", str(trace), "--max-new-tokens", "0",
                   "--no-progress"])
    assert rc == 2


def test_cli_bad_input_exits_2(tmp_path, capsys):
    rc = cli.main(["replay", "--url", "http://127.0.0.1:1", "--trace", str(tmp_path / "nope.csv"),
                   "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2
    assert "nope.csv" in capsys.readouterr().err
    rc = cli.main(["replay", "--url", "http://127.0.0.1:1", "--trace", str(write_trace(tmp_path / "t.csv")),
                   "--time-scale", "-1", "--no-progress"])
    assert rc == 2


@pytest.mark.parametrize("flag, value", [
    ("--max-requests", "0"), ("--max-requests", "-5"), ("--duration", "0"), ("--duration", "nan"),
    ("--timeout", "nan"), ("--total-timeout", "0"), ("--backoff", "-1"), ("--vocab", "1"),
    ("--trace-repeat", "0"), ("--retries", "-1"), ("--seed", "-1"),
])
def test_cli_bad_number_exits_2_naming_the_flag(tmp_path, capsys, flag, value):
    # each would otherwise replay nothing and exit 0, or fail every request
    out = tmp_path / "o"
    rc = cli.main(["replay", "--url", "http://127.0.0.1:1", "--trace", str(write_trace(tmp_path / "t.csv")),
                   "--out", str(out), "--no-progress", flag, value])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{flag} must be" in err and "Traceback" not in err
    assert not (out / "requests.jsonl").exists()


@pytest.mark.parametrize("url, needle", [
    ("127.0.0.1:30000", "expected http://HOST:PORT"),
    ("ftp://host:21", "expected http://HOST:PORT"),
    ("http://", "expected http://HOST:PORT"),
    ("http://host:99999", "Port out of range"),
])
def test_cli_bad_url_exits_2_before_sending(tmp_path, capsys, url, needle):
    # a mistyped URL is one error naming the flag, not a failed request per trace row
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        cli.main(["replay", "--url", url, "--trace", str(write_trace(tmp_path / "t.csv")),
                  "--out", str(out), "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --url" in err and needle in err
    assert not out.exists()


class EndsThenBreaks(FakeServer):
    """Index 0: the whole answer, its last chunk with a finish_reason, then the connection
    closes without [DONE]. Index 1: the server aborts it as a bad request (status 400),
    as SGLang does for a prompt past the context. The rest answer normally."""

    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        idx = int(body["rid"].rsplit("-", 2)[1])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["sampling_params"]["max_new_tokens"]
        for k in range(1, n + 1):
            finish = None
            if idx == 1:
                finish = {"type": "abort", "message": "too long", "status_code": 400}
            elif k == n:
                finish = {"type": "length", "length": n}
            chunk = {"output_ids": list(range(k)), "meta_info": {"completion_tokens": k, "finish_reason": finish}}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if finish is not None:
                break
        if idx != 0:
            await resp.write(b"data: [DONE]\n\n")
        return resp


def test_a_whole_answer_whose_stream_end_is_lost_is_not_asked_for_again(tmp_path, trace):
    # Retrying it would have the server generate it twice; an abort of a bad request
    # (4xx) would only fail again.
    with EndsThenBreaks() as srv:
        cfg = ReplayConfig(url=srv.url, trace=str(trace), out=str(tmp_path / "run"), retries=3, timeout=0.4,
                           backoff=0.01, max_requests=4, progress=False)
        summary = replay(cfg)
        rids = [b["rid"] for b in srv.bodies]
    lines = {r["rid"]: r for r in map(json.loads, (tmp_path / "run" / "requests.jsonl").read_text().splitlines())}
    assert sorted(rids) == sorted(f"replay-{i}-a1" for i in range(4))  # each asked for once
    assert lines[0]["ok"] and lines[0]["tokens_received"] == OUTPUT_LEN and lines[0]["attempts"] == 1
    assert not lines[1]["ok"] and lines[1]["error"] == "aborted_400" and lines[1]["attempts"] == 1
    assert summary["ok"] == 3 and summary["failure_reasons"] == {"aborted_400": 1} and summary["retries"] == 0
