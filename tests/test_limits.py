"""Hostile specs (found by fuzzing): each is a located SpecError with a message
that says what to change, quickly; never a traceback, a hang or a kernel that
breaks at run time.  The limits are derive.spec's MAX_* constants."""
import time

import pytest
import sympy

from derive import spec as SP
from derive.derivation import derive, derive_text
from derive.ir import _Builder, build
from derive.printer import NotSupported, triton_code
from derive.spec import SpecError, parse
from spec_errors import FILE, col, expect_error

HEADER = "op f(A[s2, s1]) -> B[s2, s1]"
XHEADER = "op f(X[r, c]; eps) -> Y[r, c]"


def derive_error(text: str, seconds: float = 5.0) -> SpecError:
    """The SpecError of deriving ``text`` (and rendering it), raised within ``seconds``."""
    start = time.perf_counter()
    e = expect_error(lambda t: derive_text(t, FILE).text(), text)
    assert time.perf_counter() - start < seconds
    return e


def rhs_error(line: str, header: str = HEADER) -> SpecError:
    e = derive_error(header + "\n" + line + "\n")
    assert e.line == 2
    return e


# ---- the file: encoding, size, characters --------------------------------------------------
def test_not_utf8_is_located_at_the_bad_byte():
    data = (HEADER + "\nB = A + 1  # caf\xe9\n").encode("latin-1")
    e = expect_error(lambda d: SP.decode(d, FILE), data)
    assert e.message == "the spec is not UTF-8 text: byte 0xe9 cannot be decoded"
    assert (e.line, e.col) == (2, len("B = A + 1  # caf") + 1)


def test_not_utf8_through_derive(tmp_path):
    p = tmp_path / "latin.op"
    p.write_bytes(b"op f(A[i]) -> B[i]\n\xffB = A\n")
    with pytest.raises(SpecError, match=r"latin\.op:2:1: the spec is not UTF-8 text: byte 0xff") as info:
        derive(str(p))
    assert (info.value.line, info.value.col) == (2, 1)


def test_utf8_byte_order_mark_is_dropped(tmp_path):
    p = tmp_path / "bom.op"
    p.write_bytes(b"\xef\xbb\xbf" + (HEADER + "\nB = exp(A)\n").encode())
    assert str(derive(str(p)).pullbacks["A"]) == "B[s2, s1]*dB[s2, s1]"


@pytest.mark.parametrize("as_bytes", [True, False])
def test_too_many_bytes(as_bytes):
    text = HEADER + "\n" + "".join(f"B = A  # {'x' * 70}\n" for _ in range(1000))
    assert len(text.encode()) > SP.MAX_BYTES
    call = (lambda t: SP.decode(t.encode(), FILE)) if as_bytes else (lambda t: parse(t, FILE))
    e = expect_error(call, text)
    assert e.message == f"the spec is too large: {len(text.encode())} bytes; a spec holds at most 65536 bytes"
    assert e.line == text.encode()[:SP.MAX_BYTES].count(b"\n") + 1


@pytest.mark.parametrize("char", ["\x00", "\x0b", "\x1b", "\u2028", "\ud800"])
def test_control_characters(char):
    line = "B = A +" + char + " A"
    e = expect_error(lambda t: parse(t, FILE), HEADER + "\n" + line + "\n")
    assert e.message == (f"unexpected character U+{ord(char):04X}: a spec is plain text, without control "
                         f"characters")
    assert (e.line, e.col) == (2, col(line, char))


def test_crlf_line_ends_are_accepted():
    d = derive_text(HEADER + "\r\nB = exp(A)\r\n", FILE)
    assert str(d.pullbacks["A"]) == "B[s2, s1]*dB[s2, s1]"


# ---- size and depth, checked before ast.parse --------------------------------------------------
def test_deep_nesting():
    line = "Y = " + "exp(" * 150 + "X" + ")" * 150
    e = rhs_error(line, XHEADER)
    assert e.message.startswith("the right-hand side of Y nests too deeply: more than 32 levels")
    assert e.col == len("Y = ") + 4 * 32 + 4  # the 33rd '('


def test_deepest_allowed_nesting_derives():
    d = derive_text(XHEADER + "\nY = " + "(" * 31 + "sqrt(X)" + ")" * 31 + "\n", FILE)
    assert str(d.pullbacks["X"]) == "dY[r, c]/(2*Y[r, c])"  # 1/(2 sqrt(X)), folded into Y


@pytest.mark.parametrize("line", ["B = " + " + ".join(["A"] * 3000), "B = " + "-" * 3000 + "A"])
def test_long_right_hand_side(line):
    e = rhs_error(line)
    assert e.message == ("the right-hand side of B is too long: more than 512 names, numbers and operators; "
                         "split it into several equations")
    assert e.col == (len("B = ") + 4 * 256 + 1 if "+" in line else len("B = ") + 513)


def test_too_many_equations_in_reverse_order():
    eqs = "".join(f"T{k} = T{k + 1} + 1\n" for k in range(1000)).replace("T1000", "A")
    e = derive_error(HEADER + "\nB = T0\n" + eqs, seconds=2)
    assert e.message == "too many equations: a spec holds at most 64"
    assert (e.line, e.col) == (2 + 64, 1)


def test_a_5000_equation_cycle():
    eqs = "".join(f"T{k} = T{(k + 1) % 5000} + A\n" for k in range(5000))
    e = derive_error(HEADER + "\nB = T0\n" + eqs, seconds=2)
    assert "the spec is too large" in e.message


def test_most_equations_allowed_in_reverse_order_derive():
    eqs = "".join(f"T{k} = T{k + 1} + {k}\n" for k in range(62)).replace("T62", "A")
    d = derive_text(HEADER + "\nB = T0\n" + eqs, FILE)
    assert [eq.target.name for eq in d.forward][:2] == ["T61", "T60"]
    assert str(d.pullbacks["A"]) == "dB[s2, s1]"


def _chain_spec(n: int, cycle: bool):
    eqs = [SP.Equation(f"T{k}", None, SP.Ref(f"T{(k + 1) % n}" if cycle or k + 1 < n else "A", SP.Pos(k + 2, 6)),
                       SP.Pos(k + 2, 1)) for k in range(n)]
    return SP.OpSpec("f", [SP.TensorDecl("A", ("i",), SP.Pos(1, 6))], [], SP.TensorDecl("T0", ("i",), SP.Pos(1, 17)),
                     eqs, FILE)


def test_topological_order_is_iterative():
    # past the parser's limits on purpose: the walk itself must not recurse
    spec = _chain_spec(5000, cycle=False)
    b = _Builder(spec)
    b.tensors["A"] = object()  # the input, as build() declares it
    order = b.topological({eq.target: eq for eq in spec.equations})
    assert order == [f"T{k}" for k in reversed(range(5000))]


def test_cycle_detection_is_iterative_and_shortens_the_path():
    spec = _chain_spec(5000, cycle=True)
    e = expect_error(lambda s: build(s), spec)
    assert e.message == ("cycle among equations: T0 -> T1 -> T2 -> T3 -> T4 -> T5 -> ... (5000 equations) ... "
                         "-> T4998 -> T4999 -> T0")
    assert (e.line, e.col) == (2, 1)


def test_too_many_index_names_in_the_header():
    header = "op f(A[" + ", ".join(f"i{k}" for k in range(3000)) + "]) -> B[i0]"
    start = time.perf_counter()
    e = expect_error(lambda t: parse(t, FILE), header + "\nB = sum[i1](A)\n")
    assert time.perf_counter() - start < 1
    assert e.message == "too many index names: a spec uses at most 64"
    assert (e.line, e.col) == (1, col(header, "i64"))


def test_too_many_index_names_across_equations():
    header = "op f(A[" + ", ".join(f"i{k}" for k in range(60)) + "]) -> B[i0]"
    line = "B = sum[j0, j1, j2, j3, j4](A)"
    e = expect_error(lambda t: parse(t, FILE), header + "\n" + line + "\n")
    assert e.message == "too many index names: a spec uses at most 64"
    assert (e.line, e.col) == (2, col(line, "j4"))


def test_too_many_header_arguments():
    header = "op f(" + ", ".join(f"A{k}[i]" for k in range(40)) + "; " + ", ".join(f"p{k}" for k in range(40)) \
        + ") -> B[i]"
    e = expect_error(lambda t: parse(t, FILE), header + "\nB = A0\n")
    assert e.message == "too many inputs and parameters: an op takes at most 64"
    assert e.col == col(header, "p24")  # the 65th


# ---- numbers: finite, real, of bounded size; SymPy never evaluates a huge power ----------------
@pytest.mark.parametrize("line, token, message", [
    ("Y[r] = sum[c](X * 0**-1)", "0**", "this expression's value is infinite (a division by zero)"),
    ("Y = X / 0", "X /", "this expression's value is infinite (a division by zero)"),
    ("Y = X * log(0)", "log", "this expression's value is infinite (a division by zero)"),
    ("Y = X * (-1)**0.5", "(-1)", "this expression's value is a complex number, not a real one"),
    ("Y = X * sqrt(-2)", "sqrt", "this expression's value is a complex number, not a real one"),
    ("Y = X * (10**30 * 10**30) / 3", "10**30 *", "this expression's value is too large: constants are at "
                                                   "most 1e+38 in magnitude (kernels compute in float32)"),
    ("Y = X * 1e30 * 1e30", "X *", "this expression's value is too large"),
    ("Y = X * exp(100)", "exp", "this expression's value is too large"),
    ("Y = X * 10**5000", "10**", "the exponent is too large: a numeric exponent is at most 64 in magnitude"),
    ("Y = X * 9**9**9", "9**9**9", "the exponent is too large"),
    ("Y = X * (10**400) / 3", "10**", "the exponent is too large"),
    ("Y = X ** 65", "X **", "the exponent is too large"),
    ("Y = X * 1" + "0" * 5000, "1000", "the number 100000000000000000000000... (5001 characters) is too large: "
                                       "numbers are at most 1e+38 in magnitude (kernels compute in float32)"),
    ("Y = X * 1e39", "1e39", "the number 1e39 is too large"),
    ("Y = X * 0x" + "f" * 40, "0x", "a number is too large: numbers are at most 1e+38 in magnitude"),
    ("Y = X * 2j", "2j", "complex numbers are not supported: constants are real numbers"),
])
def test_bad_constants(line, token, message):
    header = XHEADER.replace("Y[r, c]", "Y[r]") if line.startswith("Y[r]") else XHEADER
    e = rhs_error(line, header)
    assert e.message.startswith(message)
    assert e.col == col(line, token)


def test_a_power_tower_40_deep():
    line = "Y = X * " + "**".join(["2"] * 40)
    e = rhs_error(line, XHEADER)
    assert e.message.startswith("the exponent is too large")
    assert e.col == line.rindex("2**2**2**2**2") + 1  # 2**65536: the first power past the limit


def test_the_power_tower_is_refused_before_it_is_evaluated():
    start = time.perf_counter()
    rhs_error("B = A * 2**100000000")
    assert time.perf_counter() - start < 0.5


def test_largest_constants_are_accepted_and_print():
    d = derive_text(XHEADER + "\nY = X * 1e38 + X ** 64 + exp(1) * X\n", FILE)
    code = triton_code(d.pullbacks["X"], names={"dY": "dY", "X": "X"})
    assert "1e+38" in code and "64.0" in code and "2.718281828459045" in code


# ---- messages that say what to write --------------------------------------------------------
@pytest.mark.parametrize("line, token, message", [
    ("B[s2] = A.sum(s1)", "A.sum", "methods are not supported: write sum[s1](A) instead of A.sum(...)"),
    ("B = A.max(s1, s2)", "A.max", "methods are not supported: write max[s1, s2](A) instead of A.max(...)"),
    ("B = A.exp()", "A.exp", "methods are not supported: write exp(A) instead of A.exp()"),
    ("B = A.maximum(A)", "A.maximum", "methods are not supported: write maximum(A, y) instead of A.maximum(y)"),
    ("B = A.softmax(s1)", "A.softmax", "unsupported call of 'softmax': expected exp, log, sqrt, tanh, maximum, "
                                       "minimum or sum[...], mean[...], max[...]"),
])
def test_method_calls_say_what_to_write(line, token, message):
    header = HEADER.replace("-> B[s2, s1]", "-> B[s2]") if line.startswith("B[s2]") else HEADER
    e = rhs_error(line, header)
    assert e.message == message
    assert e.col == col(line, token)


def test_a_parameter_takes_no_indices():
    line = "Y = X * eps[r]"
    e = rhs_error(line, XHEADER)
    assert e.message == "eps is a scalar parameter: it takes no indices; write eps, not eps[r]"
    assert e.col == col(line, "eps")


# ---- the engine's own budget ------------------------------------------------------------------
def test_nested_functions_past_the_term_budget_are_a_located_error():
    eqs = "".join(f"T{k} = tanh(T{k - 1})\n" for k in range(1, 13))
    text = XHEADER + "\nT0 = X\n" + eqs + "Y = T12\n"
    e = derive_error(text, seconds=20)
    assert e.message.startswith("the pullback into ")
    assert "grows too large to simplify (its sum-of-products form has more than 256 terms)" in e.message
    assert e.line >= 2


def test_a_power_of_a_sum_past_the_term_budget():
    e = rhs_error("Y = (X + exp(X) + tanh(X)) ** 6", XHEADER)
    assert "has more than 256 terms" in e.message
    assert e.col == 1


# ---- the printer and the report never print an unusable constant ----------------------------------
@pytest.mark.parametrize("value, message", [
    (sympy.Integer(10) ** 400, "the constant 1.00000E+400 does not fit a float32 kernel"),
    (sympy.Rational(10 ** 400, 3), "the constant 3.33333E+399 does not fit a float32 kernel"),
    (sympy.Float("1e39"), "the constant 1.00000E+39 does not fit a float32 kernel"),
    (sympy.I, "no Triton translation for a complex constant"),
    (sympy.zoo, "no Triton translation for a complex infinity"),
    (sympy.nan, "no Triton translation for nan"),
])
def test_printer_refuses_unusable_constants(value, message):
    with pytest.raises(NotSupported, match=message.replace("+", r"\+")):
        triton_code(value * sympy.IndexedBase("X")[sympy.Symbol("r")])


def test_report_prints_huge_coefficients_in_scientific_notation():
    eqs = "".join(f"T{k} = 10**30 * T{k + 1} / 7\n" for k in range(60)).replace("T60", "A")
    d = derive_text(HEADER + "\nB = T0\n" + eqs, FILE)
    assert "= 1.00000000000000e+1800*dB[s2, s1]/5.08021860739623e+50    # result" in d.text()
    assert "1.00000000000000e+1800" in d.latex() and "1.00000000000000e+1800" in d.markdown()
    with pytest.raises(NotSupported, match="does not fit a float32 kernel"):
        triton_code(d.pullbacks["A"])
