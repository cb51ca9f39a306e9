"""scripts/bench_repeats.py: the ratio statistics, the summary and a small end-to-end run."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_repeats.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_repeats", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ratio_ci_is_geometric_mean_with_interval(bench):
    den = np.array([10.0, 20.0, 40.0, 5.0])
    num = den * np.array([1.1, 0.9, 1.2, 1.0])
    g, lo, hi = bench.ratio_ci(num, den)
    assert g == pytest.approx(np.exp(np.log([1.1, 0.9, 1.2, 1.0]).mean()))
    assert lo < g < hi
    assert bench.ratio_ci(den, den) == (1.0, 1.0, 1.0)
    # more runs with the same spread: a narrower interval
    _, lo2, hi2 = bench.ratio_ci(np.tile(num, 4), np.tile(den, 4))
    assert hi2 - lo2 < hi - lo


def test_summary_compares_the_policy_with_each_run_and_pools_cells(bench):
    runs = ["tt@immediate", "jsq@pool", "bfio@pool"]
    rows = []
    for w, vals in enumerate([(10.0, 9.0, 12.0, 10.0), (10.0, 12.0, 8.0, 11.0), (20.0, 25.0, 30.0, 20.0)]):
        for run, v in zip(runs + ["control"], vals):
            rows.append(dict(trace="t.csv", G=8, window=w, run=run, idle_fraction=v, tpot_ms_p99=2 * v))
    rows += [dict(r, G=32) for r in rows]
    lines = bench.summarize(rows, runs, ["idle_fraction", "tpot_ms_p99"]).splitlines()
    cells = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:]]
    by = {(c[0], c[1], c[3]): c for c in cells}
    vs_tt = by["t", "8", "bfio@pool / tt@immediate"]
    assert vs_tt[2] == "3" and vs_tt[5] == "2/3" and vs_tt[7] == "2/3"  # worse in windows 0 and 2
    assert by["t", "8", "bfio@pool / jsq@pool"][5] == "2/3"
    assert by["t", "8", "jsq@pool / tt@immediate"][5] == "2/3"  # every run against the baseline
    assert by["t", "8", "control / tt@immediate"][5] == "1/3"
    pooled = by["all cells", "", "bfio@pool / tt@immediate"]
    assert pooled[2] == "6" and pooled[5] == "4/6"
    assert cells[-1][0] == "all cells"  # pooled lines come last
    # a run without the metric (None) drops out of that comparison only
    rows[0]["idle_fraction"] = None  # window 0 of tt@immediate, G=8
    by = {(c[0], c[1], c[3]): c for c in ([x.strip() for x in line.split("|")[1:-1]] for line in
          bench.summarize(rows, runs, ["idle_fraction", "tpot_ms_p99"]).splitlines()[2:])}
    assert by["t", "8", "bfio@pool / tt@immediate"][5] == "1/2"  # window 2 only
    assert by["t", "8", "bfio@pool / tt@immediate"][7] == "2/3"


def test_small_run_end_to_end_and_bad_flags(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--traces", "azure_code_2023.csv", "--ranks", "4",
                        "--loads", "0.7", "--requests-per-rank", "25", "--max-windows", "2",
                        "--runs", "total_tokens@immediate,bfio@pool", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| azure_code_2023 | 4 | 2 | bfio@pool / total_tokens@immediate |" in r.stdout
    rows = json.loads(out.read_text())
    assert {x["run"] for x in rows} == {"total_tokens@immediate", "bfio@pool", "control"}
    assert all(x["requests_finished"] == 100 for x in rows)
    png = tmp_path / "forest.png"
    again = subprocess.run([sys.executable, str(SCRIPT), "--summary-from", str(out), "--plot", str(png)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == r.stdout.strip().split("\n\n")[-1]  # the same table from the saved runs
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for argv, flag in ((["--loads", "0.7,x"], "--loads"), (["--runs", "bfio@later"], "--runs"),
                       (["--metrics", "speed"], "--metrics"), (["--traces", "nope.csv"], "--traces"),
                       (["--ranks", "8,x"], "--ranks"), (["--estimator", "bogus"], "--estimator"),
                       (["--cost-preset", "nope"], "--cost-preset"), (["--batch", "0"], "--batch"),
                       (["--summary-from", str(tmp_path / "missing.json")], "--summary-from")):
        bad = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
        assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr
