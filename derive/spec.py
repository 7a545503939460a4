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

A spec is held to the limits below, checked on the text and its tokens
*before* anything recursive (``ast.parse`` included) sees it, so that no input
can exhaust the stack, hang or take the interpreter's digit limit; each
limit is far above what a real op needs (softmax has 4 equations, 2 index
names, depth 2).
"""
from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field

FUNCTIONS = ("exp", "log", "sqrt", "tanh")
BINARY_FUNCTIONS = ("maximum", "minimum")  # elementwise, as torch.maximum / torch.minimum
REDUCTIONS = ("sum", "mean", "max")
CONDITIONAL = "where"        # where(cond, a, b): a where cond holds, else b
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# ---- limits (each a located SpecError when exceeded; README lists them) ----------------
MAX_BYTES = 64 * 1024        # size of a spec file, in bytes of UTF-8
MAX_EQUATIONS = 64           # equations in one spec (the engine's time grows faster than linearly)
MAX_HEADER_ARGS = 64         # inputs plus parameters in the header
MAX_INDEX_NAMES = 64         # distinct index names in one spec
MAX_DEPTH = 32               # nesting of parentheses, calls and brackets in one right-hand side
MAX_TOKENS = 512             # names, numbers and operators in one right-hand side
MAX_MAGNITUDE = 1e38         # |number|, as written or as constants fold (float32 holds up to 3.4e38)
MAX_EXPONENT = 64            # |n| of a numeric exponent, x ** n


class SpecError(ValueError):
    """A problem in spec text, located at ``file:line:col``."""

    def __init__(self, message: str, file: str = "<spec>", line: int = 0, col: int = 0):
        self.message, self.file, self.line, self.col = message, file, line, col
        super().__init__(f"{file}:{line}:{col}: {message}")


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


def _line_col(data: bytes, at: int) -> tuple[int, int]:
    """1-based line and character column of byte offset ``at``."""
    start = data.rfind(b"\n", 0, at) + 1
    return data.count(b"\n", 0, at) + 1, len(data[start:at].decode("utf-8", errors="replace")) + 1


def decode(data: bytes, file: str = "<spec>") -> str:
    """The text of a spec file's bytes: at most MAX_BYTES, UTF-8 (a byte-order mark is dropped)."""
    if len(data) > MAX_BYTES:
        line, col = _line_col(data, MAX_BYTES)
        raise SpecError(f"the spec is too large: {len(data)} bytes; a spec holds at most {MAX_BYTES} bytes",
                        file, line, col)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(data, e.start)
        raise SpecError(f"the spec is not UTF-8 text: byte 0x{data[e.start]:02x} cannot be decoded", file,
                        line, col) from None
    return text[1:] if text.startswith("\ufeff") else text


# control characters (a tab and the line ends \r\n aside), Unicode line separators, lone surrogates
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _check_text(text: str, file: str) -> list[str]:
    """Size and characters of the whole text, before any line is parsed; returns its lines
    (split at \\n only, as editors count them; a \\r before it is dropped)."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        line, col = _line_col(text.encode("utf-8", errors="surrogatepass"), MAX_BYTES)
        raise SpecError(f"the spec is too large: {size} bytes; a spec holds at most {MAX_BYTES} bytes",
                        file, line, col)
    lines = [raw[:-1] if raw.endswith("\r") else raw for raw in text.split("\n")]
    for lineno, raw in enumerate(lines, start=1):
        m = _CONTROL.search(raw)
        if m is not None:
            raise SpecError(f"unexpected character U+{ord(m.group()):04X}: a spec is plain text, without control "
                            f"characters", file, lineno, m.start() + 1)
    return lines


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
class Cmp:
    op: str  # == != < <= > >=
    left: object
    right: object
    pos: Pos


@dataclass(frozen=True)
class Logic:
    op: str  # "and", "or" or "not" (one operand)
    args: tuple
    pos: Pos


@dataclass(frozen=True)
class Where:
    cond: object  # a Cmp or Logic
    then: object
    other: object
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
    dtype: str = "float"          # "int": integer values (class targets), used to select, never differentiated


@dataclass(frozen=True)
class ParamDecl:
    name: str
    pos: Pos
    default: float | int | str | None = None  # a number, "eps" (the dtype's machine epsilon) or None (required)
    dtype: str = "float"                       # "int": an integer parameter (ignore_index: int = -100)


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
    outputs: list[TensorDecl] = field(default_factory=list)  # all outputs (``output`` is the first)
    # ``-> reduction{mean: loss, sum: total, none: nll[r]}``: the caller picks one output by a keyword
    # (the parameter's name), whose values are the keys (the first is the default)
    choice: tuple[str, tuple[tuple[str, str], ...]] | None = None  # (keyword, ((value, output), ...))

    def __post_init__(self):
        if not self.outputs:
            self.outputs = [self.output]


def _short(text: str, n: int = 24) -> str:
    """User text shortened for a message (a number may be thousands of digits long)."""
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} characters)"


class _IndexNames:
    """Counts the distinct index names of a spec (MAX_INDEX_NAMES)."""

    def __init__(self, file: str):
        self.file, self.seen = file, set()

    def add(self, name: str, line: int, col: int):
        if name not in self.seen:
            self.seen.add(name)
            if len(self.seen) > MAX_INDEX_NAMES:
                raise SpecError(f"too many index names: a spec uses at most {MAX_INDEX_NAMES}", self.file, line, col)


# ---- header tokenizer ---------------------------------------------------------
_SPACE = re.compile(r"\s*")
_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<arrow>->)"
                    r"|(?P<num>-?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<punct>[\[\](){},;=:]))")


class _Header:
    """Recursive-descent reader for ``op name(T[i, j], ...; p, ...) -> O[i, j]``."""

    def __init__(self, text: str, file: str, line: int, offset: int = 0, indices: _IndexNames | None = None):
        self.file, self.line = file, line
        self.tokens: list[tuple[str, str, int]] = []
        self.indices = indices if indices is not None else _IndexNames(file)
        pos = 0
        while True:  # one linear pass: each token is matched once
            pos = _SPACE.match(text, pos).end()
            if pos >= len(text):
                break
            m = _TOKEN.match(text, pos)
            if not m:
                raise SpecError(f"unexpected character {text[pos]!r} in op header", file, line, pos + 1 + offset)
            kind = m.lastgroup
            start = m.start(kind) + 1
            self.tokens.append((kind, m.group(kind), start))
            pos = m.end()
        self.i = 0
        self.args = 0
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

    def count_arg(self, col: int):
        self.args += 1
        if self.args > MAX_HEADER_ARGS:
            raise SpecError(f"too many inputs and parameters: an op takes at most {MAX_HEADER_ARGS}",
                            self.file, self.line, col)

    def index(self) -> str:
        _, name, col = self.expect(kind="name", what="an index name")
        self.indices.add(name, self.line, col)
        return name

    def tensor(self, output: bool = False) -> TensorDecl:
        _, name, col = self.expect(kind="name", what="a tensor name")
        if not output:
            self.count_arg(col)
        indices = []
        if output and not (self.peek() and self.peek()[1] == "["):
            pass  # an output with no indices: a scalar (a loss summed or averaged over the rows)
        else:
            self.expect("[", what=f"'[' and the indices of {name}")
            indices.append(self.index())
            while self.peek() and self.peek()[1] == ",":
                self.i += 1
                indices.append(self.index())
            self.expect("]", what="']' or ','")
        dtype = "float"
        if self.peek() and self.peek()[1] == ":":  # an integer input: target[r]: int
            self.i += 1
            tok = self.expect(kind="name", what="'int' (the only type an input can declare)")
            if tok[1] != "int":
                raise SpecError(f"unknown type {tok[1]!r} for {name}; an input is float (the default) or int",
                                self.file, self.line, tok[2])
            if output:
                raise SpecError(f"the output {name} cannot be an integer tensor", self.file, self.line, tok[2])
            dtype = "int"
        default = None
        if self.peek() and self.peek()[1] == "=":
            self.i += 1
            default = self.number(f"the default value of {name}")
        return TensorDecl(name, tuple(indices), Pos(self.line, col), default, dtype)

    def number(self, what: str) -> float:
        _, text, col = self.expect(kind="num", what=f"a number ({what})")
        value = float(text)
        if not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise SpecError(f"{what} must be a finite number of magnitude at most {MAX_MAGNITUDE:g}, "
                            f"got {_short(text)}", self.file, self.line, col)
        return value

    def param(self) -> ParamDecl:
        _, name, col = self.expect(kind="name", what="a parameter name")
        self.count_arg(col)
        dtype = "float"
        if self.peek() and self.peek()[1] == ":":  # an integer parameter: ignore_index: int = -100
            self.i += 1
            tok = self.expect(kind="name", what="'int' (the only type a parameter can declare)")
            if tok[1] != "int":
                raise SpecError(f"unknown type {tok[1]!r} for {name}; a parameter is float (the default) or int",
                                self.file, self.line, tok[2])
            dtype = "int"
        default = None
        if self.peek() and self.peek()[1] == "=":
            self.i += 1
            tok = self.peek()
            if tok is not None and tok[1] == "eps" and dtype == "float":
                self.i += 1
                default = "eps"
            elif dtype == "int":
                _, text, at = self.expect(kind="num", what=f"an integer (the default value of {name})")
                if not re.fullmatch(r"-?\d{1,18}", text):
                    raise SpecError(f"the default value of the integer parameter {name} must be an integer of at "
                                    f"most 18 digits, got {_short(text)}", self.file, self.line, at)
                default = int(text)
            else:
                default = self.number(f"the default value of {name}, or eps for the dtype's machine epsilon")
        return ParamDecl(name, Pos(self.line, col), default, dtype)


def _parse_header(text: str, offset: int, file: str, line: int, indices: _IndexNames | None = None) -> OpSpec:
    h = _Header(text, file, line, offset, indices)
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
    choice = None
    if h.peek() and h.peek()[0] == "name" and h.i + 1 < len(h.tokens) and h.tokens[h.i + 1][1] == "{":
        # one output chosen by the caller: -> reduction{mean: loss, sum: total, none: nll[r]}
        _, key_name, key_col = h.expect(kind="name")
        h.i += 1
        keys, outputs = [], []
        while True:
            _, key, at = h.expect(kind="name", what=f"a value of {key_name} (a name, as in mean: loss)")
            if key in keys:
                raise SpecError(f"{key_name} lists {key} twice", file, line, at)
            keys.append(key)
            h.expect(":", what=f"':' and the output {key_name} = {key!r} returns")
            outputs.append(h.tensor(output=True))
            if h.peek() and h.peek()[1] == ",":
                h.i += 1
                continue
            h.expect("}", what="'}' or ','")
            break
        if key_name in [q.name for q in params] or key_name in [t.name for t in inputs]:
            raise SpecError(f"{key_name} names an input or parameter already; the output choice needs its own "
                            f"name", file, line, key_col)
        choice = (key_name, tuple((k, o.name) for k, o in zip(keys, outputs)))
    elif h.peek() and h.peek()[1] == "(":  # several outputs: -> (Y[r, c], L[r])
        h.i += 1
        outputs = [h.tensor(output=True)]
        while h.peek() and h.peek()[1] == ",":
            h.i += 1
            outputs.append(h.tensor(output=True))
        h.expect(")", what="')' or ',' after the outputs")
    else:
        outputs = [h.tensor(output=True)]
    seen: set[str] = set()
    if choice is not None:  # the same output may stand for several keys
        outputs = [o for k, o in enumerate(outputs) if o.name not in [q.name for q in outputs[:k]]]
    for output in outputs:
        if output.default is not None:
            raise SpecError(f"the output {output.name} cannot have a default value", file, line, output.pos.col)
        if output.name in seen:
            raise SpecError(f"the output {output.name} is listed twice", file, line, output.pos.col)
        seen.add(output.name)
    if h.peek() is not None:
        tok = h.peek()
        raise SpecError(f"unexpected {tok[1]!r} after the output", file, line, tok[2])
    return OpSpec(name=name, inputs=inputs, params=[q.name for q in params], output=outputs[0], file=file,
                  param_decls=params, name_pos=Pos(line, name_col), outputs=outputs, choice=choice)


# ---- expressions through a whitelisted ast ----------------------------------
_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.Pow: "**"}
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">="}
_CONDITIONS = (Cmp, Logic)
_UNARY = {ast.USub: "-", ast.UAdd: "+"}


# One token of a right-hand side, for the checks made before ``ast.parse``.
_RHS_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<num>(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d[\d_]*)?[jJ]?)
  | (?P<name>[^\W\d]\w*)
  | (?P<str>'[^']*'?|"[^"]*"?)
  | (?P<open>[(\[{])
  | (?P<close>[)\]}])
  | (?P<op>\*\*|//|.)
""", re.VERBOSE)


def _scan(text: str, file: str, line: int, offset: int, target: str):
    """Check a right-hand side's size, nesting and numbers on its tokens (one
    linear pass, no recursion), so that ``ast.parse`` and the recursive stages
    after it only ever see bounded trees: the depth of the tree is at most the
    number of tokens."""
    depth, tokens = 0, 0
    for m in _RHS_TOKEN.finditer(text):
        kind, col = m.lastgroup, offset + m.start() + 1
        if kind == "space":
            continue
        tokens += 1
        if tokens > MAX_TOKENS:
            raise SpecError(f"the right-hand side of {target} is too long: more than {MAX_TOKENS} names, numbers "
                            f"and operators; split it into several equations", file, line, col)
        if kind == "open":
            depth += 1
            if depth > MAX_DEPTH:
                raise SpecError(f"the right-hand side of {target} nests too deeply: more than {MAX_DEPTH} levels "
                                f"of parentheses, calls or brackets; name the inner parts in equations of their "
                                f"own", file, line, col)
        elif kind == "close":
            depth = max(depth - 1, 0)
        elif kind == "num" and not m.group().lower().endswith("j"):
            try:
                value = float(m.group().replace("_", ""))  # float() has no digit limit, int() has
            except ValueError:
                continue  # ast.parse reports it
            if not abs(value) <= MAX_MAGNITUDE:
                raise SpecError(f"the number {_short(m.group())} is too large: numbers are at most "
                                f"{MAX_MAGNITUDE:g} in magnitude (kernels compute in float32)", file, line, col)


class _Expr:
    def __init__(self, file: str, line: int, offset: int, source: str, indices: _IndexNames | None = None):
        self.file, self.line, self.offset = file, line, offset
        self.source = source.encode()
        self.indices = indices if indices is not None else _IndexNames(file)

    def index_names(self, elts) -> None:
        for e in elts:
            self.indices.add(e.id, self.line, self.column(e))

    def column(self, node: ast.AST) -> int:
        """1-based character column (ast counts UTF-8 bytes)."""
        byte = getattr(node, "col_offset", 0)
        return self.offset + len(self.source[:byte].decode(errors="replace")) + 1

    def err(self, msg: str, node: ast.AST) -> SpecError:
        return SpecError(msg, self.file, self.line, self.column(node))

    def pos(self, node: ast.AST) -> Pos:
        return Pos(self.line, self.column(node))

    def convert(self, node: ast.AST):
        """A value: a condition stands only as where's first argument."""
        out = self.any(node)
        if isinstance(out, _CONDITIONS):
            raise self.err("a comparison is a condition, not a value: use it in where(cond, a, b), e.g. "
                           "where(t != k, 1, 0)", node)
        return out

    def condition(self, node: ast.AST):
        """A condition: comparisons joined by and / or / not."""
        if isinstance(node, ast.BoolOp):
            return Logic("and" if isinstance(node.op, ast.And) else "or",
                         tuple(self.condition(v) for v in node.values), self.pos(node))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return Logic("not", (self.condition(node.operand),), self.pos(node))
        if isinstance(node, ast.Compare):
            parts, left = [], self.convert(node.left)
            for op, right_node in zip(node.ops, node.comparators):
                if type(op) not in _COMPARE:
                    raise self.err(f"unsupported comparison ({type(op).__name__}); expected "
                                   f"{' '.join(_COMPARE.values())}", node)
                right = self.convert(right_node)
                parts.append(Cmp(_COMPARE[type(op)], left, right, self.pos(node)))
                left = right
            return parts[0] if len(parts) == 1 else Logic("and", tuple(parts), self.pos(node))  # a < b < c
        raise self.err("expected a condition: a comparison (== != < <= > >=), joined by and / or / not", node)

    def any(self, node: ast.AST):
        if isinstance(node, (ast.Compare, ast.BoolOp)) or (isinstance(node, ast.UnaryOp)
                                                          and isinstance(node.op, ast.Not)):
            return self.condition(node)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return Bin(_BINOPS[type(node.op)], self.convert(node.left), self.convert(node.right), self.pos(node))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return Unary(_UNARY[type(node.op)], self.convert(node.operand), self.pos(node))
        if isinstance(node, ast.Constant):
            if isinstance(node.value, complex):
                raise self.err("complex numbers are not supported: constants are real numbers", node)
            if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
                raise self.err(f"only numbers may appear as constants, not {_short(repr(node.value))}", node)
            if not abs(node.value) <= MAX_MAGNITUDE:  # 0x... literals pass the token check
                raise self.err(f"a number is too large: numbers are at most {MAX_MAGNITUDE:g} in magnitude "
                               f"(kernels compute in float32)", node)
            return Num(node.value, self.pos(node))
        if isinstance(node, ast.Name):
            if node.id in FUNCTIONS or node.id in BINARY_FUNCTIONS or node.id in REDUCTIONS or node.id == CONDITIONAL:
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
            self.index_names(elts)
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
            self.index_names(elts)
            if len(node.args) != 1:
                raise self.err(f"{kind}[...] takes exactly one argument, got {len(node.args)}", node)
            return Reduce(kind, tuple(indices), self.convert(node.args[0]), self.pos(node))
        if isinstance(func, ast.Name):
            if func.id in REDUCTIONS:
                raise self.err(f"{func.id} needs the indices it reduces: {func.id}[i](x)", func)
            if func.id == CONDITIONAL:
                if len(node.args) != 3:
                    raise self.err(f"where takes exactly three arguments (cond, a, b), got {len(node.args)}", node)
                return Where(self.condition(node.args[0]), self.convert(node.args[1]), self.convert(node.args[2]),
                             self.pos(node))
            if func.id in BINARY_FUNCTIONS:
                if len(node.args) != 2:
                    raise self.err(f"{func.id} takes exactly two arguments, got {len(node.args)}", node)
                return Bin(func.id, self.convert(node.args[0]), self.convert(node.args[1]), self.pos(node))
            if func.id not in FUNCTIONS:
                raise self.err(f"unknown function {func.id!r}; known: "
                               f"{', '.join(FUNCTIONS + BINARY_FUNCTIONS + (CONDITIONAL,))}",
                               func)
            if len(node.args) != 1:
                raise self.err(f"{func.id} takes exactly one argument, got {len(node.args)}", node)
            return Func(func.id, self.convert(node.args[0]), self.pos(node))
        if isinstance(func, ast.Attribute):
            raise self.err(self.method_hint(func, node.args), func)
        raise self.err("unsupported call", node)

    @staticmethod
    def method_hint(func: ast.Attribute, args) -> str:
        """What to write instead of a method call such as ``A.sum(s1)``."""
        what = func.value.id if isinstance(func.value, ast.Name) else "x"
        names = [a.id for a in args if isinstance(a, ast.Name)] or ["i"]
        if func.attr in REDUCTIONS:
            return (f"methods are not supported: write {func.attr}[{', '.join(names)}]({what}) "
                    f"instead of {what}.{func.attr}(...)")
        if func.attr in FUNCTIONS:
            return f"methods are not supported: write {func.attr}({what}) instead of {what}.{func.attr}()"
        if func.attr in BINARY_FUNCTIONS:
            return (f"methods are not supported: write {func.attr}({what}, y) instead of "
                    f"{what}.{func.attr}(y)")
        return (f"unsupported call of {func.attr!r}: expected {', '.join(FUNCTIONS + BINARY_FUNCTIONS)} "
                f"or {', '.join(r + '[...]' for r in REDUCTIONS)}")


def _parse_equation(text: str, file: str, line: int, indices_seen: _IndexNames | None = None) -> Equation:
    indices_seen = indices_seen if indices_seen is not None else _IndexNames(file)
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
                raise SpecError(f"bad index name {_short(p)!r} in the indices of {target}", file, line, where)
            indices_seen.add(p, line, start + (len(raw) - len(raw.lstrip())) + 1)
            parts.append(p)
            start += len(raw) + 1
        indices = tuple(parts)
    rhs = text[m.end():]
    stripped = rhs.lstrip()
    if not stripped.strip():
        raise SpecError(f"the equation for {target} has no right-hand side", file, line, m.end() + 1)
    offset = m.end() + (len(rhs) - len(stripped))
    _scan(stripped, file, line, offset, target)
    try:
        tree = ast.parse(stripped.rstrip(), mode="eval")
    except SyntaxError as e:
        raise SpecError(f"syntax error: {e.msg}", file, line, offset + (e.offset or 1)) from None
    expr = _Expr(file, line, offset, stripped, indices_seen).convert(tree.body)
    return Equation(target, indices, expr, Pos(line, m.start(1) + 1))


def parse(text: str, file: str = "<spec>") -> OpSpec:
    """Parse the text of one ``.op`` spec."""
    spec: OpSpec | None = None
    indices = _IndexNames(file)
    for lineno, raw in enumerate(_check_text(text, file), start=1):
        code = raw.split("#", 1)[0].rstrip()
        if not code.strip():
            continue
        stripped = code.lstrip()
        if re.match(r"op\b", stripped):
            if spec is not None:
                raise SpecError("a spec file holds one op; found a second 'op' header", file, lineno,
                                len(code) - len(stripped) + 1)
            spec = _parse_header(stripped, len(code) - len(stripped), file, lineno, indices)
            continue
        if spec is None:
            raise SpecError("expected the op header 'op name(T[i, j]) -> O[i, j]' first", file, lineno,
                            len(code) - len(stripped) + 1)
        if len(spec.equations) == MAX_EQUATIONS:
            raise SpecError(f"too many equations: a spec holds at most {MAX_EQUATIONS}", file, lineno,
                            len(code) - len(stripped) + 1)
        spec.equations.append(_parse_equation(code, file, lineno, indices))
    if spec is None:
        raise SpecError("empty spec: expected an op header 'op name(T[i, j]) -> O[i, j]'", file, 1, 1)
    if not spec.equations:
        raise SpecError(f"op {spec.name} has no equations", file, spec.output.pos.line, spec.output.pos.col)
    spec.source = text
    return spec
