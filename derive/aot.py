"""``pullback build``: compile the kernels that really run, ahead of time, for real NVIDIA GPUs.

No GPU is needed.  What Triton's JIT compiles depends on the call, not only on
the kernel: integer arguments divisible by 16 carry that hint, pointers
16-byte aligned carry theirs, integer arguments equal to 1 (unit strides)
become constants.  Those hints change registers, spills and whether loads are
pipelined through ``cp.async``.  So the build does what a GPU run does:

1. **Capture.**  Each module to build lists representative calls of its public
   op in a module-level ``AOT_CASES`` (shapes, dtypes, keyword arguments)::

       AOT_CASES = [
           {"op": "softmax", "label": "rows of 4096",   # the public op, text for the table
            "inputs": [[1024, 4096]],                    # shapes of its tensor arguments
            "kwargs": {"dim": -1},                       # its other arguments
            "dtypes": ["float16", "bfloat16"]},          # one call per dtype
       ]

   Each case calls the op on CPU tensors that report ``device == cuda`` (no
   memory is touched: ``torch.empty``), then runs its backward through
   autograd.  ``JITFunction.run`` is replaced while the calls run, so every
   kernel launch is recorded (arguments, constexprs, ``num_warps``,
   ``num_stages``) and nothing executes.  The launchers choose configs exactly
   as on a GPU (``torch.cuda.get_device_capability`` answers the arch being built).
2. **Specialise.**  Triton's own binder (``create_function_from_signature`` +
   ``JITFunction._pack_args``, the code ``JITFunction.run`` calls) turns each
   recorded launch into the signature, constexprs and attributes the JIT would
   compile, for the installed triton.  Tensors become stand-ins whose
   ``data_ptr()`` is what the CUDA caching allocator gives (512-byte aligned
   storage, plus the view's offset).
3. **Compile** with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
   (the kernels the JIT would build, deduplicated), in a process pool.
   ``ptxas -v`` gives registers and spills; triton's metadata the shared memory;
   the PTX the tensor-core instructions, TMA and ``cp.async``.

**Tensor-core work ratio** (``work``): the multiply-adds the MMA instructions
issue divided by the multiply-adds of the kernel's ``tt.dot`` ops (Triton IR,
shapes as tiled, padding included).  Each static MMA instruction in the PTX
counts once per executing unit: per warp group (``num_warps / 4``) for
``wgmma``, per warp for ``mma.sync``; each static ``tt.dot`` counts once.  Both
sides count code, not loop trips, so the ratio is exact when every dot is
lowered once (Triton does not unroll or peel these loops).  1.00 means no
duplicated work; 2.00 means e.g. two warp groups each compute the same
64-row score tile.  ``-`` when the kernel has no MMA.

Building needs real ``JITFunction`` objects, which ``@triton.jit`` makes only
with the interpreter off, so :func:`run_in_subprocess` builds in a child
process (``python -m derive.aot``) that writes one JSON object per line:
``{"progress": text}``, a :class:`KernelStats` as a dict, or ``{"error": text}``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = (80, 90)
ALLOC_ALIGN = 512  # bytes: the CUDA caching allocator's block alignment

__all__ = ["AotError", "KernelStats", "Launch", "capture", "build_modules", "ptxas_stats", "parse_ptxas_log",
           "ptx_features", "work_ratio", "run_in_subprocess", "format_table"]


class AotError(RuntimeError):
    """A kernel failed to compile ahead of time, or a module's AOT_CASES are wrong."""


@dataclass(frozen=True)
class KernelStats:
    """One kernel, as the JIT would build it for one call, built for one GPU architecture."""
    module: str        # e.g. "generated.softmax"
    kernel: str        # the @triton.jit attribute name, e.g. "_softmax_fwd"
    arch: int          # compute capability, e.g. 90 for sm_90
    case: str          # the first call that launches this build, e.g. "fp16 rows of 4096"
    config: str        # its constexpr tiles, warps and stages, e.g. "BLOCK=4096, SINGLE=True, warps=8, stages=3"
    registers: int     # per thread
    spill_stores: int  # bytes
    spill_loads: int   # bytes
    shared_bytes: int  # shared memory per program (block)
    mma: str = "-"     # tensor-core instructions and shapes, e.g. "wgmma m64n64k16"
    tma: bool = False  # cp.async.bulk.tensor
    cp_async: bool = False  # cp.async (global -> shared copies, pipelined loads)
    work: float | None = None  # tensor-core work ratio (see the module docstring); None without MMA
    specialization: str = ""   # the JIT's hints: "D" divisible by 16, "=1" constant one
    cases: list = field(default_factory=list)  # every call that launches this same build


# ---- capture: run the public ops with CUDA-looking tensors and record the launches

@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``; tensors replaced by :class:`_Pointer`."""
    module: str
    kernel: str
    case: str
    fn: object
    args: tuple
    kwargs: dict


class _Pointer:
    """What triton's specialisation reads from a tensor: its dtype and ``data_ptr()``."""

    def __init__(self, dtype, address: int):
        self.dtype = dtype
        self._address = address

    def data_ptr(self) -> int:
        return self._address


def _as_pointer(t, slot: int) -> _Pointer:
    """A tensor's stand-in: a fresh allocation (ALLOC_ALIGN-aligned) plus the view's offset."""
    return _Pointer(t.dtype, ALLOC_ALIGN * (1 + 4096 * slot) + t.storage_offset() * t.element_size())


def _stand_in(a, slot: int):
    """A launch argument as the specialisation reads it: a tensor becomes a :class:`_Pointer`;
    a host-side tensor descriptor (triton.tools.tensor_descriptor, TMA) the same descriptor
    over its tensor's stand-in (the JIT specialises it by dtype and block shape); the rest as is."""
    import torch
    if isinstance(a, torch.Tensor):
        return _as_pointer(a, slot)
    if dataclasses.is_dataclass(a) and isinstance(getattr(a, "base", None), torch.Tensor):
        return dataclasses.replace(a, base=_as_pointer(a.base, slot))
    return a


def _cuda_looking_class():
    import torch

    class CudaLooking(torch.Tensor):
        """A CPU tensor that says it lives on ``cuda:0``, so the ops' device checks pass."""

        @property
        def device(self):
            return torch.device("cuda", 0)

        @property
        def is_cuda(self):
            return True

    return CudaLooking


_FACTORIES = ("empty", "zeros", "ones", "full", "empty_strided", "arange", "tensor", "rand", "randn", "as_tensor")


@contextlib.contextmanager
def _pretend_cuda(arch: int, record: Callable):
    """While active: torch factories asked for a CUDA device allocate on the CPU,
    ``torch.cuda.get_device_capability`` answers ``arch``, and every Triton
    launch calls ``record(fn, args, kwargs)`` instead of running."""
    import torch
    from triton.runtime.jit import JITFunction

    looking = _cuda_looking_class()

    def cpu_instead(f):
        @functools.wraps(f)
        def g(*args, **kwargs):
            d = kwargs.get("device")
            if d is not None and torch.device(d).type == "cuda":
                kwargs["device"] = "cpu"
                out = f(*args, **kwargs)  # on the CPU, but saying cuda, as the launchers' checks expect
                return out.as_subclass(looking) if isinstance(out, torch.Tensor) else out
            return f(*args, **kwargs)
        return g

    def run(self, *args, grid, warmup, **kwargs):
        record(self, args, kwargs)

    class Properties:  # what launchers read of the device: its SM count (H100 SXM: 132, A100: 108)
        multi_processor_count = 132 if arch >= 90 else 108
        major, minor = arch // 10, arch % 10

    saved = {n: getattr(torch, n) for n in _FACTORIES}
    saved_cap, saved_props, saved_run = (torch.cuda.get_device_capability, torch.cuda.get_device_properties,
                                         JITFunction.run)
    try:
        for n, f in saved.items():
            setattr(torch, n, cpu_instead(f))
        torch.cuda.get_device_capability = lambda device=None: (arch // 10, arch % 10)
        torch.cuda.get_device_properties = lambda device=None: Properties()
        JITFunction.run = run
        # every tensor (the ops' outputs and saved tensors too, which the registered ops
        # check in the backward) says it lives on cuda:0
        torch.Tensor.device = property(lambda self: torch.device("cuda", 0))
        torch.Tensor.is_cuda = property(lambda self: True)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch, n, f)
        torch.cuda.get_device_capability, torch.cuda.get_device_properties, JITFunction.run = \
            saved_cap, saved_props, saved_run
        del torch.Tensor.device, torch.Tensor.is_cuda  # back to torch's own (on the C base class)


_DTYPE_SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


def _check_case(module_name: str, i: int, case) -> None:
    where = f"{module_name}.AOT_CASES[{i}]"
    if not isinstance(case, dict):
        raise AotError(f"{where} is a {type(case).__name__}, expected a dict")
    missing = [k for k in ("op", "inputs", "dtypes") if k not in case]
    if missing:
        raise AotError(f"{where} lacks {', '.join(missing)}")
    unknown = sorted(set(case) - {"op", "label", "inputs", "kwargs", "dtypes"})
    if unknown:
        raise AotError(f"{where} has unknown keys: {', '.join(unknown)} (known: op, label, inputs, kwargs, dtypes)")
    bad = [d for d in case["dtypes"] if d not in _DTYPE_SHORT]
    if bad:
        raise AotError(f"{where}: unknown dtype {bad[0]!r}; known: {', '.join(_DTYPE_SHORT)}")


def capture(module_name: str, arch: int) -> list[Launch]:
    """Run every case of ``<module_name>.AOT_CASES`` (forward and backward) as on
    an ``sm_<arch>`` GPU and return the kernel launches, in launch order."""
    import torch
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- any import failure is reported the same way
        raise AotError(f"cannot import {module_name}: {type(e).__name__}: {e}") from e
    cases = getattr(module, "AOT_CASES", None)
    if cases is None:
        raise AotError(f"{module_name} has no AOT_CASES list")
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a release without the interpreter
        InterpretedFunction = ()
    interpreted = sorted(k for k, v in vars(module).items() if isinstance(v, InterpretedFunction))
    if interpreted:
        raise AotError(f"{module_name}.{interpreted[0]} is not a compiled-mode @triton.jit function (triton's "
                       f"interpreter is on); build with TRITON_INTERPRET=0 set before triton is imported")
    cuda_looking = _cuda_looking_class()
    launches: list[Launch] = []
    for i, case in enumerate(cases):
        _check_case(module_name, i, case)
        op = getattr(module, case["op"], None)
        if not callable(op):
            raise AotError(f"{module_name} has no op {case['op']!r} (named in AOT_CASES[{i}])")
        for dtype_name in case["dtypes"]:
            label = " ".join(p for p in (_DTYPE_SHORT[dtype_name], case.get("label", "")) if p)
            dtype = getattr(torch, dtype_name)

            def record(fn, args, kwargs, _label=label):
                slots = iter(range(10**6))
                args = tuple(_stand_in(a, next(slots)) for a in args)
                launches.append(Launch(module_name, fn.fn.__name__, _label, fn, args, dict(kwargs)))

            try:
                with _pretend_cuda(arch, record):
                    # an input is a shape (in the case's dtype), or {"shape": [...], "dtype": "int64"}
                    # for an integer input (class targets: no gradient) or another float input (a
                    # gradient with "requires_grad": True)
                    xs = [torch.zeros(list(s["shape"]), dtype=getattr(torch, s["dtype"])).as_subclass(cuda_looking)
                          .requires_grad_(bool(s.get("requires_grad", False)))
                          if isinstance(s, dict) else
                          torch.empty(list(s), dtype=dtype).as_subclass(cuda_looking).requires_grad_()
                          for s in case["inputs"]]
                    out = op(*xs, **case.get("kwargs", {}))
                    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                            if isinstance(o, torch.Tensor) and o.requires_grad]
                    if outs:
                        torch.autograd.backward(outs, [torch.empty_like(o) for o in outs])
            except AotError:
                raise
            except Exception as e:  # noqa: BLE001 -- the op's own message, with the case that raised it
                raise AotError(f"{module_name}: {case['op']} failed on AOT_CASES[{i}] ({label}): "
                               f"{type(e).__name__}: {e}") from e
    return launches


# ---- specialise: what JITFunction.run would hand to the compiler

def _jit_options(fn, kwargs: dict) -> dict:
    """The option keywords JITFunction.run adds before binding (they differ between releases)."""
    from triton import knobs
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    return kwargs


def specialize(launch: Launch, arch: int):
    """``(signature, constexprs, attrs, options)`` exactly as ``JITFunction.run``
    computes them on an ``sm_<arch>`` device, with the installed triton."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", int(arch), 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = _jit_options(fn, launch.kwargs)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def _hints(launch: Launch, signature: dict, attrs: dict) -> str:
    """Short text of the run-time hints: 'n_cols:D' (divisible by 16), 'stride:=1' (constant 1),
    'Q_desc:TMA' (a tensor descriptor)."""
    names = list(signature)
    marks = []
    for i, name in enumerate(names[:len(launch.args)]):
        if signature[name] == "constexpr":
            marks.append(f"{name}={launch.args[i]!r}")
        elif str(signature[name]).startswith("tensordesc"):  # a host-side tensor descriptor (TMA)
            marks.append(f"{name}:TMA")
        elif any(a[0] == "tt.divisibility" for a in attrs.get((i,), [])):
            marks.append(f"{name}:D")
    return " ".join(marks)


def _config_text(launch: Launch, options) -> str:
    """The launch's tile constexprs (BLOCK*, SINGLE), warps and stages."""
    shown = [f"{k}={v}" for k, v in launch.kwargs.items() if k.startswith("BLOCK") or k == "SINGLE"
             or (k == "PHASE" and v)]  # a split row's launches, one per pass
    shown += [f"warps={options.num_warps}", f"stages={options.num_stages}"]
    return ", ".join(shown)


def _key(kernel: str, signature, constexprs, attrs, options) -> str:
    opts = {k: v for k, v in sorted(options.__dict__.items())}
    return repr((kernel, sorted(signature.items()), sorted((k, repr(v)) for k, v in constexprs.items()),
                 sorted((k, repr(v)) for k, v in attrs.items()), repr(opts)))


# ---- PTX and IR reading

_MMA_RE = re.compile(r"^\s*(?:@!?%p\d+\s+)?(wgmma\.mma_async|mma\.sync)\S*?\.(m\d+n\d+k\d+)\S*", re.M)
_DOT_RE = re.compile(r"tt\.dot(?:_scaled)?\b[^\n]*?:\s*tensor<(\d+)x(\d+)x\w+>\s*\*\s*tensor<(\d+)x(\d+)x\w+>")


def ptx_features(ptx: str) -> dict:
    """Tensor-core instructions (kind and shape, static counts), TMA and cp.async use."""
    counts: dict[tuple[str, str], int] = {}
    for m in _MMA_RE.finditer(ptx):
        kind = "wgmma" if m.group(1).startswith("wgmma") else "mma.sync"
        counts[(kind, m.group(2))] = counts.get((kind, m.group(2)), 0) + 1
    return {"mma": counts,
            "tma": "cp.async.bulk.tensor" in ptx,
            "cp_async": re.search(r"\bcp\.async\.(ca|cg|bulk)", ptx) is not None}


def _mnk(shape: str) -> int:
    m, n, k = (int(x) for x in re.findall(r"\d+", shape))
    return m * n * k


def work_ratio(mma_counts: dict, ttir: str, num_warps: int) -> float | None:
    """MMA multiply-adds issued / multiply-adds of the tt.dot tiles (see the module docstring)."""
    if not mma_counts:
        return None
    issued = sum(n * _mnk(shape) * (max(num_warps // 4, 1) if kind == "wgmma" else num_warps)
                 for (kind, shape), n in mma_counts.items())
    useful = sum(int(m) * int(n) * int(k) for m, k, _, n in _DOT_RE.findall(ttir))
    return issued / useful if useful else None


def _mma_text(mma_counts: dict) -> str:
    if not mma_counts:
        return "-"
    return " + ".join(f"{kind} {shape}" for kind, shape in sorted(mma_counts))


# ---- ptxas -v

def _ptxas_candidates(arch: int) -> list[str]:
    """triton's own choice of ptxas for ``arch`` first, then the binaries it ships."""
    import triton
    found = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            found.append(get_ptxas(arch).path)
        except TypeError:  # releases whose get_ptxas() takes no arch
            found.append(get_ptxas().path)
    except Exception:  # noqa: BLE001 -- fall back to the shipped binaries below
        pass
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found += [str(bin_dir / n) for n in ("ptxas", "ptxas-blackwell") if (bin_dir / n).is_file()]
    return [p for p in dict.fromkeys(found) if p and os.path.isfile(p)]


_REGS_RE = re.compile(r"Used (\d+) registers")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers and spill bytes from ``ptxas -v`` output.

    With non-inlined device functions ptxas reports each function: the register
    count is the largest, and spills are summed over all of them.
    """
    regs = [int(m.group(1)) for m in _REGS_RE.finditer(log)]
    spills = [(int(m.group(1)), int(m.group(2))) for m in _SPILL_RE.finditer(log)]
    return {"registers": max(regs, default=0),
            "spill_stores": sum(s for s, _ in spills),
            "spill_loads": sum(ld for _, ld in spills)}


def _ptx_target(ptx: str, arch: int) -> str:
    """The PTX ``.target`` (e.g. "sm_90a"), which ptxas must be given as ``-arch``."""
    m = re.search(r"^\s*\.target\s+([\w]+)", ptx, re.M)
    return m.group(1) if m else f"sm_{arch}"


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Assemble ``ptx`` with triton's ``ptxas -v``; return registers, spill_stores, spill_loads."""
    sm = _ptx_target(ptx, arch)
    candidates = _ptxas_candidates(arch)
    if not candidates:
        raise AotError("triton ships no ptxas (expected <triton>/backends/nvidia/bin/ptxas)")
    errors = []
    with tempfile.TemporaryDirectory(prefix="pullback-aot-") as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in candidates:
            r = subprocess.run([ptxas, f"-arch={sm}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                return parse_ptxas_log(r.stderr + r.stdout)
            errors.append(f"{Path(ptxas).name}: {(r.stderr or r.stdout).strip()[-400:]}")
    raise AotError(f"ptxas failed for {sm}: " + " | ".join(errors))


# ---- compile (in a worker process) and build

_JOBS: list = []  # (launch, arch, signature, constexprs, attrs, options, config, hints, cases); read by forked workers


def _compile_job(index: int) -> dict:
    """Compile job ``index`` of _JOBS as the JIT would; return a KernelStats dict (or raise AotError)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch, arch, signature, constexprs, attrs, options, config, hints, cases = _JOBS[index]
    where = f"{launch.module}.{launch.kernel} ({launch.case}; {config}) for sm_{arch}"
    try:
        src = ASTSource(launch.fn, signature, constexprs, attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options=options.__dict__)
        ptx = compiled.asm["ptx"]
        stats = ptxas_stats(ptx, arch)
    except AotError as e:
        raise AotError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- triton's compile errors carry the source location
        raise AotError(f"{where} failed to compile: {type(e).__name__}: {e}") from None
    feats = ptx_features(ptx)
    ratio = work_ratio(feats["mma"], compiled.asm.get("ttir", ""), int(compiled.metadata.num_warps))
    return asdict(KernelStats(launch.module, launch.kernel, int(arch), launch.case, config, stats["registers"],
                              stats["spill_stores"], stats["spill_loads"], int(compiled.metadata.shared),
                              _mma_text(feats["mma"]), feats["tma"], feats["cp_async"],
                              None if ratio is None else round(ratio, 4), hints, cases))


def _pool_size(jobs: int | None) -> int:
    if jobs:
        return max(int(jobs), 1)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(min(cpus, 8), 1)


def build_modules(module_names: Sequence[str], archs: Iterable[int] = DEFAULT_ARCHS,
                  progress: Callable[[str], None] | None = None, jobs: int | None = None) -> list[KernelStats]:
    """Capture, specialise and compile every kernel launch of the modules' AOT_CASES.

    Must run where triton's interpreter is off (see :func:`run_in_subprocess`).
    One result per distinct build (kernel, arch, signature, constexprs, hints,
    options), in capture order.  Raises :class:`AotError` naming the module,
    kernel, case and arch on any failure.
    """
    from triton.runtime.jit import JITFunction

    _JOBS.clear()
    seen: dict[str, int] = {}
    for arch in archs:
        for name in module_names:
            launches = capture(name, arch)
            if not launches:
                raise AotError(f"{name}: its AOT_CASES launch no Triton kernel")
            for launch in launches:
                if not isinstance(launch.fn, JITFunction):
                    raise AotError(f"{name}.{launch.kernel} is not a compiled-mode @triton.jit function (got "
                                   f"{type(launch.fn).__name__}); build with TRITON_INTERPRET=0 set before "
                                   f"triton is imported")
                try:
                    signature, constexprs, attrs, options = specialize(launch, arch)
                except Exception as e:  # noqa: BLE001 -- a launch the JIT itself would reject
                    raise AotError(f"{name}.{launch.kernel} ({launch.case}): triton rejects the launch: "
                                   f"{type(e).__name__}: {e}") from e
                key = _key(launch.kernel, signature, constexprs, attrs, options) + f"@{arch}"
                if key in seen:
                    _JOBS[seen[key]][-1].append(launch.case)
                    continue
                seen[key] = len(_JOBS)
                _JOBS.append((launch, int(arch), signature, constexprs, attrs, options,
                              _config_text(launch, options), _hints(launch, signature, attrs), [launch.case]))
    workers = min(_pool_size(jobs), len(_JOBS))
    results: list[dict | None] = [None] * len(_JOBS)

    def note(i):
        if progress:
            launch, arch = _JOBS[i][0], _JOBS[i][1]
            progress(f"compiling {launch.module}.{launch.kernel} ({launch.case}; {_JOBS[i][6]}) for sm_{arch} ...")

    if workers <= 1:
        for i in range(len(_JOBS)):
            note(i)
            results[i] = _compile_job(i)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        ctx = multiprocessing.get_context("fork")  # the workers inherit _JOBS and the imported kernels
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = []
            for i in range(len(_JOBS)):
                note(i)
                futures.append(pool.submit(_compile_job, i))
            for i, f in enumerate(futures):
                results[i] = f.result()
    return [KernelStats(**r) for r in results]


# ---- the child process and its parent

def run_in_subprocess(module_names: Sequence[str], archs: Iterable[int] = DEFAULT_ARCHS,
                      jobs: int | None = None) -> list[KernelStats]:
    """Build ``module_names`` in a child process with triton's interpreter off.

    The child's progress lines are echoed to this process's stderr as they
    arrive.  Raises :class:`AotError` with the child's message if any build fails.
    """
    archs = tuple(int(a) for a in archs)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "derive.aot", "--archs", ",".join(map(str, archs))]
    if jobs:
        cmd += ["--jobs", str(int(jobs))]
    proc = subprocess.Popen(cmd + list(module_names), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tail: deque[str] = deque(maxlen=40)  # the child's own stderr, for the message if it dies
    drain = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)
    drain.start()
    stats, error = [], None
    for line in proc.stdout:
        try:
            msg = json.loads(line)
        except ValueError:
            msg = None
        if not isinstance(msg, dict):  # not ours: pass it on
            print(line.rstrip("\n"), file=sys.stderr, flush=True)
        elif "progress" in msg:
            print(msg["progress"], file=sys.stderr, flush=True)
        elif "error" in msg:
            error = msg["error"]
        else:
            stats.append(KernelStats(**msg))
    rc = proc.wait()
    drain.join(timeout=5)
    if error:
        raise AotError(error)
    if rc != 0:
        raise AotError(f"the build process exited with status {rc}: {''.join(tail).strip()[-2000:]}")
    return stats


_COLUMNS = [("kernel", "<"), ("arch", "<"), ("case", "<"), ("config", "<"), ("regs", ">"), ("spills", ">"),
            ("smem", ">"), ("mma", "<"), ("tma", "<"), ("cp.async", "<"), ("work", ">")]


def _row(s: KernelStats) -> list[str]:
    return [f"{s.module.rsplit('.', 1)[-1]}.{s.kernel}", f"sm_{s.arch}", s.case, s.config, str(s.registers),
            f"{s.spill_stores}/{s.spill_loads}", str(s.shared_bytes), s.mma, "yes" if s.tma else "no",
            "yes" if s.cp_async else "no", "-" if s.work is None else f"{s.work:.2f}"]


def format_table(stats: Iterable[KernelStats]) -> str:
    """An aligned text table, one row per build; spills are stores/loads in bytes, smem in bytes."""
    rows = [_row(s) for s in stats]
    head = [c for c, _ in _COLUMNS]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def line(cells):
        return "  ".join(f"{c:{a}{w}}" for c, (_, a), w in zip(cells, _COLUMNS, widths)).rstrip()

    out = [line(head), "-" * len(line(head))] + [line(r) for r in rows]
    width = max(len(x) for x in out)
    return "\n".join(x.ljust(width) for x in out)


def _main(argv: list[str]) -> int:
    """``python -m derive.aot [--archs 80,90] [--jobs N] MODULE...``: JSON lines on stdout."""
    archs, jobs = DEFAULT_ARCHS, None
    while argv[:1] in (["--archs"], ["--jobs"]):
        if argv[0] == "--archs":
            archs = tuple(int(a) for a in argv[1].split(",") if a)
        else:
            jobs = int(argv[1])
        argv = argv[2:]
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # Keep the protocol on a private copy of stdout; anything else printed (by the
    # imported modules, triton or C code) goes to stderr.
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        for s in build_modules(argv, archs, progress=lambda m: emit({"progress": m}), jobs=jobs):
            emit(asdict(s))
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises AotError
        emit({"error": str(e) if isinstance(e, AotError) else f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
