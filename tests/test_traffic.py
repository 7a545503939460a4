"""Bytes the kernels move, counted under the interpreter (derive.memtrace):
a row that fits a block is read once and written once, and attention never
writes an M x N tensor (its traffic grows linearly in N at fixed M)."""
import importlib
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


@pytest.mark.parametrize("split", [False, True], ids=["rows", "split rows"])
@pytest.mark.parametrize("name", ["layer_norm", "rms_norm"])
def test_norms_of_long_rows_read_the_row_twice(name, split, monkeypatch):
    """Long rows: one pass for the row's statistics, one that writes.  Layer norm's
    variance shares the mean's pass (its summand is a polynomial in the mean: the
    plan's Taylor re-expansion), so x is read twice, as rms norm's; the backward
    reads the saved statistics, x and dy twice each, whole rows or split."""
    import generated
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", 16)
    monkeypatch.setattr(rt, "SPLIT_BELOW_ROWS_CPU", 10_000 if split else 1)
    splits = []
    original = rt.split_rows
    monkeypatch.setattr(rt, "split_rows", lambda *a: splits.append(original(*a)) or splits[-1])
    x = torch.randn(3, 200, dtype=torch.float32, requires_grad=True)
    w = torch.randn(200, requires_grad=True)
    with count_traffic(watch={"x": x, "w": w}) as fwd:
        y = getattr(generated, name)(x, w)
    assert all((n_segs > 1) == split for n_segs, _ in splits) and splits
    assert fwd.per_tensor["x"].bytes_loaded == 2 * x.numel() * 4
    assert fwd.per_tensor["w"].bytes_loaded == x.shape[0] * w.numel() * 4  # the write pass's, per row
    dy = torch.randn_like(y)
    with count_traffic(watch={"x": x, "dy": dy, "y": y}) as bwd:
        y.backward(dy)
    assert bwd.per_tensor["x"].bytes_loaded == bwd.per_tensor["dy"].bytes_loaded == 2 * x.numel() * 4
    assert "y" not in bwd.per_tensor  # recomputed from x and the saved statistics, not read


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


def _flash_bytes(n: int, d: int, es: int, causal: bool, fwd_m: int, kv_m: int, kv_n: int, dq_m: int) -> dict:
    """Bytes per (batch, head) of a flash-attention forward and backward with N queries = N keys,
    head dim D, ``es``-byte elements and fp32 row statistics, from its tiles: the forward's
    ``fwd_m`` query rows per program, the dK/dV kernel's ``kv_n`` keys per program streaming
    ``kv_m`` queries per step, the dQ kernel's ``dq_m`` query rows per program."""
    f, row = 4, d * es  # a row statistic (LSE, Delta); one row of Q, K, V, O, dO, dQ, dK or dV
    # causal: a block of queries [s, s + m) reads keys up to s + m; a block of keys from s on
    # reads queries from s (rounded down to a step) on
    keys_read = lambda m: sum(min(n, s + m) if causal else n for s in range(0, n, m))  # noqa: E731
    queries_read = sum(n - ((s // kv_m) * kv_m if causal else 0) for s in range(0, n, kv_n))
    fwd = (n * row                       # reads Q once
           + 2 * row * keys_read(fwd_m)  # K and V once per block of queries
           + n * row + n * f)            # writes O and the LSE
    bwd = (2 * n * row + n * f           # Delta pass: reads O and dO, writes Delta
           + 2 * n * row                                  # dK/dV kernel: reads K and V once,
           + (2 * row + 2 * f) * queries_read             # Q, dO, LSE and Delta once per block of keys,
           + 2 * n * row                                  # writes dK and dV
           + 2 * n * row + 2 * n * f                      # dQ kernel: reads Q, dO, LSE and Delta once,
           + 2 * row * keys_read(dq_m)                    # K and V once per block of queries,
           + n * row)                                     # writes dQ
    return {"fwd": fwd, "bwd": bwd}


# Triton's tutorial 06 (python/tutorials/06-fused-attention.py) on Hopper: a forward of
# BLOCK_M = 128 query rows (the larger its autotuner tries: the least traffic it can pick);
# a backward of BLOCK_N1 = 128 keys per program streaming BLOCK_M1 = 32 queries for dK/dV,
# BLOCK_M2 = 128 queries per program for dQ.  Its backward is written for causal attention;
# without the mask the same tiles stream every block.  Not counted in its favour: the
# torch op that pre-scales K (one more read and write of K) before its backward kernel.
TUTORIAL_06 = dict(fwd_m=128, kv_m=32, kv_n=128, dq_m=128)


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_traffic_at_or_below_tutorial_06_with_sm90_tiles(d, causal, tma):
    """The interpreter runs the kernels with the tiles the launchers choose on an sm_90 GPU,
    through tensor descriptors (TMA) as there, or through pointers (tma=False, as for
    tensors TMA cannot take); the bytes they move per (batch, head) are what those tiles
    imply and no more than the tutorial's kernels move."""
    mod = importlib.import_module("generated.attention")
    b, h, n = 1, 2, 512
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, dtype=torch.float16) for _ in range(3))
    do = torch.randn(b, h, n, d, dtype=torch.float16)
    params = mod._check("attention", q, k, v, [], [None], causal)
    cfg = {kernel: mod._config(d, d, torch.float16, kernel, False, causal, arch="sm_90")
           for kernel in ("fwd", "dkdv", "dq")}
    assert (cfg["dkdv"]["BLOCK_M"], cfg["dkdv"]["BLOCK_N"], cfg["dq"]["BLOCK_M"]) == (32, 128, 128)
    with count_traffic() as fwd:
        o, lse = mod._forward(q, k, v, [], params, causal, arch="sm_90", tma=tma)
    with count_traffic() as bwd:
        dq, dk, dv = mod._backward(q, k, v, [], o, lse, do, params, causal, arch="sm_90", tma=tma)
    # the kernels, at the GPU's tiles, compute attention and its gradients (float64 SDPA)
    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal)
    want = torch.autograd.grad(ref, ref_in, do.double())
    torch.testing.assert_close(o.double(), ref, rtol=1e-2, atol=1e-2)
    for name, got, w in zip(("dQ", "dK", "dV"), (dq, dk, dv), want):
        torch.testing.assert_close(got.double(), w, rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")
    assert {k_: t.launches for k_, t in bwd.per_kernel.items()} == {
        "_attention_bwd_delta": 1, "_attention_bwd_dkdv": 1, "_attention_bwd_dq": 1}
    ours = _flash_bytes(n, d, 2, causal, cfg["fwd"]["BLOCK_M"], cfg["dkdv"]["BLOCK_M"], cfg["dkdv"]["BLOCK_N"],
                        cfg["dq"]["BLOCK_M"])
    got = {"fwd": fwd.total / (b * h), "bwd": bwd.total / (b * h)}
    assert got == ours  # every byte accounted for by the launch configs
    tutorial = _flash_bytes(n, d, 2, causal, **TUTORIAL_06)
    assert got["fwd"] <= tutorial["fwd"] and got["bwd"] <= tutorial["bwd"], (got, tutorial)


def test_count_traffic_restores_the_interpreter():
    from triton.runtime import interpreter
    before = interpreter.InterpreterBuilder.create_masked_load
    with count_traffic():
        pass
    assert interpreter.InterpreterBuilder.create_masked_load is before


def _masked_bytes(f, n, d=16):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, d, requires_grad=True) for _ in range(3))
    with count_traffic() as fwd:
        o = f(q, k, v)
    with count_traffic() as bwd:
        o.backward(torch.ones_like(o))
    return fwd, bwd


TILE = 64  # the interpreter's query and key tiles
PAIR = 2 * TILE * 16 * 4  # one key tile of K and V (D = Dv = 16, fp32)


def test_sliding_window_traffic_grows_as_n_times_window():
    """window = 64: a query tile sees its own key tile and the one before it, so the forward
    loads 2T - 1 tiles of K and V (T = N / 64), not T**2; a key tile is seen by two query
    tiles.  Bytes grow linearly in N: N = 1024 moves about twice N = 512, not four times."""
    from generated import sliding_window_attention
    runs = {n: _masked_bytes(lambda q, k, v: sliding_window_attention(q, k, v, window=64), n)
            for n in (256, 512, 1024)}
    for n, (fwd, bwd) in runs.items():
        t = n // TILE
        assert fwd.total_loaded == n * 16 * 4 + (2 * t - 1) * PAIR  # Q once, then 2T - 1 tiles of K and V
    for p in (0, 1):  # forward, backward
        a, b, c = (runs[n][p].total for n in (256, 512, 1024))
        assert c - b == 2 * (b - a)  # linear in N: no N**2 term
        assert 1.9 < c / b < 2.1
    assert 6 * runs[1024][0].total_loaded < (1024 // TILE) ** 2 * PAIR  # unmasked: T**2 = 256 tiles of K and V


def test_documents_of_equal_length_move_one_kth_of_the_bytes():
    """k equal contiguous documents over N = 512 (T = 8 tiles): a query tile sees T / k key
    tiles, so the tiles of K and V the forward loads are T**2 / k, exactly 1/k of one
    document's; every other byte (Q, O, the ids of every key tile) does not depend on k.
    The backward's bytes are likewise affine in the T**2 / k tile pairs it visits."""
    from generated import document_attention
    n, t = 512, 512 // TILE
    runs = {k: _masked_bytes(lambda q, kk, v: document_attention(q, kk, v, torch.arange(n)[None] // (n // k)), n)
            for k in (1, 2, 4, 8)}
    fixed = runs[1][0].total_loaded - t * t * PAIR  # what the forward loads besides K and V
    for k, (fwd, bwd) in runs.items():
        assert fwd.total_loaded - fixed == t * t // k * PAIR  # exactly 1/k of the K and V tiles
    per_pair = (runs[1][1].total - runs[8][1].total) / (t * t - t)  # backward bytes per visited tile pair
    base = runs[8][1].total - t * per_pair
    for k in (2, 4):
        assert runs[k][1].total == base + t * t // k * per_pair
    # about 1/k of the whole: f + (1 - f) / k, f the share of what every layout moves (Q, O, dO,
    # the ids, the row statistics; at D = 16, N = 512 about 0.17 of the forward, 0.26 of the backward)
    for k in (2, 4, 8):
        for p, extra in ((0, 0.17), (1, 0.26)):
            assert 1 / k < runs[k][p].total / runs[1][p].total < 1 / k + extra
