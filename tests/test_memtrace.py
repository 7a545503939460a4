"""derive.memtrace: bytes each kernel loads and stores under Triton's interpreter.

Small hand-written kernels whose traffic is known exactly: masked elements do
not count, each load counts on its own, the element size comes from the
pointer's dtype, and launches are counted per kernel.
"""
import os

# The kernels below must be decorated in interpreter mode, so the flag is set
# before triton is imported.  On a machine with a GPU (where conftest leaves
# the flag alone) it is put back afterwards so that other test modules keep
# compiling their kernels; the tests here set it again while they run.
_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # not setdefault: a caller's "0" would leave these kernels compiled

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from derive.memtrace import KernelTraffic, Traffic, count_traffic  # noqa: E402


@triton.jit
def _copy_rows(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    v = tl.load(x_ptr + row * stride + cols, mask=mask, other=0)
    tl.store(y_ptr + row * stride + cols, v, mask=mask)


@triton.jit
def _load_twice(x_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    a = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    b = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * stride + cols, a + b, mask=mask)


@triton.jit
def _masked_row(base, cols, mask):
    return tl.load(base + cols, mask=mask, other=0.0)


@triton.jit
def _scale_rows(x_ptr, s_ptr, y_ptr, n, stride, BLOCK: tl.constexpr):
    # an unmasked scalar load, and a load inside a device function
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    s = tl.load(s_ptr)
    v = _masked_row(x_ptr + row * stride, cols, mask)
    tl.store(y_ptr + row * stride + cols, v * s, mask=mask)


@triton.jit
def _sum_rows_atomic(x_ptr, out_ptr, n, stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    v = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0)
    tl.atomic_add(out_ptr + cols, v, mask=mask)


@triton.jit
def _copy_rows_desc(x_ptr, y_ptr, rows, n, stride, BLOCK: tl.constexpr):
    # tensor descriptors: the out-of-bounds part of each [1, BLOCK] block is masked by the interpreter
    row = tl.program_id(0)
    xd = tl.make_tensor_descriptor(x_ptr, shape=[rows, n], strides=[stride, 1], block_shape=[1, BLOCK])
    yd = tl.make_tensor_descriptor(y_ptr, shape=[rows, n], strides=[stride, 1], block_shape=[1, BLOCK])
    yd.store([row, 0], xd.load([row, 0]))


ROWS, N, BLOCK = 5, 37, 64  # n is not a power of two: 27 of each row's 64 lanes are masked off


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _copy(x):
    y = torch.empty_like(x)
    _copy_rows[(x.shape[0], )](x, y, x.shape[1], x.stride(0), BLOCK=BLOCK)
    return y


@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.float16, 2), (torch.int64, 8), (torch.bool, 1)])
def test_copy_reads_once_writes_once(dtype, size):
    x = (torch.randn(ROWS, N) * 10).to(dtype)
    with count_traffic() as t:
        y = _copy(x)
    assert torch.equal(y, x)
    assert isinstance(t, Traffic)
    assert set(t.per_kernel) == {"_copy_rows"}
    k = t.per_kernel["_copy_rows"]
    assert isinstance(k, KernelTraffic) and k.kernel == "_copy_rows"
    assert k.launches == 1
    assert k.bytes_loaded == k.bytes_stored == ROWS * N * size
    assert (t.total_loaded, t.total_stored, t.total) == (ROWS * N * size, ROWS * N * size, 2 * ROWS * N * size)


def test_float32_exact_bytes():
    x = torch.randn(ROWS, N, dtype=torch.float32)
    with count_traffic() as t:
        _copy(x)
    assert t.total_loaded == t.total_stored == ROWS * N * 4 == 740


def test_each_load_counts():
    x = torch.randn(ROWS, N)
    y = torch.empty_like(x)
    with count_traffic() as t:
        _load_twice[(ROWS, )](x, y, N, x.stride(0), BLOCK=BLOCK)
    torch.testing.assert_close(y, 2 * x)
    k = t.per_kernel["_load_twice"]
    assert k.bytes_loaded == 2 * ROWS * N * 4
    assert k.bytes_stored == ROWS * N * 4


def test_tensor_descriptor_counts_in_bounds_elements():
    x = torch.randn(ROWS, 40)[:, :N]  # rows 160 bytes apart: descriptors want 16-byte aligned strides
    y = torch.zeros(ROWS, 40)[:, :N]
    with count_traffic() as t:
        _copy_rows_desc[(ROWS, )](x, y, ROWS, N, x.stride(0), BLOCK=BLOCK)
    assert torch.equal(y, x)
    k = t.per_kernel["_copy_rows_desc"]
    assert k.bytes_loaded == k.bytes_stored == ROWS * N * 4


def test_watched_tensors_are_counted_apart():
    # x [ROWS, N] read in row slices of a wider buffer, s read once per row, y written: each watched
    # tensor's bytes come back apart, the totals unchanged; an unwatched tensor is not listed
    buf = torch.randn(ROWS, 2 * N)
    x, s, y = buf[:, :N], torch.tensor([2.0]), torch.zeros(ROWS, 2 * N)[:, N:]  # (the kernel's one stride)
    with count_traffic(watch={"x": x, "s": s, "y": y}) as t:
        _scale_rows[(ROWS, )](x, s, y, N, x.stride(0), BLOCK=BLOCK)
    torch.testing.assert_close(y, 2 * x)
    per = {k: (v.bytes_loaded, v.bytes_stored) for k, v in t.per_tensor.items()}
    assert per == {"x": (ROWS * N * 4, 0), "s": (ROWS * 4, 0), "y": (0, ROWS * N * 4)}
    assert (t.total_loaded, t.total_stored) == (ROWS * N * 4 + ROWS * 4, ROWS * N * 4)
    with count_traffic(watch={"s": s}) as t:
        _scale_rows[(ROWS, )](x, s, y, N, x.stride(0), BLOCK=BLOCK)
    assert set(t.per_tensor) == {"s"} and t.per_tensor["s"].bytes_loaded == ROWS * 4


def test_launches_and_per_kernel_split():
    x = torch.randn(ROWS, N)
    y = torch.empty_like(x)
    with count_traffic() as t:
        for _ in range(3):
            _copy(x)
        _load_twice[(ROWS, )](x, y, N, x.stride(0), BLOCK=BLOCK)
    assert {name: k.launches for name, k in t.per_kernel.items()} == {"_copy_rows": 3, "_load_twice": 1}
    assert t.per_kernel["_copy_rows"].bytes_loaded == 3 * ROWS * N * 4
    assert t.per_kernel["_copy_rows"].bytes_stored == 3 * ROWS * N * 4
    assert t.total_loaded == 5 * ROWS * N * 4
    assert t.total_stored == 4 * ROWS * N * 4


def test_scalar_load_and_device_function_count_for_the_kernel():
    x = torch.randn(ROWS, N)
    s = torch.tensor([3.0])
    y = torch.empty_like(x)
    with count_traffic() as t:
        _scale_rows[(ROWS, )](x, s, y, N, x.stride(0), BLOCK=BLOCK)
    torch.testing.assert_close(y, 3 * x)
    assert set(t.per_kernel) == {"_scale_rows"}  # the device function is not a launch
    k = t.per_kernel["_scale_rows"]
    assert k.launches == 1
    assert k.bytes_loaded == ROWS * (N * 4 + 4)  # one scalar per program
    assert k.bytes_stored == ROWS * N * 4


def test_atomic_add_reads_and_writes_its_target():
    x = torch.randn(ROWS, N)
    out = torch.zeros(N)
    with count_traffic() as t:
        _sum_rows_atomic[(ROWS, )](x, out, N, x.stride(0), BLOCK=BLOCK)
    torch.testing.assert_close(out, x.sum(0))
    k = t.per_kernel["_sum_rows_atomic"]
    assert k.bytes_loaded == 2 * ROWS * N * 4  # x, and the read half of each read-modify-write
    assert k.bytes_stored == ROWS * N * 4


def test_nothing_counted_outside_the_block_and_hooks_restored():
    from triton.runtime import interpreter
    before = (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store,
              interpreter.InterpretedFunction.run)
    x = torch.randn(ROWS, N)
    with count_traffic() as t:
        assert interpreter.InterpreterBuilder.create_masked_load is not before[0]
    _copy(x)
    assert t.per_kernel == {} and t.total == 0
    after = (interpreter.InterpreterBuilder.create_masked_load, interpreter.InterpreterBuilder.create_masked_store,
             interpreter.InterpretedFunction.run)
    assert after == before


def test_hooks_restored_after_an_error():
    from triton.runtime import interpreter
    before = interpreter.InterpreterBuilder.create_masked_load
    with pytest.raises(ZeroDivisionError):
        with count_traffic():
            1 / 0
    assert interpreter.InterpreterBuilder.create_masked_load is before


def test_nested_contexts_each_count():
    x = torch.randn(ROWS, N)
    with count_traffic() as outer:
        with count_traffic() as empty:  # equal by value to outer when it closes: must not take outer with it
            pass
        _copy(x)
        with count_traffic() as inner:
            _copy(x)
    assert empty.total == 0
    assert inner.per_kernel["_copy_rows"].launches == 1 and inner.total_loaded == ROWS * N * 4
    assert outer.per_kernel["_copy_rows"].launches == 2 and outer.total_loaded == 2 * ROWS * N * 4


def test_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        with count_traffic():
            pass


# leave the environment as this module found it (see the top); the autouse fixture sets it for each test
if _PREVIOUS is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS
