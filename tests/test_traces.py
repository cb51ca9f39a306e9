import os

import numpy as np
import pytest

from sglang_ext.errors import TraceError
from sglang_ext.traces import load_trace, paper_order


def test_azure_csv_loads_with_relative_times(traces_dir):
    t = load_trace(traces_dir / "azure_conv_2023.csv")
    assert len(t) == 19366
    assert t.arrival_s[0] == 0.0 and np.all(np.diff(t.arrival_s) >= 0)
    assert t.prompt_len[0] == 374 and t.output_len[0] == 44
    # second row is 4.3145788 s after the first
    assert t.arrival_s[1] == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)


def test_mooncake_jsonl_ms_to_seconds(traces_dir):
    t = load_trace(traces_dir / "mooncake_conversation.jsonl")
    assert len(t) == 12031
    assert t.prompt_len[0] == 6758 and t.output_len[0] == 500
    assert t.arrival_s.max() > 60  # ms converted to s, an hour-long trace


def test_window_takes_rows_and_counts_time_from_its_first(traces_dir):
    t = load_trace(traces_dir / "azure_conv_2023.csv")
    w = t.window(1000, 500)
    assert len(w) == 500
    np.testing.assert_array_equal(w.prompt_len, t.prompt_len[1000:1500])
    np.testing.assert_array_equal(w.output_len, t.output_len[1000:1500])
    assert w.arrival_s[0] == 0.0
    np.testing.assert_allclose(w.arrival_s, t.arrival_s[1000:1500] - t.arrival_s[1000])
    assert len(t.window(len(t) - 10, 500)) == 10  # cut at the end of the trace
    assert t.arrival_s[1000] > 0  # the trace itself is untouched


def test_repeat_replays_back_to_back_at_the_recorded_rate(traces_dir):
    from sglang_ext.sim.online import native_rate

    t = load_trace(traces_dir / "azure_code_2023.csv").window(0, 400)
    r = t.repeat(3)
    assert len(r) == 1200
    for k in range(3):
        np.testing.assert_array_equal(r.prompt_len[400 * k:400 * (k + 1)], t.prompt_len)
        np.testing.assert_array_equal(r.output_len[400 * k:400 * (k + 1)], t.output_len)
        # each copy keeps the gaps between its requests
        np.testing.assert_allclose(np.diff(r.arrival_s[400 * k:400 * (k + 1)]), np.diff(t.arrival_s))
    assert np.all(np.diff(r.arrival_s) > 0)  # copies follow each other, no overlap
    gap = t.arrival_s[-1] / 399  # the next copy starts one mean gap after the last request
    assert r.arrival_s[400] - r.arrival_s[399] == pytest.approx(gap)
    assert native_rate(r) == pytest.approx(native_rate(t))
    assert t.repeat(1) is t
    untimed = load_trace(traces_dir / "burstgpt_lengths_8000.json").head(10).repeat(2)
    assert untimed.arrival_s is None and len(untimed) == 20
    with pytest.raises(ValueError, match="at least 1"):
        t.repeat(0)


def test_length_json_and_paper_order(traces_dir):
    t = load_trace(traces_dir / "burstgpt_lengths_8000.json")
    assert t.arrival_s is None and len(t) == 8000
    o = paper_order(t, 8000, 42)
    idx = np.random.default_rng(42).choice(8000, size=8000, replace=False)
    assert np.array_equal(o.prompt_len, t.prompt_len[idx])
    with pytest.raises(TraceError, match="asked for 9000"):
        paper_order(t, 9000, 42)


@pytest.mark.parametrize(
    "body, where",
    [
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,5\n2023-11-16 18:15:47.1,abc,5\n",
         r"bad\.csv:3: field 'ContextTokens': not an integer"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,0\n",
         r"bad\.csv:2: field 'GeneratedTokens': must be positive"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,10,5\n2023-11-16 18:15:45.1,10,5\n",
         r"bad\.csv:3: field 'TIMESTAMP': timestamp goes backwards"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\n,10,5\n", r"bad\.csv:2: field 'TIMESTAMP': missing"),
        ("TIMESTAMP,Context\n", r"bad\.csv:1: missing column"),
        ("", r"bad\.csv: empty file \(expected a header line TIMESTAMP,ContextTokens,GeneratedTokens\)"),
    ],
)
def test_bad_csv_rows_name_file_line_field(tmp_path, body, where):
    p = tmp_path / "bad.csv"
    p.write_text(body)
    with pytest.raises(TraceError, match=where):
        load_trace(p)


def test_bad_jsonl_and_skip_option(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n'
                 '{"timestamp": 10, "input_length": -1, "output_length": 3}\n'
                 '{"timestamp": 20, "output_length": 3}\n'
                 'not json\n'
                 '{"timestamp": 30, "input_length": 7, "output_length": 2}\n')
    with pytest.raises(TraceError, match=r"m\.jsonl:2: field 'input_length': must be positive"):
        load_trace(p)
    t = load_trace(p, skip_bad=True)
    assert len(t) == 2 and t.skipped == 3
    assert list(t.prompt_len) == [5, 7] and t.arrival_s[-1] == pytest.approx(0.03)


def test_bad_length_json(tmp_path):
    p = tmp_path / "l.json"
    p.write_text('{"data": [{"input_length": 3, "output_length": 2}, {"input_length": 3}]}')
    with pytest.raises(TraceError, match=r"l\.json:record 1: field 'output_length': missing"):
        load_trace(p)
    p.write_text('{"nodata": 1}')
    with pytest.raises(TraceError, match="field 'data'"):
        load_trace(p)


def test_unknown_and_missing_files(tmp_path):
    with pytest.raises(TraceError, match="no such trace file"):
        load_trace(tmp_path / "nope.csv")
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(TraceError, match="unknown trace format"):
        load_trace(tmp_path / "x.txt")


_CSV_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


@pytest.mark.parametrize(
    "name, body, where",
    [
        ("big.csv", _CSV_HEAD + "2023-11-16 18:15:46.1,9000000000000000000,5\n",
         r"big\.csv:2: field 'ContextTokens': too large \(got 9000000000000000000, at most 2147483647\)"),
        ("frac.csv", _CSV_HEAD + "2023-11-16 18:15:46.5e999,10,5\n",
         r"frac\.csv:2: field 'TIMESTAMP': not a timestamp"),
        ("nan.jsonl", '{"timestamp": NaN, "input_length": 5, "output_length": 3}\n',
         r"nan\.jsonl:1: field 'timestamp': not a finite non-negative number \(nan\)"),
        ("inf.jsonl", '{"timestamp": 0, "input_length": 5, "output_length": 3}\n'
                      '{"timestamp": Infinity, "input_length": 5, "output_length": 3}\n',
         r"inf\.jsonl:2: field 'timestamp': not a finite"),
        ("huge.jsonl", '{"timestamp": 1' + "0" * 400 + ', "input_length": 5, "output_length": 3}\n',
         r"huge\.jsonl:1: field 'timestamp': not a finite"),
        ("float.jsonl", '{"timestamp": 0, "input_length": 1e300, "output_length": 3}\n',
         r"float\.jsonl:1: field 'input_length': too large"),
        ("big.json", '{"data": [{"input_length": 3, "output_length": 4294967296}]}',
         r"big\.json:record 0: field 'output_length': too large"),
    ],
)
def test_out_of_range_values_name_file_line_field(tmp_path, name, body, where):
    p = tmp_path / name
    p.write_text(body)
    with pytest.raises(TraceError, match=where):
        load_trace(p)


def test_out_of_range_rows_are_skipped_on_request(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n'
                 '{"timestamp": NaN, "input_length": 5, "output_length": 3}\n'
                 '{"timestamp": 20, "input_length": 3000000000, "output_length": 3}\n'
                 '{"timestamp": 30, "input_length": 7, "output_length": 2}\n')
    t = load_trace(p, skip_bad=True)
    assert list(t.prompt_len) == [5, 7] and t.skipped == 2
    assert np.isfinite(t.arrival_s).all()


@pytest.mark.parametrize("name", ["t.csv", "t.jsonl", "t.json"])
def test_not_utf8_names_file_and_line(tmp_path, name):
    good = {"t.csv": _CSV_HEAD + "2023-11-16 18:15:46.1,10,5\n",
            "t.jsonl": '{"timestamp": 0, "input_length": 5, "output_length": 3}\n',
            "t.json": '{"data": [\n{"input_length": 3, "output_length": 2}\n]}\n'}[name]
    p = tmp_path / name
    p.write_bytes(good.encode() * 1 + b"\xff\xfe bad bytes\n")
    line = good.count("\n") + 1
    with pytest.raises(TraceError, match=rf"t\.{p.suffix[1:]}:{line}: not UTF-8 text \(byte 0xff"):
        load_trace(p)


def test_a_directory_or_an_oversized_csv_field_is_one_clear_error(tmp_path):
    d = tmp_path / "dir.csv"
    d.mkdir()
    with pytest.raises(TraceError, match=r"dir\.csv: is a directory"):
        load_trace(d)
    p = tmp_path / "wide.csv"
    p.write_text(_CSV_HEAD + "2023-11-16 18:15:46.1,10,5\n" + '2023-11-16 18:15:47.1,"' + "1" * 200_000 + '",5\n')
    with pytest.raises(TraceError, match=r"wide\.csv:3: unreadable CSV \(field larger than field limit"):
        load_trace(p)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_one_clear_error(tmp_path):
    p = tmp_path / "locked.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 3}\n')
    p.chmod(0)
    with pytest.raises(TraceError, match=r"locked\.jsonl: permission denied"):
        load_trace(p)
