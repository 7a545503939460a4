"""The attention kernels' tensor-descriptor (TMA) path, run by the interpreter.

On an sm_90 GPU the launchers hand the kernels host-side tensor descriptors of
Q, K, V, O, dO, dQ, dK and dV (``TMA=True``) where the tensors allow it; the
interpreter takes the pointers unless a test names the architecture
(``arch="sm_90"``, which also brings that GPU's tiles) or forces the choice
(``tma=True`` / ``tma=False``).  Forward and every gradient against float64
SDPA or the variants' plain torch references, at the sm_90 tiles, on lengths
that are not multiples of them; the same numbers as the pointer path; the
runtime's choice for inputs TMA cannot take; its error message."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import generated._runtime as rt

pytestmark = pytest.mark.skipif(rt.TensorDescriptor is None, reason="triton without tensor descriptors")


@pytest.fixture
def descriptor_ops(monkeypatch):
    """Counts the interpreter's tensor-descriptor loads and stores (every TMA copy)."""
    from triton.runtime import interpreter
    builder = interpreter.InterpreterBuilder
    seen = {"load": 0, "store": 0}
    for kind in seen:
        orig = getattr(builder, f"create_descriptor_{kind}")

        def counted(self, *args, _orig=orig, _kind=kind, **kwargs):
            seen[_kind] += 1
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(builder, f"create_descriptor_{kind}", counted)
    return seen


def _inputs(b, hq, hkv, m, n, d, dtype, seed=0, dv=None):
    g = torch.Generator().manual_seed(seed)
    dv = d if dv is None else dv
    q = torch.randn(b, hq, m, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, n, dv, generator=g, dtype=torch.float64).to(dtype)
    do = torch.randn(b, hq, m, dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v, do


def _run(mod, op, q, k, v, do, extras=(), params=(None,), causal=False, gqa=None, **kw):
    """The module's forward and backward launchers (as its registered ops call them)."""
    checked = mod._check(op, q, k, v, list(extras), list(params), causal,
                         *([] if gqa is None else [gqa]))
    o, lse = mod._forward(q, k, v, list(extras), checked, causal, **kw)
    dq, dk, dv = mod._backward(q, k, v, list(extras), o, lse, do, checked, causal, **kw)
    return o, dq, dk, dv


def _float64(ref_fn, q, k, v, do):
    """ref_fn's output and the gradients of <output, dO> in float64, from the rounded inputs."""
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    out = ref_fn(*ins)
    return (out, *torch.autograd.grad(out, ins, do.double()))


def _close(got, want, tol):
    for name, a, b in zip(("O", "dQ", "dK", "dV"), got, want):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol, msg=lambda m: f"{name}: {m}")


# (D, Dv, M, N): lengths not multiples of the sm_90 tiles (128/64 query rows, 128/64/32 keys);
# head dims below their padded tiles (40 -> 64, 24 -> 32: the boxes' columns past them read
# zeros and are not written)
SHAPES = [(64, 64, 200, 200), (128, 128, 150, 90), (40, 24, 100, 77)]


@pytest.mark.parametrize("d,dv,m,n", SHAPES, ids=["d64", "d128-m150-n90", "d40-dv24"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_matches_float64_sdpa(d, dv, m, n, causal, descriptor_ops):
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(1, 2, 2, m, n, d, torch.float16, dv=dv)
    got = _run(mod, "attention", q, k, v, do, causal=causal, arch="sm_90")
    # every tile of Q, K, V, dO went through a descriptor, and O, dQ, dK, dV were stored through one
    assert descriptor_ops["load"] > 0 and descriptor_ops["store"] > 0
    want = _float64(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal), q, k, v, do)
    _close(got, want, 1e-2)
    # the pointer path, at the same tiles, computes the very same numbers
    ptr = _run(mod, "attention", q, k, v, do, causal=causal, arch="sm_90", tma=False)
    for a, b in zip(got, ptr):
        assert torch.equal(a, b)


def test_tma_bf16(descriptor_ops):
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(1, 2, 2, 100, 130, 64, torch.bfloat16, seed=1)
    got = _run(mod, "attention", q, k, v, do, causal=True, arch="sm_90")
    assert descriptor_ops["load"] > 0
    assert all(t.dtype == torch.bfloat16 for t in got)
    want = _float64(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=True), q, k, v, do)
    _close(got, want, 4e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_grouped_query_heads(causal, descriptor_ops):
    """Four query heads per k/v head; dK and dV sum over the group's heads."""
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(2, 4, 1, 70, 100, 64, torch.float16, seed=2)
    got = _run(mod, "attention", q, k, v, do, causal=causal, gqa=True, arch="sm_90")
    assert descriptor_ops["load"] > 0
    want = _float64(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_, is_causal=causal,
                                                                       enable_gqa=True), q, k, v, do)
    _close(got, want, 1e-2)


def _masked_reference(keep):
    def ref(q, k, v):
        s = q.shape[-1] ** -0.5 * q @ k.transpose(-1, -2)
        i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
        return torch.softmax(s.masked_fill(~keep(i, j), float("-inf")), dim=-1) @ v
    return ref


def test_tma_sliding_window(descriptor_ops):
    """A mask that skips tiles: the window of 70 keys spans two or three 64-key tiles."""
    mod = importlib.import_module("generated.sliding_window_attention")
    q, k, v, do = _inputs(1, 2, 2, 190, 190, 64, torch.float16, seed=3)
    got = _run(mod, "sliding_window_attention", q, k, v, do, params=(70, None), arch="sm_90")
    assert descriptor_ops["load"] > 0
    want = _float64(_masked_reference(lambda i, j: (j <= i) & (j > i - 70)), q, k, v, do)
    _close(got, want, 1e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_tma_documents(causal, descriptor_ops):
    """Three documents of uneven lengths over 160 tokens, D = 128."""
    mod = importlib.import_module("generated.document_attention")
    q, k, v, do = _inputs(1, 2, 2, 160, 160, 128, torch.float16, seed=4)
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate((45, 90, 25))])[None]
    got = _run(mod, "document_attention", q, k, v, do, extras=[ids], causal=causal, arch="sm_90")
    assert descriptor_ops["load"] > 0
    keep = (lambda i, j: (ids[0][i] == ids[0][j]) & (j <= i)) if causal else (lambda i, j: ids[0][i] == ids[0][j])
    want = _float64(_masked_reference(keep), q, k, v, do)
    _close(got, want, 1e-2)


def test_interpreter_takes_the_pointers_by_default(descriptor_ops):
    """No arch: the interpreter's own tiles and the pointer path (the registered op too)."""
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(1, 2, 2, 70, 70, 64, torch.float16)
    _run(mod, "attention", q, k, v, do)
    q.requires_grad_()
    mod.attention(q, k, v).backward(do)
    assert descriptor_ops == {"load": 0, "store": 0}


def _box(rows, cols):
    return [(rows, cols)]


def test_runtime_takes_tma_only_where_the_tensors_allow():
    fp16 = torch.zeros(2, 64, 64, dtype=torch.float16)
    assert rt.attention_tma_unfit("sm_90", torch.float16, [fp16], _box(128, 64)) is None
    assert rt.attention_tma_unfit("sm_90", torch.bfloat16, [fp16.bfloat16()], _box(128, 64)) is None
    buf = torch.zeros(2 * 64 * 64 + 8, dtype=torch.float16)
    cases = {
        "other architectures": ("sm_80", torch.float16, fp16, "an sm_90 device (got sm_80)"),
        "the interpreter, CPU": (None, torch.float16, fp16, "an sm_90 device (got no GPU)"),
        "Blackwell (its tiles are not built)": ("sm_100", torch.float16, fp16, "an sm_90 device (got sm_100)"),
        "fp32": ("sm_90", torch.float32, fp16.float(), "float16 or bfloat16 tensors (got float32)"),
        "strided last dim": ("sm_90", torch.float16, torch.zeros(2, 64, 128, dtype=torch.float16)[..., ::2],
                             "a unit stride along the last dimension (got strides (8192, 128, 2))"),
        "misaligned base": ("sm_90", torch.float16, buf[1:1 + 2 * 64 * 64].view(2, 64, 64),
                            "16-byte aligned addresses and strides"),
        "rows of 40 bytes": ("sm_90", torch.float16, torch.zeros(2, 64, 20, dtype=torch.float16),
                             "16-byte aligned addresses and strides (got strides (1280, 20, 1)"),
        "empty": ("sm_90", torch.float16, torch.zeros(2, 0, 64, dtype=torch.float16), "non-empty tensors"),
    }
    for what, (arch, dtype, t, why) in cases.items():
        got = rt.attention_tma_unfit(arch, dtype, [fp16.to(dtype), t], _box(128, 64))
        assert got is not None and got.startswith(why), (what, got)
        assert rt.attention_tma("op", arch, dtype, [t], _box(128, 64)) is False
    assert rt.attention_tma_unfit("sm_90", torch.float16, [fp16], _box(128, 512)).startswith(
        "tiles of at most 256 rows and columns (got 512)")
    assert rt.attention_tma("op", "sm_90", torch.float16, [fp16], _box(128, 64), force=False) is False


def test_misaligned_and_strided_inputs_take_the_pointers_at_sm90(descriptor_ops):
    """The launchers' choice on the interpreter at sm_90's tiles: a q that starts one
    element into its storage and a v with a strided last dim run on pointers, correctly."""
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(1, 2, 2, 70, 70, 64, torch.float16)
    q_off = torch.cat([torch.zeros(1, dtype=q.dtype), q.flatten()])[1:].view(q.shape)
    v_str = torch.stack([v, v], dim=-1).flatten(-2)[..., ::2]
    assert q_off.data_ptr() % 16 and v_str.stride(-1) == 2
    want = _float64(lambda q_, k_, v_: F.scaled_dot_product_attention(q_, k_, v_), q, k, v, do)
    for args in [(q_off, k, v), (q, k, v_str)]:
        got = _run(mod, "attention", *args, do, arch="sm_90")
        _close(got, want, 1e-2)
    assert descriptor_ops == {"load": 0, "store": 0}


def test_forcing_tma_says_what_is_missing():
    mod = importlib.import_module("generated.attention")
    q, k, v, do = _inputs(1, 1, 1, 16, 16, 20, torch.float16)
    with pytest.raises(ValueError, match=r"^attention: tensor descriptors \(tma=True\) need 16-byte aligned "
                                         r"addresses and strides \(got strides \(320, 20, 1\) of 2-byte elements"):
        _run(mod, "attention", q, k, v, do, arch="sm_90", tma=True)
    q, k, v, do = _inputs(1, 1, 1, 16, 16, 64, torch.float16)
    with pytest.raises(ValueError, match=r"^attention: tensor descriptors \(tma=True\) need an sm_90 device "
                                         r"\(got sm_80\)$"):
        _run(mod, "attention", q, k, v, do, arch="sm_80", tma=True)


@pytest.mark.parametrize("case, why", [
    ("float32", r"float16 or bfloat16 tensors \(got float32\)"),
    ("wide tile", r"tiles of at most 256 rows and columns \(got 512\)"),
    ("empty", r"non-empty tensors \(got shape \(1, 0, 64\)\)"),
    ("strided columns", r"a unit stride along the last dimension \(got strides \(8192, 128, 2\)\)"),
    ("no descriptors", r"a triton with triton\.tools\.tensor_descriptor"),
])
def test_each_reason_the_descriptor_path_is_refused(case, why, monkeypatch):
    """Every check of attention_tma_unfit, each on inputs that pass the others,
    and the message a forced ``tma=True`` gives for it."""
    mat, box, dtype = torch.zeros(1, 64, 64, dtype=torch.float16), (64, 64), torch.float16
    assert rt.attention_tma_unfit("sm_90", dtype, [mat], [box]) is None
    if case == "float32":
        dtype = torch.float32
    elif case == "wide tile":
        box = (512, 64)
    elif case == "empty":
        mat = torch.zeros(1, 0, 64, dtype=torch.float16)
    elif case == "strided columns":
        mat = torch.zeros(1, 64, 128, dtype=torch.float16)[..., ::2]
    else:
        monkeypatch.setattr(rt, "TensorDescriptor", None)
    assert rt.attention_tma("attention", "sm_90", dtype, [mat], [box]) is False
    with pytest.raises(ValueError, match=rf"^attention: tensor descriptors \(tma=True\) need {why}$"):
        rt.attention_tma("attention", "sm_90", dtype, [mat], [box], force=True)
