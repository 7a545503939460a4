"""Stage 1, the spec parser: good specs, and every bad-input path with its
message and its file:line:col location."""
import pytest

from derive.spec import Bin, Func, Num, Reduce, Ref, SpecError, Unary, parse
from spec_errors import FILE, col, expect_error

HEADER = "op f(A[s2, s1]) -> B[s2, s1]"


def error(text: str) -> SpecError:
    return expect_error(lambda t: parse(t, FILE), text)


def rhs_error(rhs_line: str) -> SpecError:
    """The error for a spec whose only equation (line 2) is ``rhs_line``."""
    e = error(HEADER + "\n" + rhs_line + "\n")
    assert e.line == 2
    return e


# ---- good specs ---------------------------------------------------------------------
GOOD = """\
# a leading comment
op attn(Q[z, i, d], K[z, j, d]; scale, bias)  ->  S[z, i, j]   # trailing comment

   # an indented comment
S[z, i, j] = scale * sum[d](Q * K) + bias   # with indices
T          = exp(-S) ** 2 / 3.5
U = max[j](T)
"""


def test_good_spec_parses():
    spec = parse(GOOD, "attn.op")
    assert spec.name == "attn"
    assert spec.file == "attn.op"
    assert spec.source == GOOD
    assert [(t.name, t.indices) for t in spec.inputs] == [("Q", ("z", "i", "d")), ("K", ("z", "j", "d"))]
    assert spec.params == ["scale", "bias"]
    assert (spec.output.name, spec.output.indices) == ("S", ("z", "i", "j"))
    assert spec.output.pos.line == 2 and spec.output.pos.col == col(GOOD.splitlines()[1], "S[")
    assert [e.target for e in spec.equations] == ["S", "T", "U"]
    assert spec.equations[0].indices == ("z", "i", "j")
    assert spec.equations[1].indices is None
    assert spec.equations[2].indices is None
    assert [e.pos.line for e in spec.equations] == [5, 6, 7]
    assert all(e.pos.col == 1 for e in spec.equations)


def test_good_spec_expression_trees():
    spec = parse(GOOD, "attn.op")
    s, t, u = (e.expr for e in spec.equations)
    # scale * sum[d](Q * K) + bias
    assert isinstance(s, Bin) and s.op == "+"
    assert isinstance(s.right, Ref) and s.right.name == "bias"
    mul = s.left
    assert isinstance(mul, Bin) and mul.op == "*" and mul.left == Ref("scale", mul.left.pos)
    red = mul.right
    assert isinstance(red, Reduce) and red.kind == "sum" and red.indices == ("d",)
    assert isinstance(red.arg, Bin) and red.arg.op == "*"
    assert [red.arg.left.name, red.arg.right.name] == ["Q", "K"]
    line5 = GOOD.splitlines()[4]
    assert red.pos.col == col(line5, "sum")
    assert red.arg.left.pos.col == col(line5, "Q *")
    assert s.right.pos.col == col(line5, "bias")
    # exp(-S) ** 2 / 3.5
    assert isinstance(t, Bin) and t.op == "/"
    assert isinstance(t.right, Num) and t.right.value == 3.5
    pw = t.left
    assert isinstance(pw, Bin) and pw.op == "**" and pw.right.value == 2
    assert isinstance(pw.left, Func) and pw.left.name == "exp"
    assert isinstance(pw.left.arg, Unary) and pw.left.arg.op == "-"
    assert pw.left.pos.col == col(GOOD.splitlines()[5], "exp")
    # max[j](T)
    assert isinstance(u, Reduce) and u.kind == "max" and u.indices == ("j",) and u.arg.name == "T"


def test_builtin_specs_parse():
    from derive.derivation import OPS_DIR, builtin_ops
    assert {"softmax", "max"} <= set(builtin_ops())
    for name in builtin_ops():
        spec = parse((OPS_DIR / f"{name}.op").read_text(), f"{name}.op")
        assert spec.name == name and spec.equations


def test_multi_index_reduction_and_indented_header():
    spec = parse("  op g(A[i, j, k]) -> B[i]   \n  B = sum[j, k](A)\n", FILE)
    assert spec.output.pos.col == col("  op g(A[i, j, k]) -> B[i]", "B[")
    assert spec.inputs[0].pos.col == 8
    red = spec.equations[0].expr
    assert red.indices == ("j", "k")
    assert spec.equations[0].pos.col == 3
    assert red.pos.col == col("  B = sum[j, k](A)", "sum")


def test_hash_in_comment_does_not_leak():
    spec = parse(HEADER + "\nB = A  # B = foo(A) [ ] $\n", FILE)
    assert isinstance(spec.equations[0].expr, Ref)


def test_params_only_after_semicolon():
    spec = parse("op f(A[i], C[i]; p) -> B[i]\nB = p * A + C\n", FILE)
    assert [t.name for t in spec.inputs] == ["A", "C"]
    assert spec.params == ["p"]


# ---- whole-file errors -----------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "\n\n", "   \n# only a comment\n"])
def test_empty_spec(text):
    e = error(text)
    assert "empty spec" in e.message
    assert (e.line, e.col) == (1, 1)


def test_equation_before_header():
    e = error("# comment\n  B = A\n" + HEADER + "\n")
    assert "header" in e.message and "first" in e.message
    assert (e.line, e.col) == (2, 3)


def test_second_op_header():
    text = HEADER + "\nB = A\n   op g(A[i]) -> C[i]\n"
    e = error(text)
    assert "second 'op' header" in e.message
    assert (e.line, e.col) == (3, 4)


def test_no_equations():
    e = error("# header only\n" + HEADER + "   # nothing else\n\n# still nothing\n")
    assert e.message == "op f has no equations"
    assert (e.line, e.col) == (2, col(HEADER, "B["))


# ---- header errors -----------------------------------------------------------------------
@pytest.mark.parametrize("header, token, fragment", [
    # missing '->'
    ("op f(A[s2, s1]) B[s2, s1]", "B[", "expected '->' and the output, found 'B'"),
    # missing ']'
    ("op f(A[s2, s1) -> B[s2]", ")", "expected ']' or ',', found ')'"),
    ("op f(A[s2, s1]) -> B[s2", None, "expected ']' or ',' but the header ended"),
    # missing '['
    ("op f(A) -> B[s2]", ")", "expected '[' and the indices of A, found ')'"),
    # no op name
    ("op (A[s2]) -> B[s2]", "(", "expected the op name, found '('"),
    # no '('
    ("op f A[s2] -> B[s2]", "A", "expected '(' and the op's inputs, found 'A'"),
    # empty parameter list after ';'
    ("op f(A[s2];) -> B[s2]", ")", "expected a parameter name, found ')'"),
    # no output
    ("op f(A[s2]) ->", None, "expected a tensor name but the header ended"),
    # trailing junk
    ("op f(A[s2]) -> B[s2] C", "C", "unexpected 'C' after the output"),
    # a character the header tokenizer does not know
    ("op f(A[s2]) -> B[s2] $", "$", "unexpected character '$' in op header"),
    # an index that is not a name
    ("op f(A[1]) -> B[s2]", "1", "expected an index name, found '1'"),
    ("op f(A[s2] = x) -> B[s2]", "x", "expected a number (the default value of A), found 'x'"),
    ("op f(A[s2]; p = q) -> B[s2]", "q", "expected a number (the default value of p, or eps for the dtype's "
                                         "machine epsilon), found 'q'"),
    ("op f(A[s2]) -> B[s2] = 1", "B", "the output B cannot have a default value"),
    ("op f(A[]) -> B[s2]", "]", "expected an index name, found ']'"),
])
def test_bad_header(header, token, fragment):
    e = error(header + "\nB = A\n")
    assert fragment in e.message
    assert e.line == 1
    expected = col(header, token) if token else len(header) + 1
    assert e.col == expected


def test_bad_header_after_comment_lines_reports_its_line():
    e = error("# one\n\n# three\nop f(A[s2, s1]) B[s2, s1]\nB = A\n")
    assert (e.line, e.col) == (4, col("op f(A[s2, s1]) B[s2, s1]", "B["))


def test_bad_header_indented_tokens_are_offset():
    header = "    op f(A[s2, s1]) B[s2, s1]"
    e = error(header + "\nB = A\n")
    assert (e.line, e.col) == (1, col(header, "B["))


# ---- equation errors -------------------------------------------------------------------
@pytest.mark.parametrize("line, token, fragment", [
    ("B = foo(A)", "foo", "unknown function 'foo'"),
    ("B = exp(A) + Foo(A)", "Foo", "unknown function 'Foo'"),
    ("B = sum(A)", "sum", "sum needs the indices it reduces"),
    ("B = max(A)", "max", "max needs the indices it reduces"),
    ("B = prod[s1](A)", "prod", "unknown reduction 'prod'"),
    ("B = exp(x=A)", "exp", "keyword arguments are not supported"),
    ("B = sum[s1](A, axis=0)", "sum", "keyword arguments are not supported"),
    ("B = A + 'a'", "'a'", "only numbers may appear as constants, not 'a'"),
    ('B = A * "s"', '"s"', "only numbers may appear as constants"),
    ("B = True * A", "True", "only numbers may appear as constants, not True"),
    ("B = A + False", "False", "only numbers may appear as constants, not False"),
    ("B = None", "None", "only numbers may appear as constants, not None"),
    ("B = exp", "exp", "exp is a function"),
    ("B = exp(A, A)", "exp", "exp takes exactly one argument, got 2"),
    ("B = sum[s1](A, A)", "sum", "sum[...] takes exactly one argument, got 2"),
    ("B = sum[1](A)", "1", "sum[...] takes index names"),
    ("B = A.T", "A.T", "unsupported syntax (Attribute)"),
    ("B = A if A else A", "A if", "unsupported syntax (IfExp)"),
    ("B = (A == A)", "A ==", "a comparison is a condition, not a value: use it in where(cond, a, b)"),
    ("B = [A]", "[", "unsupported syntax (List)"),
    ("B = A, A", "A, A", "unsupported syntax (Tuple)"),
    ("B = (lambda: A)()", "(lambda", "unsupported call"),
])
def test_bad_expression(line, token, fragment):
    e = rhs_error(line)
    assert fragment in e.message
    assert e.col == col(line, token)


@pytest.mark.parametrize("line, token", [
    ("B = A + * A", "*"),
    ("B = A A", "A", ),
    ("B = A )", ")"),
    ("B = exp(A", "("),
    ("B = A; C = A", ";"),
    ("B = A = A", "="),
])
def test_syntax_errors(line, token):
    e = rhs_error(line)
    assert e.message.startswith("syntax error")
    nth = 1 if (line, token) in {("B = A A", "A"), ("B = A = A", "=")} else 0
    assert e.col == col(line, token, nth)


def test_syntax_error_with_indentation_and_spaces():
    line = "   B[s2, s1]  =    A +* A"
    e = rhs_error(line)
    assert e.message.startswith("syntax error")
    assert e.col == col(line, "*")


@pytest.mark.parametrize("line", ["B =", "B =    ", "B[s2, s1] =", "B =   # comment only"])
def test_missing_right_hand_side(line):
    e = rhs_error(line)
    assert e.message == "the equation for B has no right-hand side"
    assert e.col == col(line, "=") + 1


@pytest.mark.parametrize("line", ["B == A", "= A", "B A", "1B = A", "B[s2 = A", "B.x = A"])
def test_not_an_equation(line):
    e = rhs_error(line)
    assert "expected an equation" in e.message
    assert e.col == 1


def test_bad_target_index_name():
    e = rhs_error("B[s2, 1x] = A")
    assert e.message == "bad index name '1x' in the indices of B"
    assert e.col in (col("B[s2, 1x] = A", "s2"), col("B[s2, 1x] = A", "1x"))


def test_bad_target_index_name_column_points_at_the_bad_index():
    line = "B[s2, 1x] = A"
    assert rhs_error(line).col == col(line, "1x")


def test_bad_header_character_indented_column():
    header = "    op f(A[s2]) -> B[s2] $"
    e = error(header + "\nB = A\n")
    assert "unexpected character '$'" in e.message
    assert e.col == col(header, "$")


def test_column_after_non_ascii_name():
    line = "B = \u00e9 + foo(A)"
    e = rhs_error(line)
    assert "unknown function 'foo'" in e.message
    assert e.col == col(line, "foo")


def test_error_lines_count_comments_and_blank_lines():
    text = "# c\n\n" + HEADER + "\n# c\n\nE = exp(A)\n\n  B = foo(E)  # the bad one\n"
    e = error(text)
    assert (e.line, e.col) == (8, 7)
    assert str(e).startswith("t.op:8:7: unknown function 'foo'")


# ---- user text is never evaluated ---------------------------------------------------------
@pytest.mark.parametrize("rhs, fragment", [
    ("__import__('os').system('echo hi')", "unsupported"),
    ("__import__('os')", "unknown function"),
    ("eval('1')", "unknown function"),
    ("exec('x = 1')", "unknown function"),
    ("open('/etc/passwd').read()", "unsupported"),
    ("A.__class__", "unsupported"),
    ("().__class__.__bases__[0].__subclasses__()", "unsupported"),
    ("[x for x in A]", "unsupported"),
    ("(x := A)", "unsupported syntax (NamedExpr)"),
    ("lambda: A", "unsupported"),
    ("f'{A}'", "unsupported"),
])
def test_parser_never_evaluates(rhs, fragment, capfd, monkeypatch):
    import builtins

    def boom(*a, **k):  # pragma: no cover - must never run
        raise AssertionError("user text was evaluated")

    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    line = "B = " + rhs
    e = rhs_error(line)
    assert fragment in e.message
    assert e.col == (col(line, "x :=") if ":=" in rhs else 5)
    out, err = capfd.readouterr()
    assert "hi" not in out and "hi" not in err


def test_import_in_header_is_rejected():
    header = "op f(A[s2]) -> B[s2]; __import__('os').system('echo hi')"
    e = error(header + "\nB = A\n")
    assert e.line == 1
    assert e.message == "unexpected character \"'\" in op header"
    assert e.col == col(header, "'")


def test_use_site_indices_must_be_names():
    with pytest.raises(SpecError, match=r"A\[\.\.\.\] takes index names") as e:
        parse("op f(A[s2, s1]) -> B[s2, s1]\nB = A[s2, 1]\n", "t.op")
    assert (e.value.line, e.value.col) == (2, 11)


@pytest.mark.parametrize("header,token,fragment", [
    ("op f(A[s2]: float) -> B[s2]", "float", "unknown type 'float' for A; an input is float (the default) or int"),
    ("op f(A[s2]) -> B[s2]: int", "int", "the output B cannot be an integer tensor"),
])
def test_bad_integer_declarations(header, token, fragment):
    with pytest.raises(SpecError) as e:
        parse(header + "\nB = A\n", "t.op")
    assert fragment in e.value.message and e.value.col == header.index(token) + 1
