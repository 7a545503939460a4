"""``pullback build``: compile the generated kernels ahead of time for real GPUs.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` builds PTX
and a cubin with no GPU present; triton's own ``ptxas -v`` then reports
registers and spills.  Each generated module lists its default configurations
in ``AOT_CONFIGS``.  ``triton.compile`` needs real ``JITFunction`` objects, so
the compiling runs in a child process with the interpreter off; it reports one
JSON line per kernel build.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class AotError(RuntimeError):
    """A kernel failed to compile ahead of time (or its configuration is wrong)."""


@dataclass(frozen=True)
class KernelStats:
    module: str
    kernel: str
    arch: int
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int


def _constexpr(value):
    if isinstance(value, str) and value.startswith("tl."):
        import triton.language as tl
        return getattr(tl, value[3:])
    return value


def compile_kernel(fn, signature: dict, constexprs: dict, arch: int, num_warps: int = 4) -> tuple[str, dict]:
    """PTX and metadata of one kernel compiled for ``sm_<arch>``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    consts = {(names.index(k),): _constexpr(v) for k, v in constexprs.items()}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return compiled.asm["ptx"], {"shared": int(compiled.metadata.shared), "num_warps": num_warps}


def _ptxas_candidates(arch: int) -> list[str]:
    """triton's own choice of ptxas for ``arch`` first, then the binaries it ships."""
    import triton
    found = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            found.append(get_ptxas(arch).path)
        except TypeError:  # older triton: get_ptxas() takes no arch
            found.append(get_ptxas().path)
    except Exception:
        pass
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    found += [str(bin_dir / n) for n in ("ptxas-blackwell", "ptxas") if (bin_dir / n).is_file()]
    return list(dict.fromkeys(found))


def ptxas_stats(ptx: str, arch: int) -> dict:
    """Registers and spill bytes of a PTX module, from ``ptxas -v``."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    sm = target.group(1).split(",")[0] if target else f"sm_{arch}"
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        for ptxas in _ptxas_candidates(arch):
            r = subprocess.run([ptxas, f"-arch={sm}", "-v", str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                               capture_output=True, text=True)
            if r.returncode == 0:
                log = r.stderr + r.stdout
                regs = re.search(r"Used (\d+) registers", log)
                spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
                return {"registers": int(regs.group(1)) if regs else 0,
                        "spill_stores": int(spills.group(1)) if spills else 0,
                        "spill_loads": int(spills.group(2)) if spills else 0}
            errors.append(f"{Path(ptxas).name}: {r.stderr.strip()[-300:]}")
    raise AotError(f"ptxas failed for {sm}: " + " | ".join(errors or ["triton ships no ptxas"]))


def build_module(module_name: str, archs=(80, 90), progress=None) -> list[KernelStats]:
    """Compile every entry of ``<module>.AOT_CONFIGS`` for each arch."""
    module = importlib.import_module(module_name)
    configs = getattr(module, "AOT_CONFIGS", None)
    if configs is None:
        raise AotError(f"{module_name} has no AOT_CONFIGS list")
    out = []
    for cfg in configs:
        fn = getattr(module, cfg["kernel"], None)
        if fn is None:
            raise AotError(f"{module_name} has no kernel {cfg['kernel']!r} (named in AOT_CONFIGS)")
        if not hasattr(fn, "arg_names") or type(fn).__name__ != "JITFunction":
            raise AotError(f"{module_name}.{cfg['kernel']} is not a compiled-mode @triton.jit function; "
                           f"run the build with TRITON_INTERPRET=0")
        label = cfg.get("label") or ", ".join(f"{k}={v}" for k, v in cfg["constexprs"].items()
                                              if k in ("BLOCK", "SINGLE", "BLOCK_M", "BLOCK_N", "BLOCK_D"))
        config = f"{label}, warps={cfg.get('num_warps', 4)}"
        for arch in archs:
            if progress:
                progress(f"compiling {module_name}.{cfg['kernel']} ({config}) for sm_{arch} ...")
            try:
                ptx, meta = compile_kernel(fn, cfg["signature"], cfg["constexprs"], arch, cfg.get("num_warps", 4))
            except AotError:
                raise
            except Exception as e:  # triton's compile errors carry the source location
                raise AotError(f"{module_name}.{cfg['kernel']} failed to compile for sm_{arch}: {e}") from e
            stats = ptxas_stats(ptx, arch)
            out.append(KernelStats(module_name, cfg["kernel"], arch, config, stats["registers"],
                                   stats["spill_stores"], stats["spill_loads"], meta["shared"]))
    return out


def run_in_subprocess(module_names, archs=(80, 90)) -> list[KernelStats]:
    """Build in a child process with the interpreter off; stream its progress to stderr."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "derive.aot", "--archs", ",".join(map(str, archs)), *module_names]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stats, error = [], None
    for line in proc.stdout:
        msg = json.loads(line)
        if "progress" in msg:
            print(msg["progress"], file=sys.stderr, flush=True)
        elif "error" in msg:
            error = msg["error"]
        else:
            stats.append(KernelStats(**msg))
    stderr = proc.stderr.read()
    if proc.wait() != 0 or error:
        raise AotError(error or f"the build process failed: {stderr.strip()[-2000:]}")
    return stats


def format_table(stats) -> str:
    head = f"{'kernel':<34} {'arch':<6} {'config':<44} {'regs':>5} {'spills (st/ld)':>15} {'smem':>7}"
    rows = [head, "-" * len(head)]
    for s in stats:
        rows.append(f"{s.module.split('.')[-1] + '.' + s.kernel:<34} sm_{s.arch:<3} {s.config:<44} "
                    f"{s.registers:>5} {f'{s.spill_stores}/{s.spill_loads}':>15} {s.shared_bytes:>7}")
    return "\n".join(rows)


def _main(argv: list[str]) -> int:
    archs = (80, 90)
    if argv[:1] == ["--archs"]:
        archs = tuple(int(a) for a in argv[1].split(","))
        argv = argv[2:]

    def emit(obj):
        print(json.dumps(obj), flush=True)

    try:
        for name in argv:
            for s in build_module(name, archs, progress=lambda m: emit({"progress": m})):
                emit(asdict(s))
    except Exception as e:  # reported to the parent, which raises AotError
        emit({"error": str(e)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
