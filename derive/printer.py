"""Stage 6: SymPy expressions -> Triton expression text.

A :class:`sympy.printing.codeprinter.CodePrinter` subclass in the manner of
SymPy's ``pycode``: a table maps SymPy functions to ``tl.`` names, and a
``_print_<Class>`` method exists only where the shape of the code differs
(``Piecewise`` -> ``tl.where``, ``Max`` -> ``tl.maximum``, powers).  Anything
it does not know raises :class:`NotSupported` instead of printing guesswork.

Inside a kernel every tensor of the spec is a named value (a block of a row
or a per-row scalar), so ``A[s2, s1]`` prints as ``A``; the plan chooses the
names through ``names``.
"""
from __future__ import annotations

import sympy
from sympy.printing.codeprinter import CodePrinter
from sympy.printing.precedence import precedence

from .ir import ArgmaxIndicator, IndexMax, IndexSum

KNOWN_FUNCTIONS = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "Abs": "tl.abs"}


class NotSupported(ValueError):
    """An expression the Triton printer has no translation for."""


class TritonPrinter(CodePrinter):
    printmethod = "_tritoncode"
    language = "Triton"
    _default_settings = dict(CodePrinter._default_settings, names={}, column="col", strict=True,
                             contract=False, allow_unknown_functions=False)

    def __init__(self, settings=None):
        super().__init__(settings or {})
        self.known_functions = dict(KNOWN_FUNCTIONS)

    # -- leaves -------------------------------------------------------------------------
    def _print_Indexed(self, expr):
        label = str(expr.base.label)
        return self._settings["names"].get(label, label)

    def _print_Symbol(self, expr):
        return self._settings["names"].get(expr.name, expr.name)

    def _print_Integer(self, expr):
        return f"{int(expr)}.0"

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Infinity(self, expr):
        return 'float("inf")'

    def _print_NegativeInfinity(self, expr):
        return 'float("-inf")'

    # -- structure ----------------------------------------------------------------------
    def _print_Pow(self, expr):
        base, exp = expr.base, expr.exp
        b = self.parenthesize(base, precedence(expr))
        if exp.is_Integer:
            n = int(exp)
            if n == -1:
                return f"1.0 / {b}"
            if 1 < n <= 4:
                return " * ".join([b] * n)
            if -4 <= n < -1:
                return f"1.0 / ({' * '.join([b] * -n)})"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._print(base)})"
        if exp == -sympy.Rational(1, 2):
            return f"1.0 / tl.sqrt({self._print(base)})"
        # general power through exp2/log2 (the base of a real power is positive)
        return f"tl.exp2({self._print(exp)} * tl.log2({self._print(base)}))"

    def _print_tanh(self, expr):
        x = self._print(expr.args[0])
        return f"(1.0 - 2.0 / (tl.exp(2.0 * ({x})) + 1.0))"

    def _print_Max(self, expr):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"tl.maximum({out}, {a})"
        return out

    def _print_Min(self, expr):
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"tl.minimum({out}, {a})"
        return out

    def _print_Piecewise(self, expr):
        if expr.args[-1].cond != True:  # noqa: E712 - SymPy's true
            raise NotSupported("a Piecewise needs a final (value, True) branch")
        out = self._print(expr.args[-1].expr)
        for value, cond in reversed(expr.args[:-1]):
            out = f"tl.where({self._print(cond)}, {self._print(value)}, {out})"
        return out

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_Mul(self, expr):
        # 1[s = argmax] * rest -> tl.where(col == argmax, rest, 0): no 0 * inf
        picks = [f for f in expr.args if isinstance(f, ArgmaxIndicator)]
        if picks:
            rest = sympy.Mul(*[f for f in expr.args if f not in picks])
            cond = " & ".join(self._print(p) for p in picks)
            return f"tl.where({cond}, {self._print(rest)}, 0.0)"
        return super()._print_Mul(expr)

    def _print_ArgmaxIndicator(self, expr):
        name = self._print(expr.reduced)
        return f"({self._settings['column']} == {name}_argmax)"

    # -- refusals -----------------------------------------------------------------------
    def _print_IndexSum(self, expr):
        raise NotSupported(f"a sum must be planned as a reduction before printing: {expr}")

    def _print_IndexMax(self, expr):
        raise NotSupported(f"a max must be planned as a reduction before printing: {expr}")

    def _print_KroneckerDelta(self, expr):
        raise NotSupported(f"an uncontracted Kronecker delta cannot be printed: {expr}")

    def _print_Function(self, expr):
        name = expr.func.__name__
        if name in self.known_functions:
            return f"{self.known_functions[name]}({', '.join(self._print(a) for a in expr.args)})"
        raise NotSupported(f"no Triton translation for the function {name}")

    def _print_not_supported(self, expr):
        raise NotSupported(f"no Triton translation for {type(expr).__name__}: {expr}")

    emptyPrinter = _print_not_supported

    def doprint(self, expr, assign_to=None):
        """The expression's code, one line (no assignments, no statements)."""
        return self._print(sympy.sympify(expr))


def triton_code(expr, names: dict | None = None, column: str = "col") -> str:
    """Print one expression as Triton code."""
    return TritonPrinter({"names": names or {}, "column": column}).doprint(expr)



__all__ = ["TritonPrinter", "triton_code", "NotSupported", "IndexSum", "IndexMax", "ArgmaxIndicator"]
