"""scripts/bench_queue_phases.py: a small run end to end, and a bad flag."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_queue_phases.py"


def test_small_saturated_run_splits_idle_by_phase(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--traces", "azure_conv_2023.csv", "--ranks", "4",
                        "--load", "2.0", "--requests-per-rank", "60", "--batch", "16", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [x["run"] for x in rows] == ["total_tokens@immediate", "jsq@pool", "bfio@pool"]
    for x in rows:
        assert x["requests_finished"] == 240
        assert 0 < x["queued_s"] <= x["decode_s"]  # twice the capacity: a queue builds
        assert 0 < x["drain_s"] < x["decode_s"]  # the replay ends in a drain
        # both tables: the queue split, then the split at the last arrival
        assert r.stdout.count(f"| azure_conv_2023 | 4 | {x['run']} | {x['idle_fraction']:.4f} |") == 2


@pytest.mark.parametrize("argv", [["--runs", "bfio"], ["--load", "0"], ["--traces", "nope.csv"], ["--ranks", "8,x"],
                                  ["--estimator", "bogus"]])
def test_bad_flags_exit_2_naming_the_flag(argv):
    bad = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert bad.returncode == 2 and argv[0] in bad.stderr and "Traceback" not in bad.stderr
