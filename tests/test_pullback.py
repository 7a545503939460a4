"""Stage 3, the pullbacks: compared with the seeds' closed forms symbolically
(through derive.simplify's normal form, which names bound indices canonically)
and numerically (tests/indexeval.py evaluates the SymPy expressions on float64
tensors; central finite differences and torch.autograd are the references)."""
import pytest

from derive.spec import SpecError
import sympy
import torch
from sympy import IndexedBase, Symbol, symbols

import indexeval as ie
from derive import derive, derive_text
from derive.ir import ArgmaxIndicator, IndexSum
from derive.simplify import normalize, to_expr

ATTENTION = """\
# scaled dot-product attention; z is the set of batch and head axes,
# i the queries, j the keys, d the head dimension, e the value dimension.
op attention(Q[z, i, d], K[z, j, d], V[z, j, e]; scale) -> O[z, i, e]
S[z, i, j] = scale * sum[d](Q * K)
M[z, i]    = max[j](S)
E[z, i, j] = exp(S - M)
L[z, i]    = sum[j](E)
P[z, i, j] = E / L
O[z, i, e] = sum[j](P * V)
"""


def same(a, b) -> bool:
    """Equal as index expressions: the normal form of the difference is 0."""
    return to_expr(normalize(sympy.sympify(a) - sympy.sympify(b))) == 0


def step(d, name):
    found = [s for s in d.steps if s.tensor.name == name]
    assert len(found) == 1, [s.tensor.name for s in d.steps]
    return found[0]


@pytest.fixture(scope="module")
def softmax():
    return derive("softmax")


@pytest.fixture(scope="module")
def maxop():
    return derive("max")


@pytest.fixture(scope="module")
def attention():
    return derive_text(ATTENTION, "attention.op")


s1, s2 = symbols("s1 s2")
z, i, j, d, e = symbols("z i j d e")
A, B, dB = IndexedBase("A"), IndexedBase("B"), IndexedBase("dB")
Q, K, V, S, P, O = (IndexedBase(n) for n in "QKVSPO")
dO, dP, dS = IndexedBase("dO"), IndexedBase("dP"), IndexedBase("dS")
scale = Symbol("scale")


# ---- the comparison itself ------------------------------------------------------------
def test_same_is_not_vacuous():
    expected = B[s2, s1] * (dB[s2, s1] - IndexSum(dB[s2, s1] * B[s2, s1], s1))
    assert same(expected, expected)
    # bound-index names do not matter ...
    s1b = Symbol("s1#7")
    assert same(expected, B[s2, s1] * (dB[s2, s1] - IndexSum(dB[s2, s1b] * B[s2, s1b], s1b)))
    # ... but everything else does
    assert not same(expected, B[s2, s1] * dB[s2, s1])
    assert not same(expected, B[s2, s1] * (dB[s2, s1] - IndexSum(dB[s2, s1], s1)))
    assert not same(expected, B[s2, s1] * (dB[s2, s1] - dB[s2, s1] * B[s2, s1]))
    assert not same(IndexSum(A[s2, s1], s1), IndexSum(A[s2, s1], s2))


# ---- softmax ---------------------------------------------------------------------------------
def test_softmax_pullback_closed_form(softmax):
    expected = B[s2, s1] * (dB[s2, s1] - IndexSum(dB[s2, s1] * B[s2, s1], s1))
    assert set(softmax.pullbacks) == {"A"}
    assert same(softmax.pullbacks["A"], expected)


def test_softmax_max_shift_has_zero_adjoint(softmax):
    m = step(softmax, "M")
    assert m.value == 0
    assert m.value is sympy.S.Zero
    assert m.raw != 0  # the zero is proved, not assumed
    assert "M" in [s.tensor.name for s in softmax.vanishing]


def test_softmax_backward_reads_only_the_output(softmax):
    assert softmax.backward_needs == ["B"]
    assert softmax.named_adjoints == []


# ---- max -----------------------------------------------------------------------------------------
def test_max_pullback_closed_form(maxop):
    expected = ArgmaxIndicator(B[s2], s1) * dB[s2]
    assert set(maxop.pullbacks) == {"A"}
    assert same(maxop.pullbacks["A"], expected)
    assert maxop.pullbacks["A"] == expected


def test_max_backward_needs_the_argmax(maxop):
    needs = maxop.backward_needs
    assert "argmax of B" in needs
    assert not any(n.startswith("d") for n in needs)


# ---- attention ------------------------------------------------------------------------------
def test_attention_max_shift_vanishes(attention):
    assert step(attention, "M").value == 0
    assert [s.tensor.name for s in attention.vanishing] == ["M"]


def test_attention_dP(attention):
    assert same(step(attention, "P").value, IndexSum(dO[z, i, e] * V[z, j, e], e))


def test_attention_dS(attention):
    expected = P[z, i, j] * (dP[z, i, j] - IndexSum(dO[z, i, e] * O[z, i, e], e))
    assert same(step(attention, "S").value, expected)


def test_attention_input_pullbacks(attention):
    pb = attention.pullbacks
    assert set(pb) == {"Q", "K", "V"}
    assert same(pb["Q"], scale * IndexSum(dS[z, i, j] * K[z, j, d], j))
    assert same(pb["K"], scale * IndexSum(dS[z, i, j] * Q[z, i, d], i))
    assert same(pb["V"], IndexSum(P[z, i, j] * dO[z, i, e], i))
    assert not same(pb["Q"], IndexSum(dS[z, i, j] * K[z, j, d], j))  # the scale matters


def test_attention_named_adjoints(attention):
    assert sorted(s.tensor.name for s in attention.named_adjoints) == ["P", "S"]
    for name in ("E", "L", "M"):
        assert not step(attention, name).kept


def test_attention_backward_needs(attention):
    needs = attention.backward_needs
    for name in ("E", "L", "M", "S", "dE", "dL", "dM", "dS", "dP"):
        assert name not in needs
    assert {"P", "O", "Q", "K", "V"} <= set(needs)
    assert not any(n.startswith("argmax") for n in needs)
    assert set(needs) <= set(attention.ir.tensors)


def test_attention_kept_values_read_no_inlined_adjoint(attention):
    inlined = {"d" + s.tensor.name for s in attention.steps if not s.kept}
    for s in attention.steps:
        if s.kept:
            names = {str(t.base.label) for t in s.value.atoms(sympy.Indexed)}
            assert not names & inlined, (s.tensor.name, s.value)


# ---- numerical: finite differences and autograd -------------------------------------------------
CASES = {
    "softmax": (lambda: derive("softmax"), dict(s2=3, s1=5), {}),
    "max": (lambda: derive("max"), dict(s2=3, s1=5), {}),
    "attention": (lambda: derive_text(ATTENTION, "attention.op"), dict(z=2, i=3, j=4, d=3, e=2), {"scale": 0.7}),
}


def setup_case(name, seed=0):
    make, sizes, params = CASES[name]
    der = make()
    g = torch.Generator().manual_seed(seed)
    env = ie.random_inputs(der.ir, sizes, g, params)
    if name == "max":  # distinct values, well separated: no ties within h
        n = env["A"].numel()
        env["A"] = (torch.randperm(n, generator=g).to(torch.float64) * 0.37).reshape(env["A"].shape)
    out = der.ir.output
    d_out = torch.randn([sizes[x.name] for x in out.indices], dtype=torch.float64, generator=g)
    return der, sizes, env, d_out


@pytest.mark.parametrize("name", list(CASES))
def test_evaluator_forward_matches_torch(name):
    der, sizes, env, _ = setup_case(name)
    got = ie.forward(der.ir, env, sizes)[der.ir.output.name]
    if name == "softmax":
        ref = torch.softmax(env["A"], dim=-1)
    elif name == "max":
        ref = env["A"].amax(dim=-1)
    else:
        scores = env["scale"] * env["Q"] @ env["K"].transpose(-1, -2)
        ref = torch.softmax(scores, dim=-1) @ env["V"]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", list(CASES))
def test_pullbacks_match_finite_differences(name):
    der, sizes, env, d_out = setup_case(name)
    fwd = ie.forward(der.ir, env, sizes)
    values = ie.adjoints(der, {**fwd, "d" + der.ir.output.name: d_out}, sizes)
    fd = ie.finite_differences(der.ir, env, sizes, d_out, h=1e-6)
    assert set(fd) == set(der.pullbacks)
    for x in der.ir.inputs:
        # the pullback as the derivation reports it, evaluated on its own
        direct = ie.evaluate(der.pullbacks[x.name], values, sizes, der.ir).to(x.indices, sizes)
        torch.testing.assert_close(direct, values["d" + x.name])
        torch.testing.assert_close(direct, fd[x.name], rtol=1e-6, atol=1e-7)
        assert direct.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("name", list(CASES))
def test_every_adjoint_matches_autograd(name):
    """Every step, named or inlined, equals the total derivative of the loss
    with respect to its tensor (autograd, retaining intermediates' grads)."""
    der, sizes, env, d_out = setup_case(name)
    env = {k: (v.clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in env.items()}
    fwd = ie.forward(der.ir, env, sizes)
    for eq in der.ir.equations:
        fwd[eq.target.name].retain_grad()
    (fwd[der.ir.output.name] * d_out).sum().backward()
    plain = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in fwd.items()}
    values = ie.adjoints(der, {**plain, "d" + der.ir.output.name: d_out}, sizes)
    for s in der.steps:
        ref = fwd[s.tensor.name].grad
        if ref is None:
            ref = torch.zeros_like(values["d" + s.tensor.name])
        torch.testing.assert_close(values["d" + s.tensor.name], ref, rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"d{s.tensor.name}: {m}")


def test_attention_named_adjoints_numerically(attention):
    der, sizes, env, d_out = setup_case("attention")
    fwd = ie.forward(der.ir, env, sizes)
    vals = {**fwd, "dO": d_out}
    # dP and dS from their steps, then the inputs' pullbacks from those
    vals["dP"] = ie.evaluate(step(der, "P").value, vals, sizes, der.ir).to(der.ir.tensors["P"].indices, sizes)
    vals["dS"] = ie.evaluate(step(der, "S").value, vals, sizes, der.ir).to(der.ir.tensors["S"].indices, sizes)
    Pm, Om, Vm, Qm, Km = (fwd[n] for n in "POVQK")
    torch.testing.assert_close(vals["dP"], d_out @ Vm.transpose(-1, -2))
    dS_ref = Pm * (vals["dP"] - (d_out * Om).sum(-1, keepdim=True))
    torch.testing.assert_close(vals["dS"], dS_ref)
    dQ = ie.evaluate(der.pullbacks["Q"], vals, sizes, der.ir).to(der.ir.tensors["Q"].indices, sizes)
    torch.testing.assert_close(dQ, 0.7 * vals["dS"] @ Km)
    fd = ie.finite_differences(der.ir, env, sizes, d_out)
    torch.testing.assert_close(dQ, fd["Q"], rtol=1e-6, atol=1e-7)


def test_max_pullback_under_ties_conserves_the_gradient(maxop):
    sizes = dict(s2=2, s1=4)
    A_ = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    dB_ = torch.tensor([1.5, -2.0], dtype=torch.float64)
    fwd = ie.forward(maxop.ir, {"A": A_}, sizes)
    dA = ie.evaluate(maxop.pullbacks["A"], {**fwd, "dB": dB_}, sizes, maxop.ir).to(maxop.ir.tensors["A"].indices,
                                                                                    sizes)
    expected = torch.tensor([[0.0, 1.5, 0.0, 0.0], [-2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(dA, expected)


# ---- more specs through the same numerical check ----------------------------------------------------
def test_seed002_max_shift_vanishes_and_x_gets_two_terms():
    der = derive_text(MORE["seed002"][0], "seed002.op")
    steps = {s.tensor.name: s for s in der.steps}
    assert steps["M"].value == 0
    # X enters twice (through G and through P = F C X): its pullback has both contributions
    assert {consumer for consumer, _ in steps["X"].contributions} == {"G", "P"}


MORE = {
    "logsumexp": ("op lse(A[r, c]) -> Y[r]\nM = max[c](A)\nY = M + log(sum[c](exp(A - M)))\n",
                  dict(r=3, c=4), {}),
    "rmsnorm": ("op rms(X[r, c], W[c]; eps) -> Y[r, c]\nR = sqrt(sum[c](X * X) / 4 + eps)\nY = X / R * W\n",
                dict(r=3, c=4), {"eps": 0.1}),
    "layernorm": ("op ln(X[r, c]) -> Y[r, c]\nMu = sum[c](X) / 5\nD = X - Mu\nV = sum[c](D * D) / 5\n"
                  "Y = D / sqrt(V + 0.00001)\n", dict(r=3, c=5), {}),
    "xent": ("op x(A[r, c], T[r, c]) -> Y[r]\nM = max[c](A)\nE = exp(A - M)\nZ = sum[c](E)\n"
             "Y = sum[c](T * (log(Z) + M - A))\n", dict(r=3, c=4), {}),
    "matmul_chain": ("op mm(A[i, k], B[k, j], C[j, l]) -> Y[i, l]\nT = sum[k](A * B)\nY = sum[j](T * C)\n",
                     dict(i=2, k=3, j=4, l=2), {}),
    "max_of_contraction": ("op s(A[r, c, k], B[k]) -> Y[r]\nY = max[c](sum[k](A * B))\n",
                           dict(r=2, c=3, k=2), {}),
    "shadowed_index": ("op s(A[i, j]) -> Y[i]\nY = sum[j](exp(A) * sum[j](A * A))\n", dict(i=2, j=3), {}),
    "squared_denominator": ("op q(X[r, c]) -> Y[r, c]\nQ = sum[c](X * X)\nR = Q + 1\nY = X / (R * R)\n",
                            dict(r=2, c=3), {}),
    "tanh_powers": ("op t(X[r, c]; p) -> Y[r, c]\nY = tanh(X) * X ** 3 - 2 / X + X ** p\n",
                    dict(r=2, c=3), {"p": 1.7}),
    # seed 002: f(X, Y) = softmax(lam X^T A^T B Y) C X, with X used twice (X[n, q] renames its columns)
    "seed002": ("op f(X[n, i], Y[n, j], A[k, n], B[k, n], C[j, n]; lam) -> P[i, q]\n"
                "G[i, j] = lam * sum[n, k, r](X * A * B[k, r] * Y[r, j])\n"
                "M[i] = max[j](G)\nE = exp(G - M)\nZ = sum[j](E)\nF = E / Z\n"
                "P[i, q] = sum[j, n](F * C * X[n, q])\n", dict(n=4, r=4, i=3, j=3, q=3, k=2), {"lam": 0.3}),
    "sum_of_a_row_value": ("op f(X[r, c], W[r]) -> Y[r]\nY[r] = sum[c](X * X + W)\n", dict(r=2, c=3), {}),
    "layernorm_mean": ("op ln(X[r, c]) -> Y[r, c]\nMu[r] = mean[c](X)\nD = X - Mu\nV[r] = mean[c](D * D)\n"
                       "Y = D / sqrt(V + 0.00001)\n", dict(r=3, c=5), {}),
    "layernorm_two_axes": ("op ln(X[r, c, k]) -> Y[r, c, k]\nMu[r] = mean[c, k](X)\nD = X - Mu\n"
                           "V[r] = mean[c, k](D * D)\nY = D / sqrt(V + 0.00001)\n", dict(r=2, c=3, k=2), {}),
    "gram": ("op g(X[n, i]) -> Y[i, j]\nY[i, j] = sum[n](X * X[n, j])\n", dict(n=3, i=2, j=2), {}),
}


@pytest.mark.parametrize("name", list(MORE))
def test_more_specs_match_finite_differences(name):
    text, sizes, params = MORE[name]
    der = derive_text(text, f"{name}.op")
    g = torch.Generator().manual_seed(3)
    env = ie.random_inputs(der.ir, sizes, g, params)
    for t in der.ir.inputs:  # positive inputs keep sqrt/log/powers real
        env[t.name] = env[t.name].abs() + 0.5
    out = der.ir.output
    d_out = torch.randn([sizes[x.name] for x in out.indices], dtype=torch.float64, generator=g)
    fwd = ie.forward(der.ir, env, sizes)
    values = ie.adjoints(der, {**fwd, "d" + out.name: d_out}, sizes)
    fd = ie.finite_differences(der.ir, env, sizes, d_out)
    for x in der.ir.inputs:
        torch.testing.assert_close(values["d" + x.name], fd[x.name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"d{x.name}: {m}")


def test_a_tensor_named_like_a_gradient_is_rejected():
    with pytest.raises(SpecError, match="the name 'dA' is taken by the gradient of A") as e:
        derive_text("op f(A[i], dA[i]) -> B[i]\nB = A * dA\n", "c.op")
    assert (e.value.line, e.value.col) == (1, 12)


def test_renaming_a_free_index_leaves_a_sum_that_binds_it_alone():
    """Regression (found by the emit fuzz): renaming the free c' to c must not
    reach inside sum[c'](...), which binds c' (it gave sum[c'](X[r, c]**2))."""
    from sympy import IndexedBase, Symbol
    from derive.ir import IndexSum
    from derive.simplify import rename_free
    r, c, cp = Symbol("r"), Symbol("c"), Symbol("c'")
    X = IndexedBase("X")
    expr = X[r, cp] / IndexSum(X[r, cp] ** 2, cp)
    out = rename_free(expr, {cp: c})
    (s,) = out.atoms(IndexSum)
    assert s.indices == (cp,) and s.body == X[r, cp] ** 2
    assert out == X[r, c] / s


def test_an_inline_norm_derives_what_torch_computes():
    """Y = X / sqrt(mean(X^2) + eps) written in one equation: dX through the
    reference evaluator against torch's autograd."""
    import torch
    import indexeval as IE
    d = derive_text("op rms(X[r, c]; eps) -> Y[r, c]\nY = X / sqrt(mean[c](X * X) + eps)\n", "rms.op")
    x = torch.rand(3, 6, dtype=torch.float64) + 0.5
    g = torch.rand(3, 6, dtype=torch.float64)
    sizes = {"r": 3, "c": 6}
    env = IE.forward(d.ir, {"X": x, "eps": 0.75}, sizes)
    got = IE.adjoints(d, {**env, "dY": g}, sizes)["dX"]
    xr = x.clone().requires_grad_()
    ref = xr / torch.sqrt((xr * xr).mean(-1, keepdim=True) + 0.75)
    torch.testing.assert_close(got, torch.autograd.grad(ref, xr, g)[0])


def _sums_of(expr, name):
    """The sums in ``expr`` whose whole body is the tensor ``name``."""
    return [s for s in expr.atoms(IndexSum) if isinstance(s.body, sympy.Indexed) and str(s.body.base.label) == name]


def test_a_centred_value_sums_to_zero():
    """sum[c](D) with D = X - mean[c](X) is 0 by the definitions: layer norm's dX
    has no such sum (nor the row reduction the kernel would spend on it); scaled
    by a constant that is not |c| (sum / 5), or centred by a max, it stays."""
    mean = derive_text(MORE["layernorm_mean"][0], "ln.op")
    dx = step(mean, "X").value
    assert _sums_of(step(mean, "D").value, "D") == [] and _sums_of(dx, "D") == []
    assert len(dx.atoms(IndexSum)) == 2, dx  # sum(dY) and sum(dY D): the textbook form
    five = derive_text(MORE["layernorm"][0], "ln5.op")
    assert _sums_of(step(five, "X").value, "D"), step(five, "X").value
    two = derive_text(MORE["layernorm_two_axes"][0], "ln2.op")  # centred over c and k together
    assert _sums_of(step(two, "X").value, "D") == [] and len(step(two, "X").value.atoms(IndexSum)) == 2
    shifted = derive_text("op f(X[r, c]) -> Y[r, c]\nM[r] = max[c](X)\nD = X - M\nY = D * sum[c](D)\n", "m.op")
    assert _sums_of(step(shifted, "X").value, "D"), step(shifted, "X").value
