"""Report on recorded data: telemetry from StepTelemetry, replay output from the replay module."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from sglang_ext import cli
from sglang_ext.cost import PowerModel
from sglang_ext.replay import RequestResult, _result_line, summarize
from sglang_ext.report import compute_metrics, load_run, report
from sglang_ext.telemetry import StepTelemetry

PM = PowerModel("toy", busy_w=300.0, wait_w=100.0, idle_w=50.0)
STEP = 0.01


def make_run(root, name, idle_by_rank, n_steps=40, ttfts=(0.1, 0.2, 0.3, 0.4), tokens=25, with_replay=True):
    """Telemetry of len(idle_by_rank) ranks (every step STEP s, rank g idle idle_by_rank[g] s)
    plus a replay output of len(ttfts) requests that got `tokens` tokens each (plus one failure)."""
    run = root / name
    start = time.time()
    tels = [StepTelemetry(run / "telemetry", g, power_model=PM, use_nvml=False) for g in range(len(idle_by_rank))]
    for k in range(n_steps):
        for g, tel in enumerate(tels):
            tel.record(step=k, batch_size=2, kv_tokens=1000 * (g + 1) + k,
                       predicted_cost_s=STEP - idle_by_rank[g],
                       step_time_s=STEP, idle_s=idle_by_rank[g], idle_source="measured")
    for tel in tels:
        tel.close()
    if with_replay:
        results = [RequestResult(i, 100, tokens, tokens_received=tokens, ttft_s=t, tpot_s=0.01 * (i + 1),
                                 latency_s=t + 1, dp_rank=i % 2, attempts=1, ok=True) for i, t in enumerate(ttfts)]
        results.append(RequestResult(len(ttfts), 100, tokens, tokens_received=3, attempts=3, ok=False,
                                     error="http_500", retry_reasons=["http_500", "http_500"]))
        (run / "requests.jsonl").write_text("".join(json.dumps(_result_line(r)) + "\n" for r in results))
        summary = summarize(results, wall_s=2.0, start_unix=start - 0.1, end_unix=time.time())
        (run / "summary.json").write_text(json.dumps(summary))
    return run


def test_metrics_on_recorded_data(tmp_path):
    run = make_run(tmp_path, "rr", idle_by_rank=[0.0, 0.004])
    m = compute_metrics(load_run(run))
    assert m["ranks"] == 2 and m["steps"] == 40
    assert m["idle_fraction"] == pytest.approx(0.004 / (2 * STEP))
    assert m["idle_fraction_model"] == pytest.approx(m["idle_fraction"])  # predictions agree with the record
    energy = 40 * ((300 * STEP) + (300 * 0.006 + 100 * 0.004))
    assert m["energy_j"] == pytest.approx(energy)
    tokens = 4 * 25 + 3  # the failed request's partial tokens were produced too
    assert m["output_tokens"] == tokens and m["tokens_source"] == "replay"
    assert m["joules_per_token"] == pytest.approx(energy / tokens)
    assert m["throughput_tok_s"] == pytest.approx(100 / 2.0)
    assert m["ttft_p50_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 50))
    assert m["ttft_p99_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4], 99))
    assert m["tpot_p50_s"] == pytest.approx(0.025)
    assert m["ok"] == 4 and m["failed"] == 1 and m["failure_reasons"] == {"http_500": 1}
    assert m["energy_sources"] == ["model:toy"] and m["telemetry_window"] == "replay"
    # KV of rank 0 is ~half of rank 1's: balance = mean(kv)/max(kv) ~ 0.75
    assert 0.74 < m["kv_balance"] < 0.76


def test_report_cli_two_runs_side_by_side(tmp_path, capsys):
    a = make_run(tmp_path, "round_robin", idle_by_rank=[0.0, 0.005, 0.002])
    b = make_run(tmp_path, "bfio", idle_by_rank=[0.0, 0.001, 0.0005], ttfts=(0.05, 0.1, 0.15, 0.2))
    out, js = tmp_path / "plots", tmp_path / "m.json"
    rc = cli.main(["report", str(a), str(b), "--out", str(out), "--json", str(js)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| round_robin | 3 | 40 | 23.3 | 23.3 |" in text and "| bfio | 3 | 40 | 5.0 | 5.0 |" in text
    for name in ("idle_per_rank.png", "power.png", "kv_tokens.png", "idle_fraction_by_rank.png"):
        png = out / name
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(js.read_text())
    assert [m["run"] for m in doc["runs"]] == ["round_robin", "bfio"]
    assert doc["runs"][1]["idle_fraction"] < doc["runs"][0]["idle_fraction"]


def test_report_telemetry_only_and_replay_only(tmp_path):
    tel_only = make_run(tmp_path, "tel", idle_by_rank=[0.0, 0.002], with_replay=False)
    m = compute_metrics(load_run(tel_only))
    assert m["tokens_source"].startswith("telemetry") and m["output_tokens"] == 2 * 40 * 2
    assert m["ttft_p50_s"] is None and m["joules_per_token"] > 0
    run = make_run(tmp_path, "rep", idle_by_rank=[0.0])
    for f in (run / "telemetry").iterdir():
        f.unlink()
    (run / "telemetry").rmdir()
    metrics, paths = report([str(run)])
    assert metrics[0]["ranks"] == 0 and metrics[0]["idle_fraction"] is None and metrics[0]["ok"] == 4
    assert all((run / "plots" / p.rsplit("/", 1)[1]).exists() for p in paths)  # "no telemetry" panels


def test_each_ranks_idle_fraction_is_its_idle_over_its_step_time(tmp_path):
    m = compute_metrics(load_run(make_run(tmp_path, "r", idle_by_rank=[0.0, 0.005, 0.002], with_replay=False)))
    fr = m["rank_idle_fraction"]
    assert fr == pytest.approx({"0": 0.0, "1": 0.5, "2": 0.2})
    assert m["idle_fraction"] == pytest.approx(sum(fr.values()) / 3)  # (equal step times)


def test_a_remote_servers_idle_comes_from_its_metrics(tmp_path, capsys):
    # A replay against a server whose telemetry files are out of reach: the idle its
    # /metrics gave over the window (summary.json's server_metrics) is in the table.
    run = make_run(tmp_path, "remote", idle_by_rank=[0.0])
    for f in (run / "telemetry").iterdir():
        f.unlink()
    (run / "telemetry").rmdir()
    _set_field(run / "summary.json", "server_metrics", {"idle_fraction": 0.123, "energy_j_per_output_token": 0.5})
    local = make_run(tmp_path, "local", idle_by_rank=[0.0, 0.005, 0.002])  # (its summary has no server_metrics)
    assert cli.main(["report", "--no-plots", str(run), str(local), "--json", str(tmp_path / "m.json")]) == 0
    text = capsys.readouterr().out
    assert "| idle % | idle % (model) | idle % (/metrics) | J / token |" in text
    assert "| remote | 0 | 0 | - | - | 12.3 | - |" in text and "| local | 3 | 40 | 23.3 | 23.3 | - |" in text
    runs = json.loads((tmp_path / "m.json").read_text())["runs"]
    assert (runs[0]["idle_fraction_server"], runs[0]["joules_per_token_server"]) == (0.123, 0.5)
    assert runs[1]["idle_fraction_server"] is None


def test_truncated_last_line_tolerated_bad_middle_line_named(tmp_path):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001], with_replay=False)
    f = run / "telemetry" / "rank1.jsonl"
    f.write_text(f.read_text() + '{"step": 99, "wall_ti')  # killed mid-write
    assert compute_metrics(load_run(run))["steps"] == 40
    lines = f.read_text().splitlines()
    lines[5] = "garbage"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"rank1\.jsonl:6: invalid JSON"):
        load_run(run)


def test_missing_and_empty_dirs_exit_2(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "absent")]) == 2
    assert "absent: no such run directory" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{}")  # a run's file given instead of its directory
    assert cli.main(["report", str(tmp_path / "summary.json")]) == 2
    assert "summary.json: not a directory" in capsys.readouterr().err
    (tmp_path / "empty" / "telemetry").mkdir(parents=True)
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "empty: no telemetry" in capsys.readouterr().err


def _report_error(capsys, *args) -> str:
    """stderr of `sglang-ext report --no-plots ARGS`, which must fail with exit status 2."""
    assert cli.main(["report", "--no-plots", *map(str, args)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sglang-ext report: error: ")
    return err


def _set_field(path, key, value):
    doc = json.loads(path.read_text())
    doc[key] = value
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("break_it, needle", [
    (lambda f: (f.unlink(), f.mkdir()), "summary.json: cannot read it: Is a directory"),
    (lambda f: f.write_text("{nope"), "summary.json: invalid JSON"),
    (lambda f: f.write_text("[1, 2]"), "summary.json: must be a JSON object, got [1, 2]"),
    (lambda f: f.write_text("null"), "summary.json: must be a JSON object, got null"),
    (lambda f: _set_field(f, "wall_time_s", "2.0"), "summary.json: field 'wall_time_s' must be a number or null, got \"2.0\""),
    (lambda f: _set_field(f, "start_unix", [1]), "summary.json: field 'start_unix' must be a number"),
    (lambda f: _set_field(f, "output_tokens", True), "summary.json: field 'output_tokens' must be a number"),
    (lambda f: _set_field(f, "ttft_s", [0.1, 0.2]), "summary.json: field 'ttft_s' must be a JSON object, got [0.1, 0.2]"),
    (lambda f: _set_field(f, "failure_reasons", ["http_500"]), "summary.json: field 'failure_reasons' must be a JSON object"),
    (lambda f: _set_field(f, "tpot_s", {"p50": "fast", "p99": 1.0}), "summary.json: field 'tpot_s.p50' must be a number"),
    (lambda f: _set_field(f, "server_metrics", [0.1]), "summary.json: field 'server_metrics' must be a JSON object"),
    (lambda f: _set_field(f, "server_metrics", {"idle_fraction": "low"}),
     "summary.json: field 'server_metrics.idle_fraction' must be a number or null"),
])
def test_malformed_summary_is_one_line_naming_file_and_field(tmp_path, capsys, break_it, needle):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001])
    break_it(run / "summary.json")
    assert needle in _report_error(capsys, run)


@pytest.mark.parametrize("line, needle", [
    ("[1]", "requests.jsonl:2: not a JSON object"),
    ("null", "requests.jsonl:2: not a JSON object"),
    ('{"ok": true, "tokens_received": "25"}', "requests.jsonl:2: field 'tokens_received' must be a number"),
    ('{"ok": true, "tokens_received": 25, "ttft_s": [0.1]}', "requests.jsonl:2: field 'ttft_s' must be a number"),
    ('{"ok": "yes", "tokens_received": 25}', "requests.jsonl:2: field 'ok' must be true or false"),
])
def test_malformed_request_line_is_named(tmp_path, capsys, line, needle):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001])
    f = run / "requests.jsonl"
    lines = f.read_text().splitlines()
    lines[1] = line
    f.write_text("\n".join(lines) + "\n")
    assert needle in _report_error(capsys, run)


TELEMETRY_CASES = [
    ("step", "3", "field 'step' must be a number, got \"3\""),
    ("wall_time", None, "field 'wall_time' must be a number, got null"),
    ("idle_s", True, "field 'idle_s' must be a number, got true"),
    ("kv_tokens", [1000], "field 'kv_tokens' must be a number, got [1000]"),
    ("step_time_s", float("inf"), "field 'step_time_s' must be a finite number, got Infinity"),
    ("energy_j", 10 ** 400, "field 'energy_j' must be a finite number or null"),
    ("idle_source", ["measured"], "field 'idle_source' must be a string"),
    ("energy_source", {}, "field 'energy_source' must be a string, got {}"),
]


@pytest.mark.parametrize("key, value, needle", TELEMETRY_CASES, ids=[c[0] for c in TELEMETRY_CASES])
def test_telemetry_field_of_wrong_type_names_file_line_field(tmp_path, capsys, key, value, needle):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001], with_replay=False)
    f = run / "telemetry" / "rank1.jsonl"
    lines = f.read_text().splitlines()
    rec = json.loads(lines[3])
    rec[key] = value
    lines[3] = json.dumps(rec)
    f.write_text("\n".join(lines) + "\n")
    assert f"rank1.jsonl:4: {needle}" in _report_error(capsys, run)


def test_telemetry_file_that_is_a_directory_is_named(tmp_path, capsys):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001], with_replay=False)
    (run / "telemetry" / "rank1.jsonl.1").mkdir()  # in place of a rotated file
    assert "rank1.jsonl.1: cannot read it: Is a directory" in _report_error(capsys, run)


def test_nulls_the_writers_produce_are_accepted(tmp_path):
    # a real GPU has no predicted cost; unsettled NVML lines no energy; an older replay no window
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001])
    for f in (run / "telemetry").glob("rank*.jsonl"):
        recs = [json.loads(x) for x in f.read_text().splitlines()]
        for rec in recs:
            rec["predicted_cost_s"] = None
        recs[0]["energy_j"] = recs[0]["power_w"] = None
        f.write_text("".join(json.dumps(r) + "\n" for r in recs))
    _set_field(run / "summary.json", "start_unix", None)
    _set_field(run / "summary.json", "ttft_s", {"p50": None, "p99": None, "mean": None, "n": 0})
    m = compute_metrics(load_run(run))
    assert m["idle_fraction_model"] is None and m["unsettled_energy_lines"] == 2
    assert m["telemetry_window"] == "all" and m["ttft_p50_s"] == pytest.approx(0.25)  # from requests.jsonl


def test_unwritable_plots_dir_is_named(tmp_path, capsys):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001])
    (run / "plots").write_text("")  # a file where the default plots directory goes
    assert cli.main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"--out (default {run / 'plots'}): '{run / 'plots'}' is not a directory" in err
    # under /proc nothing can be created: refused by the flag, or (as root) named when creating it
    assert cli.main(["report", str(run), "--out", "/proc/sglang_ext_plots"]) == 2
    err = capsys.readouterr().err
    assert "/proc/sglang_ext_plots" in err and err.count("\n") == 1


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_failed_json_write_names_the_file(tmp_path, capsys):
    run = make_run(tmp_path, "r", idle_by_rank=[0.0, 0.001])
    assert "error: /dev/full: No space left on device" in _report_error(capsys, run, "--json", "/dev/full")
