"""Hygiene by construction: a user's name never changes what a kernel computes.

Every identifier the templates write themselves (read from the templates, so a
name a template starts using is covered without editing this file) is put in
every role a spec of the row-wise family has: the op, an input row tensor, a column weight, a
parameter, an intermediate, a max, the output, the kept index and the reduced
index.  Each spec is emitted into its own package, imported, and its values and
gradients are compared with torch (one block per row, then looped blocks)."""
import importlib
import keyword

import pytest
import torch

from derive import emit as E
from derive.emit import TEMPLATES
from derive.names import template_names
from derive.spec import BINARY_FUNCTIONS, FUNCTIONS, REDUCTIONS

ROLES = ["op", "x", "w", "p", "t", "m", "y", "k", "c"]
SPEC = """op {op}({x}[{k}, {c}], {w}[{c}]; {p}) -> {y}[{k}]
{t} = {x} * {w} + {p}
{m}[{k}] = max[{c}]({t})
{y}[{k}] = sum[{c}](exp({t} - {m})) * {p}
"""


def reference(x, w, p):
    t = x * w + p
    return torch.exp(t - t.amax(-1, keepdim=True)).sum(-1) * p


def _identifiers() -> list[str]:
    # the names of an op module (rowwise) and of the package's __init__ that imports it
    words = template_names(TEMPLATES / "rowwise.py.j2", TEMPLATES / "init.py.j2")
    reserved = set(FUNCTIONS) | set(BINARY_FUNCTIONS) | set(REDUCTIONS) | {"op"}
    return sorted(w for w in words if not keyword.iskeyword(w) and w not in reserved)


IDS = _identifiers()
SAFE = {"op": "hyg", "x": "X", "w": "W", "p": "P", "t": "T", "m": "M", "y": "Y", "k": "r", "c": "q"}


def _assignment(j: int) -> dict[str, str]:
    """Spec ``j`` puts IDS[(j + s) % n] in role s: over all j, every identifier takes every role."""
    names = {role: IDS[(j + s) % len(IDS)] for s, role in enumerate(ROLES)}
    if not E.op_name_problem(names["op"]) is None:
        names["op"] = f"hyg{j}"  # not a module name (e.g. a leading underscore): the op role is tested elsewhere
    return names


def test_the_identifiers_come_from_the_templates():
    assert {"row", "col", "mask", "n_cols", "tl", "torch", "rt", "OP", "META"} <= set(IDS)


@pytest.mark.slow
@pytest.mark.parametrize("j", range(len(IDS)))
def test_template_identifiers_in_every_role(j, tmp_path, monkeypatch):
    names = _assignment(j)
    text = SPEC.format(**names)
    spec = tmp_path / "hyg.op"
    spec.write_text(text)
    pkg = f"hyg_pkg_{j}"
    E.emit(str(spec), tmp_path / pkg)
    monkeypatch.syspath_prepend(str(tmp_path))
    op = getattr(importlib.import_module(pkg), names["op"])
    runtime = importlib.import_module(f"{pkg}._runtime")
    for block in (4096, 4):
        monkeypatch.setattr(runtime, "MAX_BLOCK", block)
        x = torch.randn(3, 10, dtype=torch.float64, requires_grad=True)
        w = torch.randn(10, dtype=torch.float64, requires_grad=True)
        y, ref = op(x, w, 0.75), reference(x, w, 0.75)
        torch.testing.assert_close(y, ref, msg=lambda m: f"{text}\n{m}")
        g = torch.randn_like(y)
        for got, want in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
            torch.testing.assert_close(got, want, msg=lambda m: f"{text}\n{m}")
