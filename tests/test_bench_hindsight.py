"""scripts/bench_hindsight.py: a small run end to end, and bad flags."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_hindsight.py"


def test_small_run_replaces_the_drain_with_hindsight(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--traces", "azure_conv_2023.csv", "--ranks", "4",
                        "--loads", "2.0", "--requests-per-rank", "60", "--batch", "16", "--swaps", "500",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {x["run"]: x for x in json.loads(out.read_text())}
    assert list(rows) == ["total_tokens@immediate", "jsq@pool", "bfio@pool"]
    for run in ("jsq@pool", "bfio@pool"):
        x = rows[run]
        assert 0 < x["held"] <= 4 * 16  # a pool places into free slots only
        assert x["idle_drain_hindsight"] <= x["idle_drain_as_run"] + 1e-12 or x["drain_s"] == 0
        # the run's idle with its drain swapped: between the floor-free zero and a drain of pure idle
        assert 0 <= x["idle_with_hindsight_drain"] <= 1
        assert f"| azure_conv_2023 | 4 | 2 | {run} | {x['idle_fraction']:.4f} |" in r.stdout
    # Twice the capacity: immediate binding queues past the slots, no fixed drain to re-place.
    tt = rows["total_tokens@immediate"]
    assert tt["held"] > 4 * 16 and tt["idle_drain_hindsight"] is None


@pytest.mark.parametrize("argv", [["--runs", "bfio"], ["--loads", "0"], ["--swaps", "-1"],
                                  ["--estimator", "empirical"], ["--traces", "nope.csv"]])
def test_bad_flags_exit_2_naming_the_flag(argv):
    bad = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert bad.returncode == 2 and argv[0] in bad.stderr and "Traceback" not in bad.stderr
