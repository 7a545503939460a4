"""Every built-in row-wise op (each only a spec in derive/ops/) against torch:
values and every gradient in float64 (one block per row and looped blocks),
half and single precision, non-contiguous inputs, optional inputs left out,
float64 gradcheck, opcheck on the registered ops, torch.compile, and bad input.

The ops are discovered from the specs; each needs a torch reference below,
and a test fails when a built-in row-wise op has none."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import generated
from derive import builtin_ops, derive
from derive.plan import RowwisePlan, plan

ROWWISE = sorted(n for n in builtin_ops() if isinstance(plan(derive(n)), RowwisePlan))
TOL = {torch.float16: (3e-3, 3e-3), torch.bfloat16: (2.5e-2, 2e-2), torch.float32: (2e-5, 2e-5),
       torch.float64: (1e-11, 1e-11)}


def _rand(*shape, dtype=torch.float64, device="cpu", gen=None):
    return torch.randn(*shape, dtype=dtype, device=device, generator=gen)


def _targets(shape, classes, device, ignored=((0, 1),)):
    """Class indices, some of them ignore_index (-100)."""
    t = torch.randint(0, classes, shape, generator=torch.Generator().manual_seed(1)).to(device)
    for at in ignored:
        t[at] = -100
    return t


# name -> (make inputs(dtype, device) -> (args, kwargs), the op's call, torch's call)
CASES = {
    "softmax": (lambda dt, dev: ((_rand(4, 6, 9, dtype=dt, device=dev),), {"dim": (0, 2)}),
                lambda op, x, dim: op(x, dim), lambda x, dim: torch.softmax(x.double(), -1) if dim == -1
                else torch.exp(x.double() - torch.logsumexp(x.double(), dim, keepdim=True))),
    "max": (lambda dt, dev: ((_rand(5, 11, dtype=dt, device=dev),), {"dim": -1}),
            lambda op, x, dim: op(x, dim), lambda x, dim: x.double().amax(dim)),
    "logsumexp": (lambda dt, dev: ((_rand(4, 6, 9, dtype=dt, device=dev),), {"dim": (0, 2)}),
                  lambda op, x, dim: op(x, dim), lambda x, dim: torch.logsumexp(x.double(), dim)),
    "log_softmax": (lambda dt, dev: ((_rand(5, 3, 8, dtype=dt, device=dev),), {"dim": 1}),
                    lambda op, x, dim: op(x, dim), lambda x, dim: torch.log_softmax(x.double(), dim)),
    "rms_norm": (lambda dt, dev: ((_rand(6, 3, 10, dtype=dt, device=dev), _rand(3, 10, dtype=dt, device=dev)), {}),
                 lambda op, x, w: op(x, w, 1e-5),
                 lambda x, w: F.rms_norm(x.double(), tuple(w.shape), w.double(), 1e-5)),
    "layer_norm": (lambda dt, dev: ((_rand(7, 12, dtype=dt, device=dev), _rand(12, dtype=dt, device=dev),
                                     _rand(12, dtype=dt, device=dev)), {}),
                   lambda op, x, w, b: op(x, w, b, 1e-5),
                   lambda x, w, b: F.layer_norm(x.double(), (x.shape[-1],), w.double(), b.double(), 1e-5)),
    "l2_normalize": (lambda dt, dev: ((_rand(5, 4, 9, dtype=dt, device=dev),), {"dim": 1}),
                     lambda op, x, dim: op(x, dim), lambda x, dim: F.normalize(x.double(), dim=dim)),
    "cross_entropy": (lambda dt, dev: ((_rand(2, 3, 11, dtype=dt, device=dev), _targets((2, 3), 11, dev)), {}),
                      lambda op, x, t: op(x, t, "mean", -100, 0.1),
                      lambda x, t: F.cross_entropy(x.double().flatten(0, -2), t.flatten(), label_smoothing=0.1)),
    "swiglu": (lambda dt, dev: ((_rand(6, 10, dtype=dt, device=dev), _rand(6, 10, dtype=dt, device=dev)), {}),
               lambda op, a, b: op(a, b), lambda a, b: F.silu(a.double()) * b.double()),
}


def test_every_rowwise_builtin_has_a_reference():
    assert set(ROWWISE) - {"max", "softmax"} and set(ROWWISE) <= set(CASES), sorted(set(ROWWISE) - set(CASES))


def _compare(name, dtype, device, prepare=lambda t: t):
    torch.manual_seed(0)
    make, call, ref = CASES[name]
    args, kwargs = make(dtype, device)
    args = [prepare(a).requires_grad_() if a.is_floating_point() else prepare(a) for a in args]
    floats = [a for a in args if a.is_floating_point()]  # integer inputs (class targets) take no gradient
    op = getattr(generated, name)
    y = call(op, *args, **kwargs)
    r = ref(*args, **kwargs)
    assert y.dtype == dtype and y.shape == r.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), r, rtol=rtol, atol=atol)
    g = torch.randn(y.shape, dtype=torch.float64, device=device)
    got = torch.autograd.grad(y, floats, g.to(dtype))
    want = torch.autograd.grad(r, floats, g)
    for a, w in zip(got, want):
        w = w.double()
        scale = max(1.0, w.abs().max().item())
        torch.testing.assert_close(a.double(), w, rtol=rtol, atol=atol * scale * (10 if dtype != torch.float64 else 1))


@pytest.mark.parametrize("block", [4096, 4])
@pytest.mark.parametrize("name", ROWWISE)
def test_matches_torch_fp64(name, block, device, monkeypatch):
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", block)
    _compare(name, torch.float64, device)


@pytest.mark.parametrize("name", ROWWISE)
def test_matches_torch_with_rows_split_across_programs(name, device, monkeypatch):
    """Few long rows: each row split into segments, one launch per pass; the
    segments' partial maxima and sums are combined by the same printed code that
    combines a block's lanes (float64, every input's gradient)."""
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", 4)
    monkeypatch.setattr(rt, "SPLIT_BELOW_ROWS_CPU", 10_000)
    splits = []
    original = rt.split_rows
    monkeypatch.setattr(rt, "split_rows", lambda *a: splits.append(original(*a)) or splits[-1])
    _compare(name, torch.float64, device)
    assert splits and all(n_segs > 1 for n_segs, _ in splits), splits


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split rows"])
def test_layer_norm_of_long_rows_far_from_zero(split, device, monkeypatch):
    """Long rows at 1e4 + N(0, 1) in float32: the variance, folded into the mean's pass,
    is summed about each lane's running mean and combined about the row's (Chan's
    update, derived), not as E[x^2] - E[x]^2, which would lose every digit of it here."""
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", 64)
    if split:
        monkeypatch.setattr(rt, "SPLIT_BELOW_ROWS_CPU", 10_000)
    torch.manual_seed(0)
    x = (1e4 + torch.randn(3, 3000, dtype=torch.float64, device=device)).float()
    w, b = torch.randn(3000, device=device), torch.randn(3000, device=device)
    y = generated.layer_norm(x, w, b)
    ref = torch.nn.functional.layer_norm(x.double(), (3000,), w.double(), b.double())
    assert (y.double() - ref).abs().max().item() < 1e-2
    naive_var = (x * x).mean(-1) - x.mean(-1) ** 2  # what E[x^2] - E[x]^2 gives in float32
    assert (naive_var.double() - x.double().var(-1, unbiased=False)).abs().max().item() > 1


def test_split_rows_keep_torch_max_rules(device, monkeypatch):
    """Across segments: ties go to the first index, a NaN anywhere makes the row NaN
    and takes the gradient at the first NaN, softmax of such a row is NaN."""
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", 8)
    x = torch.zeros(2, 50, dtype=torch.float64, device=device)
    x[0, 7] = x[0, 45] = 5.0
    x[1, 30] = x[1, 44] = float("nan")
    assert rt.split_rows(2, 50, 8, x.device)[0] > 2
    x.requires_grad_()
    y = generated.max(x)
    torch.testing.assert_close(y, x.amax(-1), equal_nan=True)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert g[0].nonzero().flatten().tolist() == [7] and g[1].nonzero().flatten().tolist() == [30]
    s = generated.softmax(x)
    assert torch.isnan(s[1]).all()
    torch.testing.assert_close(s[0], torch.softmax(x[0], -1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("name", ROWWISE)
def test_dtypes(name, dtype, device):
    _compare(name, dtype, device)


@pytest.mark.parametrize("name", ROWWISE)
def test_non_contiguous_inputs(name, device):
    """Every input a transposed view (the kernels walk its strides)."""
    def strided(t):
        return t.detach().transpose(0, -1).contiguous().transpose(0, -1) if t.dim() > 1 else t.detach()[::1]
    _compare(name, torch.float64, device, prepare=strided)


@pytest.mark.parametrize("name", ROWWISE)
def test_gradcheck(name, device):
    torch.manual_seed(3)
    make, call, _ = CASES[name]
    args, kwargs = make(torch.float64, device)
    meta = importlib.import_module(f"generated.{name}").META
    args = [(a[:2] if m["level"] == "elem" else a).detach().clone().requires_grad_(a.is_floating_point())
            for a, m in zip(args, meta["inputs"])]
    op = getattr(generated, name)
    assert torch.autograd.gradcheck(lambda *a: call(op, *a, **kwargs), tuple(args), eps=1e-6, atol=1e-7)


def test_optional_inputs_left_out(device):
    """rms_norm(x) and layer_norm(x) without weights normalise over the last dim;
    rms_norm's eps defaults to the dtype's machine epsilon, as in torch."""
    x = _rand(4, 9, device=device).requires_grad_()
    torch.testing.assert_close(generated.rms_norm(x), F.rms_norm(x, (9,)))
    torch.testing.assert_close(generated.layer_norm(x), F.layer_norm(x, (9,)))
    w = _rand(9, device=device)
    torch.testing.assert_close(generated.layer_norm(x, w), F.layer_norm(x, (9,), w))
    torch.testing.assert_close(generated.layer_norm(x, None, w), F.layer_norm(x, (9,), None, w))
    (g,) = torch.autograd.grad(generated.rms_norm(x).sum(), x)
    (gr,) = torch.autograd.grad(F.rms_norm(x, (9,)).sum(), x)
    torch.testing.assert_close(g, gr)


def test_weight_gradients_are_deterministic(device, monkeypatch):
    """dW is a sum over rows: per-program partials, then a second stage; the same
    inputs give bitwise-identical gradients, long rows included."""
    import generated._runtime as rt
    x = _rand(37, 24, dtype=torch.float32, device=device)
    w = _rand(24, dtype=torch.float32, device=device)
    for block in (4096, 8):
        monkeypatch.setattr(rt, "MAX_BLOCK", block)
        grads = []
        for _ in range(2):
            wr = w.clone().requires_grad_()
            generated.layer_norm(x, wr, None).pow(2).sum().backward()
            grads.append(wr.grad)
        assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("name", ROWWISE)
def test_opcheck(name, device):
    make, _, _ = CASES[name]
    args, kwargs = make(torch.float32, device)
    mod = importlib.import_module(f"generated.{name}")
    x = args[0]
    if mod.META["reduces"] == "weights":
        k = next(a for a, m in zip(args, mod.META["inputs"]) if m["level"] == "col").dim()
        dims = list(range(x.dim() - k, x.dim()))
    elif mod.META["reduces"] == "dim":
        d = kwargs.get("dim", -1)
        dims = sorted(t % x.dim() for t in ((d,) if isinstance(d, int) else d))
    else:
        dims = [x.dim() - 1]
    params = [-100 if m["dtype"] == "int" else 1e-5 for m in mod.META["params"]]
    args = [a.requires_grad_(a.is_floating_point()) for a in args]
    torch.library.opcheck(getattr(torch.ops.pullback, f"{name}_forward"), (*args, dims, *params))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = _rand(5, 16, dtype=torch.float32, device=device).requires_grad_()
    w = _rand(16, dtype=torch.float32, device=device).requires_grad_()

    t = torch.tensor([3, -100, 0, 15, 7], device=device)

    def f(x, w):
        h = generated.rms_norm(x, w, 1e-6)
        return (generated.swiglu(h, h) + generated.log_softmax(h, -1)).sum() + generated.logsumexp(h, 0).sum() + \
            generated.cross_entropy(h, t, label_smoothing=0.1)

    def ref(x, w):
        h = F.rms_norm(x, (16,), w, 1e-6)
        return (F.silu(h) * h + torch.log_softmax(h, -1)).sum() + torch.logsumexp(h, 0).sum() + \
            F.cross_entropy(h, t, label_smoothing=0.1)

    out = torch.compile(f, fullgraph=True, backend="inductor")(x, w)
    got = torch.autograd.grad(out, (x, w))
    want_out = ref(x, w)
    want = torch.autograd.grad(want_out, (x, w))
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- bad input: each path with its message ---------------------------------------------
def test_bad_weights_and_params(device):
    x = _rand(4, 8, dtype=torch.float32, device=device)
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(7,\), which must be the trailing dims of "
                                         r"x's shape \(4, 8\)"):
        generated.rms_norm(x, _rand(7, dtype=torch.float32, device=device))
    with pytest.raises(TypeError, match=r"layer_norm: bias has dtype torch.float64, but x has torch.float32"):
        generated.layer_norm(x, None, _rand(8, device=device))
    with pytest.raises(TypeError, match=r"rms_norm: eps must be a real number, got str 'a'"):
        generated.rms_norm(x, None, "a")
    with pytest.raises(ValueError, match=r"layer_norm: eps must be finite, got inf"):
        generated.layer_norm(x, eps=float("inf"))
    with pytest.raises(TypeError, match=r"l2_normalize: eps is a tensor that requires grad"):
        generated.l2_normalize(x, eps=torch.tensor(1.0, requires_grad=True))
    with pytest.raises(ValueError, match=r"swiglu: b has shape \(4, 7\), expected \(4, 8\)"):
        generated.swiglu(x, _rand(4, 7, dtype=torch.float32, device=device))
    with pytest.raises(TypeError, match=r"swiglu: expected b to be a torch.Tensor, got NoneType"):
        generated.swiglu(x, None)


POLICY = ("tl.exp", "tl.log", "tl.sqrt", "tl.sum", "tl.max(", "tl.min(", "tl.maximum", "tl.minimum", "tl.where",
          'float("nan")', 'float("-inf")', "tl.zeros", "tl.full", "return_indices")


@pytest.mark.parametrize("name", ROWWISE)
def test_templates_place_the_plans_statements_and_compute_nothing(name):
    """Every statement the plan printed is in the module; with those lines taken
    out, the kernels hold no mathematics and no policy (no exp, sum, max, NaN
    or tie rule, accumulator set-up): only loops, loads, stores and offsets."""
    p = plan(derive(name))
    text = open(importlib.import_module(f"generated.{name}").__file__).read()
    lines = [ln.strip() for ln in text.splitlines()]
    printed = set()
    for k in (p.fwd, p.bwd):
        code = list(k.single.code) + list(k.before) + [a.init for a in k.accs + k.taccs] + \
            [a.update for a in k.accs + k.taccs]
        for lp in k.loops:
            code += lp.init + lp.block.code + lp.finish + lp.seg_loads
        if k.final:
            code += k.final.code
        for stmt in code:
            assert stmt.strip() in lines, stmt
        printed |= {stmt.strip() for stmt in code}
    for stmt in p.fin.code if p.fin else ():  # the second stage of the sums over the rows
        assert stmt.strip() in lines, stmt
        printed.add(stmt.strip())
    kernels = text[text.index("@triton.jit"):text.index("# ---- what the shared runtime needs")]
    rest = [ln.strip() for ln in kernels.splitlines() if ln.strip() not in printed]
    for ln in rest:
        code = ln.split("#", 1)[0]
        assert not any(tok in code for tok in POLICY), ln


# ---- cross-entropy: its reductions, ignored rows, long rows ------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("block", [4096, 8])
def test_cross_entropy_reductions(reduction, block, device, monkeypatch):
    """reduction="mean" divides by the rows whose target is not ignore_index (torch's
    rule); label smoothing; rows walked in blocks of 8 as well as whole."""
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", block)
    x = _rand(9, 21, device=device).requires_grad_()
    t = _targets((9,), 21, device, ignored=(2, 7))
    for smoothing, ignore in ((0.0, -100), (0.25, -100), (0.1, 3)):
        y = generated.cross_entropy(x, t, reduction, ignore, smoothing)
        ref = F.cross_entropy(x, t.clamp(min=0) if ignore != -100 else t, reduction=reduction,
                              ignore_index=ignore, label_smoothing=smoothing)
        if ignore != -100:  # torch refuses -100 as a class when it is not ignored; compare those rows alone
            keep = t != -100
            y = generated.cross_entropy(x[keep], t[keep], reduction, ignore, smoothing)
            ref = F.cross_entropy(x[keep], t[keep], reduction=reduction, ignore_index=ignore,
                                  label_smoothing=smoothing)
        torch.testing.assert_close(y, ref)
        g = torch.rand_like(ref)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_cross_entropy_long_rows_and_edge_cases(device):
    """131072 classes (a vocabulary's worth: the looped kernels, one pass forward and
    one backward, the softmax's row sum saved); every target ignored; no rows."""
    x = _rand(3, 131072, dtype=torch.float32, device=device).requires_grad_()
    t = torch.tensor([5, -100, 131071], device=device)
    y = generated.cross_entropy(x, t, label_smoothing=0.05)
    ref = F.cross_entropy(x, t, label_smoothing=0.05)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(torch.autograd.grad(y, x)[0], torch.autograd.grad(ref, x)[0])
    x = _rand(4, 5, device=device)
    none = torch.full((4,), -100, device=device)
    assert torch.isnan(generated.cross_entropy(x, none)) and torch.isnan(F.cross_entropy(x, none))
    assert generated.cross_entropy(x, none, "sum").item() == 0.0
    empty = generated.cross_entropy(x[:0], none[:0], "none")
    assert empty.shape == (0,) and torch.isnan(generated.cross_entropy(x[:0], none[:0]))


def test_cross_entropy_bad_input(device):
    x = _rand(4, 5, dtype=torch.float32, device=device)
    t = torch.zeros(4, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"cross_entropy: reduction must be one of 'mean', 'sum', 'none', "
                                         r"got 'avg'"):
        generated.cross_entropy(x, t, "avg")
    with pytest.raises(TypeError, match=r"cross_entropy: ignore_index must be an int, got float 1.5"):
        generated.cross_entropy(x, t, "mean", 1.5)
    with pytest.raises(TypeError, match=r"cross_entropy: expected target to be an integer tensor .* "
                                        r"got torch.float32"):
        generated.cross_entropy(x, t.float())
    with pytest.raises(ValueError, match=r"cross_entropy: target has shape \(3,\), expected \(4,\)"):
        generated.cross_entropy(x, t[:3])
