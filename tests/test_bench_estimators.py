"""scripts/bench_estimators.py: prediction errors on a real trace, and bad flags."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_estimators.py"


def test_prompt_buckets_predict_the_azure_conversation_lengths(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--traces", "azure_conv_2023.csv", "--fit", "1500",
                        "--test", "1500", "--ages", "20,5000", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {x["estimator"]: x for x in json.loads(out.read_text())}
    pooled, by_prompt = rows["empirical"], rows["empirical-prompt"]
    # in this trace the prompt's size tells a ~100-token answer from a ~400-token one
    assert by_prompt["arrival"] < 0.6 * pooled["arrival"]
    assert by_prompt["age_20"] < 0.6 * pooled["age_20"]
    assert pooled["age_5000"] is None  # nobody lives that long: no error to report
    assert f"| azure_conv_2023 | empirical-prompt | {by_prompt['arrival']:.1f} |" in r.stdout


@pytest.mark.parametrize("argv,flag", [(["--fit", "0"], "--fit"), (["--estimators", "cap"], "--estimators"),
                                       (["--estimators", "psychic"], "--estimators"), (["--ages", "x"], "--ages"),
                                       (["--fit", "10000000"], "--fit"), (["--traces", "nope.csv"], "--traces")])
def test_bad_flags_exit_2_naming_the_flag(argv, flag):
    bad = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
    assert bad.returncode == 2 and flag in bad.stderr and "Traceback" not in bad.stderr
