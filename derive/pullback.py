"""Stage 3: reverse mode over the equation DAG.

For ``Y[y] = f(X1, ..., Xn)`` the pullback into ``Xk`` is::

    dXk[x'] += sum_{y} dY[y] * d f[y] / d Xk[x']

SymPy differentiates the indexed right-hand side (giving Kronecker deltas);
:mod:`derive.simplify` contracts them.  ``max`` is differentiated as
``sum_s 1[s = argmax_s g] * g`` (seed 000): the indicator is constant, so the
derivative flows to the maximal element only.

Adjoints of the op's internal values are *inlined* into their producers
(the softmax's ``dE``, ``dZ``, ``dM``); adjoints of contraction operands and
results (attention's ``dP``, ``dS``) are *kept* as named values, because the
kernels compute them as tiles.  Every adjoint is simplified and recorded, so
the report can show that the max-shift's ``dM`` is exactly 0.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass

import sympy
from sympy import Indexed, IndexedBase, Mul

from .ir import ArgmaxIndicator, Equation, IndexMax, IndexSum, OpIR, Tensor, free_indices, primed, tensors_in
from .simplify import Folder, Term, TooLarge, combine, pretty, rename_free, terms_of
from .spec import SpecError


_NO_TENSOR = Tensor("", (sympy.Symbol("_"),), "none")


def adjoint_name(name: str) -> str:
    return "d" + name


def adjoint_of(t: Tensor) -> Tensor:
    return Tensor(adjoint_name(t.name), t.indices, "adjoint")


@dataclass
class AdjointStep:
    """The pullback into one tensor: raw contributions and the simplified value."""

    tensor: Tensor                          # the primal tensor X
    contributions: list[tuple[str, object]]  # (consumer Y, its pullback into X)
    value: object                            # simplified dX
    kept: bool                               # a named value of the backward (else inlined)

    @property
    def adjoint(self) -> Tensor:
        return adjoint_of(self.tensor)

    @property
    def raw(self):
        return sympy.Add(*[c for _, c in self.contributions])

    @property
    def equation(self) -> Equation:
        return Equation(self.adjoint, self.value, None)


def contraction_tensors(ir: OpIR) -> set[str]:
    """Tensors that are operands or results of a contraction (a sum over a
    product of two or more tensors)."""
    out: set[str] = set()
    for eq in ir.equations:
        for s in eq.rhs.atoms(IndexSum):
            names = {str(f.base.label) for f in Mul.make_args(s.body) if isinstance(f, Indexed)}
            if len(names) >= 2:
                out |= names | {eq.target.name}
    return out


def local_pullback(eq: Equation, x: Tensor) -> sympy.Expr:
    """``sum_y dY[y] * d rhs / d X[x']``, deltas contracted, then ``x'`` renamed ``x``."""
    rhs = eq.rhs
    if isinstance(rhs, IndexMax):
        rhs = IndexSum(ArgmaxIndicator(eq.lhs, *rhs.indices) * rhs.body, *rhs.indices)
    primes = {i: primed(i) for i in x.indices}
    if x.indices:
        d_rhs = rhs.diff(x.at([primes[i] for i in x.indices]))
    else:  # a scalar (a total over the rows): SymPy differentiates by symbols, not IndexedBase
        s = sympy.Dummy(x.name)
        d_rhs = rhs.xreplace({x.base: s}).diff(s).xreplace({s: x.base})
    dy = adjoint_of(eq.target).indexed
    contribution = IndexSum(dy * d_rhs, *eq.target.indices)
    expr = pretty(combine(terms_of(contribution)))
    return rename_free(expr, {p: i for i, p in primes.items()})


class _Reverse:
    def __init__(self, ir: OpIR):
        self.ir = ir
        self.folder = Folder(ir.equations)
        self.keep = (contraction_tensors(ir) | {t.name for t in ir.inputs}) - {t.name for t in ir.outputs}
        self.inlined: dict[str, object] = {}    # name -> simplified dX (own indices)
        self.kept_defs: dict[str, object] = {}  # name -> simplified dX
        self.adjoint_folder = Folder([])

    def substitute_inlined(self, expr):
        def label(e):
            if isinstance(e, Indexed):
                return str(e.base.label)
            if isinstance(e, IndexedBase) and not self.ir.tensors.get(str(e.label)[1:], _NO_TENSOR).indices:
                return str(e.label)  # the adjoint of a scalar
            return ""

        def is_inlined(e):
            name = label(e)
            return name.startswith("d") and name[1:] in self.inlined

        def expand(e):
            name = label(e)[1:]
            t = self.ir.tensors[name]
            return rename_free(self.inlined[name], dict(zip(t.indices, getattr(e, "indices", ()))))

        return expr.replace(is_inlined, expand)

    def inline_for_folding(self, terms: list[Term]) -> list[Term]:
        """Inline a kept adjoint into a sum where that lets a forward sum fold
        fire: ``sum_j P dP`` with ``dP = sum_e dO V`` becomes ``sum_e dO O``."""
        out = []
        for t in terms:
            replaced = None
            if t.bound:
                for f in Mul.make_args(t.mono):
                    if isinstance(f, Indexed) and str(f.base.label)[1:] in self.kept_defs \
                            and free_indices(f) & t.bound:
                        name = str(f.base.label)[1:]
                        value = self.kept_defs[name]
                        if not isinstance(value, IndexSum):
                            continue
                        tensor = self.ir.tensors[name]
                        inner = rename_free(value, dict(zip(tensor.indices, f.indices)))
                        trial = combine(terms_of(t.coeff * IndexSum((t.mono / f) * inner, *t.bound)))
                        trial, fired = self.folder.fold(trial)
                        if fired:
                            replaced = trial
                            break
            out.extend(replaced if replaced is not None else [t])
        return combine(out)

    def simplify(self, raw, reserved=()) -> object:
        expr = self.substitute_inlined(raw)
        terms, _ = self.folder.fold(combine(terms_of(expr)))
        terms = self.inline_for_folding(terms)
        terms, _ = self.adjoint_folder.fold(terms)
        return pretty(terms, reserved)

    def run(self) -> list[AdjointStep]:
        ir = self.ir
        contributions: dict[str, list] = defaultdict(list)
        steps: list[AdjointStep] = []
        outputs = {t.name for t in ir.outputs}
        for eq in reversed(ir.equations):
            y = eq.target
            with _located(ir, y.name, eq):
                if y.name in outputs:
                    if contributions[y.name]:  # an output other equations use: its gradient and theirs
                        contributions[y.name].insert(0, ("incoming", adjoint_of(y).indexed))
                        steps.append(self.finish(y, contributions[y.name]))
                else:
                    if not contributions[y.name]:
                        continue  # no gradient reaches y
                    steps.append(self.finish(y, contributions[y.name]))
                for name in sorted(tensors_in(eq.rhs) - {y.name}):
                    x = ir.tensors[name]
                    c = local_pullback(eq, x)
                    folded, _ = self.folder.fold(combine(terms_of(c)))
                    contributions[name].append((y.name, pretty(folded)))
        for x in ir.inputs:
            # located at the first equation that reads x
            with _located(ir, x.name, next(eq for eq in ir.equations if x.name in tensors_in(eq.rhs))
                          if contributions[x.name] else ir.equations[-1]):
                steps.append(self.finish(x, contributions[x.name]))
        return steps

    def finish(self, x: Tensor, contribs) -> AdjointStep:
        value = self.simplify(sympy.Add(*[c for _, c in contribs]), x.indices) if contribs else sympy.S.Zero
        kept = x.name in self.keep
        if kept:
            self.kept_defs[x.name] = value
            if x.role != "input":
                self.adjoint_folder = Folder([Equation(adjoint_of(self.ir.tensors[n]), v, None)
                                              for n, v in sorted(self.kept_defs.items())
                                              if self.ir.tensors[n].role != "input"])
        else:
            self.inlined[x.name] = value
        return AdjointStep(x, list(contribs), value, kept)


@contextmanager
def _located(ir: OpIR, name: str, eq: Equation):
    """Turn an adjoint that grows past the simplifier's limit into a SpecError at ``eq``."""
    try:
        yield
    except TooLarge as e:
        raise SpecError(f"the pullback into {name} grows too large to simplify ({e}); name intermediate "
                        f"values in equations of their own, or nest fewer functions", ir.file, eq.pos.line,
                        eq.pos.col) from None


def reverse(ir: OpIR) -> list[AdjointStep]:
    """All adjoint steps, in the order the reverse walk takes them (inputs last)."""
    return _Reverse(ir).run()
