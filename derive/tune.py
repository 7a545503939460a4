"""``pullback tune``: choose launch configs by timing them on the GPU at hand.

A small candidate set per kernel (attention: BLOCK_M, BLOCK_N, warps, stages per
kernel, dtype, head dim and causal flag; row-wise: warps per block size, block
and warps for rows that loop) is timed, and the fastest of each is written to
``templates/tuned_configs.json`` under the GPU's architecture (``sm_90``).
``pullback regen`` places that table in the generated package's runtime
(``TUNED_CONFIGS``), which reads it whenever it chooses a config; an entry that
is missing keeps the runtime's defaults.  Users never pay for tuning at import.

The choice itself is a pure function (:func:`choose`: candidates and a timer in,
table entries out), so it is tested with a timer that is not a GPU.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from derive.emit import TEMPLATES

TABLE = TEMPLATES / "tuned_configs.json"
FORMAT = 1
FAMILIES = ("attention", "rowwise")
NO_GPU = ("pullback tune needs a CUDA device: it times candidate configs on the GPU at hand "
          "(without one the runtime keeps its built-in defaults)")
_SAFE_TEXT = re.compile(r"[A-Za-z0-9 _.,:;()+/=-]*")  # text the runtime's literal may hold (no braces, quotes)


class TuneError(Exception):
    """A table that cannot be used (one line, for the command line)."""


@dataclass(frozen=True)
class Case:
    """One table entry to choose: family ("attention" or "rowwise"), the runtime's
    key (``attention_key`` / ``rowwise_key``), and what to run to time it."""
    family: str
    key: str
    kernel: str = ""          # attention: "fwd", "dkdv" or "dq"; row-wise: ""
    dtype: str = "float16"
    width: int = 0            # attention: padded head dim; row-wise: block (0 for rows that loop)
    causal: bool = False


# ---- candidates ---------------------------------------------------------------------------
def attention_candidates(kernel: str, dtype: str, width: int) -> list[dict]:
    """A small set of tiles for one attention kernel: tutorial 06's shapes (wide
    first: a tie keeps the wider tile) for 2-byte dtypes up to D=128, small
    tiles, lightly pipelined, for fp32/fp64 and D=256."""
    half = dtype in ("float16", "bfloat16")
    if half:
        tiles = [(128, 64), (64, 64), (128, 32), (64, 32), (32, 32)] if width <= 128 else [(32, 16), (32, 32)]
        warps, stages = (4, 8), (2, 3, 4)
    else:  # fp32/fp64 dots run on FMA units: small tiles, unpipelined or lightly pipelined
        tiles = [(32, 32), (32, 16), (16, 16)]
        warps, stages = (4, 8), (1, 2)
    if kernel == "dq" and half and width <= 128:
        tiles = [(64, 64), (128, 64), (64, 32), (32, 32)]
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n in tiles for w in warps for s in stages]


def rowwise_candidates(dtype: str, block: int) -> list[dict]:
    """Warps for rows that fit one block of ``block`` columns; block and warps for
    rows that loop (``block`` 0)."""
    if block:
        return [dict(num_warps=w) for w in (4, 1, 2, 8, 16) if 32 * w <= max(block, 32)]  # a warp per 32+ columns
    blocks = (256, 512, 1024) if dtype == "float64" else (512, 1024, 2048, 4096)
    return [dict(BLOCK=b, num_warps=w) for b in blocks for w in (4, 8)]


def cases(dtypes=("float16", "bfloat16"), widths=(64, 128), blocks=(256, 1024, 4096), quick: bool = False,
          attention_key=None, rowwise_key=None) -> list[Case]:
    """The entries to tune.  ``attention_key``/``rowwise_key`` are the runtime's
    key functions (from ``generated._runtime``), so the table matches its lookups."""
    import torch
    if attention_key is None or rowwise_key is None:
        from generated import _runtime as rt
        attention_key, rowwise_key = rt.attention_key, rt.rowwise_key
    out = []
    for dt in dtypes:
        t = getattr(torch, dt)
        for width in ((64,) if quick else widths):
            for causal in ((False,) if quick else (False, True)):
                for kernel in ("fwd", "dkdv", "dq"):
                    out.append(Case("attention", attention_key(kernel, t, width, causal), kernel, dt, width, causal))
        for block in ((1024,) if quick else blocks) + (0,):
            out.append(Case("rowwise", rowwise_key(t, block or None), "", dt, block))
    return out


def candidates(case: Case) -> list[dict]:
    if case.family == "attention":
        return attention_candidates(case.kernel, case.dtype, case.width)
    return rowwise_candidates(case.dtype, case.width)


# ---- the choice (pure) --------------------------------------------------------------------
def choose(cases: list[Case], candidates: Callable[[Case], list[dict]],
           timer: Callable[[Case, dict], float], progress=None) -> dict[str, dict[str, dict]]:
    """For each case, time each candidate (``timer`` returns milliseconds, or
    ``math.inf`` / raises for a config that cannot run) and keep the fastest;
    ties keep the earlier candidate.  Returns ``{family: {key: config}}``; a case
    none of whose candidates ran is left out (the runtime keeps its default)."""
    table: dict[str, dict[str, dict]] = {f: {} for f in FAMILIES}
    for case in cases:
        best, best_ms = None, math.inf
        for cfg in candidates(case):
            try:
                ms = float(timer(case, cfg))
            except Exception as e:  # noqa: BLE001 - out of resources, a compile failure: not a winner
                if progress:
                    progress(f"  {case.key} {cfg}: failed ({type(e).__name__})")
                continue
            if ms < best_ms:  # NaN compares false: never a winner
                best, best_ms = dict(cfg), ms
        if best is not None:
            table[case.family][case.key] = best
            if progress:
                progress(f"{case.family} {case.key}: {best} {best_ms:.4f} ms")
    return table


# ---- the table file -----------------------------------------------------------------------
def empty_table() -> dict:
    return {"format": FORMAT, "measured": {}, **{f: {} for f in FAMILIES}}


def check_table(table) -> dict:
    """The table if the runtime can hold it as a Python literal (dicts of str keys,
    int values, text without braces or quotes); else TuneError saying where."""
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise TuneError(f"tuned config table: expected an object with \"format\": {FORMAT}")
    extra = set(table) - {"format", "measured", *FAMILIES}
    if extra:
        raise TuneError(f"tuned config table: unknown section(s) {', '.join(sorted(extra))}")

    def walk(value, where):
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str) or not _SAFE_TEXT.fullmatch(k):
                    raise TuneError(f"tuned config table: bad key {k!r} at {where}")
                walk(v, f"{where}/{k}")
        elif isinstance(value, str):
            if not _SAFE_TEXT.fullmatch(value):
                raise TuneError(f"tuned config table: bad text {value!r} at {where}")
        elif not isinstance(value, int) or isinstance(value, bool):
            raise TuneError(f"tuned config table: {where} is {type(value).__name__}; expected int, text or object")
    walk(table, "")
    return table


def read_table(path: Path = TABLE) -> dict:
    try:
        table = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise TuneError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    return check_table(table)


def merge(table: dict, arch: str, chosen: dict[str, dict[str, dict]], measured: str) -> dict:
    """``table`` with ``arch``'s entries replaced by ``chosen`` (other GPUs' kept)."""
    out = json.loads(json.dumps(check_table(table)))
    for family in FAMILIES:
        entries = dict(out[family].get(arch, {}))
        entries.update(chosen.get(family, {}))
        if entries:
            out[family][arch] = dict(sorted(entries.items()))
    out["measured"][arch] = measured
    return check_table(out)


def table_text(table: dict) -> str:
    """Deterministic JSON text (sorted keys) that is also a Python literal."""
    return json.dumps(check_table(table), indent=1, sort_keys=True) + "\n"


# ---- on a GPU -----------------------------------------------------------------------------
def gpu_timer(quick: bool = False, bench=None):
    """A timer for :func:`choose` that runs the generated kernels on the current
    CUDA device with one candidate placed in the runtime's table at a time."""
    import torch

    import generated
    from generated import _runtime as rt
    if bench is None:
        import triton.testing

        def bench(fn):
            return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    arch = rt.device_arch(torch.device("cuda"))
    n = 1024 if quick else 4096

    def timer(case: Case, cfg: dict) -> float:
        dtype = getattr(torch, case.dtype)
        saved = rt.TUNED_CONFIGS
        rt.TUNED_CONFIGS = {case.family: {arch: {case.key: cfg}}}
        try:
            if case.family == "attention":
                q, k, v = (torch.randn(4, 16, n, case.width, dtype=dtype, device="cuda", requires_grad=True)
                           for _ in range(3))
                if case.kernel == "fwd":
                    return bench(lambda: generated.attention(q, k, v, causal=case.causal))
                o = generated.attention(q, k, v, causal=case.causal)
                g = torch.randn_like(o)
                return bench(lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True))
            cols = case.width or 100_000
            x = torch.randn(max(1, 2**25 // cols), cols, dtype=dtype, device="cuda", requires_grad=True)
            y = generated.softmax(x)
            g = torch.randn_like(y)
            return bench(lambda: generated.softmax(x)) + \
                bench(lambda: torch.autograd.grad(y, x, g, retain_graph=True))
        finally:
            rt.TUNED_CONFIGS = saved
    return timer, arch
