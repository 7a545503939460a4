"""``pullback build``: compile Triton kernels ahead of time for real NVIDIA GPUs.

No GPU is needed.  ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``
lowers a ``@triton.jit`` function to PTX for compute capability ``cc``, and
the ``ptxas`` that triton ships reports (``-v``) its registers and spills;
triton's metadata gives its shared memory.

Each module to build lists its configurations in a module-level ``AOT_CONFIGS``::

    AOT_CONFIGS = [
        {"kernel": "_softmax_fwd",                      # a @triton.jit attribute of the module
         "signature": {"X": "*fp16", "n": "i32", "BLOCK": "constexpr", "ACC": "constexpr"},
         "constexprs": {"BLOCK": 1024, "ACC": "tl.float32"},  # "tl.<name>" -> getattr(tl, name)
         "num_warps": 4,                                # optional, default 4
         "label": "fp16, D=64"},                        # optional text for the table
    ]

``triton.compile`` needs real ``JITFunction`` objects, which ``@triton.jit`` only
makes when triton's interpreter is off (``TRITON_INTERPRET`` unset or "0" when
triton is first imported).  The tests and the CPU fallback run with the
interpreter on, so :func:`run_in_subprocess` builds in a child process
(``python -m derive.aot <modules>``) that writes one JSON object per line:
``{"progress": text}``, a :class:`KernelStats` as a dict, or ``{"error": text}``.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ARCHS = (80, 90)

__all__ = ["AotError", "KernelStats", "compile_kernel", "ptxas_stats", "parse_ptxas_log", "build_module",
           "run_in_subprocess", "format_table"]


class AotError(RuntimeError):
    """A kernel failed to compile ahead of time, or its configuration is wrong."""


@dataclass(frozen=True)
class KernelStats:
    """One kernel built for one GPU architecture."""
    module: str        # e.g. "generated.softmax"
    kernel: str        # the @triton.jit attribute name, e.g. "_softmax_fwd"
    arch: int          # compute capability, e.g. 90 for sm_90
    config: str        # short text, e.g. "BLOCK=1024, warps=4"
    registers: int     # per thread
    spill_stores: int  # bytes
    spill_loads: int   # bytes
    shared_bytes: int  # shared memory per program (block)


# ---- compiling one kernel (needs triton with the interpreter off)

def _constexpr_value(value):
    """A constexpr from AOT_CONFIGS: "tl.float32" -> tl.float32; ints and bools as they are."""
    if isinstance(value, str) and value.startswith("tl."):
        import triton.language as tl
        try:
            return getattr(tl, value[3:])
        except AttributeError:
            raise AotError(f"unknown triton name {value!r} in constexprs") from None
    return value


def _jit_function_class():
    from triton.runtime.jit import JITFunction
    return JITFunction


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4) -> tuple[str, dict]:
    """Compile ``fn`` (a ``@triton.jit`` function) for ``sm_<arch>`` with no GPU present.

    ``signature`` maps every argument name to a triton type ("*fp16", "i32",
    "fp32", ..., "constexpr"); ``constexprs`` gives the constexpr values by name
    (strings "tl.<dtype>" become triton dtypes).  Returns the PTX text and a
    metadata dict with ``shared`` (bytes), ``num_warps`` and ``name``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not isinstance(fn, _jit_function_class()):
        raise AotError(f"{getattr(fn, '__name__', fn)!r} is not a compiled-mode @triton.jit function "
                       f"(got {type(fn).__name__}); build with TRITON_INTERPRET=0 set before triton is imported")
    names = list(fn.arg_names)
    unknown = [k for k in list(signature) + list(constexprs) if k not in names]
    missing = [k for k in names if k not in signature]
    if unknown or missing:
        raise AotError(f"{fn.__name__}: signature/constexprs do not match the kernel's arguments"
                       + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                       + (f"; missing from signature: {', '.join(missing)}" if missing else ""))
    # Keys as 1-tuples of argument indices: the form ASTSource stores, accepted by triton 3.x
    # (3.6 through 3.9 also take names; older releases only indices).
    consts = {(names.index(k),): _constexpr_value(v) for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature={k: signature[k] for k in names}, constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", int(arch), 32), options={"num_warps": int(num_warps)})
    meta = compiled.metadata
    return compiled.asm["ptx"], {"shared": int(meta.shared), "num_warps": int(meta.num_warps),
                                 "name": str(getattr(meta, "name", fn.__name__))}


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


# ---- building a module's AOT_CONFIGS

_CONFIG_KEYS = ("kernel", "signature", "constexprs")


def _config_text(cfg: dict) -> str:
    """Short text for the table: the config's label, or its BLOCK*/SINGLE constexprs, plus warps."""
    label = cfg.get("label")
    if not label:
        const = cfg.get("constexprs", {})
        shown = {k: v for k, v in const.items() if k.startswith("BLOCK") or k == "SINGLE"} or const
        label = ", ".join(f"{k}={v}" for k, v in shown.items())
    return ", ".join(p for p in (label, f"warps={cfg.get('num_warps', 4)}") if p)


def build_module(module_name: str, archs: Iterable[int] = DEFAULT_ARCHS,
                 progress: Callable[[str], None] | None = None) -> list[KernelStats]:
    """Compile every entry of ``<module_name>.AOT_CONFIGS`` for each arch.

    Must run where triton's interpreter is off (see :func:`run_in_subprocess`).
    ``progress`` is called with one line before each kernel build.  Raises
    :class:`AotError` naming the module and kernel on any failure.
    """
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 -- any import failure is reported the same way
        raise AotError(f"cannot import {module_name}: {type(e).__name__}: {e}") from e
    configs = getattr(module, "AOT_CONFIGS", None)
    if configs is None:
        raise AotError(f"{module_name} has no AOT_CONFIGS list")
    out = []
    for i, cfg in enumerate(configs):
        missing = [k for k in _CONFIG_KEYS if k not in cfg]
        if missing:
            raise AotError(f"{module_name}.AOT_CONFIGS[{i}] lacks {', '.join(missing)}")
        name = cfg["kernel"]
        where = f"{module_name}.{name}"
        fn = getattr(module, name, None)
        if fn is None:
            raise AotError(f"{module_name} has no kernel {name!r} (named in AOT_CONFIGS[{i}])")
        if not isinstance(fn, _jit_function_class()):
            raise AotError(f"{where} is not a compiled-mode @triton.jit function (got {type(fn).__name__}); "
                           f"run the build with TRITON_INTERPRET=0 set before triton is imported")
        num_warps = int(cfg.get("num_warps", 4))
        config = _config_text(cfg)
        for arch in archs:
            if progress:
                progress(f"compiling {where} ({config}) for sm_{arch} ...")
            try:
                ptx, meta = compile_kernel(fn, cfg["signature"], cfg["constexprs"], arch, num_warps)
                stats = ptxas_stats(ptx, arch)
            except AotError as e:
                raise AotError(f"{where} ({config}) for sm_{arch}: {e}") from e
            except Exception as e:  # noqa: BLE001 -- triton's compile errors carry the source location
                raise AotError(f"{where} ({config}) failed to compile for sm_{arch}: "
                               f"{type(e).__name__}: {e}") from e
            out.append(KernelStats(module_name, name, int(arch), config, stats["registers"],
                                   stats["spill_stores"], stats["spill_loads"], meta["shared"]))
    return out


# ---- the child process and its parent

def run_in_subprocess(module_names: Sequence[str], archs: Iterable[int] = DEFAULT_ARCHS) -> list[KernelStats]:
    """Build ``module_names`` in a child process with triton's interpreter off.

    The child's progress lines are echoed to this process's stderr as they
    arrive.  Raises :class:`AotError` with the child's message if any build fails.
    """
    archs = tuple(int(a) for a in archs)
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "derive.aot", "--archs", ",".join(map(str, archs)), *module_names]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
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


def format_table(stats: Iterable[KernelStats]) -> str:
    """An aligned text table: kernel, arch, config, regs, spills (stores/loads in bytes), smem (bytes)."""
    head = f"{'kernel':<34} {'arch':<6} {'config':<44} {'regs':>5} {'spills (st/ld)':>15} {'smem':>7}"
    rows = [head, "-" * len(head)]
    for s in stats:
        name = f"{s.module.rsplit('.', 1)[-1]}.{s.kernel}"
        rows.append(f"{name:<34} {'sm_' + str(s.arch):<6} {s.config:<44} {s.registers:>5} "
                    f"{f'{s.spill_stores}/{s.spill_loads}':>15} {s.shared_bytes:>7}")
    return "\n".join(rows)


def _main(argv: list[str]) -> int:
    """``python -m derive.aot [--archs 80,90] MODULE...``: JSON lines on stdout."""
    archs = DEFAULT_ARCHS
    if argv[:1] == ["--archs"]:
        archs = tuple(int(a) for a in argv[1].split(",") if a)
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
        for name in argv:
            for s in build_module(name, archs, progress=lambda m: emit({"progress": m})):
                emit(asdict(s))
    except Exception as e:  # noqa: BLE001 -- reported to the parent, which raises AotError
        emit({"error": str(e) if isinstance(e, AotError) else f"{type(e).__name__}: {e}"})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
