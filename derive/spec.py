"""Stage 1: parse spec text (``.op`` files) into a small syntax tree.

The notation, one statement per line (``#`` starts a comment)::

    op softmax(A[s2, s1]) -> B[s2, s1]
    M[s2]     = max[s1](A)
    E[s2, s1] = exp(A - M)
    Z[s2]     = sum[s1](E)
    B[s2, s1] = E / Z

The header names the op, its tensor inputs with their index sets, scalar
parameters after a ``;`` and the output tensor.  Each equation defines one
named tensor; its ``[indices]`` may be left out and are then inferred.
Tensors are referred to by name (their indices come from their declaration)
or with their index sets renamed at that use (``X[n, q]``, for a tensor used
twice with different indices, as in ``X^T X``),
``sum[i, ...](x)``, ``mean[i, ...](x)`` and ``max[i](x)`` reduce over index sets, and ``exp``,
``log``, ``sqrt``, ``tanh``, ``+ - * / **`` and numbers build expressions.

The right-hand sides are parsed with Python's ``ast`` and checked against a
whitelist of node types: user text is never evaluated.  Every error is a
:class:`SpecError` that names the file, line and column.
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

FUNCTIONS = ("exp", "log", "sqrt", "tanh")
BINARY_FUNCTIONS = ("maximum", "minimum")  # elementwise, as torch.maximum / torch.minimum
REDUCTIONS = ("sum", "mean", "max")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class SpecError(ValueError):
    """A problem in spec text, located at ``file:line:col``."""

    def __init__(self, message: str, file: str = "<spec>", line: int = 0, col: int = 0):
        self.message, self.file, self.line, self.col = message, file, line, col
        super().__init__(f"{file}:{line}:{col}: {message}")


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


# ---- expression nodes -------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: int | float
    pos: Pos


@dataclass(frozen=True)
class Ref:
    name: str
    pos: Pos
    indices: tuple[str, ...] | None = None  # X[a, b]: X with its index sets renamed at this use


@dataclass(frozen=True)
class Unary:
    op: str  # "-" or "+"
    operand: object
    pos: Pos


@dataclass(frozen=True)
class Bin:
    op: str  # + - * / **
    left: object
    right: object
    pos: Pos


@dataclass(frozen=True)
class Func:
    name: str  # one of FUNCTIONS
    arg: object
    pos: Pos


@dataclass(frozen=True)
class Reduce:
    kind: str  # "sum", "mean" or "max"
    indices: tuple[str, ...]
    arg: object
    pos: Pos


# ---- statements -------------------------------------------------------------
@dataclass(frozen=True)
class TensorDecl:
    name: str
    indices: tuple[str, ...]
    pos: Pos
    default: float | None = None  # an optional input: None at the call means this constant


@dataclass(frozen=True)
class ParamDecl:
    name: str
    pos: Pos
    default: float | str | None = None  # a number, "eps" (the dtype's machine epsilon) or None (required)


@dataclass(frozen=True)
class Equation:
    target: str
    indices: tuple[str, ...] | None  # None: inferred from the right-hand side
    expr: object
    pos: Pos


@dataclass
class OpSpec:
    name: str
    inputs: list[TensorDecl]
    params: list[str]
    output: TensorDecl
    equations: list[Equation] = field(default_factory=list)
    file: str = "<spec>"
    source: str = ""
    param_decls: list[ParamDecl] = field(default_factory=list)
    name_pos: Pos = Pos(0, 0)  # where the op name stands in the header


# ---- header tokenizer ---------------------------------------------------------
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<arrow>->)"
                    r"|(?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<punct>[\[\](),;=]))")


class _Header:
    """Recursive-descent reader for ``op name(T[i, j], ...; p, ...) -> O[i, j]``."""

    def __init__(self, text: str, file: str, line: int, offset: int = 0):
        self.file, self.line = file, line
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m:
                col = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
                raise SpecError(f"unexpected character {text[col - 1]!r} in op header", file, line, col + offset)
            kind = m.lastgroup
            start = m.start(kind) + 1
            self.tokens.append((kind, m.group(kind), start))
            pos = m.end()
        self.i = 0
        self.end_col = len(text.rstrip()) + 1

    def peek(self) -> tuple[str, str, int] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expect(self, value: str | None = None, kind: str | None = None, what: str = "") -> tuple[str, str, int]:
        tok = self.peek()
        want = what or repr(value)
        if tok is None:
            raise SpecError(f"expected {want} but the header ended", self.file, self.line, self.end_col)
        if (value is not None and tok[1] != value) or (kind is not None and tok[0] != kind):
            raise SpecError(f"expected {want}, found {tok[1]!r}", self.file, self.line, tok[2])
        self.i += 1
        return tok

    def tensor(self) -> TensorDecl:
        _, name, col = self.expect(kind="name", what="a tensor name")
        self.expect("[", what=f"'[' and the indices of {name}")
        indices = [self.expect(kind="name", what="an index name")[1]]
        while self.peek() and self.peek()[1] == ",":
            self.i += 1
            indices.append(self.expect(kind="name", what="an index name")[1])
        self.expect("]", what="']' or ','")
        default = None
        if self.peek() and self.peek()[1] == "=":
            self.i += 1
            default = self.number(f"the default value of {name}")
        return TensorDecl(name, tuple(indices), Pos(self.line, col), default)

    def number(self, what: str) -> float:
        _, text, col = self.expect(kind="num", what=f"a number ({what})")
        value = float(text)
        if not math.isfinite(value):
            raise SpecError(f"{what} must be a finite number, got {text}", self.file, self.line, col)
        return value

    def param(self) -> ParamDecl:
        _, name, col = self.expect(kind="name", what="a parameter name")
        default = None
        if self.peek() and self.peek()[1] == "=":
            self.i += 1
            tok = self.peek()
            if tok is not None and tok[1] == "eps":
                self.i += 1
                default = "eps"
            else:
                default = self.number(f"the default value of {name}, or eps for the dtype's machine epsilon")
        return ParamDecl(name, Pos(self.line, col), default)


def _parse_header(text: str, offset: int, file: str, line: int) -> OpSpec:
    h = _Header(text, file, line, offset)
    h.tokens = [(k, v, c + offset) for k, v, c in h.tokens]
    h.end_col += offset
    h.expect("op")
    _, name, name_col = h.expect(kind="name", what="the op name")
    h.expect("(", what="'(' and the op's inputs")
    inputs = [h.tensor()]
    params: list[ParamDecl] = []
    while h.peek() and h.peek()[1] == ",":
        h.i += 1
        inputs.append(h.tensor())
    if h.peek() and h.peek()[1] == ";":
        h.i += 1
        params.append(h.param())
        while h.peek() and h.peek()[1] == ",":
            h.i += 1
            params.append(h.param())
    h.expect(")", what="')'")
    h.expect("->", what="'->' and the output")
    output = h.tensor()
    if output.default is not None:
        raise SpecError(f"the output {output.name} cannot have a default value", file, line, output.pos.col)
    if h.peek() is not None:
        tok = h.peek()
        raise SpecError(f"unexpected {tok[1]!r} after the output", file, line, tok[2])
    return OpSpec(name=name, inputs=inputs, params=[q.name for q in params], output=output, file=file,
                  param_decls=params, name_pos=Pos(line, name_col))


# ---- expressions through a whitelisted ast ----------------------------------
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_UNARY = {ast.USub: "-", ast.UAdd: "+"}


class _Expr:
    def __init__(self, file: str, line: int, offset: int, source: str):
        self.file, self.line, self.offset = file, line, offset
        self.source = source.encode()

    def column(self, node: ast.AST) -> int:
        """1-based character column (ast counts UTF-8 bytes)."""
        byte = getattr(node, "col_offset", 0)
        return self.offset + len(self.source[:byte].decode(errors="replace")) + 1

    def err(self, msg: str, node: ast.AST) -> SpecError:
        return SpecError(msg, self.file, self.line, self.column(node))

    def pos(self, node: ast.AST) -> Pos:
        return Pos(self.line, self.column(node))

    def convert(self, node: ast.AST):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return Bin(_BINOPS[type(node.op)], self.convert(node.left), self.convert(node.right), self.pos(node))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return Unary(_UNARY[type(node.op)], self.convert(node.operand), self.pos(node))
        if isinstance(node, ast.Constant):
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.err(f"only numbers may appear as constants, not {node.value!r}", node)
            return Num(node.value, self.pos(node))
        if isinstance(node, ast.Name):
            if node.id in FUNCTIONS or node.id in BINARY_FUNCTIONS or node.id in REDUCTIONS:
                raise self.err(f"{node.id} is a function: call it, e.g. {node.id}(x)", node)
            return Ref(node.id, self.pos(node))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Subscript):
            if not isinstance(node.value, ast.Name):
                raise self.err("only a tensor name may be indexed, as in X[i, j]", node)
            sl = node.slice
            elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
            for e in elts:
                if not isinstance(e, ast.Name):
                    raise self.err(f"{node.value.id}[...] takes index names, as in {node.value.id}[i, j]", e)
            return Ref(node.value.id, self.pos(node), tuple(e.id for e in elts))
        raise self.err(f"unsupported syntax ({type(node).__name__}); expected numbers, names, + - * / **, "
                       f"{', '.join(FUNCTIONS)}, sum[...](...) or max[...](...)", node)

    def call(self, node: ast.Call):
        if node.keywords:
            raise self.err("keyword arguments are not supported", node)
        func = node.func
        if isinstance(func, ast.Subscript) and isinstance(func.value, ast.Name):
            kind = func.value.id
            if kind not in REDUCTIONS:
                raise self.err(f"unknown reduction {kind!r}; expected one of {', '.join(REDUCTIONS)}", func)
            sl = func.slice
            elts = sl.elts if isinstance(sl, ast.Tuple) else [sl]
            indices = []
            for e in elts:
                if not isinstance(e, ast.Name):
                    raise self.err(f"{kind}[...] takes index names", e)
                indices.append(e.id)
            if len(node.args) != 1:
                raise self.err(f"{kind}[...] takes exactly one argument, got {len(node.args)}", node)
            return Reduce(kind, tuple(indices), self.convert(node.args[0]), self.pos(node))
        if isinstance(func, ast.Name):
            if func.id in REDUCTIONS:
                raise self.err(f"{func.id} needs the indices it reduces: {func.id}[i](x)", func)
            if func.id in BINARY_FUNCTIONS:
                if len(node.args) != 2:
                    raise self.err(f"{func.id} takes exactly two arguments, got {len(node.args)}", node)
                return Bin(func.id, self.convert(node.args[0]), self.convert(node.args[1]), self.pos(node))
            if func.id not in FUNCTIONS:
                raise self.err(f"unknown function {func.id!r}; known: {', '.join(FUNCTIONS + BINARY_FUNCTIONS)}",
                               func)
            if len(node.args) != 1:
                raise self.err(f"{func.id} takes exactly one argument, got {len(node.args)}", node)
            return Func(func.id, self.convert(node.args[0]), self.pos(node))
        raise self.err("unsupported call", node)


def _parse_equation(text: str, file: str, line: int) -> Equation:
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\[[^\]]*\])?\s*=(?!=)", text)
    if not m:
        col = len(text) - len(text.lstrip()) + 1
        raise SpecError("expected an equation 'Name[indices] = expression' or 'Name = expression'", file, line, col)
    target = m.group(1)
    indices = None
    if m.group(2) is not None:
        inner = m.group(2)[1:-1]
        parts, start = [], m.start(2) + 1
        for raw in inner.split(","):
            p = raw.strip()
            if not _NAME.fullmatch(p):
                where = start + (len(raw) - len(raw.lstrip())) + 1
                raise SpecError(f"bad index name {p!r} in the indices of {target}", file, line, where)
            parts.append(p)
            start += len(raw) + 1
        indices = tuple(parts)
    rhs = text[m.end():]
    stripped = rhs.lstrip()
    if not stripped.strip():
        raise SpecError(f"the equation for {target} has no right-hand side", file, line, m.end() + 1)
    offset = m.end() + (len(rhs) - len(stripped))
    try:
        tree = ast.parse(stripped.rstrip(), mode="eval")
    except SyntaxError as e:
        raise SpecError(f"syntax error: {e.msg}", file, line, offset + (e.offset or 1)) from None
    expr = _Expr(file, line, offset, stripped).convert(tree.body)
    return Equation(target, indices, expr, Pos(line, m.start(1) + 1))


def parse(text: str, file: str = "<spec>") -> OpSpec:
    """Parse the text of one ``.op`` spec."""
    spec: OpSpec | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        code = raw.split("#", 1)[0].rstrip()
        if not code.strip():
            continue
        stripped = code.lstrip()
        if re.match(r"op\b", stripped):
            if spec is not None:
                raise SpecError("a spec file holds one op; found a second 'op' header", file, lineno,
                                len(code) - len(stripped) + 1)
            spec = _parse_header(stripped, len(code) - len(stripped), file, lineno)
            continue
        if spec is None:
            raise SpecError("expected the op header 'op name(T[i, j]) -> O[i, j]' first", file, lineno,
                            len(code) - len(stripped) + 1)
        spec.equations.append(_parse_equation(code, file, lineno))
    if spec is None:
        raise SpecError("empty spec: expected an op header 'op name(T[i, j]) -> O[i, j]'", file, 1, 1)
    if not spec.equations:
        raise SpecError(f"op {spec.name} has no equations", file, spec.output.pos.line, spec.output.pos.col)
    spec.source = text
    return spec
