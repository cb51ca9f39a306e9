"""Bad flags of the benchmark scripts: exit status 2, the flag named on stderr,
no traceback, and no run started (each case stops at argument parsing); and the
forms of list bench_scale takes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"

CASES = [
    # (script, argv, flag the error must name)
    ("bench_scale.py", ["--ranks", "x"], "--ranks"),
    ("bench_busy_loop.py", ["--free-frac", "1.5"], "--free-frac"),
    ("bench_busy_loop.py", ["--arrivals", "2,0"], "--arrivals"),
    ("bench_busy_loop.py", ["--cells", "256x0"], "--cells"),
    ("bench_gc.py", ["--grow", "0"], "--grow"),
    ("bench_gc.py", ["--cells", "8x"], "--cells"),
    ("bench_scale.py", ["--batches", "72", "0"], "--batches"),
    ("bench_scale.py", ["--ranks", "16,x"], "--ranks"),
    ("bench_scale.py", ["--batch", "72,0"], "--batches"),
    ("bench_scale.py", ["--trace", "nope.json"], "--trace"),
    ("bench_scale.py", ["--per-slot", "0"], "--per-slot"),
    ("bench_scale.py", ["--horizon", "-1"], "--horizon"),
    ("bench_scale.py", ["--plot", "heat.pgn"], "--plot"),  # matplotlib writes no .pgn: refused before the grid runs
    ("bench_scale.py", ["--theory-plot", "fit.xyz"], "--theory-plot"),
    ("bench_optimality.py", ["--instances", "0"], "--instances"),
    ("bench_optimality.py", ["--time-limit", "x"], "--time-limit"),
    ("bench_optimality.py", ["--extra", "bogus:reward=2"], "--extra"),
    ("bench_optimality.py", ["--summary-from", "nope.json"], "--summary-from"),
    ("bench_reproduction.py", ["--traces", "burstgpt_lengths_8000.json,nope.json"], "--traces"),
    ("bench_reproduction.py", ["--policies", "fcfs,bogus"], "--policies"),
    ("bench_reproduction.py", ["--estimator", "bogus"], "--estimator"),
    ("bench_reproduction.py", ["--max-prompt-len", "0"], "--max-prompt-len"),
    ("bench_seeds.py", ["--traces", "nope.json"], "--traces"),
    ("bench_seeds.py", ["--policies", "fcfs,,jsq"], "--policies"),
    ("bench_seeds.py", ["--seeds", "42,x"], "--seeds"),
    ("bench_projection.py", ["--ranks", "0"], "--ranks"),
    ("bench_projection.py", ["--horizon", "-1"], "--horizon"),
    ("bench_projection.py", ["--repeats", "x"], "--repeats"),
    ("bench_telemetry.py", ["--records", "0"], "--records"),
    ("bench_telemetry.py", ["--steps-ms", "10,x"], "--steps-ms"),
    ("bench_telemetry.py", ["--max-bytes", "-1"], "--max-bytes"),
    ("bench_online.py", ["--ranks", "8,x"], "--ranks"),
    ("bench_online.py", ["--traces", "nope.csv"], "--traces"),
    ("bench_online.py", ["--traces", "burstgpt_lengths_8000.json"], "--traces"),  # no arrival times
    ("bench_online.py", ["--ranks", "8,100000"], "--ranks"),
    ("bench_repeats.py", ["--trace-repeat", "1000000"], "--trace-repeat"),
    ("bench_online.py", ["--loads", "0.7,0"], "--loads"),
    ("bench_online.py", ["--cost-preset", "bogus"], "--cost-preset"),
    ("bench_online.py", ["--runs", "bfio"], "--runs"),
    ("bench_online.py", ["--estimator", "cap"], "--max-new-tokens"),
    ("bench_repeats.py", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("bench_repeats.py", ["--trace-repeat", "0"], "--trace-repeat"),
    ("bench_repeats.py", ["--max-pool-wait", "inf"], "--max-pool-wait"),
    ("bench_repeats.py", ["--plot", "ratios.jpgg"], "--plot"),
    ("demo_live.py", ["--policies", "bfio:estimator=psychic"], "--policies"),
    ("demo_live.py", ["--policies", "bfio:horizon"], "--policies"),
    ("demo_live.py", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("demo_live.py", ["--requests", "0"], "--requests"),
    ("demo_live.py", ["--dp-size", "0"], "--dp-size"),
    ("demo_live.py", ["--time-scale", "-1"], "--time-scale"),
    ("demo_live.py", ["--arrival-span", "inf"], "--arrival-span"),
    ("demo_live.py", ["--request-timeout", "0"], "--request-timeout"),
    ("bench_decision.py", ["--trace", "nope.json"], "--trace"),
    ("bench_decision.py", ["--batch", "72,0"], "--batch"),
    ("bench_decision.py", ["--horizons", "0,-1"], "--horizons"),
    ("bench_decision.py", ["--free-frac", "0"], "--free-frac"),
    ("bench_controller.py", ["--cells", "32x72,8y72"], "--cells"),
    ("bench_controller.py", ["--cells", "0x72"], "--cells"),
    ("bench_controller.py", ["--policies", "bfio,bogus"], "--policies"),
    ("bench_controller.py", ["--free-frac", "1"], "--free-frac"),
    ("bench_controller.py", ["--calls", "0"], "--calls"),
    ("bench_controller.py", ["--refit", "lazy"], "--refit"),
    ("bench_controller.py", ["--device", "gpu"], "--device"),
    ("bench_decision.py", ["--device", "gpu"], "--device"),
    ("bench_refit.py", ["--longest", "2048,x"], "--longest"),
    ("bench_refit.py", ["--running", "0"], "--running"),
    ("bench_refit.py", ["--calls", "0"], "--calls"),
]


@pytest.mark.parametrize("script,argv,flag", CASES, ids=[f"{s}:{' '.join(a)}" for s, a, _ in CASES])
def test_bad_flag_exits_2_naming_the_flag(script, argv, flag):
    r = subprocess.run([sys.executable, str(SCRIPTS / script), *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert flag in r.stderr and "error:" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["bench_decision.py", "bench_controller.py"])
def test_device_cuda_without_a_gpu_exits_2_before_any_work(script):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here")
    r = subprocess.run([sys.executable, str(SCRIPTS / script), "--device", "cuda"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--device cuda: torch sees no CUDA device" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_scale_takes_its_lists_space_or_comma_separated(tmp_path):
    # as the other bench scripts take them (--ranks 128,256), and as it always did (--ranks 128 256)
    cells = []
    for i, argv in enumerate([["--ranks", "4", "6", "--batches", "8"], ["--ranks", "4,6", "--batch", "8"]]):
        out = tmp_path / f"scale{i}.json"
        r = subprocess.run([sys.executable, str(SCRIPTS / "bench_scale.py"), *argv, "--per-slot", "1",
                            "--json", str(out)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        cells.append([(c["G"], c["B"], c["N"]) for c in json.loads(out.read_text())["cells"]])
    assert cells[0] == cells[1] == [(4, 8, 32), (6, 8, 48)]


@pytest.mark.parametrize("script", ["bench_online.py", "bench_repeats.py"])
@pytest.mark.parametrize("doc, needle", [
    ({"runs": []}, "expected the list of rows a --json run writes, got a JSON dict"),
    ([1], "row 0: expected an object, got int"),
    ([{"trace": ["x"], "G": 8}], "row 0: field 'trace': not a string (['x'])"),
])
def test_summary_from_a_file_of_another_shape_is_one_error_naming_it(tmp_path, script, doc, needle):
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(doc))
    r = subprocess.run([sys.executable, str(SCRIPTS / script), "--summary-from", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith(f"error: {path}: {needle}"), r.stderr
