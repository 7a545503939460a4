"""The attention family's variants (softcap, sliding window, ALiBi, documents; a
user's own modification) against plain torch references: scores built
explicitly, modified, masked, softmax, @V; forward and every gradient, float64
and float32 through the kernels, float64 gradcheck, bad-input messages."""
import pytest
import torch

from generated import alibi_attention, document_attention, sliding_window_attention, softcap_attention


def make(b, h, m, n, d, dv, dtype, seed=0, q_scale=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (q_scale * torch.randn(b, h, m, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    k = torch.randn(b, h, n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    v = torch.randn(b, h, n, dv, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return q, k, v


def reference(q, k, v, modify=None, keep=None, scale=None):
    """softmax(mask(modify(scale * q k^T))) v with the positions i (queries), j (keys)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    i = torch.arange(q.shape[-2])[:, None]
    j = torch.arange(k.shape[-2])[None, :]
    if modify is not None:
        s = modify(s, i, j)
    if keep is not None:
        s = s.masked_fill(~keep(i, j), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def compare(got_fn, ref_fn, inputs, tol, names="qkv"):
    o, r = got_fn(*inputs), ref_fn(*inputs)
    torch.testing.assert_close(o, r, rtol=tol, atol=tol)
    g = torch.randn_like(o)
    for name, a, b in zip(names, torch.autograd.grad(o, inputs, g), torch.autograd.grad(r, inputs, g)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


CAUSAL = lambda i, j: j <= i  # noqa: E731
DTYPES = [(torch.float64, 1e-10), (torch.float32, 3e-5)]
IDS = [pytest.param(*t, id=str(t[0]).split(".")[1]) for t in DTYPES]
SHAPES = [(2, 2, 37, 37, 16, 8), (1, 1, 70, 70, 20, 24)]  # M = N not a multiple of the block; D not a power of two


@pytest.mark.parametrize("dtype,tol", IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_softcap(dtype, tol, causal):
    q, k, v = make(2, 2, 37, 45, 16, 8, dtype)
    cap = 1.5  # small: the cap bends most scores
    compare(lambda q, k, v: softcap_attention(q, k, v, softcap=cap, causal=causal, scale=0.5),
            lambda q, k, v: reference(q, k, v, lambda s, i, j: cap * torch.tanh(s / cap), CAUSAL if causal else None,
                                      scale=0.5),
            (q, k, v), tol)


@pytest.mark.parametrize("dtype,tol", IDS)
@pytest.mark.parametrize("window", [1, 5, 200])
def test_sliding_window(dtype, tol, window):
    q, k, v = make(*SHAPES[1], dtype)
    compare(lambda q, k, v: sliding_window_attention(q, k, v, window=window),
            lambda q, k, v: reference(q, k, v, keep=lambda i, j: (j <= i) & (j > i - window)), (q, k, v), tol)


@pytest.mark.parametrize("m,n,window", [(200, 200, 1), (200, 200, 3), (200, 200, 64), (200, 200, 65),
                                          (200, 200, 130), (130, 200, 70), (200, 70, 150), (200, 200, 2**40)])
def test_sliding_window_skipping_tiles(m, n, window):
    """Several 64-tiles (the interpreter's): a query tile visits only the key tiles its window
    reaches, and a key tile only the query tiles that see it; windows that end inside a tile,
    on a tile's edge, wider than the keys, beyond 32 bits; fewer or more queries than keys."""
    q, k, v = make(1, 2, m, n, 16, 8, torch.float64, seed=window % 1000)
    compare(lambda q, k, v: sliding_window_attention(q, k, v, window=window),
            lambda q, k, v: reference(q, k, v, keep=lambda i, j: (j <= i) & (j > i - window)), (q, k, v), 1e-10)


@pytest.mark.parametrize("dtype,tol", IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_alibi(dtype, tol, causal):
    q, k, v = make(*SHAPES[0], dtype)
    slopes = torch.tensor([0.5, 0.0625], dtype=dtype)
    bias = lambda s, i, j: s - slopes[:, None, None] * (i - j).abs()  # noqa: E731
    compare(lambda q, k, v: alibi_attention(q, k, v, slopes, causal=causal),
            lambda q, k, v: reference(q, k, v, bias, CAUSAL if causal else None), (q, k, v), tol)


@pytest.mark.parametrize("dtype,tol", IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_document(dtype, tol, causal):
    q, k, v = make(*SHAPES[0], dtype)
    ids = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [5] * 37])
    same = lambda i, j: ids[:, None, :, None] == ids[:, None, None, :]  # noqa: E731
    keep = (lambda i, j: same(i, j) & CAUSAL(i, j)) if causal else same
    compare(lambda q, k, v: document_attention(q, k, v, ids, causal=causal),
            lambda q, k, v: reference(q, k, v, keep=keep), (q, k, v), tol)


def _documents(*lengths, ids=None):
    """Contiguous documents of the given lengths, numbered 0, 1, ... (or by ``ids``)."""
    ids = range(len(lengths)) if ids is None else ids
    return torch.tensor([d for d, n in zip(ids, lengths) for _ in range(n)])


DOCUMENTS = {
    # uneven contiguous documents: whole key tiles of other documents are skipped
    "uneven": torch.stack([_documents(10, 90, 37, 63), _documents(150, 20, 30)[torch.arange(200)]]),
    # ids out of order (9, 2, 7, 2, ...): a tile's min/max spans ids it does not hold; negative ids
    "unsorted": torch.stack([_documents(50, 40, 30, 50, 30, ids=[9, 2, 7, 2, -3]),
                             _documents(64, 64, 64, 8, ids=[3, 1, 2, 0])]),
    # interleaved: every tile holds several documents, nothing may be skipped
    "interleaved": torch.stack([torch.arange(200) % 3, (torch.arange(200) // 7) % 5]),
    # one document, and each token its own
    "extremes": torch.stack([torch.zeros(200, dtype=torch.int64), torch.arange(200)]),
}


@pytest.mark.parametrize("layout", list(DOCUMENTS))
@pytest.mark.parametrize("causal", [False, True])
def test_document_skipping_tiles(layout, causal):
    """N = 200 (four 64-tiles, the last partial): tiles whose ranges of ids do not overlap
    are skipped, in the forward and both backward kernels; the result is the reference's."""
    q, k, v = make(2, 2, 200, 200, 16, 8, torch.float64, seed=3)
    ids = DOCUMENTS[layout]
    same = lambda i, j: ids[:, None, :, None] == ids[:, None, None, :]  # noqa: E731
    keep = (lambda i, j: same(i, j) & CAUSAL(i, j)) if causal else same
    compare(lambda q, k, v: document_attention(q, k, v, ids, causal=causal),
            lambda q, k, v: reference(q, k, v, keep=keep), (q, k, v), 1e-10)


def test_skipping_is_printed_from_the_plan():
    """The tile bounds and the overlap test are the plan's text, derived from the masks:
    i - window < j <= i bounds a query tile's keys and a key tile's queries."""
    from derive import derive
    from derive.plan import plan
    p = plan(derive("sliding_window_attention"))
    assert (p.key_start, p.key_stop) == ("start_m - window + 1", "BLOCK_M + start_m")
    assert (p.query_start, p.query_stop) == ("start_n", "BLOCK_N + start_n + window - 1")
    assert p.key_text == "j >= i - window + 1, j < i + 1" and not p.tile_test
    d = plan(derive("document_attention"))
    assert d.tile_test == "((document_ids_i_lo <= document_ids_hi) & (document_ids_lo <= document_ids_i_hi))"
    assert not (d.key_start or d.key_stop or d.query_start or d.query_stop)
    for name, q in (("sliding_window_attention", p), ("document_attention", d)):
        text = open(__import__(f"generated.{name}", fromlist=["x"]).__file__).read()
        for code in [q.key_start, q.key_stop, q.query_start, q.query_stop, q.tile_test] + \
                [x.code for x in q.tile_ranges]:
            assert code in text
    a = plan(derive("softcap_attention"))  # no mask of its own: the full range
    assert not (a.key_start or a.key_stop or a.query_start or a.query_stop or a.tile_test)


def test_gradcheck():
    q, k, v = make(1, 2, 5, 5, 3, 2, torch.float64, q_scale=1.0)
    ids = torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.int32)
    slopes = torch.tensor([0.3, 0.7], dtype=torch.float64)
    for f in (lambda q, k, v: softcap_attention(q, k, v, softcap=0.8, causal=True),
              lambda q, k, v: sliding_window_attention(q, k, v, window=2, scale=0.9),
              lambda q, k, v: alibi_attention(q, k, v, slopes, causal=False),
              lambda q, k, v: document_attention(q, k, v, ids, causal=True)):
        assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-7)


def test_fully_masked_rows_are_nan_as_in_torch():
    """A query whose every key is masked (window 0) has no softmax: NaN, as torch's
    softmax over a row of -inf gives; window 1 (each query its own key) is V itself."""
    q, k, v = make(1, 1, 9, 9, 4, 4, torch.float64)
    o = sliding_window_attention(q, k, v, window=0)
    assert torch.isnan(o).all() and torch.isnan(reference(q, k, v, keep=lambda i, j: (j <= i) & (j > i))).all()
    torch.testing.assert_close(sliding_window_attention(q, k, v, window=1), v)


def test_user_spec_with_a_learned_free_modification(emit_spec):
    """A spec the built-ins do not use: a per-head temperature and a relative-position
    bias ramp, masked to even distances; emitted and compared with torch."""
    mod = emit_spec(
        "op my_attention(Q[b, h, i, d], K[b, h, j, d], V[b, h, j, e], temp[h]; scale, ramp) -> O[b, h, i, e]\n"
        "R = scale * sum[d](Q * K)\n"
        "T = R * temp + ramp * exp(-(i - j) * (i - j) / 16)\n"
        "S = where(i >= j or i - j == -2, T, -inf)\n"
        "M = max[j](S)\n"
        "E = exp(S - M)\n"
        "L = sum[j](E)\n"
        "P = E / L\n"
        "O = sum[j](P * V)\n", "my_attention", "mine")
    q, k, v = make(2, 3, 21, 21, 8, 4, torch.float64)
    temp = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    modify = lambda s, i, j: s * temp[:, None, None] + 0.7 * torch.exp(-((i - j) ** 2) / 16)  # noqa: E731
    compare(lambda q, k, v: mod.my_attention(q, k, v, temp, ramp=0.7, scale=0.3),
            lambda q, k, v: reference(q, k, v, modify, lambda i, j: (i >= j) | (i - j == -2), scale=0.3),
            (q, k, v), 1e-6)  # float parameters reach the kernels as Triton's float32 arguments (0.3, 0.7 rounded)


def test_user_mask_bounds_with_rounding_and_renamed_parameters(emit_spec, tmp_path):
    """A mask whose linear conditions solve to fractions (2j <= i + c: j <= floor((i + c)/2), printed
    with //) next to a condition that bounds nothing (an or); int parameters named like the kernels'
    own words (start_m, first_n), which the allocator renames in the kernels: over several tiles, as torch."""
    mod = emit_spec(
        "op banded(Q[z, i, d], K[z, j, d], V[z, j, e]; start_m: int, first_n: int, scale) -> O[z, i, e]\n"
        "R = scale * sum[d](Q * K)\n"
        "S = where(j > i - start_m and 2 * j <= i + first_n and (i - j < 5 or j > 3), R, -inf)\n"
        "M = max[j](S)\nE = exp(S - M)\nL = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n", "banded", "mine_banded")
    text = (tmp_path / "mine_banded" / "banded.py").read_text()
    assert "first_n = tl.maximum(start_m - start_m_1 + 1, 0) // BLOCK_N * BLOCK_N" in text
    assert "end_n = tl.minimum(end_n, (BLOCK_M + start_m + first_n_1 - 1) // 2 + 1)" in text
    q, k, v = make(1, 2, 190, 150, 8, 4, torch.float64)
    keep = lambda i, j: (j > i - 100) & (2 * j <= i + 9) & ((i - j < 5) | (j > 3))  # noqa: E731
    compare(lambda q, k, v: mod.banded(q, k, v, start_m=100, first_n=9, scale=0.5),
            lambda q, k, v: reference(q, k, v, keep=keep, scale=0.5), (q, k, v), 1e-10)


def test_softcap_pullback_reads_the_capped_score():
    """dR is derived, with tanh(R/softcap) folded into the capped score S: no tanh in the backward."""
    from derive import derive
    from derive.plan import plan
    p = plan(derive("softcap_attention"))
    (step,) = p.bwd_steps
    assert step.code == "tl.where(valid, (1.0 - (S * S)/(softcap * softcap))*dS, 0.0)"
    text = open(__import__("generated.softcap_attention", fromlist=["x"]).__file__).read()
    for code in [s.code for s in p.score_steps + p.bwd_steps + p.kv.score_steps + p.kv.bwd_steps] + \
            [x.code for x in p.loads]:
        assert code in text


def test_bad_inputs():
    q, k, v = make(2, 2, 6, 6, 4, 4, torch.float32)
    ids = torch.zeros(2, 6, dtype=torch.int64)
    slopes = torch.ones(2)
    cases = [
        (lambda: softcap_attention(q, k, v), TypeError, r"missing 1 required keyword-only argument: 'softcap'"),
        (lambda: softcap_attention(q, k, v, softcap="x"), TypeError,
         r"softcap_attention: softcap must be a real number, got str 'x'"),
        (lambda: softcap_attention(q, k, v, softcap=float("inf")), ValueError,
         r"softcap_attention: softcap must be finite, got inf"),
        (lambda: sliding_window_attention(q, k, v, window=2.5), TypeError,
         r"sliding_window_attention: window must be an int, got float 2.5"),
        (lambda: document_attention(q, k, v, ids.float()), TypeError,
         r"document_attention: expected document_ids to be an integer tensor"),
        (lambda: document_attention(q, k, v, ids[:, :5]), ValueError,
         r"document_attention: document_ids \(document_ids\[b, j\]\) must have shape \(2, 6\) \(from q and k\), "
         r"got \(2, 5\)"),
        (lambda: document_attention(q, k[:, :, :5], v[:, :, :5], ids[:, :5]), ValueError,
         r"document_attention: document_ids is read at both query and key positions, so the queries and keys "
         r"must be as many, got M = 6 and N = 5"),
        (lambda: document_attention(q[0, 0], k[0, 0], v[0, 0], ids), ValueError,
         r"document_attention: q must have at least 3 dimensions"),
        (lambda: alibi_attention(q, k, v, torch.ones(3)), ValueError,
         r"alibi_attention: slopes \(slopes\[h\]\) must have shape \(2,\) \(from q and k\), got \(3,\)"),
        (lambda: alibi_attention(q, k, v, slopes, causal=1), TypeError,
         r"alibi_attention: causal must be True or False, got 1 \(int\)"),
    ]
    for f, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            f()


def test_opcheck():
    q, k, v = make(1, 2, 7, 7, 8, 4, torch.float32)
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2]])
    torch.library.opcheck(torch.ops.pullback.document_attention_forward, (q, k, v, ids, 0.5, True))
    torch.library.opcheck(torch.ops.pullback.sliding_window_attention_forward, (q, k, v, 3, 0.5, False))


@pytest.mark.parametrize("line,msg", [
    ("S = where(j <= i, R, inf)", r"3:\d+: inf stands only as a masked branch of where: where\(cond, s, -inf\)"),
    ("S = R - inf", r"3:\d+: inf stands only as a masked branch of where"),
    ("S = R - i[z]", r"3:\d+: i is an index name: used as a value it is its position; it takes no indices"),
    ("S = R - q", r"3:\d+: undefined tensor 'q'"),
])
def test_positions_and_masks_bad_spec(line, msg):
    from derive import derive_text
    from derive.spec import SpecError
    text = ("op att(Q[z, i, d], K[z, j, d], V[z, j, e]; scale) -> O[z, i, e]\n"
            "R = scale * sum[d](Q * K)\n" + line + "\nM = max[j](S)\nE = exp(S - M)\nL = sum[j](E)\n"
            "O = sum[j](E / L * V)\n")
    with pytest.raises(SpecError, match=msg):
        derive_text(text, "att.op")


def test_positions_derive_no_gradient():
    """A position is a value with no gradient: dR of a relative bias is dS itself."""
    from derive import derive_text
    d = derive_text("op att(Q[z, i, d], K[z, j, d], V[z, j, e]; scale) -> O[z, i, e]\n"
                    "R = scale * sum[d](Q * K)\nS = R - 0.5 * (i - j)\nM = max[j](S)\nE = exp(S - M)\n"
                    "L = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n", "att.op")
    step = next(s for s in d.steps if s.tensor.name == "R")
    assert str(step.raw) == "dS[z, i, j]"


# Every built-in variant with small fixed inputs: (our call, the explicit torch reference).
_IDS7 = torch.tensor([[0, 0, 0, 1, 1, 2, 2] * 5 + [3, 3]])  # 37 tokens, four documents
_SLOPES = torch.tensor([0.5, 0.0625])
VARIANTS = {
    "softcap": (lambda q, k, v: softcap_attention(q, k, v, softcap=1.5, causal=True),
                lambda q, k, v: reference(q, k, v, lambda s, i, j: 1.5 * torch.tanh(s / 1.5), CAUSAL)),
    "sliding_window": (lambda q, k, v: sliding_window_attention(q, k, v, window=5),
                       lambda q, k, v: reference(q, k, v, keep=lambda i, j: (j <= i) & (j > i - 5))),
    "alibi": (lambda q, k, v: alibi_attention(q, k, v, _SLOPES.to(q.dtype), causal=False),
              lambda q, k, v: reference(q, k, v, lambda s, i, j: s - _SLOPES.to(s.dtype)[:, None, None] * (i - j).abs())),
    "document": (lambda q, k, v: document_attention(q, k, v, _IDS7),
                 lambda q, k, v: reference(q, k, v, keep=lambda i, j: _IDS7[:, None, :, None] == _IDS7[:, None, None, :])),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_half_precision_against_float64(variant, dtype, tol):
    """fp16/bf16 inputs (bf16 dots upcast under the interpreter) against the float64
    reference of the same rounded inputs: the output and every gradient."""
    ours, ref = VARIANTS[variant]
    q, k, v = make(1, 2, 37, 37, 16, 8, dtype, q_scale=1.0)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o, r = ours(q, k, v), ref(q64, k64, v64)
    assert o.dtype == dtype
    torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol)
    g = torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for name, a, b in zip("qkv", torch.autograd.grad(o, (q, k, v), g.to(dtype)), torch.autograd.grad(r, (q64, k64, v64), g)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_torch_compile_fullgraph(variant):
    """Each variant traces whole under torch.compile(fullgraph=True) (its kernels are
    torch.library ops) and gives the eager reference's values and gradients."""
    torch._dynamo.reset()
    ours, ref = VARIANTS[variant]
    q, k, v = make(1, 2, 37, 37, 16, 8, torch.float32, q_scale=1.0)
    out = torch.compile(lambda q, k, v: ours(q * 1.5, k, v).square().sum(), fullgraph=True)(q, k, v)
    want = ref(q * 1.5, k, v).square().sum()
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    for a, b in zip(torch.autograd.grad(out, (q, k, v)), torch.autograd.grad(want, (q, k, v))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_opcheck_softcap_and_alibi():
    q, k, v = make(1, 2, 7, 7, 8, 4, torch.float32)
    torch.library.opcheck(torch.ops.pullback.softcap_attention_forward, (q, k, v, 1.5, 0.5, True))
    torch.library.opcheck(torch.ops.pullback.alibi_attention_forward, (q, k, v, _SLOPES, 0.5, False))
