"""`pullback tune`: the choice (candidates + timer -> table), the table file, and the
runtime's selection from a table (no GPU: small tables and architectures passed in)."""
import ast
import json
import math

import pytest
import torch

import generated._runtime as rt
from derive import tune

SM90 = "sm_90"


# ---- the choice ---------------------------------------------------------------------------
def _case(key="k", family="rowwise"):
    return tune.Case(family, key)


def test_choose_keeps_the_fastest_candidate_per_case():
    cases = [_case("a"), _case("b", "attention")]
    cands = {"a": [{"num_warps": 4}, {"num_warps": 8}, {"num_warps": 2}],
             "b": [{"BLOCK_M": 64}, {"BLOCK_M": 128}]}
    times = {("a", 4): 3.0, ("a", 8): 1.5, ("a", 2): 2.0, ("b", 64): 0.7, ("b", 128): 0.9}
    seen = []

    def timer(case, cfg):
        seen.append((case.key, dict(cfg)))
        return times[(case.key, next(iter(cfg.values())))]
    table = tune.choose(cases, lambda c: cands[c.key], timer)
    assert table == {"rowwise": {"a": {"num_warps": 8}}, "attention": {"b": {"BLOCK_M": 64}}}
    assert len(seen) == 5  # every candidate timed once


def test_choose_skips_failures_and_nan_and_keeps_the_first_of_a_tie():
    def timer(case, cfg):
        if cfg["num_warps"] == 1:
            raise RuntimeError("out of resources: shared memory")
        return {2: math.nan, 4: 1.0, 8: 1.0, 16: math.inf}[cfg["num_warps"]]
    cands = [{"num_warps": w} for w in (1, 2, 4, 8, 16)]
    assert tune.choose([_case()], lambda c: cands, timer) == {"rowwise": {"k": {"num_warps": 4}}, "attention": {}}
    # a case none of whose candidates runs is left out: the runtime keeps its default
    assert tune.choose([_case()], lambda c: cands[:2], timer) == {"rowwise": {}, "attention": {}}


def test_every_candidate_is_an_entry_the_runtime_accepts():
    for case in tune.cases(dtypes=("float16", "bfloat16", "float32", "float64"), widths=(64, 128, 256)):
        fields = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if case.family == "attention" else \
            (("num_warps",) if case.width else ("BLOCK", "num_warps"))
        cands = tune.candidates(case)
        assert cands, case
        for cfg in cands:
            table = {case.family: {SM90: {case.key: cfg}}}
            assert rt.tuned(case.family, SM90, case.key, fields, table) == cfg, (case, cfg)


def test_tuned_keys_are_the_keys_the_runtime_looks_up():
    """A table written from tune's cases changes exactly the configs the runtime chooses for them."""
    for case in tune.cases(dtypes=("float16", "float32")):
        dtype = getattr(torch, case.dtype)
        if case.family == "attention":
            cfg = dict(BLOCK_M=16, BLOCK_N=256, num_warps=2, num_stages=5)
            got = rt.attention_config(case.width, case.width, dtype, case.kernel, case.causal,
                                      table={"attention": {SM90: {case.key: cfg}}}, arch=SM90)
            assert (got["BLOCK_M"], got["BLOCK_N"], got["num_warps"], got["num_stages"]) == (16, 256, 2, 5)
            other = rt.attention_config(case.width, case.width, dtype, case.kernel, not case.causal,
                                        table={"attention": {SM90: {case.key: cfg}}}, arch=SM90)
            assert other["BLOCK_N"] != 256  # the causal flag is part of the key
        elif case.width:
            got = rt.block_config(case.width, dtype, table={"rowwise": {SM90: {case.key: {"num_warps": 32}}}},
                                  arch=SM90)
            assert got == dict(BLOCK=case.width, SINGLE=True, num_warps=32)
        else:
            got = rt.block_config(10**6, dtype, table={"rowwise": {SM90: {case.key: {"BLOCK": 64, "num_warps": 2}}}},
                                  arch=SM90)
            assert got == dict(BLOCK=64, SINGLE=False, num_warps=2)


# ---- the runtime's selection --------------------------------------------------------------
def test_block_config_uses_the_entry_for_its_architecture_only():
    table = {"rowwise": {SM90: {"float16:1024": {"num_warps": 2}, "float16:loop": {"BLOCK": 2048, "num_warps": 8}}}}
    assert rt.block_config(1000, torch.float16, table=table, arch=SM90) == dict(BLOCK=1024, SINGLE=True, num_warps=2)
    assert rt.block_config(10**5, torch.float16, table=table, arch=SM90) == dict(BLOCK=2048, SINGLE=False,
                                                                                num_warps=8)
    # another architecture, dtype or block size: the defaults
    assert rt.block_config(1000, torch.float16, table=table, arch="sm_80") == dict(BLOCK=1024, SINGLE=True,
                                                                                  num_warps=4)
    assert rt.block_config(1000, torch.bfloat16, table=table, arch=SM90)["num_warps"] == 4
    assert rt.block_config(3000, torch.float16, table=table, arch=SM90) == dict(BLOCK=4096, SINGLE=True,
                                                                               num_warps=8)
    assert rt.block_config(10**5, torch.float16, table=table, arch="sm_80") == dict(BLOCK=1024, SINGLE=False,
                                                                                   num_warps=4)
    # no architecture (the CPU, the interpreter): the table is not read
    assert rt.block_config(1000, torch.float16, table=table) == dict(BLOCK=1024, SINGLE=True, num_warps=4)


@pytest.mark.parametrize("entry", [
    {"num_warps": 3},                      # not a power of two
    {"num_warps": True},                   # a bool is not a count
    {"num_warps": 4, "BLOCK": 1024},       # a field the key does not take
    {},                                    # a field missing
    "4",                                   # not an object
])
def test_a_malformed_entry_falls_back_to_the_default(entry):
    table = {"rowwise": {SM90: {"float16:1024": entry}}}
    assert rt.block_config(1000, torch.float16, table=table, arch=SM90) == dict(BLOCK=1024, SINGLE=True, num_warps=4)


def test_a_looped_entry_wider_than_the_row_limit_is_ignored():
    table = {"rowwise": {SM90: {"float64:loop": {"BLOCK": 2**20, "num_warps": 4}}}}
    default = rt.block_config(10**6, torch.float64, table={}, arch=SM90)
    assert default == dict(BLOCK=rt.LOOP_BLOCK // 8, SINGLE=False, num_warps=4)
    assert rt.block_config(10**6, torch.float64, table=table, arch=SM90) == default


def test_attention_config_reads_the_entry_else_the_structural_defaults():
    key = rt.attention_key("dkdv", torch.bfloat16, 128, True)
    assert key == "dkdv:bfloat16:d128:causal"
    table = {"attention": {SM90: {key: {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}}}}
    got = rt.attention_config(100, 128, torch.bfloat16, "dkdv", True, table=table, arch=SM90)
    assert got == dict(BLOCK_M=128, BLOCK_N=32, BLOCK_D=128, BLOCK_E=128, num_warps=4, num_stages=2)
    m, n, w, st = rt.ARCH_ATTENTION_TILES[SM90]["dkdv"][128]  # the architecture's own entry, with stages
    assert (m, n, w, st) == (32, 128, 8, 2)
    assert rt.attention_config(100, 128, torch.bfloat16, "dkdv", False, table=table, arch=SM90) == \
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=128, BLOCK_E=128, num_warps=w, num_stages=st)
    m, n, w = rt.ATTENTION_TILES["dkdv"][128]  # the others' (sm_80: 128 keys x 32 queries spill)
    assert (m, n, w) != (32, 128, 8)
    assert rt.attention_config(100, 128, torch.bfloat16, "dkdv", True, table=table, arch="sm_80") == \
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=128, BLOCK_E=128, num_warps=w)
    m, n, w = rt.WIDE_ATTENTION_TILES["fwd"][64]
    assert rt.attention_config(64, 64, torch.float32, "fwd", False, table=table, arch="sm_80") == \
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_D=64, BLOCK_E=64, num_warps=w, num_stages=rt.WIDE_DTYPE_STAGES)


def test_the_cpu_has_no_architecture():
    assert rt.device_arch(None) is None and rt.device_arch(torch.device("cpu")) is None


# ---- the table file -----------------------------------------------------------------------
def test_the_committed_table_is_what_the_package_carries():
    text = tune.TABLE.read_text()
    table = tune.read_table(tune.TABLE)
    assert ast.literal_eval(text) == json.loads(text) == table  # a Python literal as well as JSON
    assert rt.TUNED_CONFIGS == table
    assert tune.table_text(table) == text  # the writer's form


def test_merge_replaces_one_architecture_and_keeps_the_others():
    old = tune.merge(tune.empty_table(), "sm_80", {"rowwise": {"float16:loop": {"BLOCK": 512, "num_warps": 4}}},
                     "A100, torch 2.13")
    new = tune.merge(old, SM90, {"attention": {"fwd:float16:d64:full": {"BLOCK_M": 128, "BLOCK_N": 64,
                                                                          "num_warps": 8, "num_stages": 3}}},
                     "H100 80GB HBM3, torch 2.13.0+cu128, triton 3.9.0")
    assert new["rowwise"] == {"sm_80": {"float16:loop": {"BLOCK": 512, "num_warps": 4}}}
    assert list(new["attention"]) == [SM90]
    assert new["measured"] == {"sm_80": "A100, torch 2.13", SM90: "H100 80GB HBM3, torch 2.13.0+cu128, triton 3.9.0"}
    assert old["attention"] == {}  # merge copies
    text = tune.table_text(new)
    assert ast.literal_eval(text) == new and tune.table_text(json.loads(text)) == text


@pytest.mark.parametrize("table,message", [
    ({"format": 2}, 'expected an object with "format": 1'),
    ({**tune.empty_table(), "extra": {}}, "unknown section(s) extra"),
    ({**tune.empty_table(), "rowwise": {"sm_90": {"k": {"num_warps": True}}}},
     "/rowwise/sm_90/k/num_warps is bool; expected int, text or object"),
    ({**tune.empty_table(), "measured": {"sm_90": "{{ x }}"}}, "bad text '{{ x }}' at /measured/sm_90"),
    ({**tune.empty_table(), "rowwise": {'a"b': {}}}, "bad key 'a\"b' at /rowwise"),
])
def test_check_table_says_what_is_wrong(table, message):
    with pytest.raises(tune.TuneError) as e:
        tune.check_table(table)
    assert message in str(e.value)


def test_read_table_reports_bad_json(tmp_path):
    p = tmp_path / "t.json"
    p.write_text("{\n 'format': 1}")
    with pytest.raises(tune.TuneError, match=r"t.json: not JSON \(.* at line 2\)"):
        tune.read_table(p)


def test_tune_without_a_gpu_is_one_error_line(run, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = run("tune", "--out", str(tmp_path / "t.json"))
    assert r.exit_code == 1
    assert r.output == f"Error: {tune.NO_GPU}\n"
    assert "needs a CUDA device" in r.output and not (tmp_path / "t.json").exists()


def test_device_arch_asks_the_device_each_time(monkeypatch):
    """A CUDA device's architecture as torch reports it, not cached: `pullback build`
    pretends to be sm_80, then sm_90, in one process."""
    monkeypatch.setattr(rt, "INTERPRET", False)
    for cap, arch in [((9, 0), "sm_90"), ((8, 0), "sm_80"), ((12, 0), "sm_120")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cap=cap: cap)
        assert rt.device_arch(torch.device("cuda", 0)) == arch
    assert rt.device_arch(torch.device("cpu")) is None
