"""Conditions (comparisons, and/or/not, where), integer parameters, totals over
the rows and an output chosen by a keyword: derived, checked against float64
central differences and torch, emitted and run; every bad spec a located error."""
import importlib

import pytest
import torch

from derive import derive_text
from derive import emit as E
from derive.plan import plan
from derive.spec import SpecError
from tests import indexeval as ev

CLIP = """op clip(x[r, c], y[r, c]; lo = -0.5, hi = 0.7) -> z[r, c]
z = where(x > lo and not x >= hi, x * y, where(x < lo or y > 1, -x, hi * y))
"""


def test_where_derives_indicators_and_matches_central_differences():
    """dz/dx through where is 1[cond] d(then) + 1[not cond] d(else): the branch
    not taken gets nothing; checked against float64 central differences."""
    d = derive_text(CLIP, "clip.op")
    assert str(d.pullbacks["x"]).count("1[") >= 2 and "where" not in str(d.pullbacks["x"])
    sizes = {"r": 3, "c": 5}
    env = ev.random_inputs(d.ir, sizes, torch.Generator().manual_seed(0), {"lo": -0.5, "hi": 0.7})
    d_out = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    fwd = ev.forward(d.ir, env, sizes)
    x, y = env["x"], env["y"]
    want = torch.where((x > -0.5) & ~(x >= 0.7), x * y, torch.where((x < -0.5) | (y > 1), -x, 0.7 * y))
    torch.testing.assert_close(fwd["z"], want)
    adj = ev.adjoints(d, {**fwd, "dz": d_out}, sizes)
    fd = ev.finite_differences(d.ir, env, sizes, d_out)
    for name in ("x", "y"):
        torch.testing.assert_close(adj["d" + name], fd[name])


def _emit(tmp_path, monkeypatch, text: str, name: str):
    spec = tmp_path / f"{name}.op"
    spec.write_text(text)
    E.emit(str(spec), tmp_path / f"userops_{name}")
    monkeypatch.syspath_prepend(str(tmp_path))
    return importlib.import_module(f"userops_{name}.{name}"), importlib.import_module(f"userops_{name}._runtime")


def test_where_kernels_match_torch(tmp_path, monkeypatch):
    mod, runtime = _emit(tmp_path, monkeypatch, CLIP, "clip")
    for block in (4096, 4):
        monkeypatch.setattr(runtime, "MAX_BLOCK", block)
        x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
        y = (torch.randn(6, 9, dtype=torch.float64) * 2).requires_grad_()
        z = mod.clip(x, y, lo=-0.5, hi=0.7)
        ref = torch.where((x > -0.5) & ~(x >= 0.7), x * y, torch.where((x < -0.5) | (y > 1), -x, 0.7 * y))
        torch.testing.assert_close(z, ref)
        g = torch.randn_like(z)
        for a, b in zip(torch.autograd.grad(z, (x, y), g), torch.autograd.grad(ref, (x, y), g)):
            torch.testing.assert_close(a, b)


MASKED_MEAN = """op masked_mean(x[r, c], keep[r]: int; skip: int = 0) -> how{mean: avg, sum: total, rows: row_sum[r]}
row_sum[r] = mean[c](x) * where(keep != skip, 1, 0)
total = sum[r](row_sum)
avg = total / sum[r](where(keep != skip, 1, 0))
"""


def test_totals_integer_parameters_and_a_chosen_output(tmp_path, monkeypatch):
    """A total over the rows (per-program partials, then a second stage), a row
    count made of a condition on an integer input against an integer parameter,
    and the output picked by a keyword; values and gradients against torch."""
    mod, runtime = _emit(tmp_path, monkeypatch, MASKED_MEAN, "masked_mean")
    for block in (4096, 4):
        monkeypatch.setattr(runtime, "MAX_BLOCK", block)
        x = torch.randn(10, 7, dtype=torch.float64, requires_grad=True)
        keep = torch.tensor([1, 0, 2, 2, 0, 1, 1, 0, 3, 1])
        for how, skip in (("mean", 0), ("sum", 0), ("rows", 2), ("mean", 2)):
            got = mod.masked_mean(x, keep, how, skip)
            kept = (keep != skip).double()
            rows = x.mean(-1) * kept
            ref = {"mean": rows.sum() / kept.sum(), "sum": rows.sum(), "rows": rows}[how]
            torch.testing.assert_close(got, ref)
            g = torch.randn_like(ref)
            torch.testing.assert_close(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(ref, x, g)[0])
    with pytest.raises(ValueError, match=r"masked_mean: how must be one of 'mean', 'sum', 'rows', got 'avg'"):
        mod.masked_mean(x, keep, "avg")
    with pytest.raises(TypeError, match=r"masked_mean: skip must be an int, got float 0.5"):
        mod.masked_mean(x, keep, "mean", 0.5)


def test_totals_are_deterministic(tmp_path, monkeypatch):
    """The same inputs give bitwise-identical totals (fixed-order second stage)."""
    mod, _ = _emit(tmp_path, monkeypatch, MASKED_MEAN.replace("masked_mean", "masked_mean2"), "masked_mean2")
    x = torch.randn(333, 7, dtype=torch.float32)
    keep = torch.ones(333, dtype=torch.long)
    assert torch.equal(mod.masked_mean2(x, keep, "sum"), mod.masked_mean2(x, keep, "sum"))


@pytest.mark.parametrize("text,message", [
    ("op f(x[r, c]) -> y[r, c]\ny = where(x, 1, 0)\n",
     "f.op:2:11: expected a condition: a comparison (== != < <= > >=), joined by and / or / not"),
    ("op f(x[r, c]) -> y[r, c]\ny = where(x > 0, 1)\n",
     "f.op:2:5: where takes exactly three arguments (cond, a, b), got 2"),
    ("op f(x[r, c]) -> y[r, c]\ny = x * (x > 0)\n",
     "f.op:2:10: a comparison is a condition, not a value: use it in where(cond, a, b)"),
    ("op f(x[r, c]) -> y[r, c]\ny = where(x is x, 1, 0)\n",
     "f.op:2:11: unsupported comparison (Is); expected == != < <= > >="),
    ("op f(x[r, c]; k: float) -> y[r, c]\ny = x\n",
     "f.op:1:18: unknown type 'float' for k; a parameter is float (the default) or int"),
    ("op f(x[r, c]; k: int = 1.5) -> y[r, c]\ny = x\n",
     "f.op:1:24: the default value of the integer parameter k must be an integer of at most 18 digits, got 1.5"),
    ("op f(x[r, c]) -> how{a: y[r], a: z}\ny[r] = sum[c](x)\nz = sum[r](y)\n",
     "f.op:1:31: how lists a twice"),
    ("op f(x[r, c]; how) -> how{a: y[r], b: z}\ny[r] = sum[c](x)\nz = sum[r](y)\n",
     "f.op:1:23: how names an input or parameter already"),
])
def test_bad_conditions_and_headers(text, message):
    with pytest.raises(SpecError) as e:
        plan(derive_text(text, "f.op"))
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("text,message", [
    ("op f(x[r, c]) -> (y[r], z)\ny[r] = sum[c](x)\nz = max[r](y)\n",
     "f.op:3:1: z takes a max over the rows; the row-wise family sums over the rows"),
    ("op f(x[r, c]) -> (y[r, c], z)\nz = sum[r](sum[c](x))\ny = x / z\n",
     "f.op:3:1: y uses z, a total over the rows: the row-wise family computes totals after the rows"),
    ("op f(x[r, c]) -> z\nz = sum[r, c](x)\n",
     "f.op:2:1: the output has no indices and the op reduces nothing per row"),
])
def test_totals_outside_the_family(text, message):
    with pytest.raises(SpecError) as e:
        plan(derive_text(text, "f.op"))
    assert str(e.value).startswith(message), str(e.value)
