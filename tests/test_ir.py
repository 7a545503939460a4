"""Stage 2, the IR: semantic checks (each a SpecError at file:line:col naming
the problem), dependency ordering and index inference."""
import re

import pytest
import sympy
from sympy import Indexed, Symbol

from derive.ir import ArgmaxIndicator, IndexMax, IndexSum, build, free_indices
from derive.spec import SpecError, parse
from spec_errors import FILE, col, expect_error

HEADER = "op f(A[s2, s1]) -> B[s2, s1]"


def build_text(text: str):
    return build(parse(text, FILE))


def error(text: str) -> SpecError:
    return expect_error(build_text, text)


def syms(names: str) -> tuple:
    return tuple(Symbol(n) for n in names.split())


# ---- errors ---------------------------------------------------------------------------
def test_undefined_tensor():
    line = "B = A + exp(C)"
    e = error(HEADER + "\n" + line + "\n")
    assert e.message == "undefined tensor 'C'"
    assert (e.line, e.col) == (2, col(line, "C"))


def test_undefined_tensor_in_an_intermediate():
    text = HEADER + "\nT = A * Nope\nB = T\n"
    e = error(text)
    assert "undefined tensor 'Nope'" in e.message
    assert (e.line, e.col) == (2, col("T = A * Nope", "Nope"))


def test_tensor_defined_twice():
    text = HEADER + "\nB = A\n  B = 2 * A\n"
    e = error(text)
    assert "B is defined twice" in e.message and "line 2" in e.message
    assert (e.line, e.col) == (3, 3)


def test_redefining_an_input():
    text = HEADER + "\nT = A\n A = 2\nB = T\n"
    e = error(text)
    assert "A is an input" in e.message and "cannot be redefined" in e.message
    assert (e.line, e.col) == (3, 2)


def test_redefining_a_parameter():
    e = error("op f(A[s1]; p) -> B[s1]\np = 2\nB = p * A\n")
    assert "p is a parameter" in e.message
    assert (e.line, e.col) == (2, 1)


def test_input_declared_twice():
    header = "op f(A[s1], A[s1]) -> B[s1]"
    e = error(header + "\nB = A\n")
    assert "input A is declared twice" in e.message
    assert (e.line, e.col) == (1, col(header, "A", 1))


def test_free_index_not_on_target():
    e = error(HEADER.replace("B[s2, s1]", "B[s2]") + "\nB[s2] = A\n")
    assert "index mismatch" in e.message
    assert "s1 is free on the right-hand side but not an index of B" in e.message
    assert "sum[s1]" in e.message
    assert (e.line, e.col) == (2, 1)


def test_target_index_missing_on_right():
    e = error(HEADER + "\nT[s2, s1, s3] = A\nB = A\n")
    assert "index mismatch" in e.message
    assert "T has index s3 that the right-hand side lacks" in e.message
    assert (e.line, e.col) == (2, 1)


def test_target_repeats_an_index():
    e = error(HEADER + "\nT[s2, s1, s1] = A\nB = A\n")
    assert "repeats an index" in e.message
    assert (e.line, e.col) == (2, 1)


def test_reduction_over_missing_index():
    line = "B = A + sum[s3](A)"
    e = error(HEADER + "\n" + line + "\n")
    assert "sum[s3] reduces over s3" in e.message
    assert "[s2, s1]" in e.message  # what the operand has, in the header's order
    assert (e.line, e.col) == (2, col(line, "sum"))


def test_max_over_missing_index():
    line = "M = max[s3](A)"
    e = error(HEADER + "\n" + line + "\nB = A\n")
    assert "max[s3] reduces over s3" in e.message
    assert (e.line, e.col) == (2, col(line, "max"))


def test_reduction_repeats_an_index():
    line = "Z = sum[s1, s1](A)"
    e = error(HEADER + "\n" + line + "\nB = A\n")
    assert "repeats an index" in e.message
    assert (e.line, e.col) == (2, col(line, "sum"))


@pytest.mark.parametrize("line", [
    "M = 2 * max[s1](A)",
    "M = max[s1](A) + 1",
    "M = -max[s1](A)",
    "M = exp(max[s1](A))",
    "M = max[s2](max[s1](A))",
    "M = sum[s2](max[s1](A))",
])
def test_max_not_whole_rhs(line):
    e = error(HEADER + "\n" + line + "\nB = A\n")
    assert "max[...] must be the whole right-hand side" in e.message
    assert (e.line, e.col) == (2, col(line, "max", line.count("max") - 1))


def test_cycle():
    text = HEADER + "\nX = Y + A\nY = X * 2\nB = X\n"
    e = error(text)
    assert "cycle" in e.message
    assert "X" in e.message and "Y" in e.message
    assert e.message == "cycle among equations: X -> Y -> X"
    assert (e.line, e.col) == (2, 1)


def test_longer_cycle_reached_through_another_equation():
    text = HEADER + "\nB = X\nX = Y + A\nY = W * 2\nW = exp(X)\n"
    e = error(text)
    assert "cycle" in e.message
    for name in ("X", "Y", "W"):
        assert name in e.message
    assert "B" not in e.message.split(":", 1)[1]


def test_self_reference_is_a_cycle():
    e = error(HEADER + "\nX = X + A\nB = X\n")
    assert "cycle" in e.message and "X -> X" in e.message
    assert (e.line, e.col) == (2, 1)


def test_output_never_defined():
    header = "op f(A[s2, s1]) -> Out[s2, s1]"
    e = error(header + "\nB = A\n")
    assert e.message == "the output Out is never defined"
    assert (e.line, e.col) == (1, col(header, "Out"))


def test_output_declared_indices_differ_from_equation():
    header = "op f(A[s2, s1]) -> B[s1, s2]"
    e = error(header + "\nB[s2, s1] = A\n")
    assert "the output B is declared with indices [s1, s2] but its equation gives [s2, s1]" in e.message
    assert (e.line, e.col) == (1, col(header, "B["))


def test_output_declared_indices_differ_from_inferred():
    header = "op f(A[s2, s1]) -> B[s2]"
    e = error(header + "\nB = exp(A)\n")
    assert "declared with indices [s2]" in e.message and "gives [s2, s1]" in e.message
    assert (e.line, e.col) == (1, col(header, "B["))


def test_index_name_used_as_tensor_name():
    e = error(HEADER + "\n  s1 = exp(A)\nB = A\n")
    assert "'s1' is an index name and cannot name a tensor" in e.message
    assert (e.line, e.col) == (2, 3)


def test_index_name_used_as_input_name():
    header = "op f(A[s2, s1], s2[s2]) -> B[s2, s1]"
    e = error(header + "\nB = A\n")
    assert "'s2' is an index name" in e.message
    assert (e.line, e.col) == (1, col(header, "s2[s2]"))


def test_index_name_used_as_parameter():
    e = error("op f(A[s2, s1]; s1) -> B[s2, s1]\nB = A\n")
    assert "'s1' is an index name and cannot name a parameter" in e.message
    assert e.line == 1


@pytest.mark.parametrize("name", ["sum", "max", "exp", "tanh"])
def test_reserved_name_as_tensor(name):
    e = error(HEADER + f"\n {name} = A\nB = A\n")
    assert f"'{name}' is reserved" in e.message
    assert (e.line, e.col) == (2, 2)


def test_op_as_tensor_name_is_rejected():
    # the parser reads 'op = A' as a second header; either way it is an error at line 2
    e = error(HEADER + "\n op = A\nB = A\n")
    assert (e.line, e.col) == (2, 2)


def test_tensor_exponent_is_rejected():
    line = "B = A ** A"
    e = error(HEADER + "\n" + line + "\n")
    assert "exponent" in e.message
    assert (e.line, e.col) == (2, col(line, "A"))


# ---- positive: order and inference -------------------------------------------------------
SOFTMAX_SHUFFLED = """\
op softmax(A[s2, s1]) -> B[s2, s1]
B = E / Z
Z = sum[s1](E)
E = exp(A - M)
M = max[s1](A)
"""


def test_equations_out_of_order_are_sorted():
    ir = build_text(SOFTMAX_SHUFFLED)
    order = [eq.target.name for eq in ir.equations]
    assert order == ["M", "E", "Z", "B"]
    # every tensor an equation reads is an input or defined earlier
    known = {t.name for t in ir.inputs}
    for eq in ir.equations:
        read = {str(t.base.label) for t in eq.rhs.atoms(Indexed)}
        assert read <= known, (eq, read, known)
        known.add(eq.target.name)


def test_shuffled_matches_builtin():
    from derive import derive
    ref = derive("softmax").ir
    ir = build_text(SOFTMAX_SHUFFLED)
    assert [str(e) for e in ir.equations] == [str(e) for e in ref.equations]


def test_inferred_indices_follow_header_order():
    ir = build_text(SOFTMAX_SHUFFLED)
    t = ir.tensors
    # index_order follows the header (s2 before s1), not alphabetical order
    assert ir.index_order == syms("s2 s1")
    assert t["M"].indices == syms("s2")
    assert t["E"].indices == syms("s2 s1")
    assert t["Z"].indices == syms("s2")
    assert t["B"].indices == syms("s2 s1")
    assert t["B"].role == "output" and t["E"].role == "intermediate" and t["A"].role == "input"


def test_inferred_indices_across_inputs():
    text = ("op g(X[b, a], Y[a, c]) -> Out[c, b]\n"
            "T = X * Y\n"
            "Out = sum[a](T)\n")
    ir = build_text(text)
    assert ir.index_order == syms("b a c")
    assert ir.tensors["T"].indices == syms("b a c")
    # the output's inferred indices take the header's declared order
    assert ir.tensors["Out"].indices == syms("c b")
    assert ir.output.indices == syms("c b")


def test_explicit_indices_are_kept():
    ir = build_text(HEADER + "\nT[s1, s2] = 2 * A\nB = T\n")
    assert ir.tensors["T"].indices == syms("s1 s2")


def test_softmax_ir_contents():
    ir = build_text(SOFTMAX_SHUFFLED)
    s2, s1 = syms("s2 s1")
    M = ir.definition("M")
    assert isinstance(M.rhs, IndexMax) and M.rhs.indices == (s1,)
    Z = ir.definition("Z")
    assert isinstance(Z.rhs, IndexSum) and Z.rhs.indices == (s1,)
    assert free_indices(Z.rhs) == {s2}
    E = ir.definition("E")
    assert E.rhs == sympy.exp(ir.tensors["A"].indexed - ir.tensors["M"].indexed)
    assert ir.definition("nope") is None
    assert [p for p in ir.params] == []


def test_params_are_symbols():
    ir = build_text("op f(A[i]; scale) -> B[i]\nB = scale * A\n")
    assert ir.params == [Symbol("scale")]
    assert ir.equations[0].rhs == Symbol("scale") * ir.tensors["A"].indexed


def test_free_indices_of_argmax_indicator():
    s2, s1 = syms("s2 s1")
    B = sympy.IndexedBase("B")
    assert free_indices(ArgmaxIndicator(B[s2], s1)) == {s1, s2}
    assert free_indices(IndexSum(B[s2] * ArgmaxIndicator(B[s2], s1), s1)) == {s2}


def test_use_site_index_renaming():
    ir = build(parse("op g(X[n, i]) -> Y[i, j]\nY[i, j] = sum[n](X * X[n, j])\n", "t.op"))
    (eq,) = ir.equations
    assert str(eq.rhs) == "sum[n](X[n, i]*X[n, j])"


@pytest.mark.parametrize("rhs, message", [
    ("A[s1]", "A has 2 index sets [s2, s1], not 1"),
    ("A[s2, s2]", "A[s2, s2] repeats an index"),
])
def test_use_site_index_errors(rhs, message):
    with pytest.raises(SpecError, match=re.escape(message)) as e:
        build(parse(f"op f(A[s2, s1]) -> B[s2, s1]\nB = {rhs}\n", "t.op"))
    assert (e.value.line, e.value.col) == (2, 5)
