"""The generated attention against torch's scaled_dot_product_attention."""
import pytest
import torch
import torch.nn.functional as F

from derive import derive
from generated import attention


def make(shape_q, n, dv, dtype, device, seed=0):
    torch.manual_seed(seed)
    *lead, m, d = shape_q
    q = torch.randn(*lead, m, d, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(*lead, n, d, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(*lead, n, dv, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


CASES = [  # (q shape [..., M, D], N, Dv, causal)
    ((2, 3, 70, 16), 33, 24, False),    # M != N, neither a multiple of the block
    ((2, 3, 70, 16), 33, 24, True),     # causal with M > N
    ((1, 2, 37, 20), 80, 20, True),     # causal with M < N, D not a power of two
    ((1, 1, 1, 3), 1, 5, False),        # tiny: M = N = 1
    ((1, 1, 1, 3), 1, 5, True),
    ((65, 1), 130, 1, False),           # no batch axes, D = Dv = 1
    ((2, 2, 2, 9, 40), 17, 7, True),    # three leading axes
]


@pytest.mark.parametrize("shape_q,n,dv,causal", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_matches_sdpa(shape_q, n, dv, causal, dtype, tol, device):
    q, k, v = make(shape_q, n, dv, dtype, device)
    o = attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(o, ref, rtol=tol, atol=tol)
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g)
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


def test_explicit_scale_and_large_head_dims(device):
    q, k, v = make((1, 2, 9, 256), 11, 200, torch.float64, device)
    o = attention(q, k, v, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(o, ref)
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)


def test_fp16_against_sdpa(device):
    """fp16 inputs, fp32 accumulation: within 2e-3 of SDPA computed in fp32."""
    q, k, v = make((2, 2, 50, 32), 45, 32, torch.float16, device)
    o = attention(q, k, v, causal=True)
    assert o.dtype == torch.float16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    torch.testing.assert_close(o.float(), ref, rtol=2e-3, atol=2e-3)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(o, (q, k, v), g.half())
    want = torch.autograd.grad(ref, (q32, k32, v32), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


def test_gradcheck(device):
    q, k, v = make((1, 3, 3), 4, 2, torch.float64, device)
    assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=True, scale=0.7), (q, k, v),
                                    eps=1e-6, atol=1e-7)


def test_non_contiguous_inputs(device):
    q, k, v = make((2, 6, 12), 10, 8, torch.float64, device)
    qt = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # strided batch
    kt = k.detach()[:, :, :].clone().requires_grad_()
    vt = v.detach().repeat(1, 1, 2)[:, :, ::2].requires_grad_()  # stride 2 in the last dim
    o = attention(qt, kt, vt)
    ref = F.scaled_dot_product_attention(qt, kt, vt)
    torch.testing.assert_close(o, ref)
    g = torch.randn_like(o).transpose(0, 1).contiguous().transpose(0, 1)
    for a, b in zip(torch.autograd.grad(o, (qt, kt, vt), g), torch.autograd.grad(ref, (qt, kt, vt), g)):
        torch.testing.assert_close(a, b)


def test_no_queries(device):
    q, k, v = make((2, 0, 8), 5, 4, torch.float32, device)
    o = attention(q, k, v)
    assert o.shape == (2, 0, 4)
    o.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k)) and torch.equal(v.grad, torch.zeros_like(v))


def test_opcheck(device):
    q, k, v = make((2, 7, 8), 5, 4, torch.float32, device)
    torch.library.opcheck(torch.ops.pullback.attention_forward, (q, k, v, 0.5, True))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, k, v = make((2, 9, 16), 12, 16, torch.float32, device)

    def f(q, k, v):
        return attention(q * 1.5, k, v, causal=True).square().sum()

    out = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v)
    got = torch.autograd.grad(out, (q, k, v))
    ref = F.scaled_dot_product_attention(q * 1.5, k, v, is_causal=True).square().sum()
    want = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_inputs(device):
    q, k, v = make((2, 4, 8), 5, 6, torch.float32, device)
    cases = [
        ((q[0], k, v), ValueError, r"attention: q, k and v must have the same number of dimensions, got 2, 3 and 3"),
        ((q, k[:1], v[:1]), ValueError, r"attention: the batch shapes of q, k and v differ: \(2,\), \(1,\) and \(1,\)"),
        ((q, k[..., :4], v), ValueError, r"attention: q and k must have the same head dim D, got 8 and 4"),
        ((q, k, v[:, :3]), ValueError, r"attention: k and v must have the same number of keys N, got 5 and 3"),
        ((q, k.double(), v), TypeError, r"attention: q, k and v must have one dtype"),
        ((q, k, v.int()), TypeError, r"attention: expected v to be a floating-point tensor"),
        ((q[0, 0], k[0, 0], v[0, 0]), ValueError, r"attention: q must have at least 2 dimensions"),
        ((q, k[:, :0], v[:, :0]), ValueError, r"attention: needs at least one key"),
        ((torch.randn(2, 4, 300), torch.randn(2, 5, 300), v), ValueError,
         r"attention: head dims from 1 to 256 are supported, got D=300"),
    ]
    for args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            attention(*args)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="must be on one device"):
            attention(q, k.cuda(), v)


def test_kernels_print_every_formula_from_the_derivation():
    """The template holds no mathematics: each formula in the generated module
    is the plan's printed text, which comes from the derivation."""
    from derive.plan import plan
    p = plan(derive("attention"))
    text = open(__import__("generated.attention", fromlist=["x"]).__file__).read()
    for code in [p.score, p.rescale, p.l_term, p.o_term, p.o_final, p.lse_code, p.p_code, p.delta_code,
                 p.dp_code, p.ds_code] + [g.term for g in p.grads] + [g.final for g in p.grads]:
        assert code in text
    assert p.p_code == "tl.exp(-LSE[:, None] + S)"        # P from the log-sum-exp alone
    assert p.ds_code == "(-Delta[:, None] + dP)*P"        # dS = P (dP - Delta)
    assert p.delta_code == "tl.sum(O*dO, axis=1)"         # Delta = sum_e dO O, not sum_j P dP
    assert p.grad("Q").term == "tl.dot(dS.to(DT), K, input_precision=PREC)"
