"""A seeded generator of spec texts for fuzzing the front end (and, later, the
stages after it): random row-wise ops, built-in specs, and mutated or
truncated versions of both.  Everything is a pure function of the seed.

    for label, text in cases(300, seed=0):
        kind, value = outcome(text)     # ("derived", Derivation) or ("error", "fuzz.op:L:C: message")

``outcome`` is the one place that runs the pipeline on a case; a later stage
(emit, import, run the kernels) is added there.
"""
from __future__ import annotations

import random

from derive.derivation import OPS_DIR, builtin_ops, derive_text
from derive.spec import SpecError

FILE = "fuzz.op"


def outcome(text: str):
    """("derived", d) when ``text`` derives and its report renders in every format,
    ("error", message) when it is a SpecError; any other exception propagates."""
    try:
        d = derive_text(text, FILE)
        d.text(), d.markdown(), d.latex()
    except SpecError as e:
        return "error", str(e)
    return "derived", d


# ---- random row-wise ops -------------------------------------------------------------------------
FUNCS = ("exp", "log", "sqrt", "tanh")


class _Gen:
    """One random op over a kept index set ``r`` and a reduced set ``c``."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.inputs = [("X", ("r", "c"))] + rng.choice([[], [("W", ("c",))], [("b", ("r",))], [("Z", ("r", "c"))]])
        self.params = rng.choice([[], ["eps"], ["eps", "scale"]])
        self.defined: list[tuple[str, tuple]] = []  # named values so far, with their indices

    def number(self) -> str:
        return self.rng.choice(["1", "2", "0.5", "3.0", "1e-5", "0.044715", "10", "2.5e3", "7"])

    def leaf(self, row: bool) -> str:
        pool = [n for n, ix in self.inputs + self.defined if row or ix in (("r",), ())]
        pool += self.params
        if self.rng.random() < 0.2:
            return self.number()
        return self.rng.choice(pool or [self.number()])

    def expr(self, depth: int, row: bool = True) -> str:
        r = self.rng.random()
        if depth <= 0 or r < 0.25:
            return self.leaf(row)
        if r < 0.55:
            op = self.rng.choice(["+", "-", "*", "/", "*"])
            return f"{self.expr(depth - 1, row)} {op} {self.expr(depth - 1, row)}"
        if r < 0.7:
            return f"{self.rng.choice(FUNCS)}({self.expr(depth - 1, row)})"
        if r < 0.78:
            return f"({self.expr(depth - 1, row)}) ** {self.rng.choice(['2', '3', '0.5', '-1', '-0.5', 'eps'])}"
        if r < 0.84:
            return f"{self.rng.choice(['maximum', 'minimum'])}({self.expr(depth - 1, row)}, {self.leaf(row)})"
        if r < 0.92 and row:
            return f"{self.rng.choice(['sum', 'mean'])}[c]({self.row_expr(depth - 1)})"
        return f"-{self.expr(depth - 1, row)}"

    def row_expr(self, depth: int) -> str:
        """An expression over [r, c] (a reduction's operand): it reads X."""
        return f"X {self.rng.choice(['*', '+', '-', '/'])} ({self.expr(depth)})" if self.rng.random() < 0.7 else \
            f"{self.rng.choice(FUNCS)}(X)"

    def spec(self) -> str:
        rng = self.rng
        lines = []
        for k in range(rng.randint(1, 4)):
            name = f"T{k}"
            kind = rng.random()
            if kind < 0.2:
                lines.append(f"{name}[r] = max[c]({self.row_expr(1)})")
                self.defined.append((name, ("r",)))
            elif kind < 0.45:
                lines.append(f"{name}[r] = {rng.choice(['sum', 'mean'])}[c]({self.row_expr(2)})")
                self.defined.append((name, ("r",)))
            else:
                lines.append(f"{name} = {self.expr(2)}")
                self.defined.append((name, None))
        out_row = rng.random() < 0.7
        body = self.expr(2) + " + " + self.defined[-1][0]
        lines.append(f"Y[r, c] = {body} + X" if out_row else f"Y[r] = sum[c]({body} + X)")
        args = ", ".join(f"{n}[{', '.join(ix)}]" for n, ix in self.inputs)
        params = "; " + ", ".join(self.params) if self.params else ""
        header = f"op fz({args}{params}) -> Y[{'r, c' if out_row else 'r'}]"
        if rng.random() < 0.3:
            rng.shuffle(lines)  # equations may come in any order
        return "\n".join([header] + lines) + "\n"


def random_spec(rng: random.Random) -> str:
    return _Gen(rng).spec()


# ---- row-wise op shapes (as the library writes them) and the built-ins ---------------------------------
SHAPES = [
    "op softmax(A[s2, s1]) -> B[s2, s1]\nM[s2] = max[s1](A)\nE = exp(A - M)\nZ[s2] = sum[s1](E)\nB = E / Z\n",
    "op lse(X[r, c]) -> Y[r]\nM[r] = max[c](X)\nY[r] = M + log(sum[c](exp(X - M)))\n",
    "op ln(X[r, c], W[c], b[c]; eps) -> Y[r, c]\nMu[r] = mean[c](X)\nD = X - Mu\nV[r] = mean[c](D * D)\n"
    "Y = D / sqrt(V + eps) * W + b\n",
    "op rms(X[r, c]; eps) -> Y[r, c]\nY = X / sqrt(mean[c](X * X) + eps)\n",
    "op gelu(X[r, c]) -> Y[r, c]\nY = 0.5 * X * (1 + tanh(0.7978845608 * (X + 0.044715 * X ** 3)))\n",
    "op swiglu(X[r, c], G[r, c]) -> Y[r, c]\nY = X / (1 + exp(-X)) * G\n",
    "op l2(X[r, c]) -> Y[r, c]\nN[r] = sqrt(sum[c](X ** 2))\nY = X / N\n",
    "op clip(X[r, c]; lo, hi) -> Y[r, c]\nY = minimum(maximum(X, lo), hi)\n",
    "op mm(X[n, j], W[j, k]) -> Y[n, k]\nY = sum[j](X * W)\n",
    "op gram(X[n, j]) -> Y[j, q]\nY = sum[n](X * X[n, q])\n",
]


def builtin_texts() -> list[str]:
    return [(OPS_DIR / f"{name}.op").read_text() for name in builtin_ops()]


# ---- mutations ---------------------------------------------------------------------------------------
BAD_TOKENS = [
    "$", "[", "]", "(", ")", ",", ";", "=", "==", "**", "->", "#", "'s'", "1j", "0**-1", "1e39", "10**400",
    "9**9**9", "(-1)**0.5", "log(0)", "sqrt(-1)", "exp(", "foo(A)", "A.sum(s1)", "X.exp()", "eps[r]", "max[c]",
    "sum[q](X)", "sum(X)", "mean[c, c](X)", "X[r]", "X[r, r]", "Q", "op", "lambda: 1", "\x00", "\u2028", "\t",
    "é", "max[c](X) + 1", "maximum(X)", "A if A else A", "[A]", "X[1]", "sum[c](X)[r]", "-" * 40,
    "exp(" * 40, " + X" * 300,
]


def mutate(text: str, rng: random.Random) -> str:
    """One to three random edits of ``text``."""
    for _ in range(rng.randint(1, 3)):
        lines = text.split("\n")
        k = rng.randrange(len(lines))
        move = rng.randrange(9)
        if move == 0 and text:  # truncate
            text = text[:rng.randrange(len(text))]
        elif move == 1 and text:  # delete a character
            i = rng.randrange(len(text))
            text = text[:i] + text[i + 1:]
        elif move == 2:  # insert a bad or odd token
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(BAD_TOKENS) + text[i:]
        elif move == 3:  # duplicate a line (a tensor defined twice, a second header)
            lines.insert(k, lines[k])
            text = "\n".join(lines)
        elif move == 4:  # swap two lines (the header after an equation)
            j = rng.randrange(len(lines))
            lines[k], lines[j] = lines[j], lines[k]
            text = "\n".join(lines)
        elif move == 5:  # rename an index or a tensor everywhere on one line
            old, new = rng.choice([("s1", "s3"), ("c", "r"), ("r", "q"), ("X", "Q"), ("j", "i"), ("E", "A")])
            lines[k] = lines[k].replace(old, new)
            text = "\n".join(lines)
        elif move == 6:  # a cycle through a fresh equation
            names = [ln.split("=")[0].split("[")[0].strip() for ln in lines if "=" in ln and not ln.startswith("op")]
            if names:
                a = rng.choice(names)
                text += f"\nC1 = {a} + C2\nC2 = exp(C1)\n" if rng.random() < 0.5 else f"\n{a} = {a} * 2\n"
        elif move == 7:  # drop a line
            del lines[k]
            text = "\n".join(lines)
        else:  # replace a number or an operator
            for old, new in [("+", "*"), ("/", "**"), ("1", "0"), ("-", "/"), ("*", "**"), ("exp", "log")]:
                if old in lines[k] and rng.random() < 0.5:
                    lines[k] = lines[k].replace(old, new, 1)
            text = "\n".join(lines)
    return text


def cases(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` labelled spec texts: random ops, shapes and built-ins as they are, and mutated."""
    rng = random.Random(seed)
    seeds = builtin_texts() + SHAPES
    out = [(f"builtin-or-shape-{i}", t) for i, t in enumerate(seeds)]
    while len(out) < n:
        k = len(out)
        r = rng.random()
        if r < 0.35:
            out.append((f"random-{k}", random_spec(rng)))
        elif r < 0.7:
            out.append((f"mutated-random-{k}", mutate(random_spec(rng), rng)))
        else:
            out.append((f"mutated-shape-{k}", mutate(rng.choice(seeds), rng)))
    return out[:n]
