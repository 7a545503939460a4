"""Bytes the kernels move, counted under the interpreter (derive.memtrace):
a row that fits a block is read once and written once, and attention never
writes an M x N tensor (its traffic grows linearly in N at fixed M)."""
import os

import pytest
import torch

from derive.memtrace import count_traffic
from generated import attention, softmax
from generated import max as pmax

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="counts bytes in the interpreter")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softmax_reads_once_writes_once(dtype):
    x = torch.randn(8, 100, dtype=dtype, requires_grad=True)
    n, es = x.numel(), x.element_size()
    with count_traffic() as fwd:
        y = softmax(x)
    assert (fwd.total_loaded, fwd.total_stored) == (n * es, n * es)
    assert fwd.per_kernel["_softmax_fwd"].launches == 1
    with count_traffic() as bwd:
        y.backward(torch.ones_like(y))
    assert (bwd.total_loaded, bwd.total_stored) == (2 * n * es, n * es)  # reads B and dB only


def test_max_reads_once_and_saves_only_the_argmax():
    x = torch.randn(8, 100, dtype=torch.float32, requires_grad=True)
    n, rows = x.numel(), 8
    with count_traffic() as fwd:
        y = pmax(x, 1)
    assert (fwd.total_loaded, fwd.total_stored) == (4 * n, rows * (4 + 4))  # values and int32 argmax
    with count_traffic() as bwd:
        y.backward(torch.ones_like(y))
    assert (bwd.total_loaded, bwd.total_stored) == (rows * (4 + 4), 4 * n)


def test_long_rows_take_two_reads(small_block):
    x = torch.randn(4, 100, dtype=torch.float32, requires_grad=True)
    n = x.numel()
    with count_traffic() as fwd:
        y = softmax(x)
    assert (fwd.total_loaded, fwd.total_stored) == (2 * 4 * n, 4 * n)  # online max+sum pass, then the write pass
    with count_traffic() as bwd:
        y.backward(torch.ones_like(y))
    assert (bwd.total_loaded, bwd.total_stored) == (2 * 2 * 4 * n, 4 * n)


def _attention_bytes(n_keys: int, causal: bool = False):
    torch.manual_seed(0)
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    k = torch.randn(1, 2, n_keys, 16, requires_grad=True)
    v = torch.randn(1, 2, n_keys, 16, requires_grad=True)
    with count_traffic() as fwd:
        o = attention(q, k, v, causal=causal)
    with count_traffic() as bwd:
        o.backward(torch.ones_like(o))
    return fwd, bwd


def test_attention_traffic_is_linear_in_n():
    (f1, b1), (f2, b2), (f4, b4) = (_attention_bytes(n) for n in (64, 128, 256))
    for a, b, c in [(f1, f2, f4), (b1, b2, b4)]:
        assert c.total - b.total == 2 * (b.total - a.total)  # linear in N: no M x N term
    # the forward stores O and the log-sum-exp only, whatever N is
    out_bytes = 2 * 64 * 16 * 4 + 2 * 64 * 4
    assert f1.total_stored == f2.total_stored == f4.total_stored == out_bytes
    m_by_n = 2 * 64 * 256 * 4
    assert b4.total_stored < m_by_n and f4.total < 2 * m_by_n


def test_count_traffic_restores_the_interpreter():
    from triton.runtime import interpreter
    before = interpreter.InterpreterBuilder.create_masked_load
    with count_traffic():
        pass
    assert interpreter.InterpreterBuilder.create_masked_load is before
