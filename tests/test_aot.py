"""Ahead-of-time builds for real GPUs with no GPU present (derive/aot.py).

The build captures the kernel launches of each module's representative calls
(AOT_CASES) and compiles them as Triton's JIT would specialise them.  The fast
tests build the tiny op in tests/aot_fixture_kernels.py in a child process (the
test session runs with triton's interpreter on) and check the error paths and
the PTX readers.  The slow test builds every generated module and asserts that
no kernel it launches spills registers on sm_80 or sm_90 under the installed triton."""
import importlib
import json
import os
import re
from pathlib import Path

import pytest

from derive import aot, builtin_ops

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "tests.aot_fixture_kernels"


@pytest.fixture(scope="module")
def fixture_stats():
    return aot.run_in_subprocess([FIXTURE], archs=(80, 90), jobs=2)


def test_fixture_builds_each_specialisation_for_sm80_and_sm90(fixture_stats):
    assert [(s.kernel, s.arch, s.case) for s in fixture_stats] == [
        ("_row_normalize", 80, "fp16 rows of 1024"), ("_row_normalize", 80, "fp16 rows of 1000"),
        ("_row_normalize", 90, "fp16 rows of 1024"), ("_row_normalize", 90, "fp16 rows of 1000")]
    for s in fixture_stats:
        assert 0 < s.registers <= 255, s
        assert s.spill_stores == 0 and s.spill_loads == 0, s
        assert s.config == "BLOCK=1024, warps=4, stages=3"
        assert (s.mma, s.tma, s.work) == ("-", False, None)
    # what the JIT does: X is 512-byte aligned (Y is the second allocation: also aligned); the unit
    # column stride becomes the constant 1; 1024 is divisible by 16, 1000 is not
    assert fixture_stats[0].specialization == "X_ptr:D Y_ptr:D row_stride:D col_stride=1 n_cols:D"
    assert fixture_stats[1].specialization == "X_ptr:D Y_ptr:D col_stride=1"


def test_progress_goes_to_stderr(capfd):
    aot.run_in_subprocess([FIXTURE], archs=(90,), jobs=1)
    out, err = capfd.readouterr()
    assert (f"compiling {FIXTURE}._row_normalize (fp16 rows of 1000; BLOCK=1024, warps=4, stages=3) "
            f"for sm_90 ...") in err
    assert out == ""


def test_format_table(fixture_stats):
    lines = aot.format_table(fixture_stats).splitlines()
    assert lines[0].split() == ["kernel", "arch", "case", "config", "regs", "spills", "smem", "mma", "tma",
                                "cp.async", "work"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["aot_fixture_kernels._row_normalize"] * 4
    assert [r[1] for r in rows] == ["sm_80", "sm_80", "sm_90", "sm_90"]
    assert all(r[-6] == "0/0" and int(r[-7]) > 0 and r[-4:] == ["-", "no", "no", "-"] for r in rows)
    assert len({len(line) for line in lines}) == 1  # aligned


def _bad_module(tmp_path, monkeypatch, body):
    (tmp_path / "aot_bad_fixture.py").write_text("from tests.aot_fixture_kernels import _row_normalize, "
                                                  "row_normalize\n" + body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "aot_bad_fixture"


@pytest.mark.parametrize("cases, message", [
    ("[{'op': 'no_such_op', 'inputs': [[4, 4]], 'dtypes': ['float16']}]",
     r"aot_bad_fixture has no op 'no_such_op' \(named in AOT_CASES\[0\]\)"),
    ("[{'op': 'row_normalize', 'inputs': [[4, 4]]}]", r"aot_bad_fixture\.AOT_CASES\[0\] lacks dtypes"),
    ("[{'op': 'row_normalize', 'inputs': [[4, 4]], 'dtypes': ['int8']}]",
     r"aot_bad_fixture\.AOT_CASES\[0\]: unknown dtype 'int8'; known: float16, bfloat16, float32, float64"),
    ("[{'op': 'row_normalize', 'inputs': [[4, 4]], 'dtypes': ['float16'], 'shape': 1}]",
     r"aot_bad_fixture\.AOT_CASES\[0\] has unknown keys: shape"),
    ("[{'op': 'row_normalize', 'inputs': [[4]], 'dtypes': ['float16']}]",
     r"aot_bad_fixture: row_normalize failed on AOT_CASES\[0\] \(fp16\): IndexError"),
    ("[{'op': 'row_normalize', 'inputs': [[4, 4]], 'kwargs': {'scale': 2}, 'dtypes': ['float16']}]",
     r"row_normalize failed on AOT_CASES\[0\] \(fp16\): TypeError: .*unexpected keyword argument 'scale'"),
    ("[{'op': 'len', 'inputs': [[4, 4]], 'dtypes': ['float16']}]",
     r"aot_bad_fixture: its AOT_CASES launch no Triton kernel"),
])
def test_bad_cases_are_clear_errors(tmp_path, monkeypatch, cases, message):
    name = _bad_module(tmp_path, monkeypatch, f"len = len\nAOT_CASES = {cases}\n")
    with pytest.raises(aot.AotError, match=message):
        aot.run_in_subprocess([name], archs=(90,), jobs=1)


def test_module_without_cases_is_a_clear_error(tmp_path, monkeypatch):
    name = _bad_module(tmp_path, monkeypatch, "")
    with pytest.raises(aot.AotError, match="aot_bad_fixture has no AOT_CASES list"):
        aot.run_in_subprocess([name], archs=(90,))


def test_missing_module_is_a_clear_error():
    with pytest.raises(aot.AotError, match="cannot import tests.no_such_module"):
        aot.run_in_subprocess(["tests.no_such_module"], archs=(90,))


def test_build_in_process_refuses_interpreter_functions():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the interpreter is off in this session")
    with pytest.raises(aot.AotError, match="aot_fixture_kernels._row_normalize is not a compiled-mode"):
        aot.build_modules([FIXTURE], archs=(90,))


def test_capture_stands_in_for_tensor_descriptors():
    """A launch's host-side tensor descriptor (TMA) keeps its shape, strides and box; its
    tensor becomes a stand-in pointer, as a plain tensor argument does."""
    import torch
    tensor_descriptor = pytest.importorskip("triton.tools.tensor_descriptor")
    t = torch.empty(2, 100, 64, dtype=torch.float16)
    desc = tensor_descriptor.TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 64, 64])
    s = aot._stand_in(desc, 3)
    assert isinstance(s.base, aot._Pointer) and s.base.dtype == torch.float16
    assert s.base.data_ptr() == aot.ALLOC_ALIGN * (1 + 4096 * 3)
    assert (s.shape, s.strides, s.block_shape) == ([2, 100, 64], [6400, 64, 1], [1, 64, 64])
    p = aot._stand_in(t[:, 1:], 2)
    assert isinstance(p, aot._Pointer) and p.data_ptr() == aot.ALLOC_ALIGN * (1 + 4096 * 2) + 64 * 2
    assert aot._stand_in(7, 0) == 7 and aot._stand_in(None, 1) is None


def test_parse_ptxas_log():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Function properties for helper
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Compiling entry function 'kernel' for 'sm_90a'
ptxas info    : Function properties for kernel
    0 bytes stack frame, 16 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 400 bytes cmem[0]
ptxas info    : Used 12 registers
"""
    assert aot.parse_ptxas_log(log) == {"registers": 40, "spill_stores": 24, "spill_loads": 20}
    assert aot.parse_ptxas_log("") == {"registers": 0, "spill_stores": 0, "spill_loads": 0}


WGMMA = "\twgmma.mma_async.sync.aligned.m64n{n}k16.f32.f16.f16 {{%r1}}, %rd1, %rd2, 0, 1, 1, 0, 0;\n"
MMA = "\t@%p3 mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
DOT = "%{n} = tt.dot %a, %b, %c, inputPrecision = tf32 : tensor<{m}x{k}xf16> * tensor<{k}x{nn}xf16> -> tensor<x>\n"


def test_ptx_features():
    ptx = WGMMA.format(n=64) * 8 + WGMMA.format(n=16) + "\tcp.async.cg.shared.global [%r1], [%rd1], 16;\n"
    assert aot.ptx_features(ptx) == {"mma": {("wgmma", "m64n64k16"): 8, ("wgmma", "m64n16k16"): 1},
                                     "tma": False, "cp_async": True}
    tma = MMA * 2 + "\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1];\n"
    assert aot.ptx_features(tma) == {"mma": {("mma.sync", "m16n8k16"): 2}, "tma": True, "cp_async": True}
    assert aot.ptx_features("\tld.global.v4.b32 {%r1}, [%rd1];\n") == {"mma": {}, "tma": False, "cp_async": False}


def test_work_ratio():
    # attention's forward at BLOCK_M=128, BLOCK_N=64, D=64: two dots of 128x64x64 = 2**20 multiply-adds
    ttir = DOT.format(n=1, m=128, k=64, nn=64) + DOT.format(n=2, m=128, k=64, nn=64)
    # 8 warps = 2 warp groups, each issuing 8 wgmma m64n64k16 (its 64 rows): no duplicated work
    assert aot.work_ratio({("wgmma", "m64n64k16"): 8}, ttir, num_warps=8) == 1.0
    # a 64-row tile on 2 warp groups: both compute the whole 64x32 score tile
    ttir64 = DOT.format(n=1, m=64, k=64, nn=32)
    assert aot.work_ratio({("wgmma", "m64n16k16"): 8}, ttir64, num_warps=8) == 2.0
    # mma.sync counts per warp: 4 warps x 16 x (16*8*16) = 131072 = 64*32*64
    assert aot.work_ratio({("mma.sync", "m16n8k16"): 16}, ttir64, num_warps=4) == 1.0
    assert aot.work_ratio({}, ttir64, num_warps=4) is None


def _launched_kernels(module) -> set[str]:
    """The module's @triton.jit entry points (compiled or interpreted): those that read
    tl.program_id (helpers such as attention's ``_tile`` do not)."""
    import inspect
    return {name for name, v in vars(module).items()
            if type(v).__module__.startswith("triton.") and callable(getattr(v, "fn", None))
            and "program_id" in inspect.getsource(v.fn)}


@pytest.fixture(scope="module")
def build_json():
    from click.testing import CliRunner

    from cli import main
    r = CliRunner().invoke(main, ["build", "--json"])
    assert r.exit_code == 0, r.output[-3000:]
    return json.loads(r.stdout)


@pytest.mark.slow
def test_build_has_no_spills_on_any_generated_kernel(build_json):
    modules = {f"generated.{name}" for name in builtin_ops()}
    built = {(s["module"], s["kernel"], s["arch"]) for s in build_json}
    for name in modules:
        kernels = _launched_kernels(importlib.import_module(name))
        assert kernels, name
        for arch in (80, 90):
            assert {(name, k, arch) for k in kernels} <= built, (name, arch)
        cases = importlib.import_module(name).AOT_CASES
        dtypes = {d for c in cases for d in c["dtypes"]}
        assert {"float16", "bfloat16", "float32", "float64"} <= dtypes, name
    spilled = [(s["kernel"], s["arch"], s["case"], s["spill_stores"], s["spill_loads"]) for s in build_json
               if s["spill_stores"] or s["spill_loads"]]
    assert spilled == []
    assert all(0 < s["registers"] <= 255 for s in build_json)


@pytest.mark.slow
def test_build_compiles_what_the_jit_specialises(build_json):
    fwd = {(s["arch"]): s for s in build_json
           if s["kernel"] == "_attention_fwd" and s["case"] == "fp16 B=4 H=16 N=4096 D=64"}
    for arch, s in fwd.items():
        # contiguous q, k, v: unit strides are constants, N and the row strides divisible by 16
        hints = s["specialization"].split()
        assert {"Q_sd=1", "K_sd=1", "V_se=1", "n_i:D", "n_j:D", "Q_ptr:D"} <= set(hints), hints
        assert s["cp_async"], s
    assert fwd[90]["mma"].startswith("wgmma") and fwd[80]["mma"] == "mma.sync m16n8k16"
    assert fwd[90]["work"] == 1.0


@pytest.mark.slow
def test_sm90_attention_runs_tma_and_wgmma_sm80_pointers(build_json):
    """Issue 10's bar for attention on Hopper, as the JIT would build it for contiguous
    fp16/bf16 inputs at D = 64 and 128, causal or not: every forward, dK/dV and dQ kernel
    loads through tensor descriptors (TMA), every MMA a wgmma (N >= 64 forward, >= 32
    backward) with no duplicated work.  sm_80 builds, and fp32/fp64 anywhere, stay on pointers."""
    att = [s for s in build_json if s["module"] == "generated.attention" and "_bwd_delta" not in s["kernel"]]
    hopper = [s for s in att if s["arch"] == 90 and s["case"].split()[0] in ("fp16", "bf16")
              and re.search(r"\bD=(64|128)\b", s["case"])]
    # fwd, dK/dV, dQ x fp16, bf16 x D=64 (full, causal), D=128 (full, causal, grouped)
    assert len(hopper) == 3 * 2 * 5, [(s["kernel"], s["case"]) for s in hopper]
    for s in hopper:
        where = (s["kernel"], s["case"], s["mma"])
        assert s["tma"] and "Q_desc:TMA" in s["specialization"].split(), where
        kinds = s["mma"].split(" + ")
        assert kinds and all(k.startswith("wgmma m64n") for k in kinds), where
        narrowest = min(int(re.search(r"m64n(\d+)k", k).group(1)) for k in kinds)
        assert narrowest >= (64 if s["kernel"].endswith("_fwd") else 32), where
        assert s["work"] == 1.0, where
    assert not [s["kernel"] for s in att if s["arch"] == 80 and s["tma"]]
    assert not [s["kernel"] for s in att if s["case"].split()[0] in ("fp32", "fp64") and s["tma"]]
