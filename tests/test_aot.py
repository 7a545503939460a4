"""Ahead-of-time compilation for real GPUs with no GPU present (derive/aot.py).

The fast tests build the tiny kernel in tests/aot_fixture_kernels.py in a child
process (the test session may run with triton's interpreter on) and check the
error paths.  The slow test compiles, for sm_90, not only the default configs
that `pullback build` prints but the variants the launchers choose at run time
(fp16/bf16/fp64 pointers, three strided column groups, 64-bit offsets, fp32/fp64
attention with the causal mask)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from derive import aot

REPO = Path(__file__).resolve().parent.parent
FIXTURE = "tests.aot_fixture_kernels"


@pytest.fixture(scope="module")
def fixture_stats():
    return aot.run_in_subprocess([FIXTURE], archs=(80, 90))


def test_fixture_builds_for_sm80_and_sm90(fixture_stats):
    assert [(s.module, s.kernel, s.arch) for s in fixture_stats] == [
        (FIXTURE, "_row_normalize", 80), (FIXTURE, "_row_normalize", 90)]
    for s in fixture_stats:
        assert 0 < s.registers <= 255, s
        assert s.spill_stores == 0 and s.spill_loads == 0, s
        assert s.shared_bytes >= 0
        assert s.config == "BLOCK=1024, warps=4"


def test_progress_goes_to_stderr(capfd):
    aot.run_in_subprocess([FIXTURE], archs=(90,))
    out, err = capfd.readouterr()
    assert f"compiling {FIXTURE}._row_normalize (BLOCK=1024, warps=4) for sm_90 ..." in err
    assert out == ""


def test_format_table(fixture_stats):
    table = aot.format_table(fixture_stats)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["kernel", "arch", "config"]
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["aot_fixture_kernels._row_normalize"] * 2
    assert [r[1] for r in rows] == ["sm_80", "sm_90"]
    assert all(r[-2] == "0/0" and int(r[-3]) > 0 for r in rows)
    assert len({len(line) for line in lines}) == 1  # aligned


def _bad_module(tmp_path, monkeypatch, body):
    (tmp_path / "aot_bad_fixture.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return "aot_bad_fixture"


def test_unknown_kernel_is_a_clear_error(tmp_path, monkeypatch):
    name = _bad_module(tmp_path, monkeypatch, "from tests.aot_fixture_kernels import _row_normalize\n"
                       "AOT_CONFIGS = [{'kernel': '_no_such_kernel', 'signature': {}, 'constexprs': {}}]\n")
    with pytest.raises(aot.AotError, match=r"aot_bad_fixture has no kernel '_no_such_kernel'"):
        aot.run_in_subprocess([name], archs=(90,))


def test_signature_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    name = _bad_module(tmp_path, monkeypatch, "from tests.aot_fixture_kernels import _row_normalize\n"
                       "AOT_CONFIGS = [{'kernel': '_row_normalize', 'signature': {'X_ptr': '*fp16'}, "
                       "'constexprs': {'BLOCK': 64, 'WIDTH': 2}}]\n")
    with pytest.raises(aot.AotError, match=r"aot_bad_fixture\._row_normalize .*unknown: WIDTH; "
                                           r"missing from signature: Y_ptr, stride, n_cols, ACC, BLOCK"):
        aot.run_in_subprocess([name], archs=(90,))


def test_missing_module_is_a_clear_error():
    with pytest.raises(aot.AotError, match="cannot import tests.no_such_module"):
        aot.run_in_subprocess(["tests.no_such_module"], archs=(90,))


def test_build_in_process_refuses_interpreter_functions():
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the interpreter is off in this session")
    with pytest.raises(aot.AotError, match="_row_normalize is not a compiled-mode @triton.jit function"):
        aot.build_module(FIXTURE, archs=(90,))


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


SCRIPT = r'''
import copy, importlib, json, sys
from derive import aot
out = []
def variant(module, kernel, label, sig_subs, const_updates, pick=lambda c: True):
    m = importlib.import_module(module)
    cfg = next(c for c in m.AOT_CONFIGS if c["kernel"] == kernel and pick(c))
    c = copy.deepcopy(cfg)
    c["signature"] = {k: sig_subs.get(v, v) for k, v in c["signature"].items()}
    c["constexprs"].update(const_updates)
    try:
        ptx, _ = aot.compile_kernel(getattr(m, kernel), c["signature"], c["constexprs"], 90, c["num_warps"])
        out.append({"label": label, "ok": True, **aot.ptxas_stats(ptx, 90)})
    except Exception as e:
        out.append({"label": label, "ok": False, "error": str(e)[:500]})
variant("generated.softmax", "_softmax_fwd", "softmax fwd fp16 RG=3 IDX64 looped", {"*fp32": "*fp16"},
        {"RG": 3, "IDX64": True, "SINGLE": False})
variant("generated.softmax", "_softmax_bwd", "softmax bwd fp64", {"*fp32": "*fp64"}, {"ACC": "tl.float64"})
variant("generated.max", "_max_fwd", "max fwd bf16 RG=2", {"*fp32": "*bf16"}, {"RG": 2})
variant("generated.max", "_max_bwd", "max bwd fp16 IDX64 looped", {"*fp32": "*fp16"}, {"IDX64": True, "SINGLE": False})
variant("generated.attention", "_attention_fwd", "attention fwd fp32 causal", {"*fp16": "*fp32"},
        {"CAUSAL": True, "PREC": "ieee", "BLOCK_M": 64, "BLOCK_N": 32}, lambda c: "fp16, D=64" == c["label"])
variant("generated.attention", "_attention_bwd_dq", "attention dq fp64 causal", {"*fp16": "*fp64", "*fp32": "*fp64"},
        {"CAUSAL": True, "PREC": "ieee", "ACC": "tl.float64", "BLOCK_M": 32, "BLOCK_N": 32},
        lambda c: "fp16, D=64" == c["label"])
print(json.dumps(out))
'''


@pytest.mark.slow
def test_runtime_variants_compile_for_sm90():
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1", PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(results) == 6
    for res in results:
        assert res["ok"], res
        assert 0 < res["registers"] <= 255, res
