"""A tiny op for tests/test_aot.py: one row kernel, its launcher and its AOT_CASES."""
import torch
import triton
import triton.language as tl


@triton.jit
def _row_normalize(X_ptr, Y_ptr, row_stride, col_stride, n_cols, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y[r, :] = X[r, :] / sum(X[r, :]) for one row per program."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X_ptr + row * row_stride + offs * col_stride, mask=mask, other=0.0).to(ACC)
    y = x / tl.sum(x, axis=0)
    tl.store(Y_ptr + row * n_cols + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


def row_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of a 2-D tensor divided by their sums (no autograd: the build runs no backward)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _row_normalize[(x.shape[0],)](x, y, x.stride(0), x.stride(1), x.shape[1], ACC=tl.float32, BLOCK=1024,
                                  num_warps=4)
    return y


AOT_CASES = [
    {"op": "row_normalize", "label": "rows of 1024", "inputs": [[64, 1024]], "dtypes": ["float16"]},
    {"op": "row_normalize", "label": "rows of 1000", "inputs": [[64, 1000]], "dtypes": ["float16"]},
]
