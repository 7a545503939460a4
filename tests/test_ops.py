"""The generated softmax and max against torch: values, gradients, layouts,
dtypes, long rows, empty tensors, autograd, torch.library and torch.compile."""
import os
import subprocess
import sys

import pytest
import torch

from generated import max as pmax
from generated import softmax

TOL = {torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1e-2), torch.float32: (1e-5, 1e-6),
       torch.float64: (1e-12, 1e-12)}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ref_softmax(x, dim):
    x64 = x.double()
    m = x64.amax(dim=dim, keepdim=True)
    e = torch.exp(x64 - m)
    return e / e.sum(dim=dim, keepdim=True)


def close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


SHAPES = [((1, 1), -1), ((7,), 0), ((4, 37), -1), ((3, 5, 7), 1), ((3, 5, 7), (0, 2)), ((3, 5, 7), (-1, -3)),
          ((2, 3, 4, 5), (1, 3)), ((2, 3, 4, 5), (0, 1, 2, 3)), ((5, 1, 6), (1,))]


@pytest.mark.parametrize("shape,dim", SHAPES)
def test_softmax_matches_torch_fp64(shape, dim, device):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = softmax(x, dim)
    ref = ref_softmax(x, dim)
    close(y, ref, torch.float64)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)
    close(gx, gr, torch.float64)


@pytest.mark.parametrize("shape,dim", SHAPES)
def test_max_matches_amax_fp64(shape, dim, device):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, device=device, requires_grad=True)
    y = pmax(x, dim)
    ref = x.amax(dim=dim)
    assert y.shape == ref.shape
    close(y, ref, torch.float64)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gr,) = torch.autograd.grad(ref, x, g)  # no ties in random data: amax's gradient is the same
    close(gx, gr, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype, device):
    torch.manual_seed(2)
    x = (3 * torch.randn(6, 50, device=device)).to(dtype).requires_grad_()
    y = softmax(x, -1)
    assert y.dtype == dtype
    close(y, torch.softmax(x.double(), -1), dtype)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.dtype == dtype
    xr = x.detach().double().requires_grad_()
    (gr,) = torch.autograd.grad(torch.softmax(xr, -1), xr, g.double())
    close(gx, gr, dtype)
    m = pmax(x, 1)
    assert m.dtype == dtype
    close(m, x.amax(1), dtype)


@pytest.mark.parametrize("shape,dim", [((3, 100), -1), ((4, 9, 5), (0, 2)), ((2, 33), 1)])
def test_long_rows_loop_over_blocks(shape, dim, small_block, device):
    """Rows longer than the block take the looped kernels (online max/sum)."""
    torch.manual_seed(3)
    x = (4 * torch.randn(shape, dtype=torch.float64, device=device)).requires_grad_()
    y = softmax(x, dim)
    ref = ref_softmax(x, dim)
    close(y, ref, torch.float64)
    g = torch.randn_like(y)
    close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], torch.float64)
    m = pmax(x, dim)
    close(m, x.amax(dim=dim), torch.float64)
    gm = torch.randn_like(m)
    close(torch.autograd.grad(m, x, gm)[0], torch.autograd.grad(x.amax(dim=dim), x, gm)[0], torch.float64)


def test_long_row_with_default_block(device):
    """A row of two million elements (hundreds of blocks at the default block size)."""
    torch.manual_seed(4)
    x = torch.randn(1, 2_000_000, dtype=torch.float32, device=device)
    close(softmax(x), torch.softmax(x.double(), -1), torch.float32)
    close(pmax(x), x.amax(-1), torch.float32)


def test_minus_inf_entries_in_long_rows(small_block, device):
    """Masked (-inf) scores: lanes whose running max is -inf must not poison the sum."""
    x = torch.randn(3, 70, dtype=torch.float64, device=device)
    x[0, :40] = float("-inf")
    x[1, ::2] = float("-inf")
    x[2, 17:] = float("-inf")
    close(softmax(x), torch.softmax(x, -1), torch.float64)
    close(pmax(x), x.amax(-1), torch.float64)


def test_non_contiguous_inputs(device):
    torch.manual_seed(5)
    base = torch.randn(8, 12, 10, dtype=torch.float64, device=device)
    views = [base.transpose(0, 2), base[:, ::3, 1::2], base.permute(1, 2, 0)[2:], base[:, :1].expand(8, 6, 10)]
    for v in views:
        for dim in (-1, 0, (0, 2)):
            close(softmax(v, dim), ref_softmax(v, dim), torch.float64)
            close(pmax(v, dim), v.amax(dim=dim), torch.float64)


def test_non_contiguous_gradient(device):
    """A gradient that is a broadcast (stride-0) view, as from y.sum().backward()."""
    x = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    softmax(x, 0).sum().backward()
    torch.testing.assert_close(x.grad, torch.zeros_like(x), atol=1e-12, rtol=0)
    x.grad = None
    pmax(x, 1).sum().backward()
    assert torch.equal(x.grad.sum(1), torch.ones(4, dtype=torch.float64, device=device))


def test_many_groups_fallback(device):
    """Reduced and kept axes that alternate more than the kernel's three strided groups."""
    torch.manual_seed(6)
    x = torch.randn(2, 3, 2, 3, 2, 3, 2, 3, dtype=torch.float64, device=device, requires_grad=True)
    dim = (0, 2, 4, 6)
    y = softmax(x, dim)
    ref = ref_softmax(x, dim)
    close(y, ref, torch.float64)
    g = torch.randn_like(y)
    close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0], torch.float64)
    close(pmax(x, dim), x.amax(dim=dim), torch.float64)


def test_max_keepdim_and_ties(device):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float64, device=device,
                     requires_grad=True)
    y = pmax(x, 1, keepdim=True)
    assert y.shape == (2, 1)
    assert y.flatten().tolist() == [3.0, 5.0]
    y.backward(torch.tensor([[2.0], [7.0]], dtype=torch.float64, device=device))
    # the whole gradient goes to the first maximal element of each row
    assert x.grad.tolist() == [[0.0, 2.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]]


def test_max_ties_in_long_rows_pick_first(small_block, device):
    x = torch.zeros(2, 50, dtype=torch.float64, device=device)
    x[0, [7, 23, 40]] = 1.0
    x[1, [49, 31]] = 2.0
    x.requires_grad_()
    pmax(x, 1).sum().backward()
    assert x.grad.nonzero().tolist() == [[0, 7], [1, 31]]


def test_max_keepdim_tuple(device):
    x = torch.randn(3, 4, 5, dtype=torch.float64, device=device)
    y = pmax(x, (0, 2), keepdim=True)
    assert y.shape == (1, 4, 1)
    close(y, x.amax(dim=(0, 2), keepdim=True), torch.float64)


def test_zero_dim_tensor(device):
    x = torch.tensor(2.5, dtype=torch.float64, device=device)
    assert softmax(x).item() == 1.0
    assert pmax(x).item() == 2.5


def test_empty_tensors(device):
    for shape, dim in [((0, 5), 1), ((3, 0), 1), ((0, 4), 0), ((2, 0, 3), (0, 2))]:
        x = torch.randn(shape, device=device, requires_grad=True)
        y = softmax(x, dim)
        assert y.shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
    assert pmax(torch.randn(0, 5, device=device), 1).shape == (0,)
    with pytest.raises(ValueError, match=r"max: cannot reduce over dimension 1 of size 0"):
        pmax(torch.randn(3, 0, device=device), 1)


@pytest.mark.parametrize("op", [softmax, pmax], ids=["softmax", "max"])
def test_gradcheck(op, device):
    torch.manual_seed(7)
    x = torch.randn(3, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, 1), (x,), eps=1e-6, atol=1e-7)
    y = torch.randn(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op(t, (0, 2)), (y,), eps=1e-6, atol=1e-7)


def test_opcheck(device):
    x = torch.randn(3, 8, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.pullback.softmax_forward, (x, [1]))
    torch.library.opcheck(torch.ops.pullback.max_forward, (x, [1]))
    b = torch.softmax(x.detach(), 1)
    torch.library.opcheck(torch.ops.pullback.softmax_backward, ([3, 8], [1], b, torch.randn_like(b)))


@pytest.mark.slow
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def f(x):
        return softmax(x * 2.0, -1).sum() + pmax(x, (0,)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="inductor")
    x = torch.randn(5, 33, device=device, requires_grad=True)
    out = compiled(x)
    out.backward()
    xr = x.detach().clone().requires_grad_()
    ref = torch.softmax(xr * 2.0, -1).sum() + xr.amax(0).sum()
    ref.backward()
    close(out.detach(), ref.detach(), torch.float32)
    close(x.grad, xr.grad, torch.float32)


# ---- bad input: every path with its message ------------------------------------------------
@pytest.mark.parametrize("op,name", [(softmax, "softmax"), (pmax, "max")])
def test_bad_inputs(op, name, device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match=rf"{name}: expected A to be a floating-point tensor .* got torch.int64"):
        op(torch.ones(3, 4, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match=rf"{name}: expected A to be a floating-point tensor .* got torch.bool"):
        op(torch.ones(3, 4, dtype=torch.bool, device=device))
    with pytest.raises(TypeError, match=rf"{name}: expected A to be a torch.Tensor, got list"):
        op([1.0, 2.0])
    with pytest.raises(IndexError, match=rf"{name}: dim 2 is out of range for a tensor with 2 dimensions"):
        op(x, 2)
    with pytest.raises(IndexError, match=rf"{name}: dim -3 is out of range"):
        op(x, (0, -3))
    with pytest.raises(ValueError, match=rf"{name}: dim \(1, -1\) names dimension 1 more than once"):
        op(x, (1, -1))
    with pytest.raises(ValueError, match=rf"{name}: dim is an empty tuple"):
        op(x, ())
    with pytest.raises(TypeError, match=rf"{name}: dim must be an int or a tuple of ints"):
        op(x, 1.5)


def _run_python(code: str, env_updates: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_updates)
    env["PYTHONPATH"] = REPO
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) behaviour")
def test_import_sets_up_the_interpreter():
    r = _run_python("import generated, os; import torch; "
                    "print(os.environ['TRITON_INTERPRET'], generated.softmax(torch.zeros(2, 3)).sum().item())", {})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "2.0"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) behaviour")
def test_triton_imported_without_interpreter_is_an_error():
    r = _run_python("import triton\nimport generated", {})
    assert r.returncode != 0
    assert "Set TRITON_INTERPRET=1 in the environment before triton is first imported" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (no CUDA) behaviour")
def test_cpu_tensor_without_interpreter_is_an_error():
    r = _run_python("import torch, generated\ngenerated.softmax(torch.zeros(2, 3))", {"TRITON_INTERPRET": "0"})
    assert r.returncode != 0
    assert "softmax: A is on cpu, but pullback's Triton kernels run on CUDA devices" in r.stderr


@pytest.mark.parametrize("block", [4096, 16])
def test_nan_propagates_like_torch(block, device, monkeypatch):
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", block)
    x = torch.randn(3, 40, dtype=torch.float64, device=device)
    x[0, 5] = x[0, 30] = float("nan")
    x[2, 39] = float("nan")
    x.requires_grad_()
    m = pmax(x, 1)
    torch.testing.assert_close(m, x.amax(1), equal_nan=True)
    assert torch.isnan(m[0]) and not torch.isnan(m[1]) and torch.isnan(m[2])
    m.sum().backward()
    assert x.grad[0, 5] == 1 and x.grad[2, 39] == 1 and x.grad.sum() == 3  # the first NaN takes the gradient
    torch.testing.assert_close(softmax(x.detach(), 1), torch.softmax(x.detach(), 1), equal_nan=True)


def test_keepdim_must_be_a_bool(device):
    x = torch.randn(3, 4, device=device)
    with pytest.raises(TypeError, match=r"max: keepdim must be a bool, got str 'no'"):
        pmax(x, -1, keepdim="no")


def test_raw_ops_validate_their_arguments(device):
    """The torch.library ops normalise dims themselves: a negative dim is the
    same as its positive twin, and a bad one is an error, never a crash."""
    x = torch.randn(3, 5, device=device)
    torch.testing.assert_close(torch.ops.pullback.softmax_forward(x, [-1]), torch.softmax(x, -1))
    torch.library.opcheck(torch.ops.pullback.softmax_forward, (x, [-1]))
    with pytest.raises(IndexError, match=r"softmax: dim 2 is out of range"):
        torch.ops.pullback.softmax_forward(x, [2])
    with pytest.raises(ValueError, match=r"softmax: dim \(1, -1\) names dimension 1 more than once"):
        torch.ops.pullback.softmax_forward(x, [1, -1])
    b = torch.softmax(x, -1)
    with pytest.raises(ValueError, match=r"softmax: dB has shape \(3, 4\), expected \(3, 5\)"):
        torch.ops.pullback.softmax_backward([3, 5], [1], b, torch.randn(3, 4, device=device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("block", [4096, 4])
def test_all_nan_rows_give_nan(dtype, block, device, monkeypatch):
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", block)
    x = torch.full((2, 9), float("nan"), dtype=dtype, device=device)
    x[1] = torch.arange(9, dtype=dtype)
    y = pmax(x, -1)
    assert torch.isnan(y[0]) and y[1].item() == 8.0
    assert torch.isnan(softmax(x, -1)[0]).all()


def test_offsets_past_int32_switch_to_64_bits():
    """The row geometry (shapes and strides only, no allocation) asks for 64-bit
    offsets once a tensor spans 2**31 elements, and not before."""
    import generated._runtime as rt
    small = torch.empty((4, 8), device="meta")
    assert rt.RowGeometry([4, 8], [1], [(small, "elem"), (small, "elem")]).IDX64 is False
    big = torch.empty((2**16, 2**15 + 1), device="meta")  # 2**31 + 2**16 elements
    geo = rt.RowGeometry(list(big.shape), [1], [(big, "elem"), (torch.empty(2**16, device="meta"), "row")])
    assert geo.IDX64 is True and geo.n_rows == 2**16 and geo.n_cols == 2**15 + 1
    # a transposed view that spans as far needs them too
    wide = torch.empty((2**15 + 1, 2**16), device="meta").t()
    assert rt.RowGeometry(list(wide.shape), [1], [(wide, "elem")]).IDX64 is True


def test_64_bit_offsets_give_the_same_numbers(monkeypatch, device):
    """The IDX64 kernels (forced on small inputs) against the 32-bit ones."""
    import generated._runtime as rt
    x = torch.randn(5, 3, 11, dtype=torch.float64, device=device, requires_grad=True)
    y = softmax(x, (0, 2))
    (g,) = torch.autograd.grad(y.sum() + (y * y).sum(), x)
    orig = rt.RowGeometry.__init__

    def wide(self, *args, **kwargs):
        orig(self, *args, **kwargs)
        if self.fits:
            self.IDX64 = True
    monkeypatch.setattr(rt.RowGeometry, "__init__", wide)
    y64 = softmax(x, (0, 2))
    (g64,) = torch.autograd.grad(y64.sum() + (y64 * y64).sum(), x)
    torch.testing.assert_close(y64, y)
    torch.testing.assert_close(g64, g)


def test_every_raw_rowwise_op_normalises_a_negative_dim(device):
    """Each registered forward op (not only the public functions) takes dims like
    [-1]: a built-in logsumexp's raw op with [-1] once returned a wrong-shaped
    tensor of garbage."""
    x = torch.randn(3, 5, device=device)
    for op, dims, ref in [("logsumexp", [-1], torch.logsumexp(x, -1)), ("log_softmax", [-2], torch.log_softmax(x, 0))]:
        out = getattr(torch.ops.pullback, f"{op}_forward")(x, dims)
        out = out[0] if isinstance(out, (tuple, list)) else out  # the output, then what the backward needs
        torch.testing.assert_close(out, ref)
