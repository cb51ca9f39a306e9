import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_ext.argtypes import call_main, error_line, plot_file
from sglang_ext.sim.metrics import RESULT_KEYS


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sglang_ext.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_simulate_paper_json_contract_and_plot(tmp_path, traces_dir):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    p = run_cli("simulate", "--trace", str(traces_dir / "burstgpt_lengths_8000.json"), "--mode", "paper",
                "--ranks", "8", "--batch", "16", "--policies", "fcfs,bfio", "--requests", "600",
                "--json", str(out), "--plot", str(png))
    assert p.returncode == 0, p.stderr
    assert "| fcfs" in p.stdout and "| bfio" in p.stdout
    doc = json.loads(out.read_text())
    assert set(doc) == {"config", "results"}
    for pol in ("fcfs", "bfio"):
        assert set(RESULT_KEYS) <= set(doc["results"][pol])
        assert doc["results"][pol]["ttft_ms_p50"] is None  # paper mode has no TTFT
        assert doc["results"][pol]["requests_finished"] == 600
    assert png.stat().st_size > 10_000


def test_simulate_online_runs(tmp_path, traces_dir):
    out = tmp_path / "o.json"
    p = run_cli("simulate", "--trace", str(traces_dir / "azure_code_2023.csv"), "--mode", "online", "--ranks", "4",
                "--batch", "16", "--policies", "total_tokens,bfio", "--requests", "300", "--rate-scale", "2",
                "--estimator", "empirical", "--json", str(out))
    assert p.returncode == 0, p.stderr
    doc = json.loads(out.read_text())
    assert doc["config"]["estimator"] == "empirical"
    assert doc["results"]["bfio"]["ttft_ms_p99"] is not None
    assert "trace_repeat" not in doc["config"]  # one pass: the contract as before


def test_simulate_online_trace_repeat(tmp_path, traces_dir):
    from sglang_ext.traces import load_trace

    path = traces_dir / "azure_code_2023.csv"
    n = len(load_trace(path)) + 50  # more requests than one pass of the trace holds
    finished = {}
    for k in (1, 2):
        out = tmp_path / f"r{k}.json"
        p = run_cli("simulate", "--trace", str(path), "--mode", "online", "--ranks", "4", "--batch", "32",
                    "--policies", "total_tokens", "--requests", str(n), "--trace-repeat", str(k), "--load", "0.7",
                    "--json", str(out))
        assert p.returncode == 0, p.stderr
        doc = json.loads(out.read_text())
        finished[k] = doc["results"]["total_tokens"]["requests_finished"]
        assert doc["config"].get("trace_repeat") == (None if k == 1 else 2)
    assert finished == {1: n - 50, 2: n}  # one pass ends with the trace; two go on into the second copy


@pytest.mark.parametrize("args, needle", [
    (["--policies", "fcfs,nope"], "unknown policy 'nope'"),
    (["--ranks", "0"], "--ranks: must be between 1 and 4096, got 0"),
    (["--ranks", "1000000000"], "--ranks: must be between 1 and 4096, got 1000000000"),
    (["--batch", "100000000"], "--batch: must be between 1 and 65536"),
    (["--horizon", "1000000000"], "--horizon: must be between 0 and 100000"),
    (["--trace-repeat", "1000000000"], "--trace-repeat: must be between 1 and 1000"),
    (["--policies", "bfio:tail_horizon=1000000000"], "tail_horizon must be between 0 and 100000"),
    (["--estimator", "psychic"], "unknown estimator"),
    (["--cost-preset", "tpu"], "argument --cost-preset: unknown cost preset 'tpu'"),
    (["--power-preset", "tpu"], "argument --power-preset: unknown power preset 'tpu'"),
    (["--trace", "/nonexistent.csv"], "no such trace file"),
    (["--mode", "online"], "online mode needs a timed trace"),
    (["--estimator", "cap"], "--estimator cap: give --max-new-tokens"),
    (["--max-new-tokens", "64"], "--max-new-tokens: online mode only"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--trace-repeat", "2"], "--trace-repeat: online mode only"),
    (["--trace-repeat", "0"], "--trace-repeat"),
    (["--rate-scale", "inf"], "--rate-scale: must be a finite number"),
    (["--policies", "bfio:horizon=abc"], "bfio parameter 'horizon' takes an integer"),
    (["--policies", "bfio:reward=-1"], "--policies bfio:reward=-1: bfio reward must be >= 0"),
    (["--policies", "bfio:levels=0"], "levels must be >= 1"),
    (["--policies", "bfio:horizon=0:now_weight=0"], "now_weight must be > 0 with horizon=0"),
])
def test_bad_arguments_exit_2_without_traceback(traces_dir, args, needle):
    base = ["simulate", "--trace", str(traces_dir / "burstgpt_lengths_8000.json"), "--requests", "50"]
    p = run_cli(*base, *args)
    assert p.returncode == 2
    assert needle in p.stderr
    assert "Traceback" not in p.stderr


def test_unwritable_outputs_are_refused_before_the_run(tmp_path, traces_dir):
    # a long run must not end in a path it cannot write: the flag is named up front
    base = ["simulate", "--trace", str(traces_dir / "burstgpt_lengths_8000.json"), "--requests", "50"]
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for flag, path, needle in [
        ("--plot", blocker / "sub" / "p.png", "is not a directory"),
        ("--json", tmp_path, "is a directory"),
        ("--json", "", "empty path"),
    ]:
        p = run_cli(*base, flag, str(path))
        assert p.returncode == 2, (flag, p.stderr)
        assert f"argument {flag}" in p.stderr and needle in p.stderr
        assert "Traceback" not in p.stderr
    # a missing directory is fine: the run creates it
    out = tmp_path / "new" / "deeper" / "r.json"
    p = run_cli(*base, "--policies", "fcfs", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert json.loads(out.read_text())["results"]["fcfs"]
    # and an existing one is overwritten
    p = run_cli(*base, "--policies", "jsq", "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert list(json.loads(out.read_text())["results"]) == ["jsq"]


def test_bad_trace_row_names_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,5\n2023-11-16 18:15:47.1,-3,5\n")
    p = run_cli("simulate", "--trace", str(bad), "--mode", "online", "--ranks", "2", "--batch", "4")
    assert p.returncode == 2 and "bad.csv:3: field 'ContextTokens'" in p.stderr
    p = run_cli("simulate", "--trace", str(bad), "--mode", "online", "--ranks", "2", "--batch", "4", "--skip-bad-rows",
                "--policies", "jsq")
    assert p.returncode == 0, p.stderr


def test_write_errors_name_the_path_without_traceback(traces_dir):
    # past the flag check (a device, or /sys as root): the write fails after the run
    base = ["simulate", "--trace", str(traces_dir / "burstgpt_lengths_8000.json"), "--requests", "50",
            "--policies", "fcfs"]
    cases = [("--json", "/dev/full", "/dev/full: No space left on device"),
             ("--plot", "/sys/sglang_ext.png", "/sys/sglang_ext.png")]
    for flag, path, needle in cases:
        if not Path(path).parent.is_dir():
            continue
        p = run_cli(*base, flag, path)
        assert p.returncode == 2, (flag, p.stderr)
        assert needle in p.stderr.splitlines()[-1], p.stderr  # (not root: argparse refuses /sys, usage above)
        assert "Traceback" not in p.stderr


def test_call_main_reports_os_errors_as_path_and_reason(tmp_path, capsys):
    def write_into(path):
        return lambda: open(path, "w")

    assert call_main(write_into(tmp_path), prog="prog") == 2
    assert capsys.readouterr().err == f"prog: error: {tmp_path}: Is a directory\n"
    assert call_main(write_into(tmp_path / "missing" / "x.json"), prog="prog") == 2
    assert capsys.readouterr().err == f"prog: error: {tmp_path / 'missing' / 'x.json'}: No such file or directory\n"
    assert error_line(OSError(28, "No space left on device")) == "No space left on device"


def test_call_main_statuses():
    def raise_(exc):
        def main():
            raise exc
        return main

    assert call_main(lambda: 3) == 3 and call_main(lambda: None) == 0
    assert call_main(raise_(KeyboardInterrupt())) == 130
    with pytest.raises(RuntimeError):  # a bug stays a traceback
        call_main(raise_(RuntimeError("bug")))
    # output piped into `head`: a quiet exit 1, not an OSError's "error:" line
    code = "from sglang_ext.argtypes import run_main\ndef main():\n    raise BrokenPipeError(32, 'Broken pipe')\nrun_main(main)"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 1 and p.stderr == ""


@pytest.mark.parametrize("name", ["p.png", "p.PDF", "p.svg", "p"])  # (no extension: matplotlib adds .png)
def test_plot_file_takes_what_matplotlib_writes(tmp_path, name):
    assert plot_file(str(tmp_path / name)) == str(tmp_path / name)


def test_plot_file_refuses_other_extensions_up_front(tmp_path, traces_dir):
    with pytest.raises(argparse.ArgumentTypeError, match=r"matplotlib writes no \.pgn files \(use one of .*png"):
        plot_file(str(tmp_path / "p.pgn"))
    with pytest.raises(argparse.ArgumentTypeError, match="is not a directory"):  # and the path checks still apply
        plot_file(str(traces_dir / "burstgpt_lengths_8000.json" / "p.png"))


def test_simulate_refuses_a_plot_type_matplotlib_cannot_write_before_the_run(traces_dir):
    p = run_cli("simulate", "--trace", str(traces_dir / "burstgpt_lengths_8000.json"), "--policies", "fcfs",
                "--plot", "out.xyz")
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "argument --plot: cannot plot to 'out.xyz': matplotlib writes no .xyz files" in p.stderr
    assert "| fcfs" not in p.stdout  # (refused before any simulation ran)
