"""Ahead-of-time compilation of the generated kernels for real GPUs (no GPU
needed): not only the default configs that `pullback build` prints, but the
variants the launchers choose at run time (fp16/bf16/fp64 pointers, three
strided column groups, 64-bit offsets, fp32/fp64 attention with the causal mask)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

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
