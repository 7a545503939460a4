"""Count the bytes Triton kernels load and store, under Triton's interpreter.

Used to prove what the kernels promise (a row that fits a block is read once
and written once; attention never writes an M x N tensor) and to report bytes
moved against the ideal in ``pullback bench``.  Every pointer load and store
of the interpreter goes through ``InterpreterBuilder.create_masked_load`` /
``create_masked_store`` (plain loads and stores call them with an all-true
mask); we wrap those two while the context is open and count the elements
whose mask is true, times the pointee's size.

    with count_traffic() as t:
        y = softmax(x)
    t.total_loaded, t.per_kernel["_softmax_fwd"].bytes_stored
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class KernelTraffic:
    kernel: str
    launches: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0


@dataclass
class Traffic:
    per_kernel: dict[str, KernelTraffic] = field(default_factory=dict)

    @property
    def total_loaded(self) -> int:
        return sum(k.bytes_loaded for k in self.per_kernel.values())

    @property
    def total_stored(self) -> int:
        return sum(k.bytes_stored for k in self.per_kernel.values())

    @property
    def total(self) -> int:
        return self.total_loaded + self.total_stored


def _interpreter():
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
        raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before triton is imported")
    from triton.runtime import interpreter
    for name in ("InterpreterBuilder", "InterpretedFunction"):
        if not hasattr(interpreter, name):
            raise RuntimeError(f"count_traffic: this triton's interpreter has no {name}")
    builder = interpreter.InterpreterBuilder
    for name in ("create_masked_load", "create_masked_store"):
        if not hasattr(builder, name):
            raise RuntimeError(f"count_traffic: this triton's interpreter has no InterpreterBuilder.{name}")
    return interpreter


def _bytes(ptrs, mask) -> int:
    import numpy as np
    elem = ptrs.get_element_ty()
    size = max(elem.primitive_bitwidth // 8, 1)
    active = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).sum()
    return int(active) * size


@contextmanager
def count_traffic():
    """Count bytes loaded and stored by every kernel launched inside the block."""
    interp = _interpreter()
    builder, function = interp.InterpreterBuilder, interp.InterpretedFunction
    traffic = Traffic()
    current = ["<unknown>"]
    orig_load, orig_store, orig_run = builder.create_masked_load, builder.create_masked_store, function.run

    def entry() -> KernelTraffic:
        return traffic.per_kernel.setdefault(current[0], KernelTraffic(current[0]))

    def load(self, ptrs, mask, *args, **kwargs):
        entry().bytes_loaded += _bytes(ptrs, mask)
        return orig_load(self, ptrs, mask, *args, **kwargs)

    def store(self, ptrs, value, mask, *args, **kwargs):
        entry().bytes_stored += _bytes(ptrs, mask)
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    def run(self, *args, **kwargs):
        previous = current[0]
        current[0] = self.fn.__name__
        entry().launches += 1
        try:
            return orig_run(self, *args, **kwargs)
        finally:
            current[0] = previous

    builder.create_masked_load, builder.create_masked_store, function.run = load, store, run
    try:
        yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store, function.run = orig_load, orig_store, orig_run
