"""Stage 5: choose a kernel family and plan the fused forward and backward kernels.

The **row-wise** family covers ops whose tensors are indexed by a kept set
``s2`` and, for element-level tensors, one reduced set ``s1`` (max, softmax,
and any op whose reductions share one index set).  One program handles one
kept multi-index (a *row*); the reduced axes are walked as one flat column
index through strides.

For each kernel the plan lists, in order, the values to compute: element
values (a block of the row), reductions (``sum``/``max`` over the row) and
row values (scalars).  It schedules two shapes of the same program:

* **single block** (the row fits one block): every input is read once and
  every output written once;
* **looped** (long rows): passes over the row, one per level of dependent
  reductions.  A ``sum`` whose summand depends on a ``max`` only through a
  factor that rescales (``exp(A - M)``) shares the max's pass: the rescale
  factor ``f(M_new) / f(M_old)`` is *derived* here, not written by hand.

Everything mathematical is printed here with :mod:`derive.printer`; the
template only places the printed text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy import Indexed, Symbol

from .derivation import Derivation
from .ir import ArgmaxIndicator, IndexMax, IndexSum, base_name, free_indices, tensors_in
from .printer import triton_code
from .report import display_indices

NEG_INF = sympy.S.NegativeInfinity
# names the row-wise template uses for its own values
RESERVED = {"row", "col", "offs", "mask", "start", "n_cols", "tl", "triton", "ACC", "BLOCK", "SINGLE",
            "RG", "IDX64", "nk1", "nk2", "nr1", "nr2", "c0", "c1", "c2", "k0", "k1", "k2"}


class PlanError(ValueError):
    """The op does not fit a kernel family the generator knows."""


@dataclass
class KTensor:
    """A tensor a kernel reads or writes."""

    name: str    # kernel name: "A", "dB", "B_argmax"
    level: str   # "elem" (a row of the reduced axes) or "row" (one value per row)
    kind: str    # "data" (the op's dtype), "stat" (the accumulation dtype) or "index" (int32)
    doc: str = ""

    @property
    def is_elem(self) -> bool:
        return self.level == "elem"


@dataclass
class Value:
    name: str
    level: str   # "elem" or "row"
    code: str
    comment: str


@dataclass
class Reduction:
    name: str
    kind: str            # "sum" or "max"
    body: str            # summand, with element values by name
    comment: str
    argmax: bool = False
    online: str | None = None   # the max this sum is rescaled with, in the looped shape
    body_online: str = ""       # summand against the lane's running max
    rescale_step: str = ""      # factor from the running max to the new one
    rescale_final: str = ""     # factor from a lane's max to the row's max


@dataclass
class Pass:
    loads: list[KTensor]
    values: list[Value]
    reductions: list[Reduction]
    after: list[Value]


@dataclass
class RowKernel:
    name: str
    doc: str
    loads: list[KTensor]          # all tensors read
    stores: list[tuple[KTensor, str]]  # (tensor, value name)
    row_loads: list[KTensor]
    elem_loads: list[KTensor]
    single: list[tuple[str, object]]   # ("value", Value) | ("reduce", Reduction), in order
    before: list[Value]                # row values from row loads alone (looped shape)
    passes: list[Pass]
    final: Pass | None                 # computes and stores element outputs (looped shape)

    @property
    def tensors(self) -> list[KTensor]:
        return self.loads + [t for t, _ in self.stores]

    @property
    def elem_stores(self):
        return [(t, v) for t, v in self.stores if t.is_elem]

    @property
    def row_stores(self):
        return [(t, v) for t, v in self.stores if not t.is_elem]


@dataclass
class RowwisePlan:
    family: str
    name: str
    input: str
    output: str
    output_level: str
    extras: list[KTensor]        # forward outputs saved for the backward only
    saved: list[str]             # what the backward kernel reads from the forward, in order
    grad: str                    # the incoming gradient's name, e.g. "dB"
    grad_input: str              # "dA"
    params: list[str]            # scalar parameters, passed to both kernels
    fwd: RowKernel
    bwd: RowKernel
    forward_text: list[str] = field(default_factory=list)
    pullback_text: list[str] = field(default_factory=list)


def rescale_ratio(body, m, old: Symbol, new: Symbol):
    """``body(m = new) / body(m = old)`` if it is free of tensors (the factor that
    rescales a running sum when the running max moves from ``old`` to ``new``), else None."""
    ratio = sympy.simplify(sympy.powsimp(body.xreplace({m: new}) / body.xreplace({m: old})))
    return None if ratio.atoms(Indexed) else ratio


# ---- the kernel equations -------------------------------------------------------------
@dataclass
class _KEq:
    name: str
    level: str
    kind: str       # "value", "sum", "max"
    expr: object    # value, or the reduction body
    comment: str
    argmax: bool = False


class _Kernel:
    """Schedules a list of kernel equations into the single and looped shapes."""

    def __init__(self, name: str, doc: str, loads: list[KTensor], eqs: list[_KEq],
                 stores: list[tuple[KTensor, str]], reduced: str):
        self.name, self.doc, self.loads, self.eqs, self.stores = name, doc, loads, eqs, stores
        self.reduced = reduced
        self.by_name = {e.name: e for e in eqs}
        for n in [t.name for t in loads] + [e.name for e in eqs]:
            if n in RESERVED:
                raise PlanError(f"the name {n!r} is reserved by the kernel template; rename it in the spec")

    def code(self, expr) -> str:
        return triton_code(expr, names={f"|{self.reduced}|": "n_cols"})

    def names_in(self, expr) -> set[str]:
        out = {str(t.base.label) for t in expr.atoms(Indexed)} | {s.name for s in expr.atoms(Symbol)}
        out |= {f"{a.reduced.base.label}_argmax" for a in expr.atoms(ArgmaxIndicator)}
        return out

    def inline_elem(self, expr):
        """Replace element values by their definitions, down to loads and row values."""
        for _ in range(len(self.eqs) + 1):
            subs = {}
            for t in expr.atoms(Indexed):
                e = self.by_name.get(str(t.base.label))
                if e is not None and e.level == "elem" and e.kind == "value":
                    subs[t] = e.expr
            if not subs:
                return expr
            expr = expr.xreplace(subs)
        raise PlanError("element values depend on each other in a cycle")  # pragma: no cover

    def row_deps(self, expr) -> set[str]:
        names = self.names_in(self.inline_elem(expr))
        return {n for n in names if n in self.by_name and self.by_name[n].level == "row"}

    def elem_deps(self, expr) -> list[str]:
        """Element values ``expr`` needs, transitively, in equation order."""
        need: set[str] = set()
        todo = [expr]
        while todo:
            for n in self.names_in(todo.pop()):
                e = self.by_name.get(n)
                if e is not None and e.level == "elem" and n not in need:
                    need.add(n)
                    todo.append(e.expr)
        return [e.name for e in self.eqs if e.name in need]

    def elem_loads_of(self, exprs) -> list[KTensor]:
        names = set()
        for x in exprs:
            names |= self.names_in(x)
        return [t for t in self.loads if t.is_elem and t.name in names]

    def value(self, e: _KEq) -> Value:
        return Value(e.name, e.level, self.code(e.expr), e.comment)

    def reduction(self, e: _KEq) -> Reduction:
        return Reduction(e.name, e.kind, self.code(e.expr), e.comment, argmax=e.argmax)

    def online_factor(self, e: _KEq, ready: dict[str, int], level: int) -> Reduction | None:
        """A sum whose summand depends on a max M of the same pass only through a
        factor f(M): returns it with the derived rescale factors, else None."""
        if e.kind != "sum":
            return None
        late = [d for d in self.row_deps(e.expr) if ready[d] == level]
        if len(late) != 1 or self.by_name[late[0]].kind != "max":
            return None
        m = late[0]
        body = self.inline_elem(e.expr)
        old, new = Symbol(f"{m}_run"), Symbol(f"{m}_new")
        m_sym = next(t for t in body.atoms(Indexed) if str(t.base.label) == m)
        ratio = rescale_ratio(body, m_sym, old, new)
        if ratio is None:
            return None  # the summand does not rescale: schedule another pass
        red = self.reduction(e)
        red.online = m
        # A lane whose running max is still -inf has summed nothing (its terms
        # were exp(-inf) = 0): its rescale is 0, and the new terms are measured
        # against 0 instead of -inf so that exp(-inf - -inf) never appears.
        safe_new = Symbol(f"{m}_ref")
        red.body_online = self.code(body.xreplace({m_sym: safe_new}))
        red.rescale_step = self.code(sympy.Piecewise((0, sympy.Eq(old, NEG_INF)), (ratio, True)))
        final = ratio.xreplace({new: Symbol(m)})
        red.rescale_final = self.code(sympy.Piecewise((0, sympy.Eq(old, NEG_INF)), (final, True)))
        return red

    def build(self) -> RowKernel:
        eqs = self.eqs
        single = [("value" if e.kind == "value" else "reduce",
                   self.value(e) if e.kind == "value" else self.reduction(e)) for e in eqs]
        # -- the looped shape: level of each row value = passes it waits for
        ready: dict[str, int] = {t.name: 0 for t in self.loads if not t.is_elem}
        pass_of: dict[str, int] = {}
        online: dict[str, Reduction] = {}
        for e in eqs:
            if e.level != "row":
                continue
            deps = self.row_deps(e.expr)
            base = max([ready[d] for d in deps], default=0)
            if e.kind == "value":
                ready[e.name] = base
                continue
            red = self.online_factor(e, ready, base) if base > 0 else None
            level = base if red is not None else base + 1
            if red is not None:
                online[e.name] = red
            pass_of[e.name] = level
            ready[e.name] = level
        n_passes = max(pass_of.values(), default=0)
        passes = []
        for p in range(1, n_passes + 1):
            reds = [e for e in eqs if pass_of.get(e.name) == p]
            exprs = [e.expr for e in reds if e.name not in online]
            exprs += [self.inline_elem(e.expr) for e in reds if e.name in online]
            values = []
            for x in exprs:
                values += [n for n in self.elem_deps(x) if n not in values]
            values = [n for n in [e.name for e in eqs] if n in values]
            passes.append(Pass(
                loads=self.elem_loads_of(exprs + [self.by_name[n].expr for n in values]),
                values=[self.value(self.by_name[n]) for n in values],
                reductions=[online.get(e.name) or self.reduction(e) for e in reds],
                after=[self.value(e) for e in eqs
                       if e.level == "row" and e.kind == "value" and ready[e.name] == p]))
        before = [self.value(e) for e in eqs if e.level == "row" and e.kind == "value" and ready[e.name] == 0]
        final = None
        elem_out = [(t, v) for t, v in self.stores if t.is_elem]
        if elem_out:
            outs = [Indexed(v, Symbol("_")) for _, v in elem_out]
            names = []
            for o in outs:
                names += [n for n in self.elem_deps(o) if n not in names]
            names = [e.name for e in eqs if e.name in names]
            final = Pass(loads=self.elem_loads_of(outs + [self.by_name[n].expr for n in names]),
                         values=[self.value(self.by_name[n]) for n in names], reductions=[], after=[])
        return RowKernel(self.name, self.doc, self.loads, self.stores,
                         [t for t in self.loads if not t.is_elem], [t for t in self.loads if t.is_elem],
                         single, before, passes, final)


# ---- from a derivation to the two kernels ---------------------------------------------------
def _levels(d: Derivation):
    ir = d.ir
    if len(ir.inputs) != 1:
        raise PlanError(f"op {ir.name}: the row-wise family takes one input tensor")
    x = ir.inputs[0]
    reduced: set[Symbol] = set()
    for eq in ir.equations:
        for r in list(eq.rhs.atoms(IndexSum)) + list(eq.rhs.atoms(IndexMax)):
            reduced |= set(r.indices)
    if len(reduced) != 1:
        raise PlanError(f"op {ir.name}: the row-wise family needs every reduction over one index set, "
                        f"found {sorted(s.name for s in reduced) or 'none'}")
    s1 = next(iter(reduced))
    kept = tuple(i for i in x.indices if i != s1)
    if x.indices != kept + (s1,):
        raise PlanError(f"op {ir.name}: declare the input as {x.name}[{', '.join(i.name for i in kept)}, {s1}]")
    levels = {}
    for t in ir.tensors.values():
        if t.indices == kept + (s1,):
            levels[t.name] = "elem"
        elif t.indices == kept:
            levels[t.name] = "row"
        else:
            raise PlanError(f"op {ir.name}: {t.name}[{', '.join(i.name for i in t.indices)}] is neither "
                            f"indexed like the input nor like a row of it")
    return x, kept, s1, levels


def _extract_sums(expr, s1: Symbol, out: list, prefix: str):
    """Replace each sum over the reduced set by a named row value."""
    def walk(e):
        if isinstance(e, IndexSum):
            if any(base_name(i) != base_name(s1) for i in e.indices) or len(e.indices) != 1:
                raise PlanError(f"a sum over {[i.name for i in e.indices]} does not fit the row-wise family")
            body = walk(e.body).xreplace({e.indices[0]: s1})
            same = next((o for o in out if o.kind == "sum" and o.expr == body), None)
            if same is not None:  # the same sum twice: one reduction
                return Indexed(same.name, *[i for i in free_indices(body) if i != s1])
            names = sorted(str(t.base.label) for t in body.atoms(Indexed))
            name = f"{prefix}_{'_'.join(names)}" if names else f"{prefix}{len(out)}"
            while any(o.name == name for o in out):
                name += "_"
            out.append(_KEq(name, "row", "sum", body, f"{name} = sum[{s1}]({body})"))
            return Indexed(name, *[i for i in free_indices(body) if i != s1])
        if not e.args or isinstance(e, Indexed):
            return e
        return e.func(*[walk(a) for a in e.args])

    return walk(expr)


def plan_rowwise(d: Derivation) -> RowwisePlan:
    ir = d.ir
    x, kept, s1, levels = _levels(d)
    out = ir.output
    grad, grad_input = f"d{out.name}", f"d{x.name}"
    dx = d.pullbacks[x.name]
    # what the backward reads: forward tensors, argmax indicators
    argmax_of = sorted({str(a.reduced.base.label) for a in dx.atoms(ArgmaxIndicator)})
    fwd_defs = {eq.target.name: eq for eq in ir.equations}
    bwd_expr = dx
    for _ in range(len(ir.equations) + 1):  # element intermediates are recomputed, not saved
        subs = {t: fwd_defs[str(t.base.label)].rhs for t in bwd_expr.atoms(Indexed)
                if str(t.base.label) in fwd_defs and levels[str(t.base.label)] == "elem"
                and str(t.base.label) != out.name}
        if not subs:
            break
        bwd_expr = bwd_expr.xreplace(subs)
    without_indicators = bwd_expr.replace(lambda e: isinstance(e, ArgmaxIndicator), lambda e: Symbol("_pick"))
    fwd_reads = sorted(tensors_in(without_indicators) - {grad})
    extras = [KTensor(f"{m}_argmax", "row", "index", f"first argmax of {m}'s row") for m in argmax_of]
    extras += [KTensor(n, "row", "stat", f"{n} saved for the backward") for n in fwd_reads
               if n not in (x.name, out.name) and levels[n] == "row"]
    saved = [n for n in fwd_reads if n in (x.name, out.name)] + [t.name for t in extras]

    # -- forward kernel
    eqs = []
    for eq in ir.equations:
        lvl = levels[eq.target.name]
        if isinstance(eq.rhs, IndexSum):
            eqs.append(_KEq(eq.target.name, lvl, "sum", eq.rhs.body, str(eq)))
        elif isinstance(eq.rhs, IndexMax):
            eqs.append(_KEq(eq.target.name, lvl, "max", eq.rhs.body, str(eq), argmax=eq.target.name in argmax_of))
        else:  # sums inside an expression (a mean, say) become row values of their own
            rhs = _extract_sums(eq.rhs, s1, eqs, f"{eq.target.name}_sum")
            eqs.append(_KEq(eq.target.name, lvl, "value", rhs, str(eq)))
    loads = [KTensor(x.name, "elem", "data", f"the input {x.indexed}")]
    stores = [(KTensor(out.name, levels[out.name], "data", f"the output {out.indexed}"), out.name)]
    stores += [(t, t.name) for t in extras]
    fwd = _Kernel(f"_{ir.name}_fwd", f"forward of {ir.name}", loads, eqs, stores, s1.name).build()

    # -- backward kernel
    b_loads = []
    for n in saved:
        t = next((e for e in extras if e.name == n), None)
        b_loads.append(t or KTensor(n, levels[n], "data", f"{n} saved from the forward"))
    b_loads.append(KTensor(grad, levels[out.name], "data", f"the gradient of {out.name}"))
    b_eqs: list[_KEq] = []
    body = _extract_sums(bwd_expr, s1, b_eqs, "sum")
    # indices drop out of the printed code: name the indicator's reduction by its saved argmax
    idx, shown = display_indices(list(x.indices), dx)
    pullback_text = f"{grad_input}[{', '.join(i.name for i in idx)}] = {sympy.sstr(shown)}"
    b_eqs.append(_KEq(grad_input, "elem", "value", body, pullback_text))
    b_stores = [(KTensor(grad_input, "elem", "data", f"the gradient of {x.name}"), grad_input)]
    bwd = _Kernel(f"_{ir.name}_bwd", f"backward of {ir.name}", b_loads, b_eqs, b_stores, s1.name).build()
    params = [q.name for q in ir.params]
    reserved = set(RESERVED) | {t.name for t in fwd.tensors} | {t.name for t in bwd.tensors}
    for q in params:
        if q in reserved:
            raise PlanError(f"the parameter name {q!r} is taken in the row-wise kernels; rename it in the spec")
    return RowwisePlan("rowwise", ir.name, x.name, out.name, levels[out.name], extras, saved, grad, grad_input,
                       params, fwd, bwd, [str(e) for e in ir.equations], [pullback_text])


def plan(d: Derivation):
    """The kernel plan for a derivation (the family is chosen from its shape)."""
    if len(d.ir.inputs) == 3 and any(isinstance(eq.rhs, IndexMax) for eq in d.ir.equations):
        from .plan_attention import plan_attention
        return plan_attention(d)
    return plan_rowwise(d)
