"""A tiny kernel module for tests/test_aot.py: one row kernel and its AOT_CONFIGS."""
import triton
import triton.language as tl


@triton.jit
def _row_normalize(X_ptr, Y_ptr, stride, n_cols, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Y[r, :] = X[r, :] / sum(X[r, :]) for one row per program."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(X_ptr + row * stride + offs, mask=mask, other=0.0).to(ACC)
    y = x / tl.sum(x, axis=0)
    tl.store(Y_ptr + row * stride + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)


AOT_CONFIGS = [
    {"kernel": "_row_normalize", "num_warps": 4,
     "signature": {"X_ptr": "*fp16", "Y_ptr": "*fp16", "stride": "i32", "n_cols": "i32",
                   "ACC": "constexpr", "BLOCK": "constexpr"},
     "constexprs": {"ACC": "tl.float32", "BLOCK": 1024}},
]
