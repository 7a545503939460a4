"""Checks that only a GPU can make: bf16 tl.dot is wrong in Triton's
interpreter, so bf16 attention is tested here. Skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

from generated import attention, softmax
from generated import max as pmax

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_bf16_attention_against_sdpa(causal, d):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    o = attention(q, k, v, causal=causal)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal)
    torch.testing.assert_close(o.float(), ref, rtol=2e-2, atol=2e-2)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(o, (q, k, v), g.bfloat16()), torch.autograd.grad(ref, (q32, k32, v32), g)):
        torch.testing.assert_close(a.float(), b, rtol=5e-2, atol=5e-2)


def test_bf16_rowwise_long_rows():
    x = torch.randn(64, 70_000, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(softmax(x).float(), torch.softmax(x.float(), -1), rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(pmax(x), x.amax(-1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_fp16_attention_runtime_choice_and_pointers_agree(causal, d):
    """The launchers' own choice (tensor descriptors on sm_90, pointers elsewhere) and the
    pointer path forced, on this GPU, both within fp16's rounding of float64 SDPA, forward and
    every gradient, at N = 300 (not a multiple of any tile)."""
    import importlib
    mod = importlib.import_module("generated.attention")
    torch.manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 300, d, device="cuda", dtype=torch.float16) for _ in range(4))
    params = mod._check("attention", q, k, v, [], [None], causal)
    ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ins, is_causal=causal)
    want = (ref, *torch.autograd.grad(ref, ins, do.double()))
    for tma in (None, False):
        o, lse = mod._forward(q, k, v, [], params, causal, tma=tma)
        got = (o, *mod._backward(q, k, v, [], o, lse, do, params, causal, tma=tma))
        for name, a, b in zip(("O", "dQ", "dK", "dV"), got, want):
            torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-2, msg=lambda m: f"tma={tma} {name}: {m}")
