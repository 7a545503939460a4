"""The command line: each command with its exit code and output."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from derive import builtin_ops

import cli




def test_list(run):
    r = run("list")
    assert r.exit_code == 0
    assert "softmax(A[s2, s1]) -> B[s2, s1]" in r.output
    assert "max(A[s2, s1]) -> B[s2]" in r.output


def test_derive_text_shows_the_seed_results(run):
    r = run("derive", "softmax")
    assert r.exit_code == 0
    assert "dM[s2]" in r.output and "= 0    # the max-shift M contributes no gradient" in r.output
    assert "dA[s2, s1'] = " in r.output
    assert "(-sum[s1](B[s2, s1]*dB[s2, s1]) + dB[s2, s1'])*B[s2, s1']" in r.output


@pytest.mark.parametrize("fmt,needle", [("markdown", "| `dM[s2]` |"), ("latex", r"\begin{align*}")])
def test_derive_formats(run, fmt, needle):
    r = run("derive", "max", "--format", fmt) if fmt != "markdown" else run("derive", "softmax", "--format", fmt)
    assert r.exit_code == 0
    assert needle in r.output


def test_derive_unknown_op(run):
    r = run("derive", "nosuchop")
    assert r.exit_code == 1
    assert f"unknown op 'nosuchop'; built-in ops: {', '.join(builtin_ops())}; or give the path" in r.output


def test_derive_bad_spec_names_file_line_col(run, tmp_path):
    spec = tmp_path / "bad.op"
    spec.write_text("op f(A[i, j]) -> B[i]\nB[i] = sum[j](foo(A))\n")
    r = run("derive", str(spec))
    assert r.exit_code == 1
    assert f"{spec}:2:15: unknown function 'foo'" in r.output


def test_derive_missing_file(run, tmp_path):
    r = run("derive", str(tmp_path / "missing.op"))
    assert r.exit_code == 1
    assert "no spec file" in r.output


def test_emit_to_directory(run, tmp_path):
    r = run("emit", "softmax", "-o", str(tmp_path))
    assert r.exit_code == 0
    assert (tmp_path / "softmax.py").is_file() and (tmp_path / "_runtime.py").is_file()
    assert (tmp_path / "softmax.py").read_text() == (Path(cli.__file__).parent / "generated/softmax.py").read_text()
    r = run("emit", "softmax", "-o", str(tmp_path))
    assert "up to date" in r.output


def test_regen_check_on_the_repo(run):
    r = run("regen", "--check")
    assert r.exit_code == 0
    assert "generated/ is up to date" in r.output


def test_regen_check_fails_on_stale(run, monkeypatch, tmp_path):
    from derive import emit
    real = emit.regen
    monkeypatch.setattr(emit, "regen", lambda check=False, progress=None: real(check=check, root=tmp_path,
                                                                               progress=progress))
    r = run("regen", "--check")
    assert r.exit_code == 1
    assert "missing: " in r.output and "softmax.py" in r.output
    assert "run `pullback regen`" in r.output


def test_build_reports_a_module_without_configs():
    from derive import aot
    with pytest.raises(aot.AotError, match="derive.spec has no AOT_CASES list"):
        aot.run_in_subprocess(["derive.spec"], archs=(90,))


def test_bench_quick_counts_bytes_on_the_cpu(run):
    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU, bench times kernels instead")
    r = run("bench", "--quick", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if " float32 " in line]
    from derive.bench import rowwise_ops
    ops = rowwise_ops()
    assert [row[0] for row in rows] == [op for op in ops for _ in range(2)] + ["attention", "attention"]
    # a row that fits one block moves exactly the ideal bytes, forward and backward, for every row-wise op
    assert [row[-2] for row in rows[:-2]] == ["1.00"] * (2 * len(ops))  # (the last column: programs)


# ---- errors: one line for what the user can fix, a bug report hint for the rest ---------------
def _invoke(*args):
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


def test_spec_not_utf8_is_one_error_line(tmp_path):
    spec = tmp_path / "latin.op"
    spec.write_bytes(b"op f(A[i]) -> B[i]\nB = A  # caf\xe9\n")
    r = _invoke("derive", str(spec))
    assert r.exit_code == 1
    assert r.output == f"Error: {spec}:2:13: the spec is not UTF-8 text: byte 0xe9 cannot be decoded\n"


def test_spec_past_a_limit_is_one_error_line(tmp_path):
    spec = tmp_path / "deep.op"
    spec.write_text("op f(X[r, c]) -> Y[r, c]\nY = " + "exp(" * 150 + "X" + ")" * 150 + "\n")
    r = _invoke("derive", str(spec))
    assert r.exit_code == 1
    assert r.output.startswith(f"Error: {spec}:2:136: the right-hand side of Y nests too deeply")
    assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_unreadable_path_is_one_error_line(tmp_path):
    (tmp_path / "dir.op").mkdir()
    r = _invoke("derive", str(tmp_path / "dir.op"))
    assert r.exit_code == 1
    assert r.output == f"Error: no spec file '{tmp_path / 'dir.op'}'\n"


@pytest.mark.parametrize("exc", [RuntimeError("boom\nsecond line"), KeyError("A"), RecursionError("too deep")])
def test_an_internal_error_asks_for_a_bug_report(monkeypatch, exc):
    def broken(name):
        raise exc

    monkeypatch.setattr(cli, "derive", broken)
    r = _invoke("derive", "softmax")
    assert r.exit_code == cli.EXIT_INTERNAL == 70
    name = type(exc).__name__
    text = {"RuntimeError": "boom second line", "KeyError": "'A'", "RecursionError": "too deep"}[name]
    assert r.output == (f"Error: internal error: {name}: {text} (this is a bug in pullback; rerun with --debug "
                        f"for the traceback and report it)\n")
    assert "Traceback" not in r.output


def test_debug_shows_the_traceback(monkeypatch):
    def broken(name):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "derive", broken)
    with pytest.raises(RuntimeError, match="boom"):
        _invoke("--debug", "derive", "softmax")
    r = CliRunner().invoke(cli.main, ["--debug", "derive", "softmax"])  # as the console shows it
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)


def test_debug_leaves_expected_errors_one_line(tmp_path):
    r = _invoke("--debug", "derive", "nosuchop")
    assert r.exit_code == 1
    assert r.output.startswith("Error: unknown op 'nosuchop'") and r.output.count("\n") == 1


def test_bench_json_is_the_table_as_data(run):
    import json

    import torch
    if torch.cuda.is_available():
        pytest.skip("on a GPU, bench times kernels instead")
    r = run("bench", "--quick", "--json", "--dtype", "float32")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output[r.output.index("["):])
    softmax = [row for row in rows if row["op"] == "softmax"]
    assert [row["direction"] for row in softmax] == ["forward", "backward"]
    assert all(row["ratio"] == 1.0 and row["loaded"] > 0 for row in softmax)
