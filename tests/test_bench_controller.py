"""scripts/bench_controller.py: the real controller times its decisions and places requests."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_controller.py"


def test_controller_bench_places_the_pool_into_the_free_slots(tmp_path):
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--cells", "4x16,8x8", "--calls", "3", "--free-frac", "0.3",
                        "--burst", "5", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(x["G"], x["B"], x["policy"]) for x in rows] == [
        (4, 16, "total_tokens"), (4, 16, "bfio"), (8, 8, "total_tokens"), (8, 8, "bfio")]
    for x in rows:
        assert x["dispatch_p50_us"] > 0 and x["release_p50_us"] > 0 and x["reports_p50_us"] > 0
        assert x["next_dispatch_p50_us"] > 0 and x["prepare_p50_us"] > 0 and x["prepared_dispatch_p50_us"] > 0
        assert x["burst"] == 5 and x["burst_each_p50_us"] > 0 and x["burst_together_p50_us"] > 0
        # an arrival before the idle estimate: placed on the previous snapshot's, every snapshot but the first
        assert x["lagged_dispatch_p50_us"] > 0 and x["lagged_placements"] == 3 + 2 - 1
        # arrivals during the idle estimate: every one placed, the paused ones counted (8 per snapshot)
        assert 0 < x["during_whole_p50_us"] <= x["during_whole_max_us"]
        assert 0 < x["during_paused_p50_us"] <= x["during_paused_max_us"]
        assert 0 <= x["during_lagged"] <= x["during_paused"] <= 8 * 3
        # the idle estimate in stages (bfio: the totals, what runs, the refit, the estimates, the projection)
        assert x["stages_p50"] >= (5 if x["policy"] == "bfio" else 1)
        assert 0 < x["longest_stage_p50_us"] <= x["longest_stage_max_us"] <= 1e6 * 60
        # a 4G-request pool fills the free slots (fewer than 4G here), never more
        assert 0 < x["pool_placed"] <= min(x["pool_free_slots"], 4 * x["G"])
        assert f"| {x['G']} | {x['B']} |" in r.stdout
    assert "An arrival landing at a uniform moment of the idle estimate" in r.stdout


def test_refit_bench_times_both_modes_on_every_cell(tmp_path):
    out = tmp_path / "refit.json"
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_refit.py"), "--longest", "256,32768",
                        "--running", "2048", "--calls", "3", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())
    assert [(x["longest"], x["running"]) for x in rows] == [(256, 2048), (32768, 2048)]
    assert all(x["buckets"] > 1 and x["inline_ms"] > 0 and x["background_ms"] > 0 and x["no_refit_ms"] > 0
               for x in rows)
    assert "| 32768 | 2048 |" in r.stdout


def test_busy_loop_bench_places_every_arrival_once(tmp_path):
    out = tmp_path / "busy.json"
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_busy_loop.py"), "--cells", "8x8",
                        "--bindings", "immediate,pool", "--arrivals", "2,6", "--steps", "20", "--warmup", "2",
                        "--step-ms", "4", "--free-frac", "0.5", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(x["binding"], x["arrivals_per_step"], x["step_ms"]) for x in rows] == [
        ("immediate", 2, 4.0), ("immediate", 6, 4.0), ("pool", 2, 4.0), ("pool", 6, 4.0)]
    for x in rows:
        # every arrival read is sent once or still pooled at the end; the timed ones (past the
        # warm-up) that were not sent by then are counted
        assert x["sent"] + x["pooled"] == x["arrived"] and x["arrivals"] > 0
        assert x["pooled"] == 0 if x["binding"] == "immediate" else x["pooled"] >= 0
        assert 0 <= x["unplaced"] <= x["arrivals"] // 2
        assert 0 < x["wait_p50_ms"] <= x["wait_p90_ms"] <= x["wait_p99_ms"] <= x["wait_max_ms"]
        assert 0 <= x["estimated_first"] <= x["arrivals"] and x["estimates_while_idle"] > 0
        assert 0 < x["busy_fraction"] < 1
        assert 0 <= x["gc_full_passes"] <= x["gc_passes"] and (x["gc_max_ms"] > 0) == (x["gc_passes"] > 0)
        assert f"| 8 | 8 | bfio | {x['binding']} | 4.00 | {x['arrivals_per_step']:g} |" in r.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_busy_loop.py"), "--cells", "8by8"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--cells: expected GxB such as 32x72, got '8by8'" in bad.stderr and "Traceback" not in bad.stderr


def test_gc_bench_times_full_passes_with_and_without_the_freeze(tmp_path):
    out = tmp_path / "gc.json"
    r = subprocess.run([sys.executable, str(SCRIPT.parent / "bench_gc.py"), "--cells", "8x8", "--pool", "2000",
                        "--grow", "60000", "--repeats", "2", "--json", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["rows"]
    # the imports alone hold far more tracked objects than 2000 pooled requests make
    assert row["tracked"] > 100_000 and row["frozen"] >= row["tracked"] - 1000
    assert 1 <= row["tracked_per_pooled"] <= 6
    assert row["frozen_p50_ms"] < row["unfrozen_p50_ms"] / 5
    for name in ("unfrozen", "frozen"):
        grow = row[f"{name}_grow"]
        assert grow["full_passes"] == len(grow["depth_at"]) == len(grow["full_ms"])
        assert grow["depth_at"] == sorted(grow["depth_at"]) and all(0 < d <= 60000 for d in grow["depth_at"])
    # frozen, each full pass walks the pool only: none as long as the unfrozen ones
    assert row["frozen_grow"]["full_passes"] >= 1
    if row["unfrozen_grow"]["full_passes"]:
        assert max(row["frozen_grow"]["full_ms"]) < min(row["unfrozen_grow"]["full_ms"])
    assert "| 8 | 8 | bfio | frozen |" in r.stdout and "| 8 | 8 | bfio | unfrozen |" in r.stdout
