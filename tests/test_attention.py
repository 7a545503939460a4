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
        ((q[None], k[None].expand(3, -1, -1, -1), v[None].expand(3, -1, -1, -1)), ValueError,
         r"attention: the batch shapes of q, k and v differ: \(1,\), \(3,\) and \(3,\) \(the axes before the heads\)"),
        ((q, k[:1], v[:1]), ValueError, r"attention: q has 2 heads \(dim -3\) and k and v have 1: the head counts "
                                        r"must match, or pass enable_gqa=True"),
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
                 p.dp_code, p.ds_code, p.grad("Q").term] + [g.final for g in p.grads]:
        assert code in text
    # the dK/dV kernel's statements: the same formulas over [j, i] score tiles
    for code in [st.code for st in p.kv.score_steps] + [p.kv.p_code, p.kv.dp_code, p.kv.ds_code,
                                                        p.grad("K").kv_term, p.grad("V").kv_term]:
        assert code in text
    assert p.p_code == "tl.exp(-LSE[:, None] + S)"        # P from the log-sum-exp alone
    assert p.ds_code == "(-Delta[:, None] + dP)*P"        # dS = P (dP - Delta)
    assert p.delta_code == "tl.sum(O*dO, axis=1)"         # Delta = sum_e dO O, not sum_j P dP
    assert p.grad("Q").term == "tl.dot(dS.to(DT), K, input_precision=PREC)"
    # transposed: keys are the dots' rows, the row statistics broadcast along the columns
    assert p.kv.score_steps[0].code == "scale*tl.dot(K, tl.trans(Q), input_precision=PREC)"
    assert p.kv.p_code == "tl.exp(-LSE[None, :] + S)"
    assert p.kv.dp_code == "tl.dot(V, tl.trans(dO), input_precision=PREC)"
    assert p.kv.ds_code == "(-Delta[None, :] + dP)*P"
    assert p.grad("K").kv_term == "tl.dot(dS.to(DT), Q, input_precision=PREC)"
    assert p.grad("V").kv_term == "tl.dot(P.to(DT), dO, input_precision=PREC)"


def _float64_reference(q, k, v, causal, scale=None):
    """SDPA in float64 on copies of q, k, v (which stay in their own dtype)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    return (q64, k64, v64), F.scaled_dot_product_attention(q64, k64, v64, is_causal=causal, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
def test_bf16_against_float64(causal, device):
    """bf16 inputs (on the CPU: the interpreter, whose bf16 tl.dot the kernels
    avoid by upcasting), fp32 accumulation: within bf16's rounding of a float64
    SDPA, forward and every gradient."""
    q, k, v = make((2, 3, 70, 32), 45, 24, torch.bfloat16, device)
    o = attention(q, k, v, causal=causal)
    assert o.dtype == torch.bfloat16
    ref_inputs, ref = _float64_reference(q, k, v, causal)
    torch.testing.assert_close(o.double(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), g)
    want = torch.autograd.grad(ref, ref_inputs, g.double())
    for name, a, b in zip("qkv", got, want):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, rtol=4e-2, atol=4e-2, msg=lambda m: f"d{name}: {m}")


def test_dot_operands_upcast_only_for_bf16_in_the_interpreter(monkeypatch):
    """The fp32 upcast of tl.dot's operands is the interpreter's workaround
    alone: compiled kernels (INTERPRET off) keep bf16 operands."""
    import generated._runtime as rt
    mod = __import__("generated.attention", fromlist=["x"])
    for interpret, dtype, want in [(True, torch.bfloat16, True), (True, torch.float16, False),
                                   (True, torch.float32, False), (False, torch.bfloat16, False)]:
        monkeypatch.setattr(rt, "INTERPRET", interpret)
        assert mod._config(64, 64, dtype, "fwd", False)["DOT_FP32"] is want, (interpret, dtype)


def test_bad_causal_and_scale(device):
    q, k, v = make((2, 4, 8), 5, 6, torch.float32, device)
    cases = [
        (dict(causal="no"), TypeError, r"attention: causal must be True or False, got 'no' \(str\)"),
        (dict(causal=1), TypeError, r"attention: causal must be True or False, got 1 \(int\)"),
        (dict(causal=None), TypeError, r"attention: causal must be True or False, got None \(NoneType\)"),
        (dict(scale="a"), TypeError, r"attention: scale must be a real number \(int or float\) or None, "
                                     r"got 'a' \(str\)"),
        (dict(scale=1j), TypeError, r"attention: scale must be a real number \(int or float\) or None, "
                                    r"got 1j \(complex\)"),
        (dict(scale=True), TypeError, r"attention: scale must be a real number .* got True \(bool\)"),
        (dict(scale=float("nan")), ValueError, r"attention: scale must be finite, got nan"),
        (dict(scale=-float("inf")), ValueError, r"attention: scale must be finite, got -inf"),
        (dict(scale=torch.tensor(0.5, requires_grad=True)), TypeError,
         r"attention: scale must be a Python number or None, got a tensor; its gradient would be lost: "
         r"attention does not differentiate with respect to scale. Pass scale=float\(...\)"),
        (dict(scale=torch.tensor(0.5)), TypeError,
         r"attention: scale must be a Python number or None, got a tensor. Pass scale=float\(...\)"),
    ]
    for kwargs, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            attention(q, k, v, **kwargs)


def test_integer_scale_is_a_number(device):
    q, k, v = make((1, 2, 5, 4), 6, 3, torch.float64, device)
    torch.testing.assert_close(attention(q, k, v, scale=2), F.scaled_dot_product_attention(q, k, v, scale=2.0))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_inputs_are_refused(device):
    q, k, v = make((2, 4, 8), 5, 6, torch.float32, device)
    with pytest.raises(TypeError, match=r"attention: q has layout torch.sparse_coo, but pullback's kernels read "
                                        r"dense \(strided\) tensors; pass q.to_dense\(\)"):
        attention(q.detach().to_sparse(), k, v)
    with pytest.raises(TypeError, match=r"attention: v has layout torch.sparse_csr"):
        attention(q[0], k[0], v[0].detach().to_sparse_csr())


def _forward_and_saved(device, dtype=torch.float32):
    q, k, v = make((2, 7, 8), 5, 4, dtype, device)
    o, lse = torch.ops.pullback.attention_forward(q.detach(), k.detach(), v.detach(), 0.5, True)
    return q.detach(), k.detach(), v.detach(), o, lse, torch.randn_like(o)


def test_registered_ops_check_their_arguments(device):
    """torch.ops calls skip the user-facing function: the ops check shapes,
    dtypes, head dims and the scale themselves."""
    fwd, bwd = torch.ops.pullback.attention_forward, torch.ops.pullback.attention_backward
    q, k, v, o, lse, do = _forward_and_saved(device)
    F_, B_ = r"pullback::attention_forward: ", r"pullback::attention_backward: "
    cases = [
        (fwd, (q, k[..., :4], v, 0.5, False), ValueError, F_ + r"q and k must have the same head dim D, got 8 and 4"),
        (fwd, (q, k, v[:, :3], 0.5, False), ValueError, F_ + r"k and v must have the same number of keys N"),
        (fwd, (q, k.double(), v, 0.5, False), TypeError, F_ + r"q, k and v must have one dtype"),
        (fwd, (q.int(), k, v, 0.5, False), TypeError, F_ + r"expected q to be a floating-point tensor"),
        (fwd, (q[0, 0], k[0, 0], v[0, 0], 0.5, False), ValueError, F_ + r"q must have at least 2 dimensions"),
        (fwd, (torch.randn(2, 7, 300), torch.randn(2, 5, 300), v, 0.5, False), ValueError,
         F_ + r"head dims from 1 to 256 are supported, got D=300"),
        (fwd, (q, k[:, :0], v[:, :0], 0.5, False), ValueError, F_ + r"needs at least one key"),
        (fwd, (q, k, v, float("nan"), False), ValueError, F_ + r"scale must be finite, got nan"),
        (fwd, (q, k, v, float("inf"), True), ValueError, F_ + r"scale must be finite, got inf"),
        (fwd, (q.to_sparse(), k, v, 0.5, False), TypeError, F_ + r"q has layout torch.sparse_coo"),
        (bwd, (q, k, v, o, lse, do, float("nan"), True), ValueError, B_ + r"scale must be finite"),
        (bwd, (q, k[..., :4], v, o, lse, do, 0.5, True), ValueError, B_ + r"q and k must have the same head dim"),
        (bwd, (q, k, v, o[:, :3], lse, do, 0.5, True), ValueError,
         B_ + r"o must have shape \(2, 7, 4\) \(from q and v\), got \(2, 3, 4\)"),
        (bwd, (q, k, v, o, lse, do[..., :2], 0.5, True), ValueError,
         B_ + r"do must have shape \(2, 7, 4\) \(from q and v\), got \(2, 7, 2\)"),
        (bwd, (q, k, v, o, lse[:, :6], do, 0.5, True), ValueError,
         B_ + r"lse must have shape \(2, 7\) \(from q and v\), got \(2, 6\)"),
        (bwd, (q, k, v, o.double(), lse, do, 0.5, True), TypeError, B_ + r"o must have dtype torch.float32, got "
                                                                        r"torch.float64"),
        (bwd, (q, k, v, o, lse.half(), do, 0.5, True), TypeError, B_ + r"lse must have dtype torch.float32, got "
                                                                       r"torch.float16"),
        (bwd, (q, k, v, o, lse, do.int(), 0.5, True), TypeError, B_ + r"expected do to be a floating-point tensor"),
        (bwd, (q, k, v, o, lse.to_sparse(), do, 0.5, True), TypeError, B_ + r"lse has layout torch.sparse_coo"),
    ]
    for op, args, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            op(*args)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=B_ + r"lse is on cpu, but q is on cuda"):
            bwd(q, k, v, o, lse.cpu(), do, 0.5, True)


def test_registered_ops_normalise_their_arguments(device):
    """A direct call may pass an int scale and non-contiguous saved tensors:
    the results equal the float, contiguous call's."""
    q, k, v, o, lse, do = _forward_and_saved(device)
    o2, lse2 = torch.ops.pullback.attention_forward(q, k, v, 1, True)
    want_o, want_lse = torch.ops.pullback.attention_forward(q, k, v, 1.0, True)
    assert torch.equal(o2, want_o) and torch.equal(lse2, want_lse)
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (o, do)]
    lse_t = lse.t().contiguous().t()
    got = torch.ops.pullback.attention_backward(q, k, v, strided[0], lse_t, strided[1], 0.5, True)
    want = torch.ops.pullback.attention_backward(q, k, v, o, lse, do, 0.5, True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_backward(device):
    q, k, v, o, lse, do = _forward_and_saved(device)
    torch.library.opcheck(torch.ops.pullback.attention_backward, (q, k, v, o, lse, do, 0.5, True))


def test_offsets_past_int32_take_64_bits():
    """The geometry alone (meta tensors: no memory): a batch entry of q, k or
    v whose rows * row stride (plus the tile padding) reach 2**31 elements,
    or Z * M rows that do, need 64-bit offsets; the launcher's _flat views count."""
    import generated._runtime as rt
    mod = __import__("generated.attention", fromlist=["x"])

    def meta(shape, stride=None):
        if stride is None:
            return torch.empty(shape, device="meta")
        return torch.empty_strided(shape, stride, device="meta")

    pad = rt._TILE_PAD
    d = 2048
    rows_at_limit = 2**31 // d - 2 * pad  # (rows + pad) * d + (d + pad) < 2**31
    assert not rt.attention_idx64(meta((1, rows_at_limit, d)))
    assert rt.attention_idx64(meta((1, rows_at_limit + pad, d)))
    # a small matrix with a huge row stride (a slice of a wide tensor)
    assert rt.attention_idx64(meta((1, 1000, 64), (64, 2**22, 1)))
    assert not rt.attention_idx64(meta((1, 1000, 64), (64, 2**20, 1)))
    # a large column stride counts too (D is the slow axis)
    assert rt.attention_idx64(meta((1, 16, 64), (0, 1, 2**26)))
    # many small batch entries: each fits, but Z * M rows of the log-sum-exp do not
    assert not rt.attention_idx64(meta((2**20, 64, 64)))
    assert rt.attention_idx64(meta((2**25, 64, 1)))
    # [B, M, H, D] seen as [B, H, M, D]: _flat's copy or view decides the strides the kernels get
    q = meta((1, 4096, 16, 128)).transpose(1, 2)
    assert not rt.attention_idx64(mod._flat(q))
    q = meta((1, 2**21, 8, 128)).transpose(1, 2)[:, :1]  # one head of a wide tensor: row stride 1024
    assert mod._flat(q).stride(1) == 1024 and rt.attention_idx64(mod._flat(q))


@pytest.mark.parametrize("causal", [False, True])
def test_64_bit_offsets_compute_the_same(causal, monkeypatch, device):
    """The IDX64 kernels (forced on small inputs) against SDPA, forward and gradients."""
    import generated._runtime as rt
    calls = []

    def always(*mats):
        calls.append(len(mats))
        return True
    monkeypatch.setattr(rt, "attention_idx64", always)
    q, k, v = make((2, 3, 37, 20), 45, 12, torch.float64, device)
    o = attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(o, ref)
    g = torch.randn_like(o)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        torch.testing.assert_close(a, b)
    assert calls == [4, 7]  # forward, backward


@pytest.mark.slow
def test_torch_compile_with_a_symbolic_scale(device):
    """With dynamic=True torch.compile passes scale as a symbolic float: the
    checks must trace (no math.isfinite), and each scale must be used."""
    torch._dynamo.reset()
    q, k, v = make((2, 9, 16), 12, 16, torch.float64, device)

    def f(q, k, v, s):
        return attention(q, k, v, causal=True, scale=s).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=True)
    for s in (0.3, 2.0):
        out = compiled(q, k, v, s)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s).square().sum()
        torch.testing.assert_close(out, ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v)), torch.autograd.grad(ref, (q, k, v))):
            torch.testing.assert_close(a, b)


NAMED_SPEC = """op {op}(Q[z, {i}, d], K[z, {j}, d], V[z, {j}, e]; {scale}, causal: int = 0) -> O[z, {i}, e]
{S}[z, {i}, {j}] = {scale} * sum[d](Q * K)
{M}[z, {i}] = max[{j}]({S})
E[z, {i}, {j}] = exp({S} - {M})
{L}[z, {i}] = sum[{j}](E)
{P}[z, {i}, {j}] = E / {L}
O[z, {i}, e] = sum[{j}]({P} * V)
"""
DEFAULT_NAMES = dict(i="i", j="j", S="S", M="M", L="L", P="P", scale="scale")


@pytest.mark.parametrize("tag,names", [
    ("a", dict(S="alpha", scale="pid", i="blocks", L="acc", M="LSE")),
    ("b", dict(S="valid", scale="start_n", j="offs_j", P="Delta", M="DT")),
    ("c", dict(op="torch", scale="old", S="rows", L="n_i", P="acc_dQ", i="row_ok")),
])
def test_spec_names_that_the_kernels_use_too(tag, names, tmp_path, monkeypatch, device):
    """Spec names equal to the template's own (alpha, valid, pid, start_n, n_blocks
    from an index named blocks, the plan's acc/LSE/Delta tiles, the module's torch)
    are renamed in the kernels, never shadowed: the emitted op matches SDPA."""
    import importlib
    from derive import emit as E
    spec = {**DEFAULT_NAMES, "op": f"att_{tag}", **names}
    path = tmp_path / f"{spec['op']}.op"
    path.write_text(NAMED_SPEC.format(**spec))
    E.emit(str(path), tmp_path / f"named_{tag}")
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"named_{tag}")
    op = getattr(mod, spec["op"])  # the package exports the op under its name (torch_1 in its module)
    q, k, v = make((2, 70, 16), 33, 8, torch.float64, device)
    for causal in (False, True):
        o = op(q, k, v, causal=causal, **{spec["scale"]: 0.4})  # the spec's own name, even where a kernel uses it
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.4)
        torch.testing.assert_close(o, ref)
        g = torch.randn_like(o)
        for a, b in zip(torch.autograd.grad(o, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            torch.testing.assert_close(a, b)


def test_plan_allocates_the_kernel_names():
    """The spec's names are kept where free (the built-in spec's kernels read
    Q, S, scale, n_i) and renamed where the kernels use the word themselves."""
    from derive import derive_text
    from derive.plan import plan
    p = plan(derive("attention"))
    assert (p.fn, p.n["q"], p.n["s"], p.n["param:scale"], p.n["n_i"], p.n["lse"]) == \
        ("attention", "Q", "S", "scale", "n_i", "LSE")
    spec = NAMED_SPEC.format(**{**DEFAULT_NAMES, "op": "att", "S": "alpha", "scale": "pid", "i": "blocks",
                                "M": "LSE"})
    p = plan(derive_text(spec, "att.op"))
    assert (p.n["s"], p.n["param:pid"], p.n["n_i"], p.n["m"], p.n["lse"]) == \
        ("alpha_1", "pid_1", "n_blocks_1", "LSE", "LSE_1")
    assert p.score == "pid_1*tl.dot(Q, tl.trans(K), input_precision=PREC)"
