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
from dataclasses import dataclass


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

    @property
    def ratio(self) -> float:
        return (self.loaded + self.stored - self.per_program) / self.ideal if self.ideal else float("nan")


def _mib(n: int) -> str:
    return f"{n / 2**20:9.3f}"


def rowwise_ops() -> list[str]:
    """The built-in ops of the row-wise family (their modules carry the runtime's META)."""
    import importlib

    from derive import builtin_ops
    return [n for n in builtin_ops() if hasattr(importlib.import_module(f"generated.{n}"), "META")]


def _rowwise_cases(quick: bool = False):
    """(op, shape, dim) for every row-wise op: rows that fit a block, rows that
    loop over blocks, and (for ops that take ``dim``) non-adjacent reduced dims."""
    import importlib
    out = []
    for name in rowwise_ops():
        meta = importlib.import_module(f"generated.{name}").META
        if quick:
            out.append((name, (64, 1000), -1))
            continue
        out += [(name, (1024, 1024), -1), (name, (16, 100_000), -1)]
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
    if quick:
        return [((1, 1, 128, 64), 128, False)]
    return [((1, 4, 512, 64), 512, False), ((1, 4, 512, 64), 512, True), ((1, 2, 256, 128), 1024, False)]


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
        with count_traffic() as fwd:  # (an op that returns one output by a keyword: all of them, as the kernels do)
            ys = (mod.OP._call if meta.get("choice") else mod.OP)(inputs, params, call_dim, False)
        ys = list(ys) if isinstance(ys, tuple) else [ys]
        gs = [torch.randn_like(y) for y in ys]
        with count_traffic() as bwd:
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
        read += sum(4 * (n_rows if level.get(n) == "row" else 1) for n in meta["saved"] if n not in saved)  # statistics
        read += sum(nbytes(g) for g in gs)
        # (the weights' gradients are written by the second stage, a torch sum the counter does not see)
        ideal_b = read + sum(nbytes(t) for m, gr, t in zip(meta["inputs"], meta["grads"], inputs)
                             if m["level"] != "col" and not gr["zero"])  # (a gradient that is zero is not written)
        # Per program, not per op: each program reads the column weights once (rows that fit a
        # block), and the weights' gradients are per-program partials (fp32) summed in a second stage.
        weights = [t for m, t in zip(meta["inputs"], inputs) if m["level"] == "col"]
        single = rt.block_config(n_cols, dtype)["SINGLE"]
        n_progs = rt.programs(n_rows, torch.device("cpu"))
        read_back = [t for m, t in zip(meta["inputs"], inputs) if m["level"] == "col" and m["name"] in meta["saved"]]
        rereads = (n_progs - 1) * sum(nbytes(w) for w in weights) if single else 0
        rereads_b = (n_progs - 1) * sum(nbytes(w) for w in read_back) if single else 0
        partials = len(weights) * 4 * n_cols * (n_progs if single else 2 * n_rows)
        # totals over the rows: each program writes its partials, the second stage reads them
        totals = 2 * 4 * n_progs * sum(1 for k in meta["forward"]["tensors"] if k.startswith("tpartial:"))
        label = f"{tuple(shape)} dim={dim}" if meta["reduces"] == "dim" else f"{tuple(shape)}"
        rows.append(TrafficRow(name, label, dtype_name, "forward", fwd.total_loaded, fwd.total_stored, ideal_f,
                               rereads + totals))
        rows.append(TrafficRow(name, label, dtype_name, "backward", bwd.total_loaded, bwd.total_stored, ideal_b,
                               rereads_b + partials))
    for (b, h, m, d), n_keys, causal in _attention_cases(quick):
        if progress:
            progress(f"attention B={b} H={h} M={m} N={n_keys} D={d} causal={causal}")
        q = torch.randn(b, h, m, d, dtype=dtype, requires_grad=True)
        k = torch.randn(b, h, n_keys, d, dtype=dtype, requires_grad=True)
        v = torch.randn(b, h, n_keys, d, dtype=dtype, requires_grad=True)
        with count_traffic() as fwd:
            o = generated.attention(q, k, v, causal=causal)
        with count_traffic() as bwd:
            o.backward(torch.randn_like(o))
        qkv = q.numel() + k.numel() + v.numel()
        ideal_f = (qkv + o.numel()) * es
        ideal_b = (qkv + 2 * o.numel() + qkv) * es  # read q, k, v, o, dO; write dq, dk, dv
        label = f"B={b} H={h} M={m} N={n_keys} D={d}{' causal' if causal else ''}"
        rows.append(TrafficRow("attention", label, dtype_name, "forward", fwd.total_loaded, fwd.total_stored,
                               ideal_f))
        rows.append(TrafficRow("attention", label, dtype_name, "backward", bwd.total_loaded, bwd.total_stored,
                               ideal_b))
    return rows


def format_traffic(rows: list[TrafficRow]) -> str:
    head = f"{'op':<13} {'shape':<34} {'dtype':<8} {'pass':<8} {'loaded MiB':>10} {'stored MiB':>10} " \
           f"{'ideal MiB':>10} {'per-prog':>9} {'x ideal':>8}"
    out = [head, "-" * len(head)]
    for r in rows:
        part = _mib(r.per_program) if r.per_program else "-"
        out.append(f"{r.op:<13} {r.shape:<34} {r.dtype:<8} {r.direction:<8} {_mib(r.loaded):>10} "
                   f"{_mib(r.stored):>10} {_mib(r.ideal):>10} {part:>9} {r.ratio:8.2f}")
    return "\n".join(out)


# ---- GPU timing ----------------------------------------------------------------------------------
@dataclass
class TimingRow:
    op: str
    shape: str
    dtype: str
    direction: str
    ours_ms: float
    torch_ms: float
    measure: str  # e.g. "812 GB/s" or "310 TFLOP/s"

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ours_ms


def _bench(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def timings(quick: bool = False, progress=None) -> list[TimingRow]:
    """Forward and backward time of each op against torch (softmax, amax) and SDPA."""
    import torch
    import torch.nn.functional as F

    import generated

    rows: list[TimingRow] = []
    dev = "cuda"
    for dtype in (torch.float16, torch.bfloat16):
        dname = str(dtype).replace("torch.", "")
        for name, shape, dim in [("softmax", (4096, 4096), -1), ("softmax", (256, 100_000), -1),
                                 ("max", (4096, 4096), -1), ("max", (256, 100_000), -1)]:
            op = getattr(generated, name)
            ref = (lambda t, d=dim: torch.softmax(t, d)) if name == "softmax" else (lambda t, d=dim: t.amax(d))
            x = torch.randn(shape, dtype=dtype, device=dev, requires_grad=True)
            if progress:
                progress(f"{name} {shape} {dname}")
            y, yr = op(x, dim), ref(x)
            g = torch.randn_like(y)
            n_bytes = (x.numel() + y.numel()) * x.element_size()
            for direction, ours, theirs, nb in [
                ("forward", lambda: op(x, dim), lambda: ref(x), n_bytes),
                ("backward", lambda: torch.autograd.grad(y, x, g, retain_graph=True),
                 lambda: torch.autograd.grad(yr, x, g, retain_graph=True), n_bytes + y.numel() * x.element_size()),
            ]:
                t_ours, t_ref = _bench(ours), _bench(theirs)
                rows.append(TimingRow(name, f"{tuple(shape)} dim={dim}", dname, direction, t_ours, t_ref,
                                      f"{nb / t_ours / 1e6:.0f} GB/s"))
        for n in ((1024, 4096) if quick else (1024, 4096, 16384)):
            for d in (64, 128):
                for causal in (False, True):
                    b, h = 4, 16
                    if progress:
                        progress(f"attention B={b} H={h} N={n} D={d} causal={causal} {dname}")
                    q, k, v = (torch.randn(b, h, n, d, dtype=dtype, device=dev, requires_grad=True)
                               for _ in range(3))
                    flops = 4 * b * h * n * n * d * (0.5 if causal else 1.0)
                    o = generated.attention(q, k, v, causal=causal)
                    r = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                    g = torch.randn_like(o)
                    label = f"B={b} H={h} N={n} D={d}{' causal' if causal else ''}"
                    for direction, ours, theirs, fl in [
                        ("forward", lambda: generated.attention(q, k, v, causal=causal),
                         lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), flops),
                        ("backward", lambda: torch.autograd.grad(o, (q, k, v), g, retain_graph=True),
                         lambda: torch.autograd.grad(r, (q, k, v), g, retain_graph=True), 2.5 * flops),
                    ]:
                        t_ours, t_ref = _bench(ours), _bench(theirs)
                        rows.append(TimingRow("attention", label, dname, direction, t_ours, t_ref,
                                              f"{fl / t_ours / 1e9:.0f} TFLOP/s"))
                    del q, k, v, o, r, g
                    torch.cuda.empty_cache()
    return rows


def format_timings(rows: list[TimingRow]) -> str:
    head = f"{'op':<10} {'shape':<30} {'dtype':<9} {'pass':<8} {'ours ms':>9} {'torch ms':>9} {'speedup':>8}  measure"
    out = [head, "-" * len(head)]
    for r in rows:
        out.append(f"{r.op:<10} {r.shape:<30} {r.dtype:<9} {r.direction:<8} {r.ours_ms:9.3f} {r.torch_ms:9.3f} "
                   f"{r.speedup:8.2f}  {r.measure}")
    return "\n".join(out)
