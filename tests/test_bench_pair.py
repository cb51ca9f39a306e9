"""scripts/bench_pair.py: an earlier commit's policy, read out of git, timed beside the working tree's."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def test_the_base_package_is_the_commits_own_code_under_its_own_name(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import bench_pair

    before = set(sys.modules)
    try:
        policies = bench_pair.base_package("HEAD", tmp_path)
        loaded = {name: mod for name, mod in sys.modules.items() if name not in before}
        assert policies.__name__ == "sglang_ext_base.policies"
        base = {n: m for n, m in loaded.items() if n.split(".")[0] == "sglang_ext_base"}
        # the namespaced folders come along (setup.py's package_dir), and every module of it is read from the copy
        assert "sglang_ext_base.triton_kernels" in base and "sglang_ext_base.policies.bfio" in base
        assert all(str(tmp_path) in (getattr(m, "__file__", None) or str(tmp_path)) for m in base.values())
        # nothing in the copy still imports the working tree's package by name
        assert not any(re.search(r"\bsglang_ext\b", p.read_text()) for p in (tmp_path / "sglang_ext_base").rglob("*.py"))
    finally:
        for name in set(sys.modules) - before:
            if name.split(".")[0] == "sglang_ext_base":
                del sys.modules[name]


def test_pairing_head_with_itself_places_alike_and_times_both(tmp_path):
    out = tmp_path / "pair.json"
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_pair.py"), "--base", "HEAD", "--cells", "8x8,16x4",
                        "--horizons", "5", "--pool-tails", "0,0.002", "--calls", "4", "--free-frac", "0.3",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    head = subprocess.run(["git", "-C", str(SCRIPTS.parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert doc["base"] == head
    rows = doc["rows"]
    assert [(x["G"], x["B"], x["pool_tail"]) for x in rows] == [(8, 8, 0), (8, 8, 0.002), (16, 4, 0), (16, 4, 0.002)]
    for x in rows:
        assert x["same_placements"] == x["calls"] == 4  # the same code on the same snapshots
        assert 0 < x["base_p50_ms"] <= x["base_p99_ms"] and 0 < x["p50_ms"] <= x["p99_ms"] and x["paired_ratio"] > 0
    assert "| 16 | 4 | 5 | 0.002 |" in r.stdout


@pytest.mark.parametrize("argv, flag", [
    ([], "--base"),
    (["--base", "no-such-rev"], "--base"),
    (["--base", "HEAD", "--cells", "8x0"], "--cells"),
    (["--base", "HEAD", "--free-frac", "1"], "--free-frac"),
])
def test_bad_flags_exit_2_naming_the_flag(argv, flag):
    r = subprocess.run([sys.executable, str(SCRIPTS / "bench_pair.py"), *argv], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "error: " in r.stderr and flag in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
