"""How many passes a long row takes, and that folding a pass keeps the values.

A sum whose summand is a polynomial in row values of an earlier pass (a central
moment about the mean, a covariance) shares that pass: the plan derives the
Taylor re-expansion of each lane's coefficient sums about a moving reference
(:class:`derive.plan._Shift`).  A summand that is not a polynomial in them
(``exp(x - mu)`` with a mean ``mu``) takes a pass of its own.  Each is checked
against torch in float64, rows whole and split across programs.
"""
import pytest
import torch

CENTRAL3 = """op central3(x[r, c]) -> y[r]
mu[r] = mean[c](x)
y[r] = mean[c]((x - mu) * (x - mu) * (x - mu))
"""
COVARIANCE = """op covariance(x[r, c], z[r, c]) -> y[r]
mu[r] = mean[c](x)
nu[r] = mean[c](z)
y[r] = sum[c]((x - mu) * (z - nu))
"""
EXP_ABOUT_MEAN = """op exp_about_mean(x[r, c]) -> y[r]
mu[r] = mean[c](x)
y[r] = sum[c](exp(x - mu))
"""


def _central3(x):
    return ((x - x.mean(-1, keepdim=True)) ** 3).mean(-1)


def _covariance(x, z):
    return ((x - x.mean(-1, keepdim=True)) * (z - z.mean(-1, keepdim=True))).sum(-1)


def _exp_about_mean(x):
    return torch.exp(x - x.mean(-1, keepdim=True)).sum(-1)


CASES = [("central3", CENTRAL3, _central3, 1, 1), ("covariance", COVARIANCE, _covariance, 2, 1),
         ("exp_about_mean", EXP_ABOUT_MEAN, _exp_about_mean, 1, 2)]


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split rows"])
@pytest.mark.parametrize("name,text,ref,n_inputs,passes", CASES, ids=[c[0] for c in CASES])
def test_passes_and_values(name, text, ref, n_inputs, passes, split, emit_spec, device, monkeypatch):
    mod = emit_spec(text, name, f"passes_{name}")
    assert mod._runtime is not None
    op = getattr(mod, name)
    meta = __import__(f"passes_{name}.{name}", fromlist=["META"]).META
    assert meta["forward"]["passes"] == passes
    rt = mod._runtime
    monkeypatch.setattr(rt, "MAX_BLOCK", 16)
    monkeypatch.setattr(rt, "SPLIT_BELOW_ROWS_CPU", 10_000 if split else 1)
    torch.manual_seed(0)
    xs = [(3.0 + torch.randn(3, 203, dtype=torch.float64, device=device)).requires_grad_() for _ in range(n_inputs)]
    y = op(*xs)
    want = ref(*xs)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(y, xs, g), torch.autograd.grad(want, xs, g)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
