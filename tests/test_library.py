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
    "swiglu": (lambda dt, dev: ((_rand(6, 10, dtype=dt, device=dev), _rand(6, 10, dtype=dt, device=dev)), {}),
               lambda op, a, b: op(a, b), lambda a, b: F.silu(a.double()) * b.double()),
}


def test_every_rowwise_builtin_has_a_reference():
    assert set(ROWWISE) - {"max", "softmax"} and set(ROWWISE) <= set(CASES), sorted(set(ROWWISE) - set(CASES))


def _compare(name, dtype, device, prepare=lambda t: t):
    torch.manual_seed(0)
    make, call, ref = CASES[name]
    args, kwargs = make(dtype, device)
    args = [prepare(a).requires_grad_() for a in args]
    op = getattr(generated, name)
    y = call(op, *args, **kwargs)
    r = ref(*args, **kwargs)
    assert y.dtype == dtype and y.shape == r.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), r, rtol=rtol, atol=atol)
    g = torch.randn(y.shape, dtype=torch.float64, device=device)
    got = torch.autograd.grad(y, args, g.to(dtype))
    want = torch.autograd.grad(r, args, g)
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
    args = [(a[:2] if m["level"] == "elem" else a).detach().clone().requires_grad_()
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
        d = kwargs["dim"]
        dims = sorted(t % x.dim() for t in ((d,) if isinstance(d, int) else d))
    else:
        dims = [x.dim() - 1]
    params = [1e-5 for _ in mod.META["params"]]
    args = [a.requires_grad_() for a in args]
    torch.library.opcheck(getattr(torch.ops.pullback, f"{name}_forward"), (*args, dims, *params))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    x = _rand(5, 16, dtype=torch.float32, device=device).requires_grad_()
    w = _rand(16, dtype=torch.float32, device=device).requires_grad_()

    def f(x, w):
        h = generated.rms_norm(x, w, 1e-6)
        return (generated.swiglu(h, h) + generated.log_softmax(h, -1)).sum() + generated.logsumexp(h, 0).sum()

    def ref(x, w):
        h = F.rms_norm(x, (16,), w, 1e-6)
        return (F.silu(h) * h + torch.log_softmax(h, -1)).sum() + torch.logsumexp(h, 0).sum()

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
        code = list(k.single.code) + list(k.before) + [a.init for a in k.accs] + [a.update for a in k.accs]
        for lp in k.loops:
            code += lp.init + lp.block.code + lp.finish
        if k.final:
            code += k.final.code
        for stmt in code:
            assert stmt.strip() in lines, stmt
        printed |= {stmt.strip() for stmt in code}
    kernels = text[text.index("@triton.jit"):text.index("# ---- what the shared runtime needs")]
    rest = [ln.strip() for ln in kernels.splitlines() if ln.strip() not in printed]
    for ln in rest:
        code = ln.split("#", 1)[0]
        assert not any(tok in code for tok in POLICY), ln
