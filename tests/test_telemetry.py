"""StepTelemetry: schema, energy paths (model fallback, NVML counter), rotation."""
from __future__ import annotations

import json
import sys
import time
import types

import pytest

from sglang_ext.cost import PowerModel, power_preset
from sglang_ext.telemetry import FIELDS, StepTelemetry, rank_files


def read_lines(path):
    return [json.loads(x) for x in open(path).read().splitlines()]


def record_steps(tel, n, *, step_time=0.02, idle=0.005, batch=lambda i: 4):
    return [
        tel.record(step=i, batch_size=batch(i), kv_tokens=1000 + 10 * i, predicted_cost_s=0.018,
                   step_time_s=step_time, idle_s=idle, idle_source="measured" if i % 2 else "predicted")
        for i in range(n)
    ]


@pytest.fixture
def no_nvml(monkeypatch):
    # `import pynvml` raises ImportError when its sys.modules entry is None.
    monkeypatch.setitem(sys.modules, "pynvml", None)


def test_schema_every_field_present_and_sane(tmp_path, no_nvml):
    tel = StepTelemetry(tmp_path, 3, source="test")
    returned = record_steps(tel, 50, batch=lambda i: 0 if i % 10 == 0 else 8)
    tel.close()
    lines = read_lines(tmp_path / "rank3.jsonl")
    assert lines == returned
    assert len(lines) == 50
    pm = power_preset("h100")
    for i, rec in enumerate(lines):
        assert set(rec) == set(FIELDS)
        assert rec["step"] == i and rec["dp_rank"] == 3 and rec["source"] == "test"
        assert rec["wall_time"] > 1.6e9
        assert 0 <= rec["idle_s"] <= rec["step_time_s"]
        assert rec["busy_s"] == pytest.approx(rec["step_time_s"] - rec["idle_s"])
        assert rec["idle_source"] in ("measured", "predicted")
        assert rec["energy_j"] >= 0 and rec["power_w"] > 0
        assert rec["energy_source"] == "model:h100"
        if rec["batch_size"] == 0:
            assert rec["energy_j"] == pytest.approx(pm.idle_w * 0.02)
        else:
            assert rec["energy_j"] == pytest.approx(pm.busy_w * 0.015 + pm.wait_w * 0.005)
        assert rec["power_w"] == pytest.approx(rec["energy_j"] / rec["step_time_s"])
    assert [r["wall_time"] for r in lines] == sorted(r["wall_time"] for r in lines)


def test_nvml_absent_falls_back_to_labelled_model(tmp_path, no_nvml):
    pm = PowerModel("toy", busy_w=100.0, wait_w=50.0, idle_w=10.0)
    tel = StepTelemetry(tmp_path, 0, power_model=pm, nvml_every=4)
    assert tel.energy_source == "model:toy"
    rec = record_steps(tel, 1)[0]
    assert rec["energy_source"] == "model:toy"
    assert rec["energy_j"] == pytest.approx(100 * 0.015 + 50 * 0.005)  # written immediately, no pending
    tel.close()
    assert read_lines(tmp_path / "rank0.jsonl")[0]["energy_source"] == "model:toy"


def test_out_of_range_values_are_clipped_not_raised(tmp_path, no_nvml):
    with StepTelemetry(tmp_path, 0) as tel:
        a = tel.record(step=0, batch_size=1, kv_tokens=1, predicted_cost_s=0.01, step_time_s=0.01,
                       idle_s=0.05, idle_source="predicted")
        b = tel.record(step=1, batch_size=1, kv_tokens=1, predicted_cost_s=0.01, step_time_s=0.01,
                       idle_s=-1.0, idle_source="measured")
    assert a["idle_s"] == a["step_time_s"] == 0.01 and a["busy_s"] == 0
    assert b["idle_s"] == 0 and b["busy_s"] == 0.01
    with StepTelemetry(tmp_path, 1) as tel, pytest.raises(ValueError):
        tel.record(step=0, batch_size=1, kv_tokens=1, predicted_cost_s=0, step_time_s=0.01, idle_s=0,
                   idle_source="guessed")


def test_rotation(tmp_path, no_nvml):
    tel = StepTelemetry(tmp_path, 1, max_bytes=4096, backups=3)
    record_steps(tel, 200)  # ~330 bytes a line: ~16 files' worth, only 3 backups kept
    tel.close()
    files = rank_files(tmp_path / "rank1.jsonl")
    assert [f.rsplit("/", 1)[1] for f in files] == ["rank1.jsonl.3", "rank1.jsonl.2", "rank1.jsonl.1", "rank1.jsonl"]
    steps = [r["step"] for f in files for r in read_lines(f)]
    assert steps == list(range(200 - len(steps), 200))  # oldest first, contiguous, newest kept
    assert all((tmp_path / f).stat().st_size <= 4096 for f in files)
    # backups=None keeps everything.
    tel = StepTelemetry(tmp_path / "all", 0, max_bytes=4096, backups=None)
    record_steps(tel, 200)
    tel.close()
    assert [r["step"] for f in rank_files(tmp_path / "all" / "rank0.jsonl") for r in read_lines(f)] == list(range(200))


class FakeNvml(types.ModuleType):
    """A pynvml stand-in whose energy counter rises 1 J (1000 mJ) per read."""

    def __init__(self):
        super().__init__("pynvml")
        self.mj = 5_000_000
        self.reads = 0
        self.shutdown = False

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self.reads += 1
        self.mj += 1000
        return self.mj


def test_nvml_counter_spread_over_steps(tmp_path, monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tel = StepTelemetry(tmp_path, 1, nvml_every=3)
    assert tel.energy_source == "nvml" and tel._nvml.device == 1  # rank 1 -> GPU 1 without CUDA
    reads0 = fake.reads
    recs = [tel.record(step=i, batch_size=2, kv_tokens=10, predicted_cost_s=0.01, step_time_s=t, idle_s=0.0,
                       idle_source="measured") for i, t in enumerate([0.01, 0.02, 0.01, 0.03])]
    assert fake.reads - reads0 == 1  # one read for the first three steps
    assert recs[0]["energy_j"] is not None and recs[3]["energy_j"] is None  # 4th pending
    assert sum(r["energy_j"] for r in recs[:3]) == pytest.approx(1.0)
    assert recs[1]["energy_j"] == pytest.approx(0.5)  # spread by step time: 0.02 of 0.04 s
    tel.close()  # settles the pending step with one more read
    lines = read_lines(tmp_path / "rank1.jsonl")
    assert len(lines) == 4 and all(r["energy_source"] == "nvml" for r in lines)
    assert lines[3]["energy_j"] == pytest.approx(1.0) and fake.shutdown


def test_nvml_read_failure_falls_back(tmp_path, monkeypatch):
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    tel = StepTelemetry(tmp_path, 0, nvml_every=1)

    def broken(handle):
        raise RuntimeError("GPU is lost")

    fake.nvmlDeviceGetTotalEnergyConsumption = broken
    rec = record_steps(tel, 1)[0]
    assert rec["energy_source"] == "model:h100" and rec["energy_j"] > 0
    tel.close()


def test_missing_prediction_is_null(tmp_path, no_nvml):
    with StepTelemetry(tmp_path, 0) as tel:
        rec = tel.record(step=1, batch_size=1, kv_tokens=5, predicted_cost_s=float("nan"), step_time_s=0.01,
                         idle_s=0.0, idle_source="measured")
    assert rec["predicted_cost_s"] is None
    assert read_lines(tmp_path / "rank0.jsonl")[0]["predicted_cost_s"] is None


def test_each_line_reaches_on_line_once_with_its_energy(tmp_path, monkeypatch):
    # The metrics sink sees exactly the written lines, each once its NVML energy is settled.
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    seen = []
    tel = StepTelemetry(tmp_path, 1, nvml_every=3, on_line=lambda rec: seen.append(dict(rec)))
    record_steps(tel, 4)
    assert [r["step"] for r in seen] == [0, 1, 2] and all(r["energy_j"] is not None for r in seen)
    tel.close()
    assert seen == read_lines(tmp_path / "rank1.jsonl")


def test_without_a_log_dir_lines_go_to_on_line_only(tmp_path, no_nvml, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = []
    with StepTelemetry(None, 2, on_line=seen.append) as tel:
        returned = record_steps(tel, 5)
        assert tel.path is None
    assert seen == returned and all(r["energy_j"] > 0 for r in seen)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_on_line_is_logged_once_and_the_log_goes_on(tmp_path, no_nvml, caplog):
    def broken(rec):
        raise RuntimeError("metrics are down")

    with StepTelemetry(tmp_path, 0, on_line=broken) as tel:
        record_steps(tel, 3)
    assert len(read_lines(tmp_path / "rank0.jsonl")) == 3
    assert sum("consumer failed" in r.getMessage() for r in caplog.records) == 1


def test_a_rank_gone_idle_flushes_its_last_lines_when_due(tmp_path, no_nvml):
    # Lines are flushed as the next one is written; a rank with no next step calls
    # flush_due while idle, so a live report still sees its last steps.
    tel = StepTelemetry(tmp_path, 0, flush_interval_s=0.2)
    record_steps(tel, 2)
    tel.flush_due()
    assert (tmp_path / "rank0.jsonl").read_text() == ""  # (not due yet)
    time.sleep(0.25)
    tel.flush_due()
    assert len(read_lines(tmp_path / "rank0.jsonl")) == 2
    tel.close()
