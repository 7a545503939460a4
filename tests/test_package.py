"""Packages on disk: all-or-nothing writes, recovery after a killed run, merged
``__init__``, orphans, escaping of user text, and op names that cannot name a module."""
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from derive import builtin_ops, emit as E
from derive.spec import SpecError

from spec_errors import col

REPO = Path(__file__).resolve().parent.parent
LSE = "op {name}(X[r, c]) -> Y[r]\nM[r] = max[c](X)\nS[r] = sum[c](exp(X - M))\nY[r] = M + log(S)\n"


def snapshot(root: Path) -> dict[str, bytes]:
    """Every entry of ``root`` (hidden ones too) with its bytes; directories as None."""
    return {p.name: (p.read_bytes() if p.is_file() else None) for p in root.iterdir() if p.name != "__pycache__"}


def import_fresh(tmp_path, monkeypatch, module: str):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    return importlib.import_module(module)


# ---- all or nothing -----------------------------------------------------------------------
def test_a_failure_while_staging_leaves_the_package_unchanged(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    E.emit("max", pkg)
    before = snapshot(pkg)
    real, calls = E._write_file, []

    def fail_second(path, data):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, data)

    monkeypatch.setattr(E, "_write_file", fail_second)
    with pytest.raises(E.PackageError, match=f"^cannot write package to {pkg}: No space left on device$"):
        E.emit("softmax", pkg)  # stages __init__.py and softmax.py
    assert calls == ["__init__.py", "softmax.py"]
    assert snapshot(pkg) == before  # nothing moved in, no staging directory left


def test_a_failure_while_moving_puts_the_old_files_back(tmp_path, monkeypatch):
    pkg = tmp_path / "pkg"
    E.emit("max", pkg)
    before = snapshot(pkg)
    real, moved = os.replace, []

    def fail_second(src, dst):
        moved.append(Path(dst).name)
        if len(moved) == 2:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(E.PackageError, match="Input/output error"):
        E.emit("softmax", pkg)
    assert moved[:2] == ["__init__.py", "softmax.py"]  # the new __init__ was in place, then put back
    assert snapshot(pkg) == before


KILL = """
import os, sys
sys.path.insert(0, {repo!r})
from derive import emit as E
real, calls = {target}, []
def killed(*args):
    calls.append(args)
    if len(calls) == {nth}:
        os._exit(9)  # like SIGKILL: no finally, no rollback
    real(*args)
{patch} = killed
E.emit("softmax", {pkg!r})
"""


def run_killed(pkg: Path, target: str, patch: str, nth: int):
    code = KILL.format(repo=str(REPO), target=target, patch=patch, nth=nth, pkg=str(pkg))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr


def test_a_run_killed_while_moving_is_finished_by_the_next(tmp_path, monkeypatch):
    pkg = tmp_path / "userops_killed_moving"
    E.emit("max", pkg)
    run_killed(pkg, "os.replace", "os.replace", nth=2)
    # the kill left a half-moved package: __init__ exports softmax, softmax.py is still staged
    staged = [p for p in pkg.iterdir() if p.name.startswith(E.STAGING_PREFIX)]
    assert len(staged) == 1 and (staged[0] / E.COMMIT).is_file() and (staged[0] / "softmax.py").is_file()
    assert not (pkg / "softmax.py").exists() and "from .softmax import softmax" in (pkg / "__init__.py").read_text()
    fm = E.emit("max", pkg)
    assert fm.cleaned == staged and fm.written == []
    assert sorted(snapshot(pkg)) == ["__init__.py", "_runtime.py", "max.py", "softmax.py"]
    mod = import_fresh(tmp_path, monkeypatch, "userops_killed_moving")
    x = torch.randn(3, 11)
    torch.testing.assert_close(mod.softmax(x, -1), torch.softmax(x, -1))
    torch.testing.assert_close(mod.max(x, -1), torch.amax(x, -1))


def test_a_run_killed_while_staging_is_cleaned_up_by_the_next(tmp_path):
    pkg = tmp_path / "pkg"
    E.emit("max", pkg)
    before = snapshot(pkg)
    run_killed(pkg, "E._write_file", "E._write_file", nth=2)
    (pkg / ".max.py.k3j2x9.tmp").write_text("a temporary of an older pullback\n")
    leftovers = sorted(set(snapshot(pkg)) - set(before))
    assert len(leftovers) == 2 and leftovers[1].startswith(E.STAGING_PREFIX)
    assert not (pkg / leftovers[1] / E.COMMIT).exists()  # killed before staging was complete
    fm = E.emit("max", pkg)  # up to date, and it removes what the killed run left
    assert fm.written == [] and sorted(p.name for p in fm.cleaned) == leftovers
    assert snapshot(pkg) == before


# ---- a package holds every op emitted into it --------------------------------------------
def test_emit_into_a_package_keeps_the_ops_already_there(tmp_path, monkeypatch):
    pkg = tmp_path / "userops_merged"
    E.emit("max", pkg)
    spec = tmp_path / "lse.op"
    spec.write_text(LSE.format(name="lse"))
    E.emit(str(spec), pkg)
    E.emit("softmax", pkg)
    (pkg / "helper.py").write_text("def helper():\n    return 1\n")  # a user's file: not an op
    E.emit("softmax", pkg)
    mod = import_fresh(tmp_path, monkeypatch, "userops_merged")
    assert mod.__all__ == ["lse", "max", "softmax"]
    x = torch.randn(4, 9, dtype=torch.float64)
    torch.testing.assert_close(mod.max(x, -1), torch.amax(x, -1))
    torch.testing.assert_close(mod.lse(x, -1), torch.logsumexp(x, -1))
    torch.testing.assert_close(mod.softmax(x, -1), torch.softmax(x, -1))


def test_emit_never_overwrites_a_users_file(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("# my package\n")
    with pytest.raises(E.PackageError, match=r"__init__.py exists and was not generated by pullback"):
        E.emit("max", pkg)
    assert snapshot(pkg) == {"__init__.py": b"# my package\n"}


def test_regen_finds_and_removes_orphans_but_never_a_users_file(tmp_path):
    E.regen(root=tmp_path)
    (tmp_path / "oldop.py").write_bytes((tmp_path / "max.py").read_bytes())  # ours, no spec makes it
    (tmp_path / "mine.py").write_text("x = 1\n")
    fm = E.regen(check=True, root=tmp_path)
    assert [(p.name, why) for p, why in fm.stale] == [("oldop.py", "orphan")]
    assert (tmp_path / "oldop.py").exists()  # check writes nothing
    fm = E.regen(root=tmp_path)
    assert [p.name for p in fm.removed] == ["oldop.py"] and fm.written == []
    assert sorted(snapshot(tmp_path)) == sorted(["__init__.py", "_runtime.py", "mine.py"] +
                                                [f"{op}.py" for op in builtin_ops()])


# ---- user text in generated code ---------------------------------------------------------
def test_the_escaping_filters():
    assert E.comment_text("derive/ops/max.op") == "derive/ops/max.op"
    assert E.comment_text("a\nb\r\tc\\d\x00\u2028\u202e\udcff") == "a\\nb\\r\\tc\\\\d\\x00\\u2028\\u202e\\udcff"
    assert E.docstring_text('a"""b\\N{x}') == 'a\\"\\"\\"b\\\\\\\\N{x}'
    for text in ['x"""', 'x"', "x\\", "x\\N{bad}", "x\n'''"]:
        source = f'"""{E.docstring_text(text)}"""'
        assert eval(compile(source, "<doc>", "eval")) == E.visible(text)


EVIL = {  # spec file name -> what a pasted, unescaped name runs at import
    "comment": "evil\nraise RuntimeError(7)\n#.op",
    "docstring": 'a""" if exec("raise RuntimeError(7)") else """b.op',
}


@pytest.mark.parametrize("case", sorted(EVIL))
def test_a_spec_file_name_never_runs_as_code(tmp_path, monkeypatch, case):
    spec = tmp_path / EVIL[case]
    spec.write_text(LSE.format(name=f"lse_{case}"))
    E.emit(str(spec), tmp_path / f"userops_evil_{case}")
    mod = import_fresh(tmp_path, monkeypatch, f"userops_evil_{case}.lse_{case}")  # runs nothing
    assert E.visible(spec) in mod.__doc__
    first = (tmp_path / f"userops_evil_{case}" / f"lse_{case}.py").read_text().splitlines()[0]
    assert first == f"# @generated by pullback from {E.visible(spec)} -- do not edit."
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(getattr(mod, f"lse_{case}")(x, -1), torch.logsumexp(x, -1))

    # the same emit without the filters does run the file name: the test above can fail
    monkeypatch.setattr(E, "comment_text", str)
    monkeypatch.setattr(E, "docstring_text", str)
    E.emit(str(spec), tmp_path / f"userops_raw_{case}")
    with pytest.raises(RuntimeError, match="7"):
        import_fresh(tmp_path, monkeypatch, f"userops_raw_{case}.lse_{case}")


# ---- op names ------------------------------------------------------------------------------
@pytest.mark.parametrize("name,message", [
    ("_runtime", "the op name '_runtime' starts with '_'; such names are kept for the package's own files "
                 "(__init__.py, _runtime.py)"),
    ("__init__", "the op name '__init__' starts with '_'; such names are kept for the package's own files "
                 "(__init__.py, _runtime.py)"),
    ("class", "the op name 'class' is not usable as a Python module name"),
    ("n" * 65, f"the op name '{'n' * 40}...' is 65 characters long; at most 64 are allowed"),
    ("n" * 5000, f"the op name '{'n' * 40}...' is 5000 characters long; at most 64 are allowed"),
], ids=["_runtime", "__init__", "keyword", "65_chars", "5000_chars"])
def test_an_op_name_that_cannot_name_a_module_is_a_spec_error(tmp_path, name, message):
    header = f"  op {name}(X[r, c]) -> Y[r]"
    spec = tmp_path / "named.op"
    spec.write_text(f"# an op\n{header}\nY[r] = sum[c](X)\n")
    with pytest.raises(SpecError) as info:
        E.emit(str(spec), tmp_path / "pkg")
    e = info.value
    assert (e.file, e.line, e.col) == (str(spec), 2, col(header, name))
    assert e.message == message
    assert not (tmp_path / "pkg").exists()


def test_the_longest_op_name_emits(tmp_path, monkeypatch):
    name = "n" * E.MAX_OP_NAME
    spec = tmp_path / "long.op"
    spec.write_text(f"op {name}(X[r, c]) -> Y[r]\nY[r] = sum[c](X)\n")
    E.emit(str(spec), tmp_path / "userops_long")
    mod = import_fresh(tmp_path, monkeypatch, "userops_long")
    x = torch.randn(2, 7)
    torch.testing.assert_close(getattr(mod, name)(x, -1), x.sum(-1))


@pytest.mark.parametrize("name", ["torch", "tl", "rt", "AOT_CONFIGS", "OP", "META"])
def test_an_op_named_like_its_modules_own_globals_works(tmp_path, monkeypatch, name):
    """An op named like one of its module's own globals gets a renamed function
    there (``torch_1``), exported under its own name by the package."""
    import importlib
    import torch
    spec = tmp_path / f"{name}.op"
    spec.write_text(f"op {name}(X[r, c]) -> Y[r]\nY[r] = sum[c](X)\n")
    E.emit(str(spec), tmp_path / f"pkg_{name.lower()}")
    monkeypatch.syspath_prepend(str(tmp_path))
    pkg = importlib.import_module(f"pkg_{name.lower()}")
    x = torch.randn(2, 7)
    torch.testing.assert_close(getattr(pkg, name)(x, -1), x.sum(-1))


# ---- every template escapes what it places in comments and docstrings ---------------------
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")


def unescaped(text: str) -> list[str]:
    """``{{ ... }}`` placeholders in a template that land in a ``#`` comment or a
    docstring without the ``comment`` / ``docstring`` filter, as "line: placeholder"."""
    text = re.sub(r"\{#.*?#\}", lambda m: "\n" * m.group().count("\n"), text, flags=re.S)  # Jinja comments
    bad, in_doc = [], False
    for n, line in enumerate(text.split("\n"), 1):
        for k, part in enumerate(line.split('"""')):
            in_doc = in_doc != (k > 0)
            if in_doc:
                filt, seg = "docstring", part
            else:
                m = re.search(r"(^|\s)#(\s|$)", part)
                filt, seg = "comment", (part[m.start():] if m else "")
            bad += [f"{n}: {{{{{ph}}}}} needs | {filt}" for ph in _PLACEHOLDER.findall(seg)
                    if not re.search(rf"\|\s*{filt}\s*$", ph) and ph.strip() != "loop.index"]
    return bad


def test_the_template_check_finds_unescaped_text():
    template = ('{{ header }}\n"""{{ p.name }}: kernels.\n\nForward ({{ spec_path | docstring }}):\n"""\n'
                'x = {{ v.code }}  # {{ v.comment }}\ny = 1  # {{ v.doc | comment }}\n{# {{ jinja }} #}\n')
    assert unescaped(template) == ["2: {{ p.name }} needs | docstring", "6: {{ v.comment }} needs | comment"]


@pytest.mark.parametrize("template", sorted(p.name for p in (REPO / "templates").glob("*.j2")))
def test_every_template_escapes_user_text(template):
    assert unescaped((REPO / "templates" / template).read_text()) == []
