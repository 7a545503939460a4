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

import math

import sympy
from sympy.printing.codeprinter import CodePrinter
from sympy.printing.precedence import precedence

from .ir import ArgmaxIndicator, IndexMax, IndexSum, Indicator, Pick, Position

FLOAT32_MAX = 3.4028234663852886e38  # the largest finite float32

KNOWN_FUNCTIONS = {"exp": "tl.exp", "log": "tl.log", "sqrt": "tl.sqrt", "Abs": "tl.abs"}


class NotSupported(ValueError):
    """An expression the Triton printer has no translation for."""


class TritonPrinter(CodePrinter):
    printmethod = "_tritoncode"
    language = "Triton"
    _default_settings = dict(CodePrinter._default_settings, names={}, column="col", argmax={}, strict=True,
                             contract=False, allow_unknown_functions=False)

    def __init__(self, settings=None):
        super().__init__(settings or {})
        self.known_functions = dict(KNOWN_FUNCTIONS)

    # -- leaves -------------------------------------------------------------------------
    def _print_Indexed(self, expr):
        label = str(expr.base.label)
        return self._settings["names"].get(label, label)

    def _print_IndexedBase(self, expr):  # a tensor with no indices: a total over the rows
        label = str(expr.label)
        return self._settings["names"].get(label, label)

    def _print_Symbol(self, expr):
        if expr.name in self._settings["names"]:
            return self._settings["names"][expr.name]
        if expr.name.startswith("|"):
            raise NotSupported(f"the kernel does not know the size {expr.name} of that index set")
        return expr.name

    def _constant(self, expr) -> str:
        """A real number as a float literal; one a float32 kernel cannot hold is refused, never
        printed as ``inf`` (a Python name) or thousands of digits."""
        try:
            value = float(expr)
        except (OverflowError, TypeError):
            value = math.inf
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise NotSupported(f"the constant {sympy.Float(expr, 6) if expr.is_real else expr} does not fit "
                               f"a float32 kernel (at most {FLOAT32_MAX:.4g} in magnitude)")
        return repr(value)

    def _print_Integer(self, expr):
        if abs(expr.p) < 2 ** 53:  # exact as a float
            return f"{int(expr)}.0"
        return self._constant(expr)

    def _print_Rational(self, expr):
        return self._constant(expr)

    def _print_Float(self, expr):
        return self._constant(expr)

    def _print_NumberSymbol(self, expr):  # E (from exp(1)), pi
        return self._constant(expr)

    def _print_ImaginaryUnit(self, expr):
        raise NotSupported(f"no Triton translation for a complex constant: {expr}")

    def _print_ComplexInfinity(self, expr):
        raise NotSupported("no Triton translation for a complex infinity (zoo, a division by zero)")

    def _print_NaN(self, expr):
        raise NotSupported("no Triton translation for nan as a constant")

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
            # integer powers multiply out, so a negative base keeps its sign (the spec's
            # exponents are at most 64); exp2/log2 below is only for real exponents
            if 1 < n <= 64:
                return f"({' * '.join([b] * n)})"
            if -64 <= n < -1:
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

    def _fold(self, func: str, expr, extra: str = "") -> str:
        args = [self._print(a) for a in expr.args]
        out = args[0]
        for a in args[1:]:
            out = f"{func}({out}, {a}{extra})"
        return out

    def _print_Heaviside(self, expr):
        # the derivative of maximum/minimum: 1 above, 0 below, 1/2 at a tie (as torch splits ties)
        x = self._print(expr.args[0])
        half = self._print(expr.args[1]) if len(expr.args) > 1 else "0.5"
        return f"tl.where(({x}) > 0, 1.0, tl.where(({x}) < 0, 0.0, {half}))"

    # elementwise maximum/minimum as torch's: a NaN operand gives NaN (Triton's default
    # returns the other operand)
    def _print_Max(self, expr):
        return self._fold("tl.maximum", expr, ", propagate_nan=tl.PropagateNan.ALL")

    def _print_Min(self, expr):
        return self._fold("tl.minimum", expr, ", propagate_nan=tl.PropagateNan.ALL")

    def _print_Piecewise(self, expr):
        if expr.args[-1].cond != True:  # noqa: E712 - SymPy's true
            raise NotSupported("a Piecewise needs a final (value, True) branch")
        out = self._print(expr.args[-1].expr)
        for value, cond in reversed(expr.args[:-1]):
            out = f"tl.where({self._print(cond)}, {self._print(value)}, {out})"
        return out

    def _print_Relational(self, expr):
        # an integer constant compared stays an integer (a class index against -100, a position against 0)
        def side(e):
            return str(int(e)) if e.is_Integer and abs(int(e)) < 2 ** 53 else self._print(e)
        return f"({side(expr.lhs)} {expr.rel_op} {side(expr.rhs)})"

    def _print_And(self, expr):
        return "(" + " & ".join(self._print(a) for a in expr.args) + ")"

    def _print_Or(self, expr):
        return "(" + " | ".join(self._print(a) for a in expr.args) + ")"

    def _print_Not(self, expr):
        return f"({self._print(expr.args[0])} == 0)"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Where(self, expr):
        return f"tl.where({self._print(expr.cond)}, {self._print(expr.then)}, {self._print(expr.other)})"

    def _print_Indicator(self, expr):
        return self._print(expr.cond)

    def _print_Mul(self, expr):
        # 1[s = argmax] * rest -> tl.where(col == argmax, rest, 0): no 0 * inf
        picks = [f for f in expr.args if isinstance(f, (ArgmaxIndicator, Pick, Indicator))]
        if picks:
            rest = sympy.Mul(*[f for f in expr.args if f not in picks])
            cond = " & ".join(self._print(p) for p in picks)
            return f"tl.where({cond}, {self._print(rest)}, 0.0)"
        return super()._print_Mul(expr)

    def _print_Pick(self, expr):
        # 1[c = t[r]]: the column index against the integer tensor's value
        return f"({self._settings['column']} == {self._print(expr.value)})"

    def _print_ArgmaxIndicator(self, expr):
        label = str(expr.reduced.base.label)
        if label not in self._settings["argmax"]:
            raise NotSupported(f"the kernel has no saved argmax for {label}")
        return f"({self._settings['column']} == {self._settings['argmax'][label]})"

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


class TilePrinter(TritonPrinter):
    """Prints expressions over 1-D and 2-D tiles (the attention family).

    ``axes`` gives each tile's axes (index-set names, in storage order) and
    ``target`` the axes of the value being printed: a lower-rank tile
    broadcasts (``L[:, None]``), a transposed one is ``tl.trans``-ed, a sum over
    the axis two tiles share is a ``tl.dot`` and any other sum a ``tl.sum``.
    Computed tiles (``computed``) are cast to the input dtype ``DT`` before a
    dot, as flash attention casts P before ``P @ V``.
    """

    _default_settings = dict(TritonPrinter._default_settings, axes={}, target=(), computed=(), batch=(),
                             dot_options="", positions={})

    def _axes_of(self, expr) -> tuple[str, ...]:
        from .ir import base_name
        if isinstance(expr, Position):
            return (base_name(expr.index),)
        if isinstance(expr, sympy.Indexed):
            known = self._settings["axes"].get(str(expr.base.label))
            if known is not None:
                return tuple(known)
            return tuple(base_name(i) for i in expr.indices if base_name(i) not in self._settings["batch"])
        if isinstance(expr, IndexSum):
            gone = {base_name(i) for i in expr.indices}
            return tuple(a for a in self._axes_of(expr.body) if a not in gone)
        out: list[str] = []
        for a in expr.args:
            for ax in self._axes_of(a):
                if ax not in out:
                    out.append(ax)
        target = self._settings["target"]
        return tuple(sorted(out, key=lambda a: target.index(a) if a in target else len(target)))

    def _with_target(self, expr, target):
        saved = self._settings["target"]
        self._settings["target"] = tuple(target)
        try:
            return self._print(expr)
        finally:
            self._settings["target"] = saved

    def _print_Position(self, expr):
        from .ir import base_name
        axis = base_name(expr.index)
        if axis not in self._settings["positions"]:
            raise NotSupported(f"the kernel has no positions along {axis}")
        text = self._laid_out(self._settings["positions"][axis], expr)
        # integers where compared (exact, cheap); in arithmetic the accumulation dtype (fp64 for fp64)
        return text if getattr(self, "_comparing", 0) else f"{text}.to(ACC)"

    def _print_Relational(self, expr):
        self._comparing = getattr(self, "_comparing", 0) + 1
        try:
            return super()._print_Relational(expr)
        finally:
            self._comparing -= 1

    def _print_Indexed(self, expr):
        return self._laid_out(super()._print_Indexed(expr), expr)

    def _laid_out(self, name, expr):
        axes, target = self._axes_of(expr), tuple(self._settings["target"])
        if axes == target or not axes:
            return name
        if len(axes) == 2 and axes[::-1] == target:
            return f"tl.trans({name})"
        if len(axes) == 1 and len(target) == 2 and axes[0] in target:
            return f"{name}[:, None]" if axes[0] == target[0] else f"{name}[None, :]"
        raise NotSupported(f"cannot lay the tile {expr} (axes {axes}) out as {target}")

    def _operand(self, factor, target) -> str:
        text = self._with_target(factor, target)
        computed = not isinstance(factor, sympy.Indexed) or str(factor.base.label) in self._settings["computed"]
        if not computed:
            return text
        if text.startswith("tl.trans(") and isinstance(factor, sympy.Indexed):
            return f"tl.trans({text[len('tl.trans('):-1]}.to(DT))"
        return f"({text}).to(DT)" if not isinstance(factor, sympy.Indexed) else f"{text}.to(DT)"

    def _print_IndexSum(self, expr):
        from .ir import base_name
        if len(expr.indices) != 1:
            raise NotSupported(f"a tile sum over several index sets: {expr}")
        c = base_name(expr.indices[0])
        target = tuple(self._settings["target"])
        factors = sympy.Mul.make_args(expr.body)
        if len(target) == 2 and len(factors) == 2:
            a, b = target
            fx, fy = factors
            ax, ay = set(self._axes_of(fx)), set(self._axes_of(fy))
            if ax == {b, c} and ay == {a, c}:
                fx, fy, ax, ay = fy, fx, ay, ax
            if ax == {a, c} and ay == {c, b}:
                left = self._operand(fx, (a, c))
                right = self._operand(fy, (c, b))
                return f"tl.dot({left}, {right}{self._settings['dot_options']})"
        body_axes = self._axes_of(expr.body)
        if c not in body_axes:
            raise NotSupported(f"a sum over {c}, which the tiles of {expr.body} lack")
        body = self._with_target(expr.body, body_axes)
        return f"tl.sum({body}, axis={body_axes.index(c)})"


def tile_code(expr, axes: dict, target, computed=(), batch=(), names=None, dot_options="", positions=None) -> str:
    """Print one tile expression (see :class:`TilePrinter`); ``positions`` maps an
    index name to the kernel's vector of its positions (``i`` -> ``offs_i``)."""
    return TilePrinter({"names": names or {}, "axes": axes, "target": tuple(target), "computed": tuple(computed),
                        "batch": tuple(batch), "dot_options": dot_options,
                        "positions": positions or {}}).doprint(expr)


class IndexPrinter(TritonPrinter):
    """Prints integer arithmetic on scalars: a loop bound from positions and int
    parameters.  Integers stay integers; ``floor(p/q)`` (q a positive integer) is
    ``p // q``, which Triton rounds toward zero and Python down: both lie within
    one of the exact quotient, which the caller's bounds allow for.  Any other
    fraction is refused."""

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        raise NotSupported(f"an integer bound cannot hold the fraction {expr}")

    def _print_floor(self, expr):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if not (den.is_Integer and den > 0):
            raise NotSupported(f"an integer bound divides only by a positive integer: {expr}")
        return f"({self._print(num)}) // {int(den)}"


def index_code(expr, names: dict | None = None) -> str:
    """Print an integer scalar expression (see :class:`IndexPrinter`)."""
    return IndexPrinter({"names": names or {}}).doprint(expr)


def triton_code(expr, names: dict | None = None, column: str = "col", argmax: dict | None = None) -> str:
    """Print one expression as Triton code.  ``names`` maps tensor, parameter and
    size names to the kernel's names; ``argmax`` maps a max's name to the kernel
    value holding its saved argmax."""
    return TritonPrinter({"names": names or {}, "column": column, "argmax": argmax or {}}).doprint(expr)



__all__ = ["TritonPrinter", "triton_code", "index_code", "NotSupported", "IndexSum", "IndexMax", "ArgmaxIndicator"]
