"""Grouped-query attention (`enable_gqa`): the built-in spec's query-only index set
r (Q[z, r, i, d], K[z, j, d]), whose dK = scale*sum[r, i](Q*dS) the engine derives,
against torch's scaled_dot_product_attention(..., enable_gqa=True); forward and every
gradient, float64 and float32 through the kernels, gradcheck, bad head counts, a
user's spec in the grouped notation."""
import pytest
import torch
import torch.nn.functional as F

from derive import derive, derive_text
from generated import attention


def make(b, h_q, h_kv, m, n, d, dv, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_q, m, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    k = torch.randn(b, h_kv, n, d, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    v = torch.randn(b, h_kv, n, dv, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    return q, k, v


def compare(got, want, inputs, tol):
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    g = torch.randn_like(got)
    for name, a, b in zip("qkv", torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
def test_matches_sdpa_with_enable_gqa(group, causal, dtype, tol, device):
    """G query heads per k/v head; M = 70 > N = 45 (causal: top-left aligned), D not a power of two."""
    q, k, v = make(2, 2 * group, 2, 70, 45, 20, 8, dtype, device)
    compare(attention(q, k, v, causal=causal, enable_gqa=True),
            F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True), (q, k, v), tol)


def test_fewer_queries_than_keys_and_a_scale(device):
    q, k, v = make(1, 6, 3, 20, 67, 16, 12, torch.float64, device)
    compare(attention(q, k, v, causal=True, scale=0.4, enable_gqa=True),
            F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.4, enable_gqa=True), (q, k, v), 1e-10)


def test_one_kv_head_and_no_batch_axes(device):
    """Multi-query attention (one k/v head for all), q [H, M, D] with no batch axis; and
    q, k, v [M, D] (no head axis: enable_gqa changes nothing)."""
    q, k, v = make(1, 5, 1, 9, 13, 8, 4, torch.float64, device)
    q3, k3, v3 = (t.detach()[0].requires_grad_() for t in (q, k, v))
    compare(attention(q3, k3, v3, enable_gqa=True),
            F.scaled_dot_product_attention(q3, k3, v3, enable_gqa=True), (q3, k3, v3), 1e-10)
    q2, k2, v2 = (t.detach()[0, 0].requires_grad_() for t in (q, k, v))
    compare(attention(q2, k2, v2, enable_gqa=True), F.scaled_dot_product_attention(q2, k2, v2), (q2, k2, v2), 1e-10)


def test_gradcheck(device):
    q, k, v = make(1, 4, 2, 5, 6, 3, 2, torch.float64, device)
    for causal in (False, True):
        assert torch.autograd.gradcheck(lambda a, b, c: attention(a, b, c, causal=causal, scale=0.7, enable_gqa=True),
                                        (q, k, v), eps=1e-6, atol=1e-7)


def test_non_contiguous_inputs(device):
    """q laid out [B, M, Hq, D] (heads not outermost), k sliced, v with a strided last dim."""
    q, k, v = make(2, 4, 2, 11, 9, 8, 6, torch.float64, device)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    kt = k.detach().repeat(1, 1, 2, 1)[:, :, ::2].requires_grad_()
    vt = v.detach().repeat(1, 1, 1, 2)[..., ::2].requires_grad_()
    assert not any(t.is_contiguous() for t in (qt, kt, vt))
    compare(attention(qt, kt, vt, enable_gqa=True),
            F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True), (qt, kt, vt), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_against_float64(dtype, device):
    q, k, v = make(1, 4, 2, 40, 33, 16, 16, dtype, device)
    o = attention(q, k, v, causal=True, enable_gqa=True)
    assert o.dtype == dtype
    r64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*r64, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(o)
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, r64, g.double())):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=4e-2, atol=4e-2, msg=lambda m: f"d{name}: {m}")


def test_bad_head_counts(device):
    q, k, v = make(2, 6, 4, 5, 5, 8, 8, torch.float32, device)
    q4 = q[:, :4]
    cases = [
        (lambda: attention(q, k, v), ValueError,
         r"attention: q has 6 heads \(dim -3\) and k and v have 4: the head counts must match, or pass "
         r"enable_gqa=True \(q's heads a multiple of k's and v's\)"),
        (lambda: attention(q, k, v, enable_gqa=True), ValueError,
         r"attention: with enable_gqa, q's heads \(dim -3\) must be a multiple of k's and v's, got 6 and 4"),
        (lambda: attention(q4, k[:, :2], v, enable_gqa=True), ValueError,
         r"attention: k and v must have the same number of heads \(dim -3\), got 2 and 4"),
        (lambda: attention(q4, k, v, enable_gqa=1), TypeError,
         r"attention: enable_gqa must be True or False, got 1 \(int\)"),
        (lambda: attention(q4[:1], k, v, enable_gqa=True), ValueError,
         r"attention: the batch shapes of q, k and v differ: \(1,\), \(2,\) and \(2,\) \(the axes before the heads\)"),
        (lambda: torch.ops.pullback.attention_forward(q.detach(), k.detach(), v.detach(), 0.5, False), ValueError,
         r"pullback::attention_forward: with enable_gqa, q's heads \(dim -3\) must be a multiple of k's and v's, "
         r"got 6 and 4"),
    ]
    for f, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            f()


def test_opcheck(device):
    """The registered ops take q [..., Hq, M, D] and k, v [..., Hkv, N, D] (Hq a multiple of Hkv)."""
    q, k, v = make(2, 4, 2, 7, 5, 8, 4, torch.float32, device)
    q, k, v = q.detach(), k.detach(), v.detach()
    torch.library.opcheck(torch.ops.pullback.attention_forward, (q, k, v, 0.5, True))
    o, lse = torch.ops.pullback.attention_forward(q, k, v, 0.5, True)
    assert o.shape == (2, 4, 7, 4) and lse.shape == (2, 4, 7)
    torch.library.opcheck(torch.ops.pullback.attention_backward, (q, k, v, o, lse, torch.randn_like(o), 0.5, True))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    q, k, v = make(2, 4, 2, 9, 12, 16, 16, torch.float32, device)

    def f(q, k, v):
        return attention(q * 1.5, k, v, causal=True, enable_gqa=True).square().sum()

    out = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v)
    ref = F.scaled_dot_product_attention(q * 1.5, k, v, is_causal=True, enable_gqa=True).square().sum()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(out, (q, k, v)), torch.autograd.grad(ref, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plan_reads_the_loops_from_the_derived_sums():
    """dK and dV of the built-in spec sum over r and i (derived, not special-cased): the
    dK/dV kernel loops over the group's query heads and query blocks; the printed
    formulas are the plan's; the variants stay ungrouped (no enable_gqa)."""
    import inspect

    from derive.plan import plan
    from generated import softcap_attention
    d = derive("attention")
    dk = next(s for s in d.steps if s.tensor.name == "K")
    assert str(dk.value) == "scale*sum[i, r](Q[z, r, i, d]*dS[z, r, i, j])"
    p = plan(d)
    assert p.group == "r" and p.grad("K").group == p.grad("V").group == ("r",) and p.grad("Q").group == ()
    text = open(__import__("generated.attention", fromlist=["x"]).__file__).read()
    # the dK/dV kernel prints its statements over [keys, queries] tiles (p.kv, kv_term)
    for code in ([p.score, p.p_code, p.ds_code, p.delta_code, p.grad("Q").term, p.kv.p_code, p.kv.ds_code]
                 + [p.grad(x).kv_term for x in "KV"] + [g.final for g in p.grads]):
        assert code in text
    assert "end_m = n_i\n" in text
    assert "for step in range(0, n_r * tl.cdiv(tl.maximum(end_m - start_i, 0), BLOCK_M)):" in text
    assert "zk = z // n_r" in text
    assert "enable_gqa" in inspect.signature(attention).parameters
    assert plan(derive("softcap_attention")).group is None
    assert "enable_gqa" not in inspect.signature(softcap_attention).parameters


GROUPED_SPEC = """\
op gqa_softcap(Q[b, h, r, i, d], K[b, h, j, d], V[b, h, j, e], temp[h, r]; softcap, scale, causal: int = 0) -> O[b, h, r, i, e]
R = scale * sum[d](Q * K) * temp
S = softcap * tanh(R / softcap)
M = max[j](S)
E = exp(S - M)
L = sum[j](E)
P = E / L
O = sum[j](P * V)
"""


def test_user_spec_in_the_grouped_notation(emit_spec):
    """A user's grouped spec (a per-query-head temperature temp[h, r], a softcap) emitted
    and compared with torch: scores from q and k repeated per group, as SDPA's enable_gqa."""
    mod = emit_spec(GROUPED_SPEC, "gqa_softcap", "grouped")
    q, k, v = make(2, 6, 2, 21, 17, 8, 4, torch.float64)
    temp = torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.25, 1.0]], dtype=torch.float64)  # [Hkv, G]

    def reference(q, k, v, causal):
        kr, vr = k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1)
        s = 0.3 * q @ kr.transpose(-1, -2) * temp.reshape(6)[:, None, None]
        s = 1.5 * torch.tanh(s / 1.5)
        if causal:
            s = s.masked_fill(torch.ones(21, 17, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, dim=-1) @ vr

    for causal in (False, True):
        compare(mod.gqa_softcap(q, k, v, temp, softcap=1.5, scale=0.3, causal=causal, enable_gqa=True),
                reference(q, k, v, causal), (q, k, v), 1e-6)  # float parameters reach the kernels as float32
    with pytest.raises(ValueError, match=r"gqa_softcap: temp \(temp\[h, r\]\) must have shape \(2, 3\)"):
        mod.gqa_softcap(q, k, v, temp.reshape(6), softcap=1.5, enable_gqa=True)
    # a grouped spec builds no gradient for its float inputs: one that requires grad is refused
    with pytest.raises(ValueError, match=r"gqa_softcap: temp requires grad, but pullback builds no gradient for an "
                                         r"input of grouped-query attention; pass temp.detach\(\)"):
        mod.gqa_softcap(q, k, v, temp.clone().requires_grad_(), softcap=1.5, enable_gqa=True)


@pytest.mark.parametrize("header,msg", [
    ("op att(Q[r, z, i, d], K[z, j, d], V[z, j, e]; scale) -> O[r, z, i, e]",
     r"grouped, Q\[z, r, i, d\], K\[z, j, d\], V\[z, j, e\] -> O\[z, r, i, e\]"),
    ("op att(Q[z, g, r, i, d], K[z, j, d], V[z, j, e]; scale) -> O[z, g, r, i, e]",
     r"r: the query heads that share one k/v head, the last of Q's batch sets"),
    ("op att(Q[r, i, d], K[j, d], V[j, e]; scale) -> O[r, i, e]", r"declare Q\[z, i, d\]"),
    ("op att(Q[z, r, i, d], K[z, j, d], V[z, r, j, e]; scale) -> O[z, r, i, e]", r"declare Q\[z, i, d\]"),
])
def test_grouped_specs_that_do_not_fit(header, msg):
    from derive.plan import PlanError, plan
    text = header + "\nS = scale * sum[d](Q * K)\nM = max[j](S)\nE = exp(S - M)\nL = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n"
    with pytest.raises(PlanError, match=msg):
        plan(derive_text(text, "att.op"))
