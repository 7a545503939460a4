"""Stage 5: choose a kernel family and plan the fused forward and backward kernels.

The **row-wise** family covers every spec whose tensors are indexed by one
*kept* set ``K`` (any number of index names: the rows) and one *reduced* set
``c`` (the columns): row tensors ``X[K, c]``, per-row tensors ``b[K]`` and
column weights ``W[c]``, any number of each, plus scalar parameters.  Sums and
maxima run over ``c``; a spec with no reduction at all (an elementwise op)
takes its output's last index set as ``c``.  Gradients of column weights are
sums over the rows (``dW[c] = sum[K](...)``): each program accumulates its own
rows and a second stage sums the per-program partials, so the same inputs
always give bitwise-identical gradients.

A program walks rows ``pid, pid + n_progs, ...``; the reduced axes of a row are
one flat column index walked through strides.  For each kernel the plan lists
the values to compute, in order, as printed statements: element values (a
block of a row), reductions over the row (``sum``/``max``), row values
(scalars), and column accumulators.  It schedules two shapes of the same
program:

* **single block** (the row fits one block): every input is read once and
  every output written once;
* **looped** (long rows): passes over the row, one per level of dependent
  reductions.  A ``sum`` whose summand depends on a ``max`` only through a
  factor that rescales (``exp(A - M)``) shares the max's pass: the rescale
  factor ``f(M_new) / f(M_old)`` is *derived* here, not written by hand.  A
  ``sum`` whose summand is a polynomial in row values of an earlier pass (layer
  norm's variance about the mean) shares that pass too: its Taylor
  re-expansion about a moving per-lane reference is derived (:class:`_Shift`).

Every formula and every policy (a max's NaN and tie rules, the online
rescaling) is printed here as statements; every name in them comes from
:class:`derive.names.Names`.  The template only places the text.
"""
from __future__ import annotations

import dataclasses
import itertools
import pprint
from dataclasses import dataclass, field

import sympy
from sympy import Indexed, Symbol

from .derivation import REPO_ROOT, Derivation
from .ir import ArgmaxIndicator, Equation, IndexMax, IndexSum, base_name, free_indices, size_symbol
from .names import Names, comment_text, template_names, visible
from .printer import NotSupported, triton_code
from .report import display_indices
from .simplify import rename_free
from .spec import Pos, SpecError

NEG_INF = sympy.S.NegativeInfinity
TEMPLATES = REPO_ROOT / "templates"


class PlanError(SpecError):
    """The op does not fit a kernel family the generator knows (located at the
    spec's file:line:col when the cause is one equation or declaration)."""

    def __init__(self, message: str, file: str = "<spec>", line: int = 0, col: int = 0):
        super().__init__(message, file, line, col)


def rescale_ratio(body, m, old: Symbol, new: Symbol):
    """``body(m = new) / body(m = old)`` if it is free of tensors (the factor that
    rescales a running sum when the running max moves from ``old`` to ``new``), else None."""
    ratio = sympy.simplify(sympy.powsimp(body.xreplace({m: new}) / body.xreplace({m: old})))
    return None if ratio.atoms(Indexed) else ratio


# ---- what the template places ----------------------------------------------------------
@dataclass
class KTensor:
    """A tensor a kernel reads or writes, with every name the kernel uses for it."""

    key: str      # the spec's name ("A", "dB"), "argmax:M" or "partial:dW"
    level: str    # "elem" [K, c] | "row" [K] | "col" [c] | "part" [programs, c] (contiguous) | "total" []
                  # (a scalar: a sum over the rows) | "tpart" [programs] (a total's per-program partials)
    kind: str     # "data" (the op's dtype) | "stat" (accumulation dtype) | "index" (int32)
    doc: str
    value: str    # the kernel value loaded from / stored to it
    ptr: str
    base: str     # the pointer moved to this program's row
    off: str      # the column offsets of the current block
    sk: list[str] = field(default_factory=list)  # strides over the kept groups (outermost first)
    sr: list[str] = field(default_factory=list)  # strides over the reduced groups

    @property
    def name(self) -> str:
        return self.key

    @property
    def blockwise(self) -> bool:
        """Loaded or stored a block of columns at a time."""
        return self.level in ("elem", "col", "part")


@dataclass
class Block:
    """Code for one block of columns: the tensors it loads, then statements."""

    loads: list[KTensor]
    code: list[str]


@dataclass
class Loop:
    """One pass over a long row: accumulators set up, updated per block, finished."""

    names: list[str]
    init: list[str]
    block: Block
    finish: list[str]
    # split rows: a segment stores what its finish computed; a later pass loads the segments'
    # values into the lane accumulators' names, and the same finish combines them
    seg_stores: list[tuple[KTensor, str]] = field(default_factory=list)
    seg_loads: list[str] = field(default_factory=list)  # statements: the segments' values, as lane vectors


@dataclass
class Acc:
    """A column accumulator: a sum over the rows a program handles (``dW[c]``)."""

    tensor: KTensor   # the partial buffer it is stored to
    name: str
    init: str
    update: str


@dataclass
class RowKernel:
    name: str
    doc: str
    tensors: list[KTensor]                 # the signature, in order
    row_loads: list[KTensor]
    col_loads: list[KTensor]               # hoisted out of the row loop in the single-block shape
    single: Block                          # elementwise loads and all statements (row fits a block)
    elem_stores: list[tuple[KTensor, str]]
    row_stores: list[tuple[KTensor, str]]
    accs: list[Acc]
    before: list[str]                      # row values from row loads alone (looped shape)
    loops: list[Loop]
    final: Block | None                    # computes element outputs and accumulators (looped shape)
    n: dict[str, str]                      # the kernel's own names: "row", "col", ...
    total_loads: list[KTensor] = field(default_factory=list)  # scalars loaded once (totals, their gradients)
    taccs: list[Acc] = field(default_factory=list)            # per-program sums over the rows (scalars)

    @property
    def loads(self) -> list[KTensor]:
        stored = {t.key for t, _ in self.elem_stores + self.row_stores} | {a.tensor.key for a in self.accs}
        return [t for t in self.tensors if t.key not in stored and t.level != "seg"]


@dataclass
class FinishKernel:
    """The second stage of sums over the rows: one program sums each total's
    per-program partials in a fixed order, then computes the totals made of them."""

    name: str
    doc: str
    tensors: list[KTensor]             # partials read, then totals written
    code: list[str]
    stores: list[tuple[KTensor, str]]


@dataclass
class RowwisePlan:
    family: str
    name: str                  # the op (module) name
    fn: str                    # the public function's name in the module
    fwd: RowKernel
    bwd: RowKernel
    meta: dict                 # the op's description for the runtime (pure data)
    saved: list[str]
    extras: list[KTensor]
    params: list[str]
    forward_text: list[str] = field(default_factory=list)
    pullback_text: list[str] = field(default_factory=list)
    param_names: list[str] = field(default_factory=list)  # the parameters' names in generated code
    signature: str = ""        # the public function's parameters
    call: str = ""             # its call of the runtime
    doc: str = ""
    aot_cases: list = field(default_factory=list)  # representative calls for `pullback build`
    real_params: list = field(default_factory=list)  # (kernel name, spec name) of real parameters, loaded
    int_params: list = field(default_factory=list)   # (kernel name, spec name) of integer ones, passed as ints
    fin: FinishKernel | None = None                   # sums over the rows, second stage

    @property
    def aot_text(self) -> str:
        return pprint.pformat(self.aot_cases, width=110, sort_dicts=False)

    @property
    def doc_lines(self) -> list[str]:
        return self.doc.split("\n")

    @property
    def meta_text(self) -> str:
        return pprint.pformat(self.meta, width=110, sort_dicts=False)


# ---- structure: is this spec in the family? ----------------------------------------
@dataclass
class _Shape:
    kept: tuple[Symbol, ...]
    red: Symbol
    levels: dict[str, str]
    scalars: dict = field(default_factory=dict)  # IndexedBase of a scalar intermediate -> its value
    totals: list = field(default_factory=list)   # equations of scalars made of sums over the rows


def _scalars(ir) -> dict:
    """Intermediates with no indices whose value is made of numbers and parameters
    (``T[] = 2 * eps``): their values, to be written in place."""
    out: dict = {}
    for eq in ir.equations:
        if not eq.target.indices and eq.target.role == "intermediate":
            value = eq.rhs.xreplace(out)
            if not value.atoms(Indexed) and not value.has(IndexSum, IndexMax):
                out[eq.target.base] = value
    return out


def _located(ir, pos: Pos | None, msg: str) -> PlanError:
    if pos is None:
        return PlanError(f"op {ir.name}: {msg}", ir.file, 1, 1)
    return PlanError(msg, ir.file, pos.line, pos.col)


def _decl_pos(d: Derivation, name: str) -> Pos | None:
    ir = d.ir
    eq = ir.definition(name)
    if eq is not None:
        return eq.pos
    for decl in d.spec.inputs + d.spec.outputs:
        if decl.name == name:
            return decl.pos
    return None


def match_rowwise(d: Derivation) -> _Shape:
    """The kept and reduced sets of a row-wise spec, or a located PlanError."""
    ir = d.ir
    scalars = _scalars(ir)
    totals = [eq for eq in ir.equations if not eq.target.indices and eq.target.base not in scalars]
    reduced: dict[str, Pos] = {}
    for eq in ir.equations:
        if eq in totals:
            continue  # sums over the rows: checked once the rows are known
        for r in list(eq.rhs.atoms(IndexSum)) + list(eq.rhs.atoms(IndexMax)):
            for i in r.indices:
                reduced.setdefault(base_name(i), eq.pos)
    if len(reduced) > 1:
        names = list(reduced)  # in the order the equations use them
        raise _located(ir, reduced[names[1]], f"the row-wise family reduces over one index set, but this op "
                       f"reduces over {', '.join(names)}")
    if reduced:
        red = Symbol(next(iter(reduced)))
    elif any(o.indices for o in ir.outputs):
        red = next(o for o in ir.outputs if o.indices).indices[-1]  # elementwise: the last index set is the columns
    else:
        raise _located(ir, _decl_pos(d, ir.output.name), "the output has no indices and the op reduces nothing "
                       "per row: write the rows' values first, e.g. y[r] = sum[c](x), then total = sum[r](y)")
    row_like = [t for t in ir.tensors.values() if red in t.indices and len(t.indices) > 1]
    kept_source = row_like[0] if row_like else next(o for o in ir.outputs if o.indices)
    kept = tuple(i for i in kept_source.indices if i != red)
    levels = {}
    for t in ir.tensors.values():
        if t.base in scalars:
            continue
        if not t.indices:
            levels[t.name] = "total"
        elif t.indices == kept + (red,):
            levels[t.name] = "elem"
        elif t.indices == kept and kept:
            levels[t.name] = "row"
        elif t.indices == (red,):
            levels[t.name] = "col"
        else:
            want = ", ".join(i.name for i in kept + (red,))
            raise _located(ir, _decl_pos(d, t.name),
                           f"{t.name}[{', '.join(i.name for i in t.indices)}] does not fit the row-wise family: "
                           f"every tensor is indexed [{want}], [{', '.join(i.name for i in kept)}] or [{red.name}]")
    for t in ir.inputs:
        if t.dtype == "int" and levels[t.name] != "row":
            raise _located(ir, _decl_pos(d, t.name), f"the integer input {t.name} selects one element of each row: "
                           f"index it like a row, [{', '.join(i.name for i in kept)}]")
    if not any(levels[t.name] == "elem" for t in ir.inputs):
        raise _located(ir, _decl_pos(d, ir.inputs[0].name),
                       f"the row-wise family needs an input indexed [{', '.join(i.name for i in kept + (red,))}]")
    for o in ir.outputs:
        if levels[o.name] == "col":
            raise _located(ir, _decl_pos(d, o.name),
                           f"an output indexed [{red.name}] sums over rows; the row-wise family writes row or "
                           f"per-row outputs")
    for eq in totals:
        _check_total(ir, eq, kept, levels)
    for eq in ir.equations:
        if eq not in totals:
            late = sorted(n for n in {str(b.label) for b in eq.rhs.atoms(sympy.IndexedBase)}
                          if levels.get(n) == "total")
            if late:
                raise _located(ir, eq.pos, f"{eq.target.name} uses {', '.join(late)}, a total over the rows: the "
                               f"row-wise family computes totals after the rows, never rows from totals")
    return _Shape(kept, red, levels, scalars, totals)


def _row_sums(expr) -> list:
    """The outermost sums of an expression (a total's sums over the rows)."""
    out, todo = [], [expr]
    while todo:
        e = todo.pop()
        if isinstance(e, IndexSum):
            out.append(e)
        else:
            todo.extend(e.args)
    return out


def _check_total(ir, eq, kept, levels):
    """A total: numbers, parameters, other totals and sums over all the rows of row values."""
    rows = ", ".join(k.name for k in kept)
    if eq.rhs.has(IndexMax):
        raise _located(ir, eq.pos, f"{eq.target.name} takes a max over the rows; the row-wise family sums over "
                       f"the rows (sum[{rows}](...)) but takes no max across them")
    for s in _row_sums(eq.rhs):
        if {base_name(i) for i in s.indices} != {k.name for k in kept} or free_indices(s.body) - set(s.indices):
            raise _located(ir, eq.pos, f"{eq.target.name} sums over {', '.join(i.name for i in s.indices)}: a total "
                           f"sums row values over all the rows, sum[{rows}](y) with y indexed [{rows}]")


# ---- kernel equations and their schedule -------------------------------------------
@dataclass
class _KEq:
    name: str       # spec-level name
    level: str      # "elem", "col" or "row"
    kind: str       # "value", "sum", "max" or "acc" (a sum over the rows)
    expr: object    # value, or the reduction's body
    comment: str
    argmax: bool = False


@dataclass
class _Shift:
    """A sum whose summand is a polynomial in row values ``L`` of its own pass (layer
    norm's ``sum[c]((x - mu)**2)`` with ``mu = mean[c](x)``), folded into that pass.

    Taylor's theorem, exact for a polynomial: ``sum[c](f(L)) = sum_a prod_i (L_i -
    rho_i)**a_i * U_a`` with ``U_a = sum[c](d^a f / a! at rho)``, for any reference
    ``rho``.  Each lane keeps its own ``rho`` (its running estimate of ``L``: the
    pass's sums scaled from the lane's columns to the row) and its ``U_a``; when
    ``rho`` moves, the ``U_a`` are re-expanded about the new one (``shift``), as an
    online softmax rescales its running sum when the running max moves.  Lanes (and
    a split row's segments) combine the same way, about the row's estimate ``ref``."""

    late: list[str]            # the row values L_i, in equation order
    syms: list[Symbol]         # L_i as symbols
    rho: list[Symbol]          # a lane's reference for each L_i
    delta: list[Symbol]        # how far it moves
    terms: dict                # a (multi-index) -> d^a f / a! at rho, an element expression (U_a a lane sum)
    consts: dict               # a -> the constant d^a f / a! (U_a = it * count)
    shift: dict                # a -> U_a about ``rho + delta``, from the U's about ``rho``
    value: object              # the sum about rho: sum_a prod (L - rho)**a * U_a
    needs: list[str]           # this pass's sums and values the estimate of L is made of, in order
    u: dict                    # a -> Symbol U_a


class _Kernel:
    """Schedules a list of kernel equations into the single and looped shapes."""

    def __init__(self, names: Names, n: dict, name: str, doc: str, tensors: list[KTensor], eqs: list[_KEq],
                 stores: list[tuple[KTensor, str]], red: Symbol, params: dict[str, str]):
        self.N, self.n = names, n
        self.name, self.doc, self.eqs, self.red = name, doc, eqs, red
        self.stored = {t.key for t, _ in stores}
        self.tensors = tensors
        self.loads = [t for t in tensors if t.key not in self.stored and t.level not in ("part", "tpart")]
        self.stores = stores
        self.by_name = {e.name: e for e in eqs}
        # spec name -> kernel value name
        self.value_of = {t.key: t.value for t in tensors}  # spec name (or "argmax:M") -> kernel value
        for e in eqs:
            self.value_of.setdefault(e.name, names.of(("value", e.name), e.name.replace(":", "_")))
        self.argmax_of = {t.key[len("argmax:"):]: t.value for t in tensors if t.key.startswith("argmax:")}
        self.params = params

    # -- printing
    def code(self, expr, **extra) -> str:
        names = dict(self.value_of)
        names.update(self.params)
        names[f"|{self.red.name}|"] = f"tl.cast({self.n['n_cols']}, {self.n['ACC']})"
        names.update(extra)
        argmax = {k: v for k, v in self.argmax_of.items()}
        return triton_code(expr, names=names, column=self.n["col"], argmax=argmax)

    def names_in(self, expr) -> set[str]:
        out = {str(t.base.label) for t in expr.atoms(Indexed)} | {s.name for s in expr.atoms(Symbol)}
        out |= {f"argmax:{a.reduced.base.label}" for a in expr.atoms(ArgmaxIndicator)}
        return out

    def is_block(self, name: str) -> bool:
        e = self.by_name.get(name)
        return e is not None and e.level in ("elem", "col") and e.kind == "value"

    def inline_block(self, expr):
        """Replace element values by their definitions, down to loads and row values."""
        for _ in range(len(self.eqs) + 1):
            subs = {t: self.by_name[str(t.base.label)].expr for t in expr.atoms(Indexed)
                    if self.is_block(str(t.base.label))}
            if not subs:
                return expr
            expr = expr.xreplace(subs)
        raise PlanError("element values depend on each other in a cycle")  # pragma: no cover

    def row_deps(self, expr) -> set[str]:
        names = self.names_in(self.inline_block(expr))
        return {n for n in names if n in self.by_name and self.by_name[n].level == "row"}

    def block_deps(self, expr) -> list[str]:
        """Element values ``expr`` needs, transitively, in equation order."""
        need: set[str] = set()
        todo = [expr]
        while todo:
            for nm in self.names_in(todo.pop()):
                if self.is_block(nm) and nm not in need:
                    need.add(nm)
                    todo.append(self.by_name[nm].expr)
        return [e.name for e in self.eqs if e.name in need]

    def block_loads(self, exprs, hoisted=()) -> list[KTensor]:
        names = set()
        for x in exprs:
            names |= self.names_in(x)
        return [t for t in self.loads if t.blockwise and t.key in names and t.key not in hoisted]

    # -- statements
    def assign(self, e: _KEq) -> str:
        return f"{self.value_of[e.name]} = {self.code(e.expr)}  # {comment_text(e.comment)}"

    def max_single(self, e: _KEq) -> list[str]:
        n, v = self.n, self.value_of[e.name]
        blk = self.N.of(("blk", e.name), f"{v}_blk")
        nan = self.N.of(("nan", e.name), f"{v}_nan")
        lines = [f"{blk} = tl.where({n['mask']}, {self.code(e.expr)}, float(\"-inf\"))  # {comment_text(e.comment)}",
                 "# a NaN anywhere makes the max NaN (as torch.amax); its index is the first NaN's",
                 f"{nan} = tl.min(tl.where({blk} != {blk}, {n['col']}, {n['n_cols']}), axis=0)",
                 f"{blk} = tl.where({blk} != {blk}, float(\"-inf\"), {blk})"]
        if e.argmax:
            arg = self.argmax_of[e.name]
            lines += [f"{v}, {arg} = tl.max({blk}, axis=0, return_indices=True, "
                      f"return_indices_tie_break_left=True)  # ties: the first index",
                      f"{arg} = tl.where({nan} < {n['n_cols']}, {nan}, {arg})"]
        else:
            lines.append(f"{v} = tl.max({blk}, axis=0)")
        lines.append(f"{v} = tl.where({nan} < {n['n_cols']}, float(\"nan\"), {v})")
        return lines

    def sum_single(self, e: _KEq) -> list[str]:
        v = self.value_of[e.name]
        return [f"{v} = tl.sum(tl.where({self.n['mask']}, {self.code(e.expr)}, 0.0), axis=0)  "
                f"# {comment_text(e.comment)}"]

    def acc_update(self, e: _KEq) -> str:
        acc = self.N.of(("acc", e.name), f"{self.value_of[e.name]}_acc")
        return f"{acc} += tl.where({self.n['mask']}, {self.code(e.expr)}, 0.0)  # {comment_text(e.comment)}"

    # -- the looped shape
    def loop_for(self, reds: list[_KEq], online: dict[str, tuple], shifted: dict[str, _Shift]) -> Loop:
        n = self.n
        init, finish = [], []
        exprs = [e.expr for e in reds if e.name not in online and e.name not in shifted] + \
            [self.inline_block(e.expr) for e in reds if e.name in online] + \
            [x for e in reds if e.name in shifted for x in shifted[e.name].terms.values()]
        values: list[str] = []
        for x in exprs:
            values += [nm for nm in self.block_deps(x) if nm not in values]
        values = [e.name for e in self.eqs if e.name in values]
        block_code = [self.assign(self.by_name[nm]) for nm in values]
        maxes = [e for e in reds if e.kind == "max"]
        sums = [e for e in reds if e.kind == "sum" and e.name not in shifted]
        run = {e.name: self.N.of(("run", e.name), f"{self.value_of[e.name]}_run") for e in reds}
        for e in maxes:
            v = self.value_of[e.name]
            new, nan = self.N.of(("new", e.name), f"{v}_new"), self.N.of(("nan", e.name), f"{v}_nan")
            blk, isnan = self.N.of(("blk", e.name), f"{v}_blk"), self.N.of(("isnan", e.name), f"{v}_isnan")
            init += [f"{run[e.name]} = tl.full([{n['BLOCK']}], float(\"-inf\"), {n['ACC']})",
                     f"{nan} = tl.zeros([{n['BLOCK']}], dtype=tl.int32) + {n['n_cols']}  # first NaN column per lane"]
            block_code += [f"{blk} = tl.where({n['mask']}, {self.code(e.expr)}, float(\"-inf\"))  "
                           f"# {comment_text(e.comment)}",
                           f"{isnan} = {blk} != {blk}",
                           f"{nan} = tl.minimum({nan}, tl.where({isnan}, {n['col']}, {n['n_cols']}))",
                           f"{blk} = tl.where({isnan}, float(\"-inf\"), {blk})"]
            if e.argmax:
                idx = self.N.of(("idx", e.name), f"{v}_idx")
                init.append(f"{idx} = tl.zeros([{n['BLOCK']}], dtype=tl.int32)")
                block_code.append(f"{idx} = tl.where({blk} > {run[e.name]}, {n['col']}, {idx})  "
                                  f"# strict: the earlier index wins ties")
            block_code.append(f"{new} = tl.maximum({run[e.name]}, {blk})")
            if any(online.get(s.name, (None,))[0] == e.name for s in sums):
                ref = self.N.of(("ref", e.name), f"{v}_ref")
                block_code.append(f"{ref} = tl.where({new} == float(\"-inf\"), 0.0, {new})  "
                                  f"# a lane with nothing yet measures against 0, never -inf - -inf")
        for e in sums:
            v = self.value_of[e.name]
            init.append(f"{run[e.name]} = tl.zeros([{n['BLOCK']}], dtype={n['ACC']})")
            if e.name in online:
                m, body_online, step, final = online[e.name]
                block_code.append(f"{run[e.name]} = {run[e.name]} * {step} + tl.where({n['mask']}, {body_online}, "
                                  f"0.0)  # {comment_text(e.comment)}, rescaled to the new running max")
                finish_sum = f"{v} = tl.sum({run[e.name]} * {final}, axis=0)"
            else:
                block_code.append(f"{run[e.name]} += tl.where({n['mask']}, {self.code(e.expr)}, 0.0)  "
                                  f"# {comment_text(e.comment)}")
                finish_sum = f"{v} = tl.sum({run[e.name]}, axis=0)"
            finish.append(finish_sum)
        shifts = [(e, shifted[e.name]) for e in reds if e.name in shifted]
        shift_seg: list[tuple[str, str, str, str]] = []  # (key, finish value, lane name, what)
        if shifts:
            more = self.shift_code(reds, shifts, run)
            init += more["init"]
            block_code += more["block"]
            finish += more["finish"]
            shift_seg = more["seg"]
        for e in maxes:
            block_code.append(f"{run[e.name]} = {self.N.given[('new', e.name)]}")
        max_finish = []
        for e in maxes:
            v = self.value_of[e.name]
            nan = self.N.given[("nan", e.name)]
            first = self.N.of(("first_nan", e.name), f"{v}_first_nan")
            max_finish.append(f"{v} = tl.max({run[e.name]}, axis=0)")
            if e.argmax:
                arg, idx = self.argmax_of[e.name], self.N.given[("idx", e.name)]
                max_finish.append(f"{arg} = tl.min(tl.where({run[e.name]} == {v}, {idx}, {n['n_cols']}), axis=0)")
            max_finish += ["# a NaN anywhere makes the max NaN (as torch.amax), at the first NaN",
                           f"{first} = tl.min({nan}, axis=0)",
                           f"{v} = tl.where({first} < {n['n_cols']}, float(\"nan\"), {v})"]
            if e.argmax:
                max_finish.append(f"{self.argmax_of[e.name]} = tl.where({first} < {n['n_cols']}, {first}, "
                                  f"{self.argmax_of[e.name]})")
        loads = self.block_loads(exprs + [self.by_name[nm].expr for nm in values])
        seg_stores: list[tuple[KTensor, str]] = []
        seg_loads: list[str] = []

        def seg(key: str, kind: str, doc: str) -> KTensor:
            v = self.N.of(("seg", self.name, key), f"{key.replace(':', '_')}_seg")
            return KTensor(f"seg:{key}", "seg", kind, doc, v, self.N.take(f"{v}_ptr"), "", "")
        def load(t: KTensor, into: str, none: str, what: str):
            seg_loads.append(f"{into} = tl.load({t.ptr} + {n['row']} * {n['n_segs']} + {n['soffs']}, "
                             f"mask={n['smask']}, other={none})  # {what}")

        for e in maxes:
            t = seg(e.name, "stat", f"each segment's {e.name} (split rows)")
            seg_stores.append((t, self.value_of[e.name]))
            load(t, run[e.name], 'float("-inf")', f"the segments' maxima of {e.name} (no segment: -inf)")
            t = seg(f"{e.name}:nan", "index", f"each segment's first NaN column of {e.name} (split rows)")
            seg_stores.append((t, self.N.given[("first_nan", e.name)]))
            load(t, self.N.given[("nan", e.name)], n["n_cols"], "their first NaN columns")
            if e.argmax:
                t = seg(f"{e.name}:arg", "index", f"each segment's first argmax of {e.name} (split rows)")
                seg_stores.append((t, self.argmax_of[e.name]))
                load(t, self.N.given[("idx", e.name)], "0", "their first argmax columns")
        for e in sums:
            t = seg(e.name, "stat", f"each segment's {comment_text(e.comment)} (split rows)")
            seg_stores.append((t, self.value_of[e.name]))
            load(t, run[e.name], "0.0", f"the segments' {comment_text(e.comment)}")
        for key, value, lane, what in shift_seg:
            t = seg(key, "stat", f"each segment's {what} (split rows)")
            seg_stores.append((t, value))
            load(t, lane, "0.0", f"the segments' {what} (no segment: 0)")
        return Loop([e.name for e in reds], init, Block(loads, block_code), max_finish + finish, seg_stores, seg_loads)

    def shift_code(self, reds: list[_KEq], shifts: list[tuple[_KEq, _Shift]], run: dict[str, str]) -> dict:
        """The statements of a pass's shifted sums (see :class:`_Shift`): lane
        references and coefficient sums set up, updated per block, combined at the end."""
        n, N = self.n, self.N
        key = reds[0].name
        cnt = N.of(("cnt", key), "n_seen")
        cnt_new = N.of(("cnt_new", key), "n_seen_new")
        cnt_all = N.of(("cnt_all", key), "n_seen_row")
        ncols = f"tl.cast({n['n_cols']}, {self.n['ACC']})"
        late = [x for x in self.eqs if any(x.name in sh.late for _, sh in shifts)]
        needs = [x for x in self.eqs if any(x.name in sh.needs for _, sh in shifts)]
        rho = {x.name: N.of(("rho", x.name), f"{self.value_of[x.name]}_rho") for x in late}
        rho_new = {x.name: N.of(("rho_new", x.name), f"{self.value_of[x.name]}_rho_new") for x in late}
        delta = {x.name: N.of(("delta", x.name), f"{self.value_of[x.name]}_delta") for x in late}
        est = {x.name: N.of(("est", x.name), f"{self.value_of[x.name]}_est") for x in needs}
        ref = {x.name: N.of(("fest", x.name), f"{self.value_of[x.name]}_ref") for x in needs}
        u_lane = {(e.name, a): N.of(("U", e.name, a), f"{self.value_of[e.name]}_u{''.join(map(str, a))}")
                  for e, sh in shifts for a in sh.terms}
        u_row = {(e.name, a): N.of(("Ur", e.name, a), f"{self.value_of[e.name]}_u{''.join(map(str, a))}_row")
                 for e, sh in shifts for a in sh.terms}
        init = [f"{cnt} = tl.zeros([{n['BLOCK']}], dtype={n['ACC']})  # columns each lane has seen"]
        init += [f"{rho[x.name]} = tl.zeros([{n['BLOCK']}], dtype={n['ACC']})  # each lane's reference for "
                 f"{comment_text(x.name)}" for x in late]
        init += [f"{u_lane[k]} = tl.zeros([{n['BLOCK']}], dtype={n['ACC']})" for k in u_lane]

        def estimates(names_: dict, count: str, sums: dict) -> list[str]:
            out, given = [], {}
            for x in needs:
                if x.kind == "sum":
                    out.append(f"{names_[x.name]} = {sums[x.name]} * ({ncols} / tl.maximum({count}, 1.0))  "
                               f"# {comment_text(x.comment)}, scaled to the whole row")
                else:
                    out.append(f"{names_[x.name]} = {self.code(x.expr, **given)}  # {comment_text(x.comment)}")
                given[x.name] = names_[x.name]
            return out

        def printed(expr, sh: _Shift, e: _KEq, deltas: dict, us: dict, count: str, **extra) -> str:
            names_ = {d.name: deltas[nm] for d, nm in zip(sh.delta, sh.late)}
            names_.update({sh.u[a].name: us[(e.name, a)] for a in sh.terms})
            names_.update(extra)
            expr = expr.xreplace({sh.u[a]: c * Symbol(count) for a, c in sh.consts.items()})
            names_[count] = count
            return self.code(expr, **names_)

        block = [f"{cnt_new} = {cnt} + tl.where({n['mask']}, 1.0, 0.0)",
                 "# each lane's estimate of the row's values, from its columns so far: its new reference"]
        block += estimates(est, cnt_new, {x.name: run[x.name] for x in needs if x.kind == "sum"})
        block += [f"{rho_new[x.name]} = tl.where({cnt_new} > 0, {est[x.name]}, 0.0)" for x in late]
        block += [f"{delta[x.name]} = {rho_new[x.name]} - {rho[x.name]}" for x in late]
        for e, sh in shifts:
            block.append(f"# {comment_text(e.comment)}: the lane's sums re-expanded about the new reference "
                         f"(Taylor, exact for a polynomial), then this block's terms")
            for a in sh.terms:  # (by degree: each reads only higher coefficients, not yet moved)
                block.append(f"{u_lane[(e.name, a)]} = {printed(sh.shift[a], sh, e, delta, u_lane, cnt)}")
            for a, term in sh.terms.items():
                body = self.code(term, **{r.name: rho_new[nm] for r, nm in zip(sh.rho, sh.late)})
                block.append(f"{u_lane[(e.name, a)]} += tl.where({n['mask']}, {body}, 0.0)")
        block += [f"{rho[x.name]} = {rho_new[x.name]}" for x in late] + [f"{cnt} = {cnt_new}"]

        finish = [f"{cnt_all} = tl.sum({cnt}, axis=0)", "# the row's estimate: the reference the lanes combine about"]
        finish += estimates(ref, cnt_all, {x.name: self.value_of[x.name] for x in needs if x.kind == "sum"})
        finish += [f"{delta[x.name]} = {ref[x.name]} - {rho[x.name]}" for x in late]
        seg = [(f"{key}:n_seen", cnt_all, cnt, "columns seen")]
        seg += [(f"{x.name}:ref", ref[x.name], rho[x.name], f"reference for {comment_text(x.name)}") for x in late]
        for e, sh in shifts:
            for a in sh.terms:
                moved = printed(sh.shift[a], sh, e, delta, u_lane, cnt)
                finish.append(f"{u_row[(e.name, a)]} = tl.sum({moved}, axis=0)")
                seg.append((f"{e.name}:u{''.join(map(str, a))}", u_row[(e.name, a)], u_lane[(e.name, a)],
                            f"coefficient {a} of {comment_text(e.comment)}"))
        return {"init": init, "block": block, "finish": finish, "seg": seg}

    def shift_final(self, e: _KEq, sh: _Shift, reds: list[_KEq]) -> str:
        """The shifted sum itself, once its row values are known: its polynomial about the row's estimate."""
        key = reds[0].name
        names_ = {r.name: self.N.given[("fest", nm)] for r, nm in zip(sh.rho, sh.late)}
        names_.update({s_.name: self.value_of[nm] for s_, nm in zip(sh.syms, sh.late)})
        names_.update({sh.u[a].name: self.N.given[("Ur", e.name, a)] for a in sh.terms})
        cnt_all = self.N.given[("cnt_all", key)]
        value = sh.value.xreplace({sh.u[a]: c * Symbol(cnt_all) for a, c in sh.consts.items()})
        names_[cnt_all] = cnt_all
        return f"{self.value_of[e.name]} = {self.code(value, **names_)}  # {comment_text(e.comment)}"

    def online_factor(self, e: _KEq, ready: dict[str, int], level: int):
        """A sum whose summand depends on a max M of the same pass only through a
        factor f(M): its printed online update, else None."""
        if e.kind != "sum":
            return None
        late = [x for x in self.row_deps(e.expr) if ready[x] == level]
        if len(late) != 1 or self.by_name[late[0]].kind != "max":
            return None
        m = late[0]
        body = self.inline_block(e.expr)
        old, new = Symbol(f"_{m}_run"), Symbol(f"_{m}_new")
        m_sym = next(t for t in body.atoms(Indexed) if str(t.base.label) == m)
        ratio = rescale_ratio(body, m_sym, old, new)
        if ratio is None:
            return None  # the summand does not rescale: schedule another pass
        v = self.value_of[m]
        run = self.N.of(("run", m), f"{v}_run")
        newn = self.N.of(("new", m), f"{v}_new")
        ref = self.N.of(("ref", m), f"{v}_ref")
        # A lane whose running max is still -inf has summed nothing (its terms
        # were exp(-inf) = 0): its rescale is 0, and the new terms are measured
        # against 0 instead of -inf so that exp(-inf - -inf) never appears.
        body_online = self.code(body.xreplace({m_sym: Symbol(f"_{m}_ref")}), **{f"_{m}_ref": ref})
        step = self.code(sympy.Piecewise((0, sympy.Eq(old, NEG_INF)), (ratio, True)),
                         **{old.name: run, new.name: newn})
        final = self.code(sympy.Piecewise((0, sympy.Eq(old, NEG_INF)), (ratio.xreplace({new: Symbol(m)}), True)),
                          **{old.name: run})
        return m, body_online, step, final

    def shift_sum(self, e: _KEq, ready: dict[str, int], level: int, pass_of: dict[str, int],
                  online: dict, max_degree: int = 4) -> _Shift | None:
        """A sum whose summand is a polynomial in row values of pass ``level``, each an
        expression of that pass's plain sums: its :class:`_Shift`, else None."""
        if e.kind != "sum":
            return None
        late = [x.name for x in self.eqs if x.name in self.row_deps(e.expr) and ready.get(x.name) == level]
        if not late:
            return None
        # what the estimate of each L is made of: this pass's plain sums and values of them
        needs: list[str] = []
        todo = list(late)
        while todo:
            x = self.by_name[todo.pop()]
            if x.name in needs:
                continue
            if x.kind == "sum":
                if pass_of.get(x.name) != level or x.name in online:
                    return None
            elif x.kind != "value":
                return None
            needs.append(x.name)
            if x.kind == "value":
                todo += [y for y in self.row_deps(x.expr) if ready.get(y) == level]
        needs = [x.name for x in self.eqs if x.name in needs]
        body = self.inline_block(e.expr)
        syms = [Symbol(f"_L{k}") for k in range(len(late))]
        by_late = dict(zip(late, syms))
        body = body.xreplace({t: by_late[str(t.base.label)] for t in body.atoms(Indexed)
                              if str(t.base.label) in by_late})
        if any(str(t.base.label) in by_late for t in body.atoms(Indexed)) or not body.is_polynomial(*syms):
            return None
        degree = sympy.Poly(body, *syms).total_degree()
        if not 1 <= degree <= max_degree:
            return None
        rho = [Symbol(f"_rho{k}") for k in range(len(syms))]
        alphas = sorted((a for a in itertools.product(range(degree + 1), repeat=len(syms)) if sum(a) <= degree),
                        key=lambda a: (sum(a), a))
        terms, consts, u = {}, {}, {}
        for a in alphas:
            d = body
            for sym, k in zip(syms, a):
                d = sympy.diff(d, sym, k)
            d = d.xreplace(dict(zip(syms, rho))) / sympy.prod(sympy.factorial(k) for k in a)
            if d == 0:
                continue
            u[a] = Symbol("_U" + "_".join(map(str, a)))
            if d.atoms(Indexed) or d.free_symbols & set(rho):
                terms[a] = d
            else:
                consts[a] = d
        # the sum as a polynomial in L about rho
        value = sympy.Add(*[u[a] * sympy.prod((s_ - r) ** k for s_, r, k in zip(syms, rho, a)) for a in u])
        # re-expanded about new = rho + delta: the coefficient of prod (L - new)**b, in powers of delta
        # (a lane's reference moves little, so no large terms cancel)
        t = [Symbol(f"_t{k}") for k in range(len(syms))]
        delta = [Symbol(f"_delta{k}") for k in range(len(syms))]
        moved = sympy.Add(*[u[a] * sympy.prod((t_ + d_) ** k for t_, d_, k in zip(t, delta, a)) for a in u])
        moved = sympy.Poly(sympy.expand(moved), *t)
        shift = {b: moved.coeff_monomial(sympy.prod(t_ ** k for t_, k in zip(t, b))) for b in u}
        return _Shift(late, syms, rho, delta, terms, consts, shift, value, needs, u)

    def build(self) -> RowKernel:
        eqs = self.eqs
        col_loads = [t for t in self.loads if t.level == "col"]
        single_code: list[str] = []
        accs: list[Acc] = []
        taccs: list[Acc] = []
        for e in eqs:
            if e.kind == "value":
                single_code.append(self.assign(e))
            elif e.kind == "sum":
                single_code += self.sum_single(e)
            elif e.kind == "max":
                single_code += self.max_single(e)
            elif e.kind == "tacc":  # a total: its row's term, added at the end of the row
                part = next(t for t in self.tensors if t.key == f"tpartial:{e.name}")
                acc = self.N.of(("tacc", e.name), f"{self.value_of[e.name]}_acc")
                taccs.append(Acc(part, acc, f"{acc} = tl.zeros((), dtype={self.n['ACC']})",
                                 f"{acc} += {self.code(e.expr)}  # {comment_text(e.comment)}"))
            else:  # a sum over the rows: accumulated per program
                single_code.append(self.acc_update(e))
                part = next(t for t in self.tensors if t.key == f"partial:{e.name}")
                acc = self.N.given[("acc", e.name)]
                accs.append(Acc(part, acc, f"{acc} = tl.zeros([{self.n['BLOCK']}], dtype={self.n['ACC']})",
                                self.acc_update(e)))
        single_exprs = [e.expr for e in eqs if e.kind != "tacc"]
        single = Block(self.block_loads(single_exprs, hoisted={t.key for t in col_loads}), single_code)
        # -- the looped shape: the level of each row value = the passes it waits for
        ready: dict[str, int] = {t.key: 0 for t in self.loads if t.level == "row"}
        pass_of: dict[str, int] = {}
        online: dict[str, tuple] = {}
        shifted: dict[str, _Shift] = {}
        for e in eqs:
            if e.level != "row":
                continue
            deps = self.row_deps(e.expr)
            base = max([ready[x] for x in deps], default=0)
            if e.kind == "value":
                ready[e.name] = base
                continue
            red = self.online_factor(e, ready, base) if base > 0 else None
            if red is not None:
                online[e.name] = red
            elif base > 0:
                sh = self.shift_sum(e, ready, base, pass_of, online)
                if sh is not None:
                    shifted[e.name] = sh
            level = base if e.name in online or e.name in shifted else base + 1
            pass_of[e.name] = level
            ready[e.name] = level
        loops = []
        for p in range(1, max(pass_of.values(), default=0) + 1):
            reds = [e for e in eqs if pass_of.get(e.name) == p]
            loop = self.loop_for(reds, online, shifted)
            loop.finish += [self.assign(e) if e.kind == "value" else self.shift_final(e, shifted[e.name], reds)
                            for e in eqs if e.level == "row" and ready.get(e.name) == p
                            and (e.kind == "value" or e.name in shifted)]
            loops.append(loop)
        before = [self.assign(e) for e in eqs if e.level == "row" and e.kind == "value" and ready[e.name] == 0]
        final = None
        elem_out = [(t, v) for t, v in self.stores if t.level == "elem"]
        acc_eqs = [e for e in eqs if e.kind == "acc"]
        if elem_out or acc_eqs:
            outs = [Indexed(v, Symbol("_")) for _, v in elem_out] + [e.expr for e in acc_eqs]
            need: list[str] = []
            for o in outs:
                need += [nm for nm in self.block_deps(o) if nm not in need]
            need = [e.name for e in eqs if e.name in need]
            final = Block(self.block_loads(outs + [self.by_name[nm].expr for nm in need]),
                          [self.assign(self.by_name[nm]) for nm in need] + [self.acc_update(e) for e in acc_eqs])
        stores = [(t, self.value_of[v]) for t, v in self.stores]
        return RowKernel(self.name, self.doc, self.tensors, [t for t in self.loads if t.level == "row"], col_loads,
                         single, [(t, v) for t, v in stores if t.level == "elem"],
                         [(t, v) for t, v in stores if t.level == "row"], accs, before, loops, final, self.n,
                         [t for t in self.loads if t.level == "total"], taccs)

    @staticmethod
    def with_segments(k: RowKernel) -> RowKernel:
        """The kernel's signature with the split-row buffers of its passes, last."""
        k.tensors = k.tensors + [t for lp in k.loops for t, _ in lp.seg_stores]
        return k


# ---- from a derivation to the two kernels --------------------------------------------
def _extract_sums(expr, red: Symbol, out: list, prefix: str, names: Names, ir, pos, kept=()):
    """Replace each sum over the reduced set by a named row value (indexed by the kept set)."""
    def walk(e):
        if isinstance(e, IndexSum):
            if any(base_name(i) != red.name for i in e.indices) or len(e.indices) != 1:
                raise _located(ir, pos, f"a sum over {', '.join(i.name for i in e.indices)} inside this "
                               f"expression does not fit the row-wise family (sums run over {red.name})")
            body = walk(e.body).xreplace({e.indices[0]: red})
            same = next((o for o in out if o.kind == "sum" and o.expr == body), None)
            if same is not None:  # the same sum twice: one reduction
                return Indexed(same.name, *(kept or [red]))
            tensors = sorted({str(t.base.label).replace(":", "_") for t in body.atoms(Indexed)})
            # a key no spec name can take (':'); the kernel's name is allocated from it
            name = f"{prefix}:{'_'.join(tensors)}" if tensors else f"{prefix}:{len(out)}"
            while any(o.name == name for o in out):
                name += "_"
            out.append(_KEq(name, "row", "sum", body, f"sum[{red}]({body})"))
            return Indexed(name, *(kept or [red]))
        if not e.args or isinstance(e, Indexed):
            return e
        return e.func(*[walk(a) for a in e.args])

    return walk(expr)


def _row_sum(expr, kept: tuple[Symbol, ...], ir, pos):
    """``dW[c]`` as one sum over the kept set: ``sum[K](body)``.  The pullback of a
    column weight is a sum over the rows (or a sum of such sums with factors
    free of the rows); anything else does not fit."""
    kept_names = {k.name for k in kept}
    body_terms = []
    for term in sympy.Add.make_args(sympy.expand(expr, deep=False, mul=True, multinomial=False,
                                                 power_exp=False, power_base=False, log=False)):
        sums = [f for f in sympy.Mul.make_args(term) if isinstance(f, IndexSum)
                and {base_name(i) for i in f.indices} >= kept_names]
        if len(sums) != 1:
            raise _located(ir, pos, "this gradient of a column weight is not a sum over the rows; "
                                    "the row-wise family cannot reduce it")
        s = sums[0]
        rest = term / s
        inner = tuple(i for i in s.indices if base_name(i) not in kept_names)
        if inner:  # sum[c', r](...) = sum[r](sum[c'](...)), factors free of c' taken out of the inner sum
            out_f, in_f = [], []
            for f in sympy.Mul.make_args(s.body):
                (in_f if free_indices(f) & set(inner) else out_f).append(f)
            s = IndexSum(sympy.Mul(*out_f) * IndexSum(sympy.Mul(*in_f), *inner),
                         *[i for i in s.indices if i not in inner])
        if free_indices(rest) & set(s.indices) or any(base_name(i) in kept_names for i in free_indices(rest)):
            raise _located(ir, pos, "this gradient of a column weight mixes rows outside its sum")
        by_set = {base_name(i): i for i in s.indices}
        body = s.body.xreplace({by_set[k.name]: k for k in kept})
        body_terms.append(rest * body)
    return sympy.Add(*body_terms)


def plan_rowwise(d: Derivation) -> RowwisePlan:
    ir = d.ir
    shape = match_rowwise(d)
    kept, red, levels = shape.kept, shape.red, shape.levels
    names = Names(template_names(TEMPLATES / "rowwise.py.j2"))
    # the template's own identifiers, by role (its text uses these exact words)
    n = {w: w for w in ("row", "col", "mask", "n_cols", "ACC", "BLOCK", "n_segs", "soffs", "smask")}
    outs = list(ir.outputs)
    out_names = {o.name for o in outs}
    # scalar intermediates (numbers and parameters) are written in place
    equations = [Equation(eq.target, eq.rhs.xreplace(shape.scalars), eq.pos) for eq in ir.equations
                 if eq.target.base not in shape.scalars]
    fwd_defs = {eq.target.name: eq for eq in equations}
    inputs = list(ir.inputs)

    # -- the backward's expressions: block-level forward values are recomputed, row values saved
    def recompute(g, keep: set[str]):
        """``g`` with block-level forward values (rows and column values) replaced
        by their definitions, at their use-site indices, except those in ``keep``."""
        for _ in range(len(equations) + 1):
            subs = {t: rename_free(fwd_defs[str(t.base.label)].rhs,
                                   dict(zip(fwd_defs[str(t.base.label)].target.indices, t.indices)))
                    for t in g.atoms(Indexed)
                    if str(t.base.label) in fwd_defs and levels[str(t.base.label)] in ("elem", "col")
                    and str(t.base.label) not in keep}
            if not subs:
                return g
            g = g.xreplace(subs)
        return g

    def reads_of(gs) -> set[str]:
        out_: set[str] = set()
        for g in gs:  # an argmax indicator reads the saved index, not its max's values
            g = g.replace(lambda e: isinstance(e, ArgmaxIndicator), lambda e: Symbol("_pick"))
            out_ |= {str(b.label) for b in g.atoms(sympy.IndexedBase)}
        return out_ - set(grad_outs)

    # adjoints the derivation keeps as named values (of contraction operands) are
    # values of the row-wise backward too: substitute them, at their use-site indices
    kept_adjoints = {f"d{st.tensor.name}": st for st in d.steps if st.kept and st.tensor.role != "input"}

    def inline_adjoints(g):
        for _ in range(len(kept_adjoints) + 1):
            subs = {t: rename_free(kept_adjoints[str(t.base.label)].value,
                                   dict(zip(kept_adjoints[str(t.base.label)].tensor.indices, t.indices)))
                    for t in g.atoms(Indexed) if str(t.base.label) in kept_adjoints}
            if not subs:
                return g
            g = g.xreplace(subs)
        raise _located(ir, None, "the named adjoints depend on each other in a cycle")  # pragma: no cover

    pullbacks = {x.name: inline_adjoints(d.pullbacks[x.name]).xreplace(shape.scalars) for x in inputs}
    grad_outs = [f"d{o.name}" for o in outs]
    # every sum over the rows is a total of the forward, named (loss = total / sum[r](counts): "loss_rows:1")
    row_sums: dict = {}  # its body, over the kept indices -> its name
    for eq in equations:
        if levels[eq.target.name] == "total":
            for k, srow in enumerate(_row_sums(eq.rhs)):
                by_set = {base_name(i): i for i in srow.indices}
                body = srow.body.xreplace({by_set[q.name]: q for q in kept})
                row_sums.setdefault(body, eq.target.name if srow == eq.rhs else f"{eq.target.name}_rows:{k}")
    for name in row_sums.values():
        levels.setdefault(name, "total")

    def name_totals(g):
        """The backward reads a sum over the rows as the forward's total, saved."""
        subs = {}
        for srow in g.atoms(IndexSum):
            if {base_name(i) for i in srow.indices} == {q.name for q in kept}:
                by_set = {base_name(i): i for i in srow.indices}
                body = srow.body.xreplace({by_set[q.name]: q for q in kept})
                if body in row_sums:
                    subs[srow] = sympy.IndexedBase(row_sums[body])
        return g.xreplace(subs)

    pullbacks = {x: name_totals(g) for x, g in pullbacks.items()}
    grads = {x.name: recompute(pullbacks[x.name], out_names) for x in inputs}
    reads = reads_of(grads.values())
    elem_outs = {o.name for o in outs if levels[o.name] == "elem"}
    if reads & elem_outs:
        # the backward reads an output: recompute it instead when everything it is made
        # of is read anyway (rms norm's y = x w / rms, with x, w and rms at hand)
        again = {x.name: recompute(pullbacks[x.name], out_names - elem_outs) for x in inputs}
        if reads_of(again.values()) <= reads - elem_outs:
            grads, reads = again, reads_of(again.values())
    argmax_of = sorted({str(a.reduced.base.label) for g in grads.values() for a in g.atoms(ArgmaxIndicator)})
    saved_fwd = [t.name for t in inputs if t.name in reads] + [o.name for o in outs if o.name in reads]
    stat_names = sorted(r for r in reads if (r in fwd_defs or r in row_sums.values()) and r not in out_names
                        and levels[r] in ("row", "total"))

    def tensor(key, level, kind, doc, want) -> KTensor:
        v = names.of(("value", key), want)
        ptr, base, off = names.take(f"{v}_ptr"), names.take(f"{v}_row"), names.take(f"{v}_off")
        sk = [names.take(f"{v}_sk{k}") for k in range(3)] if level in ("elem", "row") else []
        sr = [names.take(f"{v}_sr{k}") for k in range(3)] if level in ("elem", "col") else []
        return KTensor(key, level, kind, doc, v, ptr, base, off, sk, sr)

    params = {q.name: names.of(("param", q.name), q.name) for q in ir.params}
    t_in = {x.name: tensor(x.name, levels[x.name], "index" if x.dtype == "int" else "data", f"the input {x.indexed}",
                           x.name) for x in inputs}
    t_outs = {o.name: tensor(o.name, levels[o.name], "data", f"the output {o.indexed}", o.name) for o in outs}
    t_arg = {m: tensor(f"argmax:{m}", "row", "index", f"first argmax of {m}'s row", f"{m}_argmax")
             for m in argmax_of}
    t_stat = {s: tensor(s, levels[s], "stat", f"{s} saved for the backward", s) for s in stat_names}

    # -- forward kernel
    eqs: list[_KEq] = []
    t_parts: list[KTensor] = []       # per-program partials of the sums over the rows
    fin_eqs: list[tuple[str, object, str]] = []  # totals made of those sums: (name, value, comment)
    for eq in equations:
        lvl = levels[eq.target.name]
        if lvl == "total":  # each sum over the rows: one term per row, summed per program, then across programs
            subs = {}
            for k, srow in enumerate(_row_sums(eq.rhs)):
                by_set = {base_name(i): i for i in srow.indices}
                body = srow.body.xreplace({by_set[q.name]: q for q in kept})
                name = eq.target.name if srow == eq.rhs else f"{eq.target.name}_rows:{k}"
                if row_sums[body] != name:  # the same sum twice: one total
                    subs[srow] = sympy.IndexedBase(row_sums[body])
                    continue
                body = _extract_sums(body, red, eqs, f"{name}_sum", names, ir, eq.pos, kept)
                eqs.append(_KEq(name, "total", "tacc", body, f"{eq.target.name}[] = {sympy.sstr(srow)}"))
                t_parts.append(tensor(f"tpartial:{name}", "tpart", "stat",
                                      f"per-program partial sums of {name} (summed in a second stage)",
                                      f"{name.replace(':', '_')}_partial"))
                subs[srow] = sympy.IndexedBase(name)
            if subs.get(eq.rhs) != sympy.IndexedBase(eq.target.name):
                fin_eqs.append((eq.target.name, eq.rhs.xreplace(subs), str(eq)))
            continue
        if isinstance(eq.rhs, IndexSum):
            body = _extract_sums(eq.rhs.body, red, eqs, f"{eq.target.name}_sum", names, ir, eq.pos, kept)
            eqs.append(_KEq(eq.target.name, lvl, "sum", body, str(eq)))
        elif isinstance(eq.rhs, IndexMax):  # (a sum inside a max's operand is a row value of its own)
            body = _extract_sums(eq.rhs.body, red, eqs, f"{eq.target.name}_sum", names, ir, eq.pos, kept)
            eqs.append(_KEq(eq.target.name, lvl, "max", body, str(eq), argmax=eq.target.name in argmax_of))
        else:  # sums inside an expression (a mean, say) become row values of their own
            rhs = _extract_sums(eq.rhs, red, eqs, f"{eq.target.name}_sum", names, ir, eq.pos, kept)
            eqs.append(_KEq(eq.target.name, lvl, "value", rhs, str(eq)))
    # -- backward kernel
    t_grads = [tensor(f"d{o.name}", levels[o.name], "data", f"the gradient of {o.name}", f"d{o.name}")
               for o in outs]
    saved_t = [t_in[s] if s in t_in else t_outs[s] for s in saved_fwd] + list(t_arg.values()) + \
        list(t_stat.values())
    b_eqs: list[_KEq] = []
    b_stores: list[tuple[KTensor, str]] = []
    partials: list[KTensor] = []
    zero_grads: set[str] = set()
    pullback_text = []
    for x in inputs:
        lvl = levels[x.name]
        gname = f"d{x.name}"
        g = grads[x.name]
        idx, shown = display_indices(list(x.indices), d.pullbacks[x.name])
        text = f"{gname}[{', '.join(i.name for i in idx)}] = {sympy.sstr(shown)}"
        pullback_text.append(text)
        pos = _decl_pos(d, x.name)
        if g == 0:  # no gradient reaches x (it is unused, or only through a max-shift): zeros, no kernel work
            zero_grads.add(x.name)
            continue
        if lvl == "col":
            body = _extract_sums(_row_sum(g, kept, ir, pos), red, b_eqs, "sum", names, ir, pos, kept)
            b_eqs.append(_KEq(gname, "elem", "acc", body, text))
            partials.append(tensor(f"partial:{gname}", "part", "stat",
                                   f"per-program partial sums of {gname} (summed in a second stage)",
                                   f"{gname}_partial"))
            continue
        if lvl == "row":
            g = sympy.sympify(g)
        body = _extract_sums(g, red, b_eqs, "sum", names, ir, pos, kept)
        b_eqs.append(_KEq(gname, lvl, "value", body, text))
        b_stores.append((tensor(gname, lvl, "data", f"the gradient of {x.name}", gname), gname))
    # a row sum the backward needs that the forward computes anyway is saved, not
    # recomputed (cross-entropy's sum[c](exp(x - m)): the looped backward then makes one pass)
    elem_defs = {e.name: e.expr for e in eqs if e.kind == "value" and e.level in ("elem", "col")}

    def inline_forward(x):
        for _ in range(len(eqs) + 1):
            subs = {t: elem_defs[str(t.base.label)] for t in x.atoms(Indexed) if str(t.base.label) in elem_defs}
            if not subs:
                break
            x = x.xreplace(subs)
        return x

    fwd_sums: dict = {}
    for e in eqs:
        if e.kind == "sum" and e.level == "row":
            fwd_sums.setdefault(inline_forward(e.expr), e.name)
    reuse = {e.name: fwd_sums[e.expr] for e in b_eqs if e.kind == "sum" and e.level == "row" and e.expr in fwd_sums}
    if reuse:
        row_idx = kept or (red,)
        subs = {Indexed(b, *row_idx): Indexed(f, *row_idx) for b, f in reuse.items()}
        b_eqs = [dataclasses.replace(e, expr=e.expr.xreplace(subs)) for e in b_eqs if e.name not in reuse]
        for f in sorted(set(reuse.values())):
            t_stat[f] = tensor(f, "row", "stat", f"{next(e.comment for e in eqs if e.name == f)}, saved for the "
                               f"backward", f.replace(":", "_"))
        saved_t += [t_stat[f] for f in sorted(set(reuse.values()))]

    fin_tensors = [t for t in list(t_outs.values()) + list(t_stat.values()) if t.level == "total"]
    fwd_tensors = [t for t in list(t_in.values()) + list(t_outs.values()) + list(t_arg.values()) +
                   list(t_stat.values()) if t.level != "total"] + t_parts
    fwd_stores = [(t, o) for o, t in t_outs.items() if t.level != "total"] + \
        [(t, f"argmax:{m}") for m, t in t_arg.items()] + [(t, s) for s, t in t_stat.items() if t.level != "total"]
    k_fwd = _Kernel(names, n, names.take(f"_{ir.name}_fwd"), f"forward of {ir.name}", fwd_tensors, eqs,
                    fwd_stores, red, params)
    fwd = _Kernel.with_segments(k_fwd.build())
    fin = _finish(names, ir, kept, t_parts, fin_eqs, fin_tensors, params) if t_parts else None

    bwd_tensors = saved_t + t_grads + [t for t, _ in b_stores] + partials
    k_bwd = _Kernel(names, n, names.take(f"_{ir.name}_bwd"), f"backward of {ir.name}", bwd_tensors, b_eqs,
                    b_stores, red, params)
    bwd = _Kernel.with_segments(k_bwd.build())

    fn = names.of(("fn", ir.name), ir.name)
    signature, call, reduces, api_params, api_dim = _api(ir, d.spec, levels, has_reduction=bool(
        [e for e in eqs if e.kind in ("sum", "max")]))
    meta = {
        "name": ir.name,
        "inputs": [{"name": x.name, "level": levels[x.name], "default": decl.default, "dtype": x.dtype}
                   for x, decl in zip(inputs, d.spec.inputs)],
        "params": [{"name": q.name, "default": q.default, "dtype": q.dtype} for q in d.spec.param_decls],
        "outputs": [{"name": o.name, "level": levels[o.name]} for o in outs],
        "extras": [{"name": t.key, "level": t.level, "kind": t.kind}
                   for t in list(t_arg.values()) + list(t_stat.values())],
        "saved": saved_fwd + [t.key for t in list(t_arg.values()) + list(t_stat.values())],
        "grads": [{"name": f"d{x.name}", "of": x.name, "level": levels[x.name], "zero": x.name in zero_grads}
                  for x in inputs],
        "forward": _kernel_meta(fwd),
        "backward": _kernel_meta(bwd),
        "finish": {"kernel": fin.name, "tensors": [t.key for t in fin.tensors]} if fin else None,
        "choice": None if d.spec.choice is None else {"keyword": d.spec.choice[0],
                                                      "values": dict(d.spec.choice[1])},
    }
    meta["reduces"] = reduces
    extras = list(t_arg.values()) + list(t_stat.values())
    doc = (f"{ir.name}({', '.join(str(x.indexed) for x in inputs)}"
           f"{'; ' + ', '.join(q.name for q in ir.params) if ir.params else ''}) -> "
           f"{', '.join(str(o.indexed) for o in outs)}, "
           f"from {visible(str(d.path))}.\n\n{_api_doc(ir, levels, red, meta['reduces'], d.spec.choice)}\n"
           f"Forward and backward run the generated Triton kernels above.")
    return RowwisePlan("rowwise", ir.name, fn, fwd, bwd, meta, meta["saved"], extras, [q.name for q in ir.params],
                       [str(e) for e in ir.equations], pullback_text, list(params.values()), signature, call, doc,
                       _aot_cases(fn, inputs, levels, reduces, api_params, api_dim, d.spec.param_decls),
                       [(params[q.name], q.name) for q in d.spec.param_decls if q.dtype != "int"],
                       [(params[q.name], q.name) for q in d.spec.param_decls if q.dtype == "int"], fin)


def _kernel_meta(k: RowKernel) -> dict:
    """A kernel's arguments (tensor keys, in order), its passes over a long row, and the
    buffers its segments fill when a row is split across programs."""
    return {"kernel": k.name, "tensors": [t.key for t in k.tensors], "passes": len(k.loops),
            "segments": {t.key: t.kind for t in k.tensors if t.level == "seg"}}


def _finish(names: Names, ir, kept, parts: list[KTensor], fin_eqs, stores: list[KTensor], params) -> FinishKernel:
    """The second stage of the sums over the rows, and the totals made of them."""
    value_of = {t.key: t.value for t in stores}
    code = []
    for t in parts:
        name = t.key[len("tpartial:"):]
        v = value_of.setdefault(name, names.of(("value", name), name.replace(":", "_")))
        code.append(f"{v} = tl.sum(tl.load({t.ptr} + offs, mask=offs < n_parts, other=0.0), axis=0)  "
                    f"# {comment_text(name)}: the per-program partials, summed in a fixed order")
    for name, value, comment in fin_eqs:
        v = value_of.setdefault(name, names.of(("value", name), name))
        printing = dict(value_of)
        printing.update(params)
        printing[str(size_symbol(kept))] = "tl.cast(n_rows, ACC)"
        code.append(f"{v} = {triton_code(value, names=printing)}  # {comment_text(comment)}")
    return FinishKernel(names.take(f"_{ir.name}_fin"), f"sums over the rows of {ir.name}, second stage",
                        parts + stores, code, [(t, t.value) for t in stores])


def _aot_cases(fn: str, inputs, levels, reduces: str, api_params: dict, api_dim: str, decls=()) -> list[dict]:
    """Representative calls of the op for ``pullback build``, which captures the
    kernels they launch: rows that fit a block (4096), long rows (100000) and,
    for ops that take ``dim``, non-adjacent reduced dims."""
    shapes = [("rows of 4096", [1024, 4096], -1, ["float16", "bfloat16", "float32", "float64"]),
              ("rows of 100000", [16, 100000], -1, ["float16", "bfloat16", "float32", "float64"])]
    if reduces == "dim":
        shapes.append(("dims (0, 2)", [64, 96, 48], (0, 2), ["float16"]))
    cases = []
    for label, shape, dim, dtypes in shapes:
        dims = [d % len(shape) for d in ((dim,) if isinstance(dim, int) else dim)]
        sizes = {"elem": shape, "col": [shape[d] for d in dims], "row": [n for d, n in enumerate(shape) if d not in dims]}
        ints = {q.name for q in decls if q.dtype == "int"}
        kwargs = {q: -100 if name in ints else 0.001 for name, q in api_params.items()}
        if reduces == "dim":
            kwargs[api_dim] = dim
        cases.append({"op": fn, "label": label, "kwargs": kwargs, "dtypes": dtypes,
                      "inputs": [{"shape": sizes[levels[x.name]], "dtype": "int64"} if x.dtype == "int"
                                 else sizes[levels[x.name]] for x in inputs]})
    return cases


def _api(ir, spec, levels, has_reduction: bool) -> tuple[str, str, str, dict, str]:
    """The public function's signature and the runtime call, as text.  Tensor
    arguments are the spec's inputs, in order; the reduced dims come from
    ``dim`` (an int or a tuple), or from the column weights' shapes (their
    trailing dims), or are the last dim for an elementwise op."""
    # the wrapper's own scope: its parameters are the user's names wherever they are safe there
    api = Names({"OP"}, builtins=False)
    args = [api.take(x.name) for x in ir.inputs]
    qs = [api.take(q.name) for q in ir.params]
    has_col = any(levels[x.name] == "col" for x in ir.inputs)
    sig = [a if decl.default is None else f"{a}=None" for a, decl in zip(args, spec.inputs)]
    qsig = [q if decl.default is None else f"{q}=None" if decl.default == "eps" else f"{q}={decl.default!r}"
            for q, decl in zip(qs, spec.param_decls)]
    takes_dim = has_reduction and not has_col  # else: the weights' dims, or the last dim
    dim = keepdim = "None"
    if spec.choice is not None:
        # one output, chosen by a keyword (torch's losses: reduction="mean"), then the parameters
        # positionally (as F.cross_entropy's ignore_index, label_smoothing), the reduced dim last
        ch = api.take(spec.choice[0])
        sig += [f"{ch}={spec.choice[1][0][0]!r}"] + qsig
        if takes_dim:
            dim = api.take("dim")
            sig += ["*", f"{dim}=-1"]
        call = f"[{', '.join(args)}], [{', '.join(qs)}], {dim}, False, {ch}"
        reduces = "weights" if has_col else ("dim" if takes_dim else "last")
        return ", ".join(sig), call, reduces, dict(zip([q.name for q in ir.params], qs)), dim
    if takes_dim:
        dim = api.take("dim")
        sig.append(f"{dim}=-1")
    else:
        sig += qsig
    if any(levels[o.name] == "row" for o in ir.outputs):
        keepdim = api.take("keepdim")
        sig.append(f"{keepdim}: bool = False")
    if takes_dim and qs:
        sig += ["*"] + qsig
    optional = False
    for a in sig:
        if a == "*":
            break
        if "=" in a:
            optional = True
        elif optional:
            raise _located(ir, spec.inputs[0].pos, f"the argument {a} has no default but comes after one that "
                                                   f"has; give it a default or move it first")
    call = f"[{', '.join(args)}], [{', '.join(qs)}], {dim}, {keepdim if keepdim != 'None' else 'False'}"
    reduces = "weights" if has_col else ("dim" if dim != "None" else "last")
    return ", ".join(sig), call, reduces, dict(zip([q.name for q in ir.params], qs)), dim


def _api_doc(ir, levels, red, reduces: str, choice=None) -> str:
    if reduces == "weights":
        where = (f"The reduced set {red.name} is the trailing dims of the inputs indexed [{red.name}] "
                 f"(like normalized_shape in torch's norms).")
    elif reduces == "dim":
        where = f"The reduced set {red.name} is ``dim``: an int or a tuple of ints (negative allowed)."
    else:
        where = f"Elementwise: {red.name} is the last dim, the other dims are rows."
    if choice is not None:
        keyword, values = choice
        return where + f" Returns one output, by ``{keyword}``: " + ", ".join(
            f"{v!r}: {o}" + ("[...] (one value per row)" if levels[o] == "row" else " (a scalar)")
            for v, o in values) + "."
    if any(levels[o.name] == "row" for o in ir.outputs):
        where += " ``keepdim`` keeps the reduced dims with size 1."
    if len(ir.outputs) > 1:
        where += f" Returns ({', '.join(o.name for o in ir.outputs)})."
    return where


def plan(d: Derivation):
    """The kernel plan for a derivation.  The family is chosen by structure: a
    spec whose tensors are all rows, row values or column weights of one
    kept/reduced split is row-wise; one with contractions between two inputs
    is attention; anything else gets the row-wise family's located error."""
    try:
        return plan_rowwise(d)
    except PlanError as rowwise_error:
        from .pullback import contraction_tensors
        if not (contraction_tensors(d.ir) & {t.name for t in d.ir.inputs}):
            raise
        from .plan_attention import plan_attention
        try:
            return plan_attention(d)
        except PlanError as attention_error:
            raise PlanError(f"{rowwise_error.message}; as attention: {attention_error.message}",
                            rowwise_error.file, rowwise_error.line, rowwise_error.col) from None
    except NotSupported as e:
        raise PlanError(f"op {d.ir.name}: {e}", d.ir.file, 1, 1) from None
