"""Gradients of the float inputs of an attention score's modification (a learned
ALiBi slope, a per-head temperature, per-key / per-query / per-position biases):
derived, accumulated by the backward kernels, summed by the runtime; against
plain torch through explicit scores (float64 and float32), float64 gradcheck,
bitwise determinism, opcheck, torch.compile, and the bad-input messages."""
import importlib

import pytest
import torch

from generated import alibi_attention
from test_attention_variants import CAUSAL, IDS, compare, make, reference


def _alibi_reference(slopes, causal):
    bias = lambda s, i, j: s - slopes[:, None, None] * (i - j).abs()  # noqa: E731
    return lambda q, k, v: reference(q, k, v, bias, CAUSAL if causal else None)


@pytest.mark.parametrize("dtype,tol", IDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 2, 37, 37, 16, 8), (1, 3, 70, 45, 20, 24)], ids=["square", "m70n45"])
def test_alibi_slopes_gradient(dtype, tol, causal, shape):
    """dslopes[h] = -sum[b, i, j](dS * |i - j|): the dQ kernel's per-row partials,
    summed over b and i by the runtime; every gradient against torch's autograd."""
    q, k, v = make(*shape, dtype)
    slopes = torch.linspace(0.7, 0.05, shape[1], dtype=dtype).requires_grad_()
    compare(lambda q, k, v, s: alibi_attention(q, k, v, s, causal=causal),
            lambda q, k, v, s: _alibi_reference(s, causal)(q, k, v), (q, k, v, slopes), tol,
            names=["q", "k", "v", "slopes"])


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_with_slopes(causal):
    q, k, v = make(1, 2, 6, 6, 3, 2, torch.float64, q_scale=1.0)
    slopes = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v, s: alibi_attention(q, k, v, s, causal=causal),
                                    (q, k, v, slopes), eps=1e-6, atol=1e-7)


def test_extra_gradients_are_deterministic():
    """Partials written per program, summed by one fixed-shape torch.sum: two runs
    give bitwise the same gradients (several query and key blocks)."""
    q, k, v = make(2, 2, 150, 150, 16, 8, torch.float32)
    slopes = torch.tensor([0.5, 0.0625], requires_grad=True)
    g = torch.randn(2, 2, 150, 8, generator=torch.Generator().manual_seed(3))
    runs = [torch.autograd.grad(alibi_attention(q, k, v, slopes, causal=False), (q, k, v, slopes), g)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    want = torch.autograd.grad(_alibi_reference(slopes, False)(q, k, v), slopes, g)[0]
    torch.testing.assert_close(runs[0][3], want, rtol=3e-5, atol=3e-5)


def test_only_the_wanted_gradients():
    """Slopes without requires_grad: no gradient, the kernels compile without its
    accumulation; dq, dk, dv equal those of a call that also wants dslopes."""
    q, k, v = make(1, 2, 20, 20, 8, 8, torch.float64)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    o = alibi_attention(q, k, v, slopes)
    g = torch.randn_like(o)
    plain = torch.autograd.grad(o, (q, k, v), g)
    learned = slopes.clone().requires_grad_()
    both = torch.autograd.grad(alibi_attention(q, k, v, learned), (q, k, v, learned), g)
    for a, b in zip(plain, both):
        assert torch.equal(a, b)
    o = alibi_attention(q, k, v, learned)
    o.backward(g, inputs=[q])  # only q wanted: the backward is asked for no dslopes
    assert learned.grad is None


USER_SPEC = (
    "op {name}(Q[b, h, i, d], K[b, h, j, d], V[b, h, j, e], temp[h], kb[b, j], qs[b, i], pb[h, i, j]; scale)"
    " -> O[b, h, i, e]\n"
    "R = scale * sum[d](Q * K)\n"
    "T = R * temp + kb - qs * (i - j) * (i - j) / 64 + pb\n"
    "S = where(i >= j or i - j == -2, T, -inf)\n"
    "M = max[j](S)\n"
    "E = exp(S - M)\n"
    "L = sum[j](E)\n"
    "P = E / L\n"
    "O = sum[j](P * V)\n")


def test_user_spec_with_learned_inputs(emit_spec):
    """`pullback emit` of a user's variant with a learned per-head temperature temp[h],
    a per-key bias kb[b, j], a per-query distance penalty qs[b, i] and a bias tile
    pb[h, i, j]: every gradient against torch (float64, float32), each accumulated
    where the plan says (dQ kernel: temp, qs; dK/dV kernel: kb, pb)."""
    from derive import derive_text
    from derive.plan import plan
    text = USER_SPEC.format(name="learned_attention")
    p = plan(derive_text(text, "learned_attention.op"))
    assert {g.of: (g.kernel, g.positions) for g in p.xgrads} == {
        "temp": ("dq", ("i",)), "kb": ("dkdv", ("j",)), "qs": ("dq", ("i",)), "pb": ("dkdv", ("i", "j"))}
    mod = emit_spec(text, "learned_attention", "learned")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 3e-5)):
        q, k, v = make(2, 3, 21, 21, 8, 4, dtype)
        gen = torch.Generator().manual_seed(1)
        temp = torch.tensor([0.5, 1.0, 2.0], dtype=dtype).requires_grad_()
        kb = torch.randn(2, 21, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        qs = torch.rand(2, 21, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
        pb = torch.randn(3, 21, 21, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()

        def modify(s, i, j, temp, kb, qs, pb):
            return (s * temp[:, None, None] + kb[:, None, None, :] - qs[:, None, :, None] * ((i - j) ** 2) / 64
                    + pb)

        compare(lambda q, k, v, *x: mod.learned_attention(q, k, v, *x, scale=0.25),
                lambda q, k, v, *x: reference(q, k, v, lambda s, i, j: modify(s, i, j, *x),
                                              lambda i, j: (i >= j) | (i - j == -2), scale=0.25),
                (q, k, v, temp, kb, qs, pb), tol, names=["q", "k", "v", "temp", "kb", "qs", "pb"])


def test_user_spec_per_head_bias_gradcheck(emit_spec):
    """A per-head bias on a causal score (S = R + bias[h] * (j - i)) and a per-key gate:
    float64 gradcheck through every input."""
    text = ("op gated(Q[z, h, i, d], K[z, h, j, d], V[z, h, j, e], bias[h], gate[z, h, j]; causal: int = 1, scale)"
            " -> O[z, h, i, e]\n"
            "R = scale * sum[d](Q * K)\n"
            "S = R * gate + bias * (j - i)\n"
            "M = max[j](S)\nE = exp(S - M)\nL = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n")
    mod = emit_spec(text, "gated", "gated_pkg")
    q, k, v = make(1, 2, 5, 5, 3, 2, torch.float64, q_scale=1.0)
    bias = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    gate = torch.rand(1, 2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    for causal in (True, False):
        assert torch.autograd.gradcheck(lambda *a: mod.gated(*a, causal=causal, scale=0.5),
                                        (q, k, v, bias, gate), eps=1e-6, atol=1e-7)


def test_float_input_read_across_positions_gets_no_gradient(emit_spec):
    """kb[b, j] read at the query positions too (kb[b, i]): its gradient is not built;
    with requires_grad the call says so, detached it runs."""
    text = ("op cross(Q[b, h, i, d], K[b, h, j, d], V[b, h, j, e], kb[b, j]; scale) -> O[b, h, i, e]\n"
            "R = scale * sum[d](Q * K)\nS = R + kb[b, i] * kb[b, j]\n"
            "M = max[j](S)\nE = exp(S - M)\nL = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n")
    mod = emit_spec(text, "cross", "cross_pkg")
    q, k, v = make(1, 2, 6, 6, 4, 4, torch.float64)
    kb = torch.randn(1, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"cross: kb requires grad, but pullback builds no gradient for an input "
                                         r"read at both query and key positions; pass kb.detach\(\)"):
        mod.cross(q, k, v, kb.requires_grad_(), scale=0.5)
    o = mod.cross(q, k, v, kb.detach(), scale=0.5)
    want = reference(q, k, v, lambda s, i, j: s + kb.detach()[:, None, :, None] * kb.detach()[:, None, None, :],
                     scale=0.5)
    torch.testing.assert_close(o, want)


def test_extra_gradient_kernels_print_the_plan():
    """dslopes's tile and its row sum are the plan's printed text, in the dQ kernel;
    integer extras (document ids) and extras of no variant get no gradient at all."""
    from derive import derive
    from derive.plan import plan
    p = plan(derive("alibi_attention"))
    (g,) = p.xgrads
    assert (g.kernel, g.positions, g.term) == ("dq", ("i",), "tl.sum(g_dslopes, axis=1)")
    assert g.tile.code.startswith("tl.where(valid, -dS*tl.maximum(")
    text = open(importlib.import_module("generated.alibi_attention").__file__).read()
    assert g.tile.code in text and g.term in text
    assert "dslopes[h] = -sum[b, i, j](dS[b, h, i, j]*Max(-i + j, i - j))" in text
    for name in ("document_attention", "softcap_attention", "attention"):
        assert not plan(derive(name)).xgrads
        assert not hasattr(importlib.import_module(f"generated.{name}"), "_GRADS")


def test_opcheck_with_learned_slopes():
    q, k, v = make(1, 2, 7, 7, 8, 4, torch.float32)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)
    torch.library.opcheck(torch.ops.pullback.alibi_attention_forward, (q, k, v, slopes, 0.5, True))
    o, lse = torch.ops.pullback.alibi_attention_forward(q.detach(), k.detach(), v.detach(), slopes.detach(), 0.5,
                                                        False)
    do = torch.randn_like(o)
    for need in ([True], [False]):
        args = (q.detach(), k.detach(), v.detach(), slopes.detach(), o, lse, do, 0.5, False, need)
        torch.library.opcheck(torch.ops.pullback.alibi_attention_backward, args)
    *_, ds = torch.ops.pullback.alibi_attention_backward(*args[:-1], [True])
    assert ds.shape == (2,) and ds.dtype == torch.float32
    with pytest.raises(TypeError, match=r"pullback::alibi_attention_backward: need must be a list of 1 bools "
                                        r"\(one per float input with a gradient\), got \[True, True\]"):
        torch.ops.pullback.alibi_attention_backward(*args[:-1], [True, True])


@pytest.mark.slow
def test_torch_compile_fullgraph_with_learned_slopes():
    torch._dynamo.reset()
    q, k, v = make(1, 2, 12, 12, 16, 16, torch.float32)
    slopes = torch.tensor([0.5, 0.25], requires_grad=True)

    def f(q, k, v, s):
        return alibi_attention(q * 1.5, k, v, s * 2.0, causal=True).square().sum()

    out = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v, slopes)
    got = torch.autograd.grad(out, (q, k, v, slopes))
    ref = _alibi_reference(slopes * 2.0, True)(q * 1.5, k, v).square().sum()
    want = torch.autograd.grad(ref, (q, k, v, slopes))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_learned_inputs_named_like_the_code_around_them(emit_spec):
    """Extras named like the launcher's words (need, parts) and a score named like the
    gradient's tile (g_dneed): the allocator renames, the gradients match torch."""
    text = ("op clash(Q[b, h, i, d], K[b, h, j, d], V[b, h, j, e], need[h], parts[b, j]; scale) -> O[b, h, i, e]\n"
            "R = scale * sum[d](Q * K)\ng_dneed = R * need + parts\n"
            "M = max[j](g_dneed)\nE = exp(g_dneed - M)\nL = sum[j](E)\nP = E / L\nO = sum[j](P * V)\n")
    mod = emit_spec(text, "clash", "clash_pkg")
    q, k, v = make(2, 2, 9, 9, 4, 4, torch.float64)
    need = torch.tensor([0.5, 1.5], dtype=torch.float64, requires_grad=True)
    parts = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    compare(lambda q, k, v, a, b: mod.clash(q, k, v, a, b, scale=0.5),
            lambda q, k, v, a, b: reference(q, k, v, lambda s, i, j: s * a[:, None, None] + b[:, None, None, :],
                                            scale=0.5),
            (q, k, v, need, parts), 1e-10, names=["q", "k", "v", "need", "parts"])
