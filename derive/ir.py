"""Stage 2: the spec's equations as SymPy expressions over indexed tensors.

Every index name of a spec stands for an index *set* (any number of axes),
exactly as ``s1`` and ``s2`` do in the seed notes, and becomes one SymPy
``Symbol``.  A tensor ``A[s2, s1]`` becomes ``Indexed(IndexedBase('A'), s2, s1)``.
Reductions are two small ``Expr`` classes, :class:`IndexSum` and
:class:`IndexMax`; the pullback of a max goes through
:class:`ArgmaxIndicator`, the seeds' ``1[s1 = argmax_s1 A]``.

Checks made here, each a :class:`~derive.spec.SpecError` with file:line:col:
undefined tensors, a tensor defined twice or an input redefined, reductions
over an index the operand lacks, indices that do not match the target's, a
``max`` that is not a whole right-hand side, and cycles among the equations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy import Expr, Indexed, IndexedBase, Symbol

from . import spec as S
from .spec import SpecError


# ---- index helpers ------------------------------------------------------------
def base_name(index: Symbol) -> str:
    """The index set an index symbol belongs to: ``s1'`` and ``s1#2`` -> ``s1``."""
    return index.name.split("'")[0].split("#")[0]


def primed(index: Symbol) -> Symbol:
    return Symbol(index.name + "'")


def _sorted_indices(indices) -> tuple[Symbol, ...]:
    return tuple(sorted(set(indices), key=lambda s: s.name))


# ---- reductions and the argmax indicator -----------------------------------------
class _Reduction(Expr):
    """A reduction over index sets (no bounds: they are the tensors' own)."""

    is_commutative = True
    symbol = ""

    @property
    def body(self) -> Expr:
        return self.args[0]

    @property
    def indices(self) -> tuple[Symbol, ...]:
        return self.args[1:]

    @property
    def free_symbols(self):
        return self.body.free_symbols - set(self.indices)

    def _sympystr(self, printer):
        idx = ", ".join(printer._print(i) for i in self.indices)
        return f"{self.symbol}[{idx}]({printer._print(self.body)})"


class IndexSum(_Reduction):
    """``sum_{i, ...} body``."""

    symbol = "sum"

    def __new__(cls, body, *indices):
        body = sympy.sympify(body)
        if body == 0:
            return sympy.S.Zero
        indices = _sorted_indices(indices)
        if not indices:
            return body
        return Expr.__new__(cls, body, *indices)

    def _eval_derivative(self, x):
        return IndexSum(self.body.diff(x), *self.indices)


class IndexMax(_Reduction):
    """``max_{i, ...} body``.  Its pullback is taken at the equation it defines."""

    symbol = "max"

    def __new__(cls, body, *indices):
        indices = _sorted_indices(indices)
        if not indices:
            return sympy.sympify(body)
        return Expr.__new__(cls, sympy.sympify(body), *indices)

    def _eval_derivative(self, x):  # pragma: no cover - guarded by the IR checks
        raise NotImplementedError("max is differentiated at the equation that names it")


class ArgmaxIndicator(Expr):
    """``1[i = argmax_i ...]`` for the max reduction that defines ``M``.

    ``ArgmaxIndicator(M[s2], s1)`` is 1 at the one maximal element of each
    row of the reduction that defined ``M`` (the first in row-major order of
    the reduced axes, so the gradient is conserved under ties) and 0 elsewhere.
    """

    is_commutative = True

    def __new__(cls, reduced, *indices):
        return Expr.__new__(cls, reduced, *_sorted_indices(indices))

    @property
    def reduced(self) -> Indexed:
        return self.args[0]

    @property
    def indices(self) -> tuple[Symbol, ...]:
        return self.args[1:]

    def _eval_derivative(self, x):
        return sympy.S.Zero  # piecewise constant

    def _sympystr(self, printer):
        idx = ", ".join(printer._print(i) for i in self.indices)
        return f"1[{idx} = argmax {printer._print(self.reduced)}]"


class Pick(Expr):
    """``1[k = t[r]]``: 1 where the index ``k`` equals the integer tensor ``t``'s
    value, 0 elsewhere.  ``x[r, t]`` (x's row r at column t[r]) is
    ``sum[k](x[r, k] * 1[k = t[r]])``, so its pullback into x is this indicator,
    as a max's is its argmax's.  Piecewise constant: no gradient flows to ``t``."""

    is_commutative = True

    def __new__(cls, index, value):
        return Expr.__new__(cls, index, value)

    @property
    def index(self) -> Symbol:
        return self.args[0]

    @property
    def value(self) -> Indexed:
        return self.args[1]

    def _eval_derivative(self, x):
        return sympy.S.Zero

    def _sympystr(self, printer):
        return f"1[{printer._print(self.index)} = {printer._print(self.value)}]"


def condition_text(printer, cond) -> str:
    """A condition in the spec's own notation: ``t[r] != k and i >= j``."""
    if isinstance(cond, (sympy.And, sympy.Or)):
        op = " and " if isinstance(cond, sympy.And) else " or "
        return op.join(f"({condition_text(printer, a)})" if isinstance(a, (sympy.And, sympy.Or)) else
                       condition_text(printer, a) for a in cond.args)
    if isinstance(cond, sympy.Not):
        return f"not ({condition_text(printer, cond.args[0])})"
    if isinstance(cond, sympy.core.relational.Relational):
        return f"{printer._print(cond.lhs)} {cond.rel_op} {printer._print(cond.rhs)}"
    return printer._print(cond)


class Indicator(Expr):
    """``1[cond]``: 1 where the condition holds, 0 elsewhere.  A factor of the
    pullback of ``where(cond, a, b)``; printed as a ``tl.where`` around the rest
    of its product, so that ``1[cond] * inf`` is 0, never NaN.  Piecewise
    constant: no gradient flows into the condition."""

    is_commutative = True

    def __new__(cls, cond):
        if cond is sympy.true:
            return sympy.S.One
        if cond is sympy.false:
            return sympy.S.Zero
        return Expr.__new__(cls, cond)

    @property
    def cond(self):
        return self.args[0]

    def _eval_derivative(self, x):
        return sympy.S.Zero

    def _sympystr(self, printer):
        return f"1[{condition_text(printer, self.cond)}]"


class Where(Expr):
    """``where(cond, a, b)``: ``a`` where ``cond`` holds, else ``b``.  Its
    derivative is ``1[cond] da + 1[not cond] db``: the branch not taken gets
    nothing, so a masked score (``where(ok, s, -inf)``) has a zero pullback."""

    is_commutative = True

    def __new__(cls, cond, then, other):
        if cond is sympy.true or then == other:
            return then
        if cond is sympy.false:
            return other
        return Expr.__new__(cls, cond, then, other)

    @property
    def cond(self):
        return self.args[0]

    @property
    def then(self):
        return self.args[1]

    @property
    def other(self):
        return self.args[2]

    def _eval_derivative(self, x):
        return Indicator(self.cond) * self.then.diff(x) + Indicator(sympy.Not(self.cond)) * self.other.diff(x)

    def _sympystr(self, printer):
        return f"where({condition_text(printer, self.cond)}, {printer._print(self.then)}, {printer._print(self.other)})"


class Position(Expr):
    """An index that stands for one axis, used as a value: its position along
    that axis (0, 1, 2, ...), so ``i - j`` is a relative position.  Constant
    with respect to every tensor: no gradient flows through it."""

    is_commutative = True
    is_real = True

    def __new__(cls, index):
        return Expr.__new__(cls, index)

    @property
    def index(self) -> Symbol:
        return self.args[0]

    def _eval_derivative(self, x):
        return sympy.S.Zero

    def _sympystr(self, printer):
        return printer._print(self.index)


def size_symbol(indices) -> Symbol:
    """The number of elements of index sets, ``|c|``: ``mean[c](x) = sum[c](x) / |c|``.
    A scalar named after the sets (not the index symbols), so renaming an index leaves it alone."""
    return Symbol("|" + ", ".join(sorted(base_name(i) for i in indices)) + "|", positive=True)


def free_indices(expr) -> set[Symbol]:
    """Index symbols of ``expr`` not bound by a reduction inside it."""
    if isinstance(expr, Indexed):
        return set(expr.indices)
    if isinstance(expr, (IndexSum, IndexMax)):
        return free_indices(expr.body) - set(expr.indices)
    if isinstance(expr, ArgmaxIndicator):
        return free_indices(expr.reduced) | set(expr.indices)
    if isinstance(expr, Pick):
        return {expr.index} | free_indices(expr.value)
    if isinstance(expr, Position):
        return {expr.index}
    out: set[Symbol] = set()
    for a in expr.args:
        out |= free_indices(a)
    return out


def tensors_in(expr) -> set[str]:
    """Names of the tensors an expression reads (a tensor with no indices, a
    total over the rows, is its bare ``IndexedBase``)."""
    return {str(b.label) for b in expr.atoms(IndexedBase)}


# ---- the IR ---------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    name: str
    indices: tuple[Symbol, ...]
    role: str  # "input", "intermediate" or "output"
    dtype: str = "float"  # "int" for an integer input (it selects; it has no gradient)

    @property
    def base(self) -> IndexedBase:
        return IndexedBase(self.name)

    @property
    def indexed(self) -> Indexed:
        return Indexed(self.base, *self.indices) if self.indices else self.base

    def at(self, indices) -> Indexed:
        return Indexed(self.base, *indices) if indices else self.base


@dataclass(frozen=True)
class Equation:
    target: Tensor
    rhs: Expr
    pos: S.Pos

    @property
    def lhs(self) -> Indexed:
        return self.target.indexed

    def __str__(self) -> str:
        return f"{self.lhs} = {self.rhs}"


@dataclass
class OpIR:
    name: str
    file: str
    inputs: list[Tensor]
    params: list[Symbol]
    output: Tensor             # the first output
    equations: list[Equation]  # topological order
    tensors: dict[str, Tensor] = field(default_factory=dict)
    index_order: tuple[Symbol, ...] = ()
    outputs: list[Tensor] = field(default_factory=list)  # every output, in the header's order

    def __post_init__(self):
        if not self.outputs:
            self.outputs = [self.output]

    def definition(self, name: str) -> Equation | None:
        for eq in self.equations:
            if eq.target.name == name:
                return eq
        return None


MASKED = "inf"  # -inf: where(cond, s, -inf) removes a score (exp(-inf) = 0)


def _order(indices, order: tuple[Symbol, ...]) -> tuple[Symbol, ...]:
    rank = {s: k for k, s in enumerate(order)}
    return tuple(sorted(indices, key=lambda s: (rank.get(s, len(rank)), s.name)))


class _Builder:
    def __init__(self, spec: S.OpSpec):
        self.spec = spec
        self.file = spec.file
        order: list[Symbol] = []
        for decl in spec.inputs + spec.outputs:
            for i in decl.indices:
                if Symbol(i) not in order:
                    order.append(Symbol(i))
        self.index_order = tuple(order)
        self.tensors: dict[str, Tensor] = {}
        self.params = {p: Symbol(p) for p in spec.params}
        self.picks = 0
        self.in_condition = 0  # > 0 while building a comparison: integer tensors are values there

    def err(self, msg: str, pos: S.Pos) -> SpecError:
        return SpecError(msg, self.file, pos.line, pos.col)

    def check_name(self, name: str, pos: S.Pos, what: str):
        if name in S.FUNCTIONS or name in S.BINARY_FUNCTIONS or name in S.REDUCTIONS or name in ("op", S.CONDITIONAL):
            raise self.err(f"{name!r} is reserved and cannot name {what}", pos)
        if Symbol(name) in self.index_order:
            raise self.err(f"{name!r} is an index name and cannot name {what}", pos)

    def build(self) -> OpIR:
        spec = self.spec
        seen_inputs = set()
        for decl in spec.inputs:
            self.check_name(decl.name, decl.pos, "a tensor")
            if decl.name in seen_inputs or decl.name in self.params:
                raise self.err(f"input {decl.name} is declared twice", decl.pos)
            if len(set(decl.indices)) != len(decl.indices):
                raise self.err(f"input {decl.name} repeats an index", decl.pos)
            seen_inputs.add(decl.name)
            self.tensors[decl.name] = Tensor(decl.name, tuple(Symbol(i) for i in decl.indices), "input",
                                             decl.dtype)
        for p in spec.params:
            self.check_name(p, spec.output.pos, "a parameter")
        # Definitions may appear in any order; order them by dependency.
        defs: dict[str, S.Equation] = {}
        for eq in spec.equations:
            self.check_name(eq.target, eq.pos, "a tensor")
            if eq.target in self.tensors:
                raise self.err(f"{eq.target} is an input of op {spec.name} and cannot be redefined", eq.pos)
            if eq.target in self.params:
                raise self.err(f"{eq.target} is a parameter of op {spec.name} and cannot be redefined", eq.pos)
            if eq.target in defs:
                first = defs[eq.target].pos
                raise self.err(f"{eq.target} is defined twice (first at line {first.line})", eq.pos)
            defs[eq.target] = eq
        names = set(self.tensors) | set(defs)
        for name in sorted(names):
            if name.startswith("d") and name[1:] in names:
                pos = defs[name].pos if name in defs else next(d.pos for d in spec.inputs if d.name == name)
                raise self.err(f"the name {name!r} is taken by the gradient of {name[1:]}; rename the tensor", pos)
        decls = spec.outputs
        for decl in decls:
            if decl.name not in defs:
                raise self.err(f"the output {decl.name} is never defined", decl.pos)
        order = self.topological(defs)
        equations = [self.equation(defs[name]) for name in order]
        outs = []
        for decl in decls:
            out = self.tensors[decl.name]
            declared = tuple(Symbol(i) for i in decl.indices)
            if declared != out.indices:
                raise self.err(f"the output {out.name} is declared with indices [{', '.join(decl.indices)}] "
                               f"but its equation gives [{', '.join(i.name for i in out.indices)}]", decl.pos)
            outs.append(out)
        return OpIR(spec.name, self.file, [self.tensors[d.name] for d in spec.inputs], list(self.params.values()),
                    outs[0], equations, dict(self.tensors), self.index_order, outs)

    def topological(self, defs: dict[str, S.Equation]) -> list[str]:
        """Definitions in dependency order (depth first, one explicit stack: no recursion)."""
        refs = {name: _refs(eq.expr) for name, eq in defs.items()}
        state: dict[str, int] = {}  # 1 on the current path, 2 done
        order: list[str] = []
        for root in sorted(defs, key=lambda n: defs[n].pos.line):
            if root in state:
                continue
            state[root] = 1
            path, stack = [root], [iter(refs[root])]
            while stack:
                for r in stack[-1]:
                    if r.name in defs:
                        if state.get(r.name) == 2:
                            continue
                        if state.get(r.name) == 1:
                            cycle = path[path.index(r.name):] + [r.name]
                            if len(cycle) > 12:
                                cycle = cycle[:6] + [f"... ({len(cycle) - 1} equations) ..."] + cycle[-3:]
                            raise self.err(f"cycle among equations: {' -> '.join(cycle)}", defs[r.name].pos)
                        state[r.name] = 1
                        path.append(r.name)
                        stack.append(iter(refs[r.name]))
                        break
                    if (r.name not in self.tensors and r.name not in self.params and r.name != MASKED
                            and Symbol(r.name) not in self.index_order):
                        raise self.err(f"undefined tensor {r.name!r}", r.pos)
                else:  # every reference of path[-1] is done
                    stack.pop()
                    done = path.pop()
                    state[done] = 2
                    order.append(done)
        return order

    def equation(self, eq: S.Equation) -> Equation:
        rhs = self.expr(eq.expr, top=True)
        free = free_indices(rhs)
        decl = next((o for o in self.spec.outputs if o.name == eq.target), None)
        is_output = decl is not None
        if eq.indices is None and is_output and set(decl.indices) == {i.name for i in free}:
            indices = tuple(Symbol(i) for i in decl.indices)  # the header's order
        elif eq.indices is None:
            indices = _order(free, self.index_order)
        else:
            indices = tuple(Symbol(i) for i in eq.indices)
            if len(set(indices)) != len(indices):
                raise self.err(f"{eq.target} repeats an index", eq.pos)
            missing = set(indices) - free
            extra = free - set(indices)
            if extra:
                names = ", ".join(sorted(i.name for i in extra))
                raise self.err(f"index mismatch: {names} is free on the right-hand side but not an index of "
                               f"{eq.target}; reduce it with sum[{names}](...) or max[{names}](...)", eq.pos)
            if missing:
                names = ", ".join(sorted(i.name for i in missing))
                raise self.err(f"index mismatch: {eq.target} has index {names} that the right-hand side lacks",
                               eq.pos)
        role = "output" if is_output else "intermediate"
        t = Tensor(eq.target, indices, role)
        self.tensors[eq.target] = t
        return Equation(t, rhs, eq.pos)

    def expr(self, node, top: bool = False) -> Expr:
        out = self._expr(node, top)
        if isinstance(node, (S.Bin, S.Unary, S.Func)):
            # SymPy folds numbers as it builds: 0**-1 is zoo, (-1)**0.5 is I, 10**30 * 10**30 is 10**60.
            # A folded number stands alone or as a direct argument (a coefficient, a term).
            for a in (out, *out.args):
                if a.is_number:
                    why = _constant_problem(a)
                    if why is not None:
                        raise self.err(f"this expression's value is {why}", node.pos)
        return out

    def condition(self, node):
        """A comparison, or comparisons joined by and / or / not, as a SymPy boolean."""
        if isinstance(node, S.Logic):
            args = [self.condition(a) for a in node.args]
            return {"and": sympy.And, "or": sympy.Or, "not": sympy.Not}[node.op](*args)
        self.in_condition += 1
        try:
            a, b = self.expr(node.left), self.expr(node.right)
        finally:
            self.in_condition -= 1
        try:
            return _RELATIONS[node.op](a, b)
        except TypeError as e:  # pragma: no cover - only real operands reach here
            raise self.err(f"cannot compare: {e}", node.pos) from None

    def branch(self, node) -> Expr:
        """A branch of where(): a value, or -inf (a masked score: the identity of max, exp(-inf) = 0)."""
        if (isinstance(node, S.Unary) and node.op == "-" and isinstance(node.operand, S.Ref)
                and node.operand.name == MASKED and MASKED not in self.tensors and MASKED not in self.params):
            return -sympy.oo
        return self.expr(node)

    def _expr(self, node, top: bool = False) -> Expr:
        if isinstance(node, S.Num):
            return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Float(node.value)
        if isinstance(node, S.Ref):
            if node.name not in self.tensors and node.name not in self.params and Symbol(node.name) in self.index_order:
                if node.indices is not None:
                    raise self.err(f"{node.name} is an index name: used as a value it is its position; it takes no "
                                   f"indices", node.pos)
                return Position(Symbol(node.name))
            if node.name == MASKED and node.name not in self.tensors and node.name not in self.params:
                raise self.err("inf stands only as a masked branch of where: where(cond, s, -inf)", node.pos)
            if node.name in self.params:
                if node.indices is not None:
                    raise self.err(f"{node.name} is a scalar parameter: it takes no indices; write {node.name}, "
                                   f"not {node.name}[{', '.join(node.indices)}]", node.pos)
                return self.params[node.name]
            if node.name not in self.tensors:  # pragma: no cover - caught in topological()
                raise self.err(f"undefined tensor {node.name!r}", node.pos)
            tensor = self.tensors[node.name]
            if tensor.dtype == "int" and not self.in_condition:
                raise self.err(f"{node.name} is an integer tensor: it selects an element, as in x[r, {node.name}], "
                               f"or is compared, as in where({node.name} != k, a, b); it is not a value itself",
                               node.pos)
            if node.indices is None:
                return tensor.indexed
            picks = [(k, self.tensors[i]) for k, i in enumerate(node.indices)
                     if i in self.tensors and self.tensors[i].dtype == "int"]
            if picks:  # x[r, t]: the element of x's row at column t[r]
                if len(node.indices) != len(tensor.indices):
                    raise self.err(f"{node.name} has {len(tensor.indices)} index sets "
                                   f"[{', '.join(i.name for i in tensor.indices)}], not {len(node.indices)}", node.pos)
                self.picks += 1
                idx = [Symbol(i) for i in node.indices]
                bound = []
                factor = sympy.S.One
                for k, t in picks:
                    b = Symbol(f"{tensor.indices[k].name}#pick{self.picks}_{k}")
                    idx[k] = b
                    bound.append(b)
                    factor *= Pick(b, t.indexed)
                return IndexSum(tensor.at(idx) * factor, *bound)
            for i in node.indices:
                if i in self.tensors:
                    raise self.err(f"{i} is a tensor; only an integer input (declared {i}[...]: int) selects in "
                                   f"{node.name}[...]", node.pos)
            if len(node.indices) != len(tensor.indices):
                raise self.err(f"{node.name} has {len(tensor.indices)} index sets "
                               f"[{', '.join(i.name for i in tensor.indices)}], not {len(node.indices)}", node.pos)
            if len(set(node.indices)) != len(node.indices):
                raise self.err(f"{node.name}[{', '.join(node.indices)}] repeats an index", node.pos)
            return tensor.at([Symbol(i) for i in node.indices])
        if isinstance(node, S.Unary):
            inner = self.expr(node.operand)
            return -inner if node.op == "-" else inner
        if isinstance(node, S.Bin):
            a, b = self.expr(node.left), self.expr(node.right)
            if node.op == "**" and free_indices(b):
                raise self.err("an exponent must be a number or parameter, not a tensor", node.pos)
            if node.op == "**" and b.is_number and not abs(b) <= S.MAX_EXPONENT:  # before SymPy evaluates it
                raise self.err(f"the exponent is too large: a numeric exponent is at most {S.MAX_EXPONENT} "
                               f"in magnitude", node.pos)
            return {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                    "/": lambda: a / b, "**": lambda: a ** b,
                    "maximum": lambda: sympy.Max(a, b), "minimum": lambda: sympy.Min(a, b)}[node.op]()
        if isinstance(node, S.Func):
            return getattr(sympy, node.name)(self.expr(node.arg))
        if isinstance(node, S.Where):
            return Where(self.condition(node.cond), self.branch(node.then), self.branch(node.other))
        if isinstance(node, S.Reduce):
            body = self.expr(node.arg)
            have = free_indices(body)
            for i in node.indices:
                if Symbol(i) not in have:
                    names = ", ".join(s.name for s in _order(have, self.index_order)) or "none"
                    raise self.err(f"{node.kind}[{i}] reduces over {i}, but its operand has indices [{names}]",
                                   node.pos)
            if len(set(node.indices)) != len(node.indices):
                raise self.err(f"{node.kind}[...] repeats an index", node.pos)
            syms = [Symbol(i) for i in node.indices]
            if node.kind == "sum":
                return IndexSum(body, *syms)
            if node.kind == "mean":
                return IndexSum(body, *syms) / size_symbol(syms)
            if not top:
                raise self.err("max[...] must be the whole right-hand side of an equation; name it, "
                               "e.g. M = max[i](x), and use M", node.pos)
            return IndexMax(body, *syms)
        raise TypeError(node)  # pragma: no cover


_RELATIONS = {"==": sympy.Eq, "!=": sympy.Ne, "<": sympy.Lt, "<=": sympy.Le, ">": sympy.Gt, ">=": sympy.Ge}


def _refs(node) -> list[S.Ref]:
    """The tensor references of a spec expression, left to right (an explicit stack: no recursion)."""
    out, stack = [], [node]
    while stack:
        n = stack.pop()
        if isinstance(n, S.Ref):
            out.append(n)
            continue
        for child in ("arg", "right", "left", "operand", "other", "then", "cond"):  # pushed in reverse: popped left first
            if hasattr(n, child):
                stack.append(getattr(n, child))
        if isinstance(n, S.Logic):
            stack.extend(reversed(n.args))
    return out


def _constant_problem(value) -> str | None:
    """Why a number SymPy folded cannot be a kernel constant, or None if it can."""
    if value.has(sympy.zoo):
        return "infinite (a division by zero)"
    if value.has(sympy.nan):
        return "not a number (nan)"
    if value.has(sympy.oo, -sympy.oo):
        return "infinite"
    re_part, im_part = sympy.N(value, 20).as_real_imag()
    if im_part != 0:
        return "a complex number, not a real one"
    if not re_part.is_finite or abs(re_part) > S.MAX_MAGNITUDE:
        return f"too large: constants are at most {S.MAX_MAGNITUDE:g} in magnitude (kernels compute in float32)"
    return None


def build(spec: S.OpSpec) -> OpIR:
    """Turn a parsed spec into checked SymPy equations in dependency order."""
    return _Builder(spec).build()
