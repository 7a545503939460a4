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
