"""Count the bytes Triton kernels load and store, under Triton's interpreter.

Used to prove what the kernels promise (a row that fits a block is read once
and written once; attention never writes an M x N tensor) and to report bytes
moved against the ideal in ``pullback bench``.

    with count_traffic() as t:
        y = softmax(x)
    t.total_loaded, t.per_kernel["_softmax_fwd"].bytes_stored

How it counts.  With ``TRITON_INTERPRET=1`` every ``@triton.jit`` kernel is an
``InterpretedFunction`` whose body runs, program by program, against the
module-level ``InterpreterBuilder``.  Every global-memory access of that
builder funnels into two methods, in triton 3.6 through 3.9 alike:

* ``create_masked_load`` -- ``create_load`` (unmasked ``tl.load``), the
  block-pointer load (``create_tensor_pointer_load``, 3.6), the tensor
  descriptor load / gather and ``create_atomic_load`` all call it;
* ``create_masked_store`` -- likewise ``create_store``, the block-pointer and
  descriptor stores / scatter and ``create_atomic_store``.

While a context is open those two are wrapped to add, per call, the number of
elements whose mask is true times the size of the pointee (from the
pointer's triton dtype; a pointer to pointers counts 8 bytes).  The two
read-modify-write atomics, ``create_atomic_rmw`` (masked) and
``create_atomic_cas`` (every element), do not go through them; they are
wrapped too when present and count one load and one store per element.

Which kernel is running comes from wrapping ``InterpretedFunction.run`` (what
``kernel[grid](...)``, autotuners and heuristics all end in): it pushes the
kernel's name for the duration of the launch and counts the launch (warm-up
calls, which run nothing, are not counted).  Device functions called from a
kernel (``InterpretedFunction.__call__``) are not launches: their traffic is
the calling kernel's.

Contexts may nest or overlap; each open ``Traffic`` sees every access made
while it is open.  The patches are installed when the first context opens
and removed when the last one closes.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["KernelTraffic", "Traffic", "count_traffic"]

NOT_INTERPRETING = "count_traffic needs TRITON_INTERPRET=1 set before triton is imported"
OUTSIDE = "<outside a kernel>"  # accesses seen with no launch under way (should not happen)


@dataclass
class KernelTraffic:
    kernel: str
    launches: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0

    @property
    def total(self) -> int:
        return self.bytes_loaded + self.bytes_stored


@dataclass
class Traffic:
    per_kernel: dict[str, KernelTraffic] = field(default_factory=dict)
    # bytes loaded / stored inside the memory of each watched tensor (``count_traffic(watch=...)``)
    per_tensor: dict[str, KernelTraffic] = field(default_factory=dict)
    regions: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)  # name -> [start, end)

    @property
    def total_loaded(self) -> int:
        return sum(k.bytes_loaded for k in self.per_kernel.values())

    @property
    def total_stored(self) -> int:
        return sum(k.bytes_stored for k in self.per_kernel.values())

    @property
    def total(self) -> int:
        return self.total_loaded + self.total_stored

    @property
    def launches(self) -> int:
        return sum(k.launches for k in self.per_kernel.values())

    def kernel(self, name: str) -> KernelTraffic:
        """The entry for ``name``, created empty if that kernel has not run."""
        entry = self.per_kernel.get(name)
        if entry is None:
            entry = self.per_kernel[name] = KernelTraffic(name)
        return entry


# ---------------------------------------------------------------------------
# hook state (module level: the interpreter's builder is a module singleton)

_lock = threading.RLock()
_active: list[Traffic] = []  # open contexts, in opening order
_running: list[str] = []  # names of the kernels being launched (innermost last)
_saved: list[tuple[type, str, object]] = []  # (class, attribute, own original or _INHERITED)
_INHERITED = object()

# builder methods every supported triton has; without them nothing would be counted
_REQUIRED_BUILDER = ("create_masked_load", "create_masked_store")


def _interpreting() -> bool:
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the environment decides
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def _interpreter_module():
    if not _interpreting():
        raise RuntimeError(NOT_INTERPRETING)
    try:
        from triton.runtime import interpreter
    except ImportError as e:  # pragma: no cover - depends on the triton build
        raise RuntimeError(f"count_traffic: cannot import triton's interpreter ({e})") from e
    missing = [n for n in ("InterpreterBuilder", "InterpretedFunction") if not hasattr(interpreter, n)]
    missing += [f"InterpreterBuilder.{n}" for n in _REQUIRED_BUILDER
                if hasattr(interpreter, "InterpreterBuilder") and not hasattr(interpreter.InterpreterBuilder, n)]
    if hasattr(interpreter, "InterpretedFunction") and not hasattr(interpreter.InterpretedFunction, "run"):
        missing.append("InterpretedFunction.run")
    if missing:
        import triton
        raise RuntimeError(f"count_traffic: triton {getattr(triton, '__version__', '?')}'s interpreter has no "
                           f"{', '.join(missing)}; the byte counter supports triton 3.6 to 3.9")
    return interpreter


def _element_bytes(ptrs) -> int:
    """Size of what the pointer tensor ``ptrs`` (a TensorHandle) points at."""
    import triton.language as tl
    ty = ptrs.dtype
    while isinstance(ty, tl.block_type):
        ty = ty.element_ty
    pointee = ty.element_ty if isinstance(ty, tl.pointer_type) else ty
    if isinstance(pointee, tl.pointer_type):
        return 8
    return max(int(pointee.primitive_bitwidth) // 8, 1)


def _active_elements(ptrs, mask, region: tuple[int, int] | None = None) -> int:
    """How many of the pointers in ``ptrs`` the mask lets through (and, given a
    ``region`` [start, end) of addresses, point inside it).

    ``mask`` is a TensorHandle, or (block pointers and descriptors in triton
    3.6) a bare numpy array, or None for all of them.
    """
    import numpy as np
    data = np.asarray(ptrs.data)
    shape = np.shape(data)
    if mask is None and region is None:  # every pointer: no array to build (each load and store comes here)
        return int(np.prod(shape, dtype=np.int64))
    if mask is None:
        m = np.ones(shape, dtype=bool)
    else:
        m = mask if isinstance(mask, np.ndarray) else getattr(mask, "data", mask)
        m = np.asarray(m).astype(bool, copy=False)
    try:
        m = np.broadcast_to(m, np.broadcast_shapes(m.shape, shape))
    except ValueError:  # shapes that do not broadcast: count the mask as given
        return 0 if region is not None else int(np.count_nonzero(m))
    if region is not None:
        addr = np.broadcast_to(data, m.shape).astype(np.uint64, copy=False)
        m = m & (addr >= np.uint64(region[0])) & (addr < np.uint64(region[1]))
    return int(np.count_nonzero(m))


def _record(loaded: int, stored: int, ptrs=None, mask=None) -> None:
    name = _running[-1] if _running else OUTSIDE
    for traffic in _active:
        entry = traffic.kernel(name)
        entry.bytes_loaded += loaded
        entry.bytes_stored += stored
        if traffic.regions and ptrs is not None:
            for tname, (start, end) in traffic.regions.items():
                inside = _active_elements(ptrs, mask, (start, end)) * _element_bytes(ptrs)
                if inside:
                    t = traffic.per_tensor.setdefault(tname, KernelTraffic(tname))
                    t.bytes_loaded += inside if loaded else 0
                    t.bytes_stored += inside if stored else 0


def _install(interp) -> None:
    builder, function = interp.InterpreterBuilder, interp.InterpretedFunction
    orig_load, orig_store = builder.create_masked_load, builder.create_masked_store
    orig_run = function.run

    def create_masked_load(self, ptrs, mask, *args, **kwargs):
        _record(_active_elements(ptrs, mask) * _element_bytes(ptrs), 0, ptrs, mask)
        return orig_load(self, ptrs, mask, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        _record(0, _active_elements(ptrs, mask) * _element_bytes(ptrs), ptrs, mask)
        return orig_store(self, ptrs, value, mask, *args, **kwargs)

    def run(self, *args, **kwargs):
        if kwargs.get("warmup"):
            return orig_run(self, *args, **kwargs)
        name = getattr(getattr(self, "fn", None), "__name__", None) or type(self).__name__
        for traffic in _active:
            traffic.kernel(name).launches += 1
        _running.append(name)
        try:
            return orig_run(self, *args, **kwargs)
        finally:
            _running.pop()

    patches = [(builder, "create_masked_load", create_masked_load),
               (builder, "create_masked_store", create_masked_store),
               (function, "run", run)]

    orig_rmw = getattr(builder, "create_atomic_rmw", None)
    if orig_rmw is not None:
        def create_atomic_rmw(self, op, ptr, val, mask, *args, **kwargs):
            nbytes = _active_elements(ptr, mask) * _element_bytes(ptr)
            _record(nbytes, nbytes)
            return orig_rmw(self, op, ptr, val, mask, *args, **kwargs)
        patches.append((builder, "create_atomic_rmw", create_atomic_rmw))

    orig_cas = getattr(builder, "create_atomic_cas", None)
    if orig_cas is not None:
        def create_atomic_cas(self, ptr, *args, **kwargs):
            nbytes = _active_elements(ptr, None) * _element_bytes(ptr)
            _record(nbytes, nbytes)
            return orig_cas(self, ptr, *args, **kwargs)
        patches.append((builder, "create_atomic_cas", create_atomic_cas))

    for owner, attr, wrapper in patches:
        _saved.append((owner, attr, owner.__dict__.get(attr, _INHERITED)))
        setattr(owner, attr, wrapper)


def _uninstall() -> None:
    while _saved:
        owner, attr, original = _saved.pop()
        if original is _INHERITED:
            delattr(owner, attr)
        else:
            setattr(owner, attr, original)
    _running.clear()


@contextmanager
def count_traffic(watch: dict | None = None) -> Iterator[Traffic]:
    """Count bytes loaded and stored by every kernel launched inside the block.

    Yields a :class:`Traffic` that fills while kernels run.  ``watch`` maps
    names to CPU tensors: the bytes accessed inside each one's memory are
    also counted apart, in ``per_tensor[name]``.  Needs triton's interpreter
    (``TRITON_INTERPRET=1`` before triton is imported); raises RuntimeError
    otherwise, or when this triton's interpreter lacks the methods the
    counter hooks.
    """
    interp = _interpreter_module()
    traffic = Traffic()
    for tname, t in (watch or {}).items():
        start = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        span = sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if n > 0) + 1 if t.numel() else 0
        traffic.regions[tname] = (start, start + span * t.element_size())
    with _lock:
        if not _active:
            try:
                _install(interp)
            except BaseException:
                _uninstall()
                raise
        _active.append(traffic)
    try:
        yield traffic
    finally:
        with _lock:
            for i, t in enumerate(_active):  # by identity: Traffic compares by value
                if t is traffic:
                    del _active[i]
                    break
            if not _active:
                _uninstall()
