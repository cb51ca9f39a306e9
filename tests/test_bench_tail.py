"""scripts/bench_tail.py: the ratio statistics and a small end-to-end run."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_tail.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_tail", SCRIPT)
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
    # more runs of the same spread: a narrower interval
    _, lo2, hi2 = bench.ratio_ci(np.tile(num, 4), np.tile(den, 4))
    assert hi2 - lo2 < hi - lo


def test_summary_counts_worse_runs_per_cell_and_pooled(bench):
    rows = []
    for w, (tt, pol, ctl) in enumerate([(10.0, 12.0, 10.0), (10.0, 8.0, 11.0), (20.0, 30.0, 20.0)]):
        for run, v in (("total_tokens", tt), ("bfio", pol), ("control", ctl)):
            rows.append(dict(trace="t.csv", G=8, window=w, run=run, idle_fraction=v, tpot_ms_p99=v))
    rows += [dict(r, G=32) for r in rows]
    table = bench.summarize(rows, "bfio").splitlines()
    cell = [c.strip() for c in table[2].split("|")]
    assert cell[1:4] == ["t", "8", "3"]
    assert cell[5] == "2/3" and cell[7] == "1/3"  # bfio worse in 2 runs, control in 1
    pooled = [c.strip() for c in table[-1].split("|")]
    assert pooled[1] == "all cells" and pooled[3] == "6" and pooled[5] == "4/6"


def test_small_run_end_to_end_and_bad_flags(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--traces", "azure_code_2023.csv", "--ranks", "4",
                        "--loads", "0.7", "--requests-per-rank", "25", "--max-windows", "2", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| azure_code_2023 | 4 | 2 |" in r.stdout
    import json
    rows = json.loads(out.read_text())
    assert {x["run"] for x in rows} == {"total_tokens", "control", "bfio"}
    assert all(x["requests_finished"] == 100 for x in rows)
    bad = subprocess.run([sys.executable, str(SCRIPT), "--loads", "0.7,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--loads" in bad.stderr and "Traceback" not in bad.stderr
