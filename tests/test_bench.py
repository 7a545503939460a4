"""`pullback bench`: programs counted as launched, the GPU timing path with an injected
timer (run here on the CPU), and the Markdown report with its plots."""
import json
import math

import pytest
import torch

import generated
import generated._runtime as rt
from derive import bench
from derive.bench import COMPILED, COPY, EAGER, FLASH, PULLBACK, TrafficRow


def test_count_programs_counts_the_grids_launched():
    x = torch.randn(40, 8, requires_grad=True)
    with bench.count_programs() as fwd:
        y = generated.softmax(x)
    with bench.count_programs() as bwd:
        y.backward(torch.ones_like(y))
    assert (fwd.programs, fwd.launches) == (16, 1)  # a persistent grid: 16 programs walk the 40 rows
    assert (bwd.programs, bwd.launches) == (16, 1)
    assert fwd.programs == rt.programs(40, x.device)
    q = torch.randn(1, 2, 130, 16)
    with bench.count_programs() as att:
        generated.attention(q, q, q)
    assert att.programs == 2 * math.ceil(130 / 64) and att.launches == 1  # z * query blocks of 64 (interpreter)
    with bench.count_programs() as none:
        generated.softmax(torch.randn(0, 8))
    assert (none.programs, none.launches) == (0, 0)


def test_traffic_rows_carry_programs_and_rows(monkeypatch):
    monkeypatch.setattr(bench, "_rowwise_cases", lambda quick: [("softmax", (40, 8), -1)])
    monkeypatch.setattr(bench, "_attention_cases", lambda quick: [])
    rows = bench.traffic("float32")
    assert [(r.direction, r.programs, r.launches, r.rows) for r in rows] == [("forward", 16, 1, 40),
                                                                             ("backward", 16, 1, 40)]
    assert [r.ratio for r in rows] == [1.0, 1.0]
    assert rows[0].ideal == 2 * 40 * 8 * 4


# ---- GPU timing, with the timer injected ----------------------------------------------------
class _Timer:
    """Calls each function once (it must run) and answers 1, 2, 3, ... ms in turn."""

    def __init__(self):
        self.results = []

    def __call__(self, fn):
        self.results.append(fn())
        return float(len(self.results))


def _timings(**kw):
    timer = _Timer()
    args = dict(timer=timer, device="cpu", dtypes=(torch.float32,), compile_fn=lambda f: f, copy_bytes=4096,
                rows=[("layer_norm", (6, 32))], attention=[(1, 2, 24, 16, True)])
    args.update(kw)
    return bench.timings(**args), timer


def test_timings_time_every_contender_and_rate_them():
    rows, timer = _timings()
    copy, fwd, bwd, afwd, abwd = rows
    assert (copy.op, copy.times, copy.work) == (COPY, {COPY: 1.0}, 8192)
    assert copy.ceiling == pytest.approx(8192 / 1e-3 / 1e9)  # bytes read and written in 1 ms, GB/s
    assert fwd.times == {PULLBACK: 2.0, EAGER: 3.0, COMPILED: 4.0}
    assert bwd.times == {PULLBACK: 5.0, EAGER: 6.0, COMPILED: 7.0}
    n_in = (6 * 32 + 32 + 32) * 4
    assert (fwd.work, bwd.work) == (n_in + 6 * 32 * 4, 2 * n_in + 6 * 32 * 4)
    assert fwd.ceiling == copy.ceiling and fwd.rate(EAGER) == pytest.approx(fwd.work / 3e-3 / 1e9)
    assert fwd.speedup(COMPILED) == 2.0 and math.isnan(fwd.speedup(FLASH))
    assert afwd.times == {PULLBACK: 8.0, FLASH: 9.0, EAGER: 10.0, COMPILED: 11.0}
    assert afwd.work == 4 * 1 * 2 * 24 * 24 * 16 * 0.5 and abwd.work == 2.5 * afwd.work
    assert afwd.unit == "TFLOP/s" and afwd.ceiling == 0.0
    assert afwd.rate(FLASH) == pytest.approx(afwd.work / 9e-3 / 1e12)
    # every contender computes the same thing (the forwards agree with each other)
    ln = timer.results[1:4]
    torch.testing.assert_close(ln[0], ln[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ln[0], ln[2])
    att = timer.results[7:11]
    for other in att[1:]:
        torch.testing.assert_close(att[0], other, atol=1e-5, rtol=1e-5)
    # the backwards are gradients of every input
    assert len(timer.results[4]) == 3 and len(timer.results[11]) == 3


def test_timings_leave_out_eager_attention_past_the_scores_budget():
    rows, _ = _timings(rows=[], scores_budget=1 * 2 * 24 * 24 * 4 - 1)
    assert set(rows[1].times) == {PULLBACK, FLASH}
    cells = bench.format_timings(rows).splitlines()[3].split()
    assert cells[:8] == ["attention", "B=1", "H=2", "N=24", "D=16", "causal", "float32", "forward"]
    assert cells[8:12] == ["2.0000", "-", "-", "3.0000"]  # pullback, eager, compiled, flash


def test_format_timings_lists_each_row():
    rows, _ = _timings()
    lines = bench.format_timings(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    assert lines[3].startswith("layer_norm") and "GB/s copy" in lines[3]


# ---- the report -------------------------------------------------------------------------
def _traffic_rows():
    return [TrafficRow("softmax", "(64, 32)", "float16", "forward", 4096, 4096, 8192, 0, 16, 1, 64),
            TrafficRow("softmax", "(64, 32)", "float16", "backward", 8192, 4096, 12288, 0, 16, 1, 64),
            TrafficRow("attention", "B=1 H=1 M=64 N=64 D=16", "float16", "forward", 9000, 2048, 8192, 0, 1, 1)]


def _builds():
    base = dict(module="generated.softmax", kernel="_softmax_fwd", case="fp16 rows of 4096", config="BLOCK=4096",
                registers=40, spill_stores=0, spill_loads=0, shared_bytes=16, mma="-", tma=False, cp_async=False,
                work=None)
    return [dict(base, arch=80), dict(base, arch=90, registers=200, spill_stores=8),
            dict(base, kernel="_softmax_bwd", arch=90, registers=64)]


def _report(tmp_path, name, timings=None):
    pytest.importorskip("matplotlib")
    from derive import bench_report
    if timings is None:
        timings, _ = _timings(attention=[(1, 2, n, 16, c) for n in (16, 32) for c in (False, True)])
    return bench_report.write_report(tmp_path / name, [("command", "`pullback bench --report x`"),
                                                       ("date", "2026-01-02")],
                                     traffic=_traffic_rows(), timings=timings, builds=_builds())


def test_the_report_holds_every_section_and_plot(tmp_path):
    paths = _report(tmp_path, "a")
    assert [p.name for p in paths] == ["README.md", "traffic.png", "build.png", "attention.png", "rowwise.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[1:])
    assert all(p.stat().st_size < 200_000 for p in paths[1:])
    text = paths[0].read_text()
    assert "| date | 2026-01-02 |" in text
    assert "| softmax | (64, 32) | float16 | backward | 0.008 | 0.004 | 0.012 | - | 1.00 | 1 | 16 | 4 |" in text
    assert "| attention | B=1 H=1 M=64 N=64 D=16 | float16 | forward |" in text and "| 1.35 | 1 | 1 | - |" in text
    assert "| softmax._softmax_fwd | sm_90 | 1 | 200 | 1 | 16 |" in text  # max registers, builds that spill
    assert "3 builds" in text and "1 of them spill" in text
    assert "![attention.png](attention.png)" in text and "![rowwise.png](rowwise.png)" in text
    assert "| layer_norm | (6, 32) | float32 | forward | 2 | 3 | 4 | - |" in text  # ms of each contender


def test_the_report_is_the_same_bytes_for_the_same_inputs(tmp_path):
    timings, _ = _timings(attention=[(1, 2, 16, 16, False)])
    a, b = _report(tmp_path, "a", timings), _report(tmp_path, "b", timings)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_a_report_of_traffic_only_has_no_gpu_section(tmp_path):
    pytest.importorskip("matplotlib")
    from derive import bench_report
    paths = bench_report.write_report(tmp_path, [("machine", "cpu")], traffic=_traffic_rows())
    assert [p.name for p in paths] == ["README.md", "traffic.png"]
    assert "GPU times" not in paths[0].read_text() and "date" not in paths[0].read_text()


# ---- the command line -----------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("args,message", [
    (["--date", "2026-01-01"], "--build-json, --with-build and --date go with --report DIR"),
    (["--report", "R", "--with-build", "--build-json", "B"], "--build-json and --with-build both give the "
                                                             "compile stats: pass one"),
])
def test_bench_option_errors(run, no_cuda, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "B").write_text("[]")
    r = run("bench", "--quick", *args)
    assert r.exit_code == 1 and r.output == f"Error: {message}\n"


@pytest.mark.parametrize("content", ["{not json", '[{"module": "m"}]', '{"a": 1}'])
def test_bench_refuses_a_build_json_that_is_not_builds(run, no_cuda, tmp_path, content):
    p = tmp_path / "b.json"
    p.write_text(content)
    r = run("bench", "--quick", "--report", str(tmp_path / "r"), "--build-json", str(p))
    assert r.exit_code == 1 and r.output.startswith(f"Error: {p}: not the JSON of `pullback build --json`")
    assert r.output.count("\n") == 1 and not (tmp_path / "r").exists()


def test_bench_report_from_the_command_line(run, no_cuda, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "_rowwise_cases", lambda quick: [("softmax", (40, 8), -1)])
    monkeypatch.setattr(bench, "_attention_cases", lambda quick: [])
    p = tmp_path / "b.json"
    p.write_text(json.dumps(_builds()))
    r = run("bench", "--quick", "--report", str(tmp_path / "r"), "--build-json", str(p), "--date", "2026-05-01")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "r" / "README.md").read_text()
    assert f"pullback build --json > b.json && pullback bench --quick --report {tmp_path / 'r'} --build-json b.json " \
        "--date 2026-05-01`" in text
    assert "| date | 2026-05-01 |" in text and "no CUDA device" in text
    assert "| softmax | (40, 8) dim=-1 | float16 | forward |" in text and "| 1.00 | 1 | 16 | 2.5 |" in text
    assert sorted(q.name for q in (tmp_path / "r").iterdir()) == ["README.md", "build.png", "traffic.png"]
