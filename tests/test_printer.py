"""Stage 6, the Triton expression printer."""
import math

import pytest
import sympy
from sympy import IndexedBase, KroneckerDelta, Max, Min, Piecewise, Rational, symbols

from derive.ir import ArgmaxIndicator, IndexMax, IndexSum
from derive.printer import NotSupported, triton_code

s1, s2 = symbols("s1 s2")
A = IndexedBase("A")[s2, s1]
B = IndexedBase("B")[s2]
C = IndexedBase("C")[s2]
M = IndexedBase("M")[s2]
Z = IndexedBase("Z")[s2]
dB = IndexedBase("dB")[s2]
x = sympy.Symbol("x", positive=True)


# ---- leaves ---------------------------------------------------------------------------------
def test_indexed_prints_its_name():
    assert triton_code(A) == "A"
    assert triton_code(B) == "B"


def test_names_mapping():
    assert triton_code(A, names={"A": "a_blk"}) == "a_blk"
    assert triton_code(A + B, names={"A": "a_blk"}) == "a_blk + B"
    assert triton_code(sympy.Symbol("scale") * A, names={"scale": "sc"}) == "sc*A"


def test_numbers_are_floats():
    assert triton_code(sympy.Integer(3)) == "3.0"
    assert triton_code(Rational(1, 4)) == "0.25"
    assert triton_code(sympy.Float(2.5)) == "2.5"
    assert triton_code(sympy.oo) == 'float("inf")'
    assert triton_code(-sympy.oo) == 'float("-inf")'


# ---- functions ------------------------------------------------------------------------------------
def test_exp_log_sqrt():
    assert triton_code(sympy.exp(A)) == "tl.exp(A)"
    assert triton_code(sympy.log(A)) == "tl.log(A)"
    assert triton_code(sympy.sqrt(A)) == "tl.sqrt(A)"
    assert triton_code(sympy.exp(A - M) / Z) == "tl.exp(A - M)/Z"


def test_tanh_through_exp():
    code = triton_code(sympy.tanh(A))
    assert "tl.exp" in code and "tanh" not in code


# ---- powers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr, code", [
    (A ** 2, "(A * A)"),
    (A ** 3, "(A * A * A)"),
    (A ** -1, "1.0 / A"),
    (A ** -2, "1.0 / (A * A)"),
    (sympy.sqrt(A), "tl.sqrt(A)"),
    (1 / sympy.sqrt(A), "1.0 / tl.sqrt(A)"),
    ((A + B) ** 2, "((A + B) * (A + B))"),
])
def test_powers(expr, code):
    assert triton_code(expr) == code


def test_general_power_through_exp2_log2():
    code = triton_code(A ** Rational(3, 2))
    assert code == "tl.exp2(1.5 * tl.log2(A))"


# ---- structure -----------------------------------------------------------------------------------
def test_piecewise_is_where():
    assert triton_code(Piecewise((A, A > 0), (0, True))) == "tl.where((A > 0), A, 0.0)"
    nested = Piecewise((A, A > 1), (B, A > 0), (0, True))
    assert triton_code(nested) == "tl.where((A > 1), A, tl.where((A > 0), B, 0.0))"


def test_piecewise_without_default_is_refused():
    with pytest.raises(NotSupported, match="Piecewise"):
        triton_code(Piecewise((A, A > 0), (B, A < 0)))


def test_max_min():
    """Elementwise, NaN-propagating as torch.maximum / torch.minimum (Triton's default returns
    the operand that is not NaN)."""
    nan = ", propagate_nan=tl.PropagateNan.ALL"
    code = triton_code(Max(A, B))
    assert code in (f"tl.maximum(A, B{nan})", f"tl.maximum(B, A{nan})")
    code3 = triton_code(Max(A, B, C))
    assert code3.count("tl.maximum(") == 2 and code3.count(nan) == 2
    assert triton_code(Min(A, B)) in (f"tl.minimum(A, B{nan})", f"tl.minimum(B, A{nan})")


def test_argmax_indicator_times_value():
    am = {"B": "B_argmax"}
    assert triton_code(ArgmaxIndicator(B, s1) * dB, argmax=am) == "tl.where((col == B_argmax), dB, 0.0)"
    assert triton_code(ArgmaxIndicator(B, s1) * dB, column="offs", argmax=am) == \
        "tl.where((offs == B_argmax), dB, 0.0)"
    assert triton_code(ArgmaxIndicator(B, s1) * dB, names={"B": "b", "dB": "g"}, argmax={"B": "b_arg"}) == \
        "tl.where((col == b_arg), g, 0.0)"


def test_an_indicator_without_a_saved_argmax_is_refused():
    with pytest.raises(NotSupported, match="the kernel has no saved argmax for B"):
        triton_code(ArgmaxIndicator(B, s1) * dB)


def test_max_pullback_prints():
    from derive import derive
    assert triton_code(derive("max").pullbacks["A"], argmax={"B": "B_argmax"}) == \
        "tl.where((col == B_argmax), dB, 0.0)"


# ---- refusals ---------------------------------------------------------------------------------------
def test_index_sum_not_supported():
    with pytest.raises(NotSupported, match="sum"):
        triton_code(IndexSum(A, s1))
    with pytest.raises(NotSupported, match="sum"):
        triton_code(B * (dB - IndexSum(A * dB, s1)))


def test_index_max_not_supported():
    with pytest.raises(NotSupported, match="max"):
        triton_code(IndexMax(A, s1))


def test_kronecker_delta_not_supported():
    with pytest.raises(NotSupported, match="Kronecker delta"):
        triton_code(KroneckerDelta(s1, s2))
    with pytest.raises(NotSupported, match="Kronecker delta"):
        triton_code(A * KroneckerDelta(s1, s2))


@pytest.mark.parametrize("expr, name", [
    (sympy.gamma(x), "gamma"),
    (sympy.sin(x), "sin"),
    (sympy.atan2(A, B), "atan2"),
    (sympy.Function("mystery")(A), "mystery"),
])
def test_unknown_function_not_supported(expr, name):
    with pytest.raises(NotSupported, match=name):
        triton_code(expr)


def test_not_supported_is_a_value_error():
    assert issubclass(NotSupported, ValueError)


# ---- the printed code evaluates ---------------------------------------------------------------------
class _TL:
    """A scalar stand-in for ``triton.language``."""
    exp = staticmethod(math.exp)
    log = staticmethod(math.log)
    sqrt = staticmethod(math.sqrt)
    abs = staticmethod(abs)
    exp2 = staticmethod(lambda v: 2.0 ** v)
    log2 = staticmethod(math.log2)
    maximum = staticmethod(lambda a, b, propagate_nan=None: math.nan if math.isnan(a) or math.isnan(b) else max(a, b))
    minimum = staticmethod(lambda a, b, propagate_nan=None: math.nan if math.isnan(a) or math.isnan(b) else min(a, b))
    where = staticmethod(lambda c, a, b: a if c else b)

    class PropagateNan:
        ALL = "all"


def run(expr, **values):
    return eval(triton_code(expr), {"tl": _TL, "__builtins__": {"float": float, "abs": abs}}, values)


VALUES = dict(A=0.7, B=1.3, C=2.1, M=1.9, Z=3.4, dB=-0.6, scale=0.5)


def reference(expr):
    sub = {A: VALUES["A"], B: VALUES["B"], C: VALUES["C"], M: VALUES["M"], Z: VALUES["Z"], dB: VALUES["dB"],
           sympy.Symbol("scale"): VALUES["scale"]}
    return float(expr.xreplace(sub).evalf())


@pytest.mark.parametrize("expr", [
    sympy.exp(A - M) / Z,
    A ** 2 + B ** 3 - C,
    1 / A + 1 / (A * B),
    A ** -2,
    (A + B) ** 2 * C,
    sympy.sqrt(A) / sympy.sqrt(B + C),
    A ** Rational(3, 2),
    sympy.tanh(A - B) * 2,
    sympy.log(A * B) - sympy.Symbol("scale") * C,
    Max(A, B) - Max(A, C),
    Piecewise((A, A > B), (B - C, True)),
    B * (dB - A * dB) / Z,
])
def test_printed_code_evaluates(expr):
    assert run(expr, **VALUES) == pytest.approx(reference(expr), rel=1e-12)


def test_printed_argmax_evaluates():
    code = triton_code(ArgmaxIndicator(B, s1) * dB * 2, argmax={"B": "B_argmax"})
    for col, want in [(3, 2 * VALUES["dB"]), (1, 0.0)]:
        got = eval(code, {"tl": _TL}, {"col": col, "B_argmax": 3, "dB": VALUES["dB"]})
        assert got == pytest.approx(want)


@pytest.mark.parametrize("expr", [B / A ** 2, B / A ** 3, sympy.exp(A) / A ** 2, B / (A + C) ** 2])
def test_power_in_a_denominator_evaluates(expr):
    assert run(expr, **VALUES) == pytest.approx(reference(expr), rel=1e-12)


def test_integer_powers_keep_the_sign_of_a_negative_base():
    code = triton_code(A ** 5)
    assert code == "(A * A * A * A * A)"
    assert eval(code, {"tl": _TL}, {"A": -2.0}) == -32.0
    assert eval(triton_code(A ** -7), {"tl": _TL}, {"A": -2.0}) == pytest.approx(-1 / 128)
