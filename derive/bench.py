"""``pullback bench``: how the generated kernels compare with the ideal and with torch.

* Without a GPU the kernels run under Triton's interpreter, where time means
  nothing; instead every byte a kernel loads and stores is counted
  (:mod:`derive.memtrace`) and compared with the ideal: each input read once,
  each output written once.
* With a GPU, forward and backward are timed (``triton.testing.do_bench``,
  median) against torch's own ops and SDPA in the same run, and reported as
  time, GB/s or TFLOP/s and the ratio to torch.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class TrafficRow:
    op: str
    shape: str
    dtype: str
    direction: str     # "forward" or "backward"
    loaded: int
    stored: int
    ideal: int
    per_program: int = 0  # bytes each program moves for itself: column weights read per program and the
    #                       weights' gradients' partial sums; reported, excepted from the ratio
    programs: int = 0     # programs launched by the pass's kernels, summed over its launches (grid sizes)
    launches: int = 0     # kernel launches of the pass
    rows: int = 0         # row-wise ops: rows (kept index positions) the programs share; 0 for attention

    @property
    def ratio(self) -> float:
        return (self.loaded + self.stored - self.per_program) / self.ideal if self.ideal else float("nan")


def _mib(n: int) -> str:
    return f"{n / 2**20:9.3f}"


class Programs:
    """Programs launched while a :func:`count_programs` context is open."""

    def __init__(self):
        self.programs = 0
        self.launches = 0
        self.per_kernel: dict[str, int] = {}


def _grid_size(grid, kwargs) -> int:
    if callable(grid):
        grid = grid(kwargs)
    grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
    return math.prod(int(g) for g in grid)


@contextmanager
def count_programs():
    """Count the programs (grid size) of every kernel launched under Triton's
    interpreter while open: the grid the runtime really launched, not a model of it."""
    from triton.runtime import interpreter
    cls = interpreter.InterpretedFunction
    orig = cls.run
    seen = Programs()

    def run(self, *args, grid, warmup=False, **kwargs):
        if not warmup:
            n = _grid_size(grid, kwargs)
            name = getattr(getattr(self, "fn", None), "__name__", "?")
            seen.programs += n
            seen.launches += 1
            seen.per_kernel[name] = seen.per_kernel.get(name, 0) + n
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    cls.run = run
    try:
        yield seen
    finally:
        cls.run = orig


def rowwise_ops() -> list[str]:
    """The built-in ops of the row-wise family (their modules carry the runtime's META)."""
    import importlib

    from derive import builtin_ops
    return [n for n in builtin_ops() if hasattr(importlib.import_module(f"generated.{n}"), "META")]


def _rowwise_cases(quick: bool = False):
    """(op, shape, dim) for every row-wise op: rows that fit a block, rows that
    loop over blocks, few long rows split across programs, and (for ops that take ``dim``) non-adjacent reduced dims."""
    import importlib
    out = []
    for name in rowwise_ops():
        meta = importlib.import_module(f"generated.{name}").META
        if quick:
            out.append((name, (64, 1000), -1))
            continue
        # (2 rows of 100000: fewer rows than the device can fill, so each row is split across programs)
        out += [(name, (1024, 1024), -1), (name, (16, 100_000), -1), (name, (2, 100_000), -1)]
        if meta["reduces"] == "dim":
            out.append((name, (64, 96, 48), (0, 2)))
    return out


def _rowwise_inputs(meta, shape, dim, dtype):
    """Random inputs for one op: row tensors of ``shape``, column weights of the
    reduced dims, per-row tensors of the kept dims; default or small parameters."""
    import torch
    dims = [d % len(shape) for d in ((dim,) if isinstance(dim, int) else dim)]
    sizes = {"elem": list(shape), "col": [shape[d] for d in dims],
             "row": [n for d, n in enumerate(shape) if d not in dims]}
    n_cols = math.prod(sizes["col"])
    inputs = [torch.randint(0, n_cols, sizes[m["level"]]) if m.get("dtype") == "int" else
              torch.randn(sizes[m["level"]], dtype=dtype, requires_grad=True) for m in meta["inputs"]]
    params = [None if q["default"] == "eps" else (q["default"] if q["default"] is not None else 1e-5)
              for q in meta["params"]]
    return inputs, params, dims


def _attention_cases(quick: bool = False):
    """((B, H, M, D), N, causal, mask): mask None (attention), ("window", w) (sliding_window_attention)
    or ("documents", k) (document_attention with k equal contiguous documents): the tiles they skip."""
    if quick:
        return [((1, 1, 128, 64), 128, False, None)]
    return [((1, 4, 512, 64), 512, False, None), ((1, 4, 512, 64), 512, True, None),
            ((1, 2, 256, 128), 1024, False, None)] + \
        [((1, 4, n, 64), n, False, ("window", 128)) for n in (512, 1024, 2048)] + \
        [((1, 4, 1024, 64), 1024, False, ("documents", k)) for k in (1, 4, 16)]


def traffic(dtype_name: str = "float16", quick: bool = False, progress=None) -> list[TrafficRow]:
    """Bytes moved by each kernel pass under the interpreter, against the ideal."""
    import torch

    import generated
    from derive.memtrace import count_traffic

    dtype = getattr(torch, dtype_name)
    es = torch.empty(0, dtype=dtype).element_size()
    rows: list[TrafficRow] = []
    import importlib

    import generated._runtime as rt
    for name, shape, dim in _rowwise_cases(quick):
        if progress:
            progress(f"{name} {shape} dim={dim}")
        mod = importlib.import_module(f"generated.{name}")
        meta = mod.META
        inputs, params, dims = _rowwise_inputs(meta, shape, dim, dtype)
        call_dim = dim if meta["reduces"] == "dim" else None
        weights = {m["name"]: t for m, t in zip(meta["inputs"], inputs) if m["level"] == "col"}
        with count_traffic(watch=weights) as fwd, count_programs() as pf:  # (an op that returns one output by a keyword:
            ys = (mod.OP._call if meta.get("choice") else mod.OP)(inputs, params, call_dim, False)  # all of them)
        ys = list(ys) if isinstance(ys, tuple) else [ys]
        gs = [torch.randn_like(y) for y in ys]
        with count_traffic(watch=weights) as bwd, count_programs() as pb:
            torch.autograd.backward(ys, gs)
        nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
        # forward: each input read once, each output written once
        ideal_f = sum(nbytes(t) for t in inputs) + sum(nbytes(y) for y in ys)
        # backward: what it reads from the forward, once, the incoming gradients, and each gradient written once
        saved = {m["name"]: t for m, t in zip(meta["inputs"], inputs)}
        saved.update({m["name"]: y for m, y in zip(meta["outputs"], ys)})
        read = sum(nbytes(saved[n]) for n in meta["saved"] if n in saved)
        n_rows = math.prod(n for d, n in enumerate(shape) if d not in dims)
        n_cols = math.prod(shape[d] for d in dims)
        level = {t["name"]: t["level"] for t in meta["extras"]}
        stats = sum(4 * (n_rows if level.get(n) == "row" else 1) for n in meta["saved"] if n not in saved)
        ideal_f += stats  # the per-row statistics the backward reads, written once (argmax, saved row sums)
        read += stats
        read += sum(nbytes(g) for g in gs)
        # (the weights' gradients are written by the second stage, a torch sum the counter does not see)
        ideal_b = read + sum(nbytes(t) for m, gr, t in zip(meta["inputs"], meta["grads"], inputs)
                             if m["level"] != "col" and not gr["zero"])  # (a gradient that is zero is not written)
        # Apart from the ratio: the column weights read again (measured: each program reads them
        # once when rows fit a block, each row's passes read them again when rows are long: [c]
        # values a GPU serves from L2), and the weights' gradients' per-program partials (fp32),
        # summed in a second stage.
        single = rt.block_config(n_cols, dtype, torch.device("cpu"))["SINGLE"]
        n_progs = rt.programs(n_rows, torch.device("cpu"))

        def rereads(t, counted: set) -> int:
            seen = sum(t.per_tensor[k].bytes_loaded for k in weights if k in t.per_tensor)
            return seen - sum(nbytes(w) for k, w in weights.items() if k in counted)
        rereads_f = rereads(fwd, set(weights))
        rereads_b = rereads(bwd, set(meta["saved"]))
        partials = len(weights) * 4 * n_cols * (n_progs if single else 2 * n_rows)
        # totals over the rows: each program writes its partials, the second stage reads them
        totals = 2 * 4 * n_progs * sum(1 for k in meta["forward"]["tensors"] if k.startswith("tpartial:"))
        label = f"{tuple(shape)} dim={dim}" if meta["reduces"] == "dim" else f"{tuple(shape)}"
        rows.append(TrafficRow(name, label, dtype_name, "forward", fwd.total_loaded, fwd.total_stored, ideal_f,
                               rereads_f + totals, pf.programs, pf.launches, n_rows))
        rows.append(TrafficRow(name, label, dtype_name, "backward", bwd.total_loaded, bwd.total_stored, ideal_b,
                               rereads_b + partials, pb.programs, pb.launches, n_rows))
    for (b, h, m, d), n_keys, causal, mask in _attention_cases(quick):
        kind, size = mask or (None, None)
        label = f"B={b} H={h} M={m} N={n_keys} D={d}{' causal' if causal else ''}" + \
            {None: "", "window": f" window={size}", "documents": f" documents={size}"}[kind]
        if progress:
            progress(f"attention {label}")
        q = torch.randn(b, h, m, d, dtype=dtype, requires_grad=True)
        k = torch.randn(b, h, n_keys, d, dtype=dtype, requires_grad=True)
        v = torch.randn(b, h, n_keys, d, dtype=dtype, requires_grad=True)
        ids = torch.arange(n_keys).div(-(-n_keys // size), rounding_mode="floor").expand(b, n_keys) \
            if kind == "documents" else None
        op, call = {None: ("attention", lambda: generated.attention(q, k, v, causal=causal)),
                    "window": ("sliding_window_attention",
                               lambda: generated.sliding_window_attention(q, k, v, window=size)),
                    "documents": ("document_attention",
                                  lambda: generated.document_attention(q, k, v, ids, causal=causal))}[kind]
        with count_traffic() as fwd, count_programs() as pf:
            o = call()
        with count_traffic() as bwd, count_programs() as pb:
            o.backward(torch.randn_like(o))
        qkv = q.numel() + k.numel() + v.numel()
        extra = 0 if ids is None else ids.numel() * ids.element_size()  # the document ids, read once
        ideal_f = (qkv + o.numel()) * es + extra
        ideal_b = (qkv + 2 * o.numel() + qkv) * es + extra  # read q, k, v, o, dO; write dq, dk, dv
        rows.append(TrafficRow(op, label, dtype_name, "forward", fwd.total_loaded, fwd.total_stored,
                               ideal_f, 0, pf.programs, pf.launches))
        rows.append(TrafficRow(op, label, dtype_name, "backward", bwd.total_loaded, bwd.total_stored,
                               ideal_b, 0, pb.programs, pb.launches))
    return rows


def format_traffic(rows: list[TrafficRow]) -> str:
    head = f"{'op':<24} {'shape':<40} {'dtype':<8} {'pass':<8} {'loaded MiB':>10} {'stored MiB':>10} " \
           f"{'ideal MiB':>10} {'per-prog':>9} {'x ideal':>8} {'programs':>9}"
    out = [head, "-" * len(head)]
    for r in rows:
        part = _mib(r.per_program) if r.per_program else "-"
        out.append(f"{r.op:<24} {r.shape:<40} {r.dtype:<8} {r.direction:<8} {_mib(r.loaded):>10} "
                   f"{_mib(r.stored):>10} {_mib(r.ideal):>10} {part:>9} {r.ratio:8.2f} {r.programs:>9}")
    return "\n".join(out)


# ---- GPU timing ----------------------------------------------------------------------------------
PULLBACK, EAGER, COMPILED, FLASH, COPY = "pullback", "torch eager", "torch.compile", "SDPA flash", "device copy"
SCORES_BUDGET = 2**32  # bytes: torch eager/compiled attention materialise B*H*N*N scores; larger cases skip them


@dataclass
class TimingRow:
    op: str
    shape: str
    dtype: str
    direction: str
    times: dict = field(default_factory=dict)  # contender -> median ms ("pullback", "torch eager", ...)
    work: float = 0.0     # bytes moved (row ops: ideal, each input read once, each output written once) or flops
    unit: str = "GB/s"    # "GB/s" or "TFLOP/s"
    ceiling: float = 0.0  # row ops: GB/s of the same-run device copy (the bandwidth ceiling); 0 for attention

    def rate(self, who: str = PULLBACK) -> float:
        """GB/s or TFLOP/s of one contender (NaN when it did not run)."""
        ms = self.times.get(who)
        if not ms or ms != ms:
            return float("nan")
        return self.work / (ms * 1e-3) / (1e9 if self.unit == "GB/s" else 1e12)

    def speedup(self, who: str) -> float:
        """``who``'s time over pullback's: above 1, pullback is faster."""
        mine, theirs = self.times.get(PULLBACK), self.times.get(who)
        return theirs / mine if mine and theirs else float("nan")


def _bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _references():
    """Torch code computing what each built-in row-wise op computes (eager, and what torch.compile compiles)."""
    import torch
    import torch.nn.functional as F
    return {
        "softmax": lambda x: torch.softmax(x, -1),
        "log_softmax": lambda x: torch.log_softmax(x, -1),
        "max": lambda x: x.amax(-1),
        "logsumexp": lambda x: torch.logsumexp(x, -1),
        "layer_norm": lambda x, w, b: F.layer_norm(x, w.shape, w, b, 1e-5),
        "rms_norm": lambda x, w: F.rms_norm(x, w.shape, w, 1e-6),
        "swiglu": lambda a, b: F.silu(a) * b,
    }


def row_cases(quick: bool = False) -> list[tuple[str, tuple]]:
    shapes = [(4096, 4096)] if quick else [(4096, 4096), (32768, 256), (256, 100_000), (16, 1_000_000)]
    return [(name, shape) for name in ("softmax", "log_softmax", "max", "layer_norm", "rms_norm", "swiglu")
            for shape in shapes]


def attention_cases(quick: bool = False) -> list[tuple]:
    """(B, H, N, D, causal): issue 10's grid, B=4, H=16, N from 1k to 16k."""
    ns = (1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384)
    return [(4, 16, n, d, causal) for d in (64, 128) for causal in (False, True) for n in ns]


def _row_inputs(name, shape, dtype, device):
    import torch
    cols = shape[-1]
    x = torch.randn(shape, dtype=dtype, device=device, requires_grad=True)
    if name == "layer_norm":
        return [x, torch.randn(cols, dtype=dtype, device=device, requires_grad=True),
                torch.randn(cols, dtype=dtype, device=device, requires_grad=True)]
    if name == "rms_norm":
        return [x, torch.randn(cols, dtype=dtype, device=device, requires_grad=True)]
    if name == "swiglu":
        return [x, torch.randn(shape, dtype=dtype, device=device, requires_grad=True)]
    return [x]


def _ours(name):
    import generated
    op = getattr(generated, name)
    return {"layer_norm": lambda x, w, b: op(x, w, b, 1e-5), "rms_norm": lambda x, w: op(x, w, 1e-6)}.get(name, op)


def _eager_attention(q, k, v, causal):
    """Attention as plain torch code (scores materialised): what torch eager and torch.compile run."""
    import torch
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        n_i, n_j = s.shape[-2], s.shape[-1]
        keep = torch.ones(n_i, n_j, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def timings(quick: bool = False, progress=None, *, timer=None, device: str = "cuda", dtypes=None,
            rows=None, attention=None, compile_fn=None, copy_bytes: int = 2**30,
            scores_budget: int = SCORES_BUDGET) -> list[TimingRow]:
    """Forward and backward times of pullback's kernels against torch eager, ``torch.compile``
    of the same torch code, and (attention) SDPA's flash backend, in one run; row ops carry
    the same run's device-copy bandwidth as their ceiling.  ``timer(fn) -> ms`` (default
    ``triton.testing.do_bench``, median) and the cases are injectable, so this runs in a
    test without a GPU."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import generated
    timer = timer or _bench
    compile_fn = compile_fn or torch.compile
    dtypes = dtypes or (torch.float16, torch.bfloat16)
    rows = row_cases(quick) if rows is None else rows
    attention = attention_cases(quick) if attention is None else attention
    refs = _references()
    out: list[TimingRow] = []

    src = torch.empty(copy_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    copy = TimingRow(COPY, f"{copy_bytes / 2**20:g} MiB", "-", "copy", {COPY: timer(lambda: dst.copy_(src))},
                     2 * copy_bytes, "GB/s")  # read and written once
    copy_gbps = copy.ceiling = copy.rate(COPY)
    out.append(copy)
    del src, dst

    def grad_fn(y, xs, g):
        return lambda: torch.autograd.grad(y, xs, g, retain_graph=True)

    for dtype in dtypes:
        dname = str(dtype).replace("torch.", "")
        for name, shape in rows:
            if progress:
                progress(f"{name} {shape} {dname}")
            xs = _row_inputs(name, shape, dtype, device)
            contenders = {PULLBACK: _ours(name), EAGER: refs[name], COMPILED: compile_fn(refs[name])}
            ys = {who: fn(*xs) for who, fn in contenders.items()}
            g = torch.randn_like(ys[PULLBACK])
            n_in = sum(x.numel() * x.element_size() for x in xs)
            n_out = ys[PULLBACK].numel() * ys[PULLBACK].element_size()
            label = f"{tuple(shape)}"
            fwd = {who: timer(lambda fn=fn: fn(*xs)) for who, fn in contenders.items()}
            bwd = {who: timer(grad_fn(y, xs, g)) for who, y in ys.items()}
            out.append(TimingRow(name, label, dname, "forward", fwd, n_in + n_out, "GB/s", copy_gbps))
            # backward: the inputs again (what it reads of the forward is at least their size), dY, and dX
            out.append(TimingRow(name, label, dname, "backward", bwd, 2 * n_in + n_out, "GB/s", copy_gbps))
            del xs, ys, g
        for b, h, n, d, causal in attention:
            if progress:
                progress(f"attention B={b} H={h} N={n} D={d} causal={causal} {dname}")
            q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))

            def flash(q, k, v, causal=causal):
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            contenders = {PULLBACK: lambda q, k, v, c=causal: generated.attention(q, k, v, causal=c), FLASH: flash}
            if b * h * n * n * 4 <= scores_budget:  # fp32 scores: the eager code's largest tensor
                eager = lambda q, k, v, c=causal: _eager_attention(q, k, v, c)  # noqa: E731
                contenders.update({EAGER: eager, COMPILED: compile_fn(eager)})
            ys = {who: fn(q, k, v) for who, fn in contenders.items()}
            g = torch.randn_like(ys[PULLBACK])
            flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
            label = f"B={b} H={h} N={n} D={d}{' causal' if causal else ''}"
            fwd = {who: timer(lambda fn=fn: fn(q, k, v)) for who, fn in contenders.items()}
            bwd = {who: timer(grad_fn(y, (q, k, v), g)) for who, y in ys.items()}
            out.append(TimingRow("attention", label, dname, "forward", fwd, flops, "TFLOP/s"))
            out.append(TimingRow("attention", label, dname, "backward", bwd, 2.5 * flops, "TFLOP/s"))
            del q, k, v, ys, g
            if device == "cuda":
                torch.cuda.empty_cache()
    return out


def format_timings(rows: list[TimingRow]) -> str:
    who = [PULLBACK, EAGER, COMPILED, FLASH]
    head = f"{'op':<12} {'shape':<30} {'dtype':<9} {'pass':<8} " + " ".join(f"{w + ' ms':>16}" for w in who) + \
        f"  {'pullback rate':>16}  ceiling"
    out = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r.times[w]:16.4f}" if w in r.times else f"{'-':>16}" for w in who)
        ceiling = f"{r.ceiling:.0f} GB/s copy" if r.ceiling else ""
        rate = f"{r.rate(COPY if r.op == COPY else PULLBACK):.1f} {r.unit}"
        out.append(f"{r.op:<12} {r.shape:<30} {r.dtype:<9} {r.direction:<8} {cells}  {rate:>16}  {ceiling}")
    return "\n".join(out)
