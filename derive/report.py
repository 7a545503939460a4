"""Render a :class:`~derive.derivation.Derivation` as text, Markdown or LaTeX,
in the seeds' notation: primed indices mark the variable of differentiation
when a sum runs over the same index set."""
from __future__ import annotations

import sympy
from sympy import Symbol
from sympy.printing.latex import LatexPrinter
from sympy.printing.str import StrPrinter

from .ir import IndexMax, IndexSum, base_name


def display_indices(lhs_indices, value, *others):
    """Name indices as the seeds write them: a free index whose set is also
    summed over is primed, and the sums' dummies take the plain name, then
    more primes: ``dA[s2, s1] = ... sum[s1#1](B[s2, s1#1])`` ->
    ``dA[s2, s1'] = ... sum[s1](B[s2, s1])``.
    Returns the indices, the value and each of ``others`` renamed alike."""
    bound = {i for s in value.atoms(IndexSum, IndexMax) for i in s.indices}
    dummies = {i for i in bound if "#" in i.name}
    summed_sets = {base_name(b) for b in dummies}
    mapping = {i: Symbol(i.name + "'") for i in lhs_indices if i.name in summed_sets}
    # a dummy already named like a primed free index (sum[c'](...) beside a free c') is renamed too
    dummies = sorted(dummies | {i for i in bound if i in set(mapping.values())}, key=lambda s: s.name)
    in_use = {x.name for x in value.free_symbols | set().union(*[a.free_symbols for a in others])
              if isinstance(x, Symbol)}
    in_use |= {s.name for s in value.atoms(Symbol)} | {v.name for v in mapping.values()}
    in_use -= {k.name for k in mapping}
    for b in dummies:
        name = base_name(b)
        while name in in_use:
            name += "'"
        mapping[b] = Symbol(name)
        in_use.add(name)
    return ([mapping.get(i, i) for i in lhs_indices], value.xreplace(mapping),
            *[o.xreplace(mapping) for o in others])


_LONG = 10 ** 30  # integers and rationals past this print in scientific notation


def _long_number(expr) -> str | None:
    """A huge exact number (a coefficient that grew through many equations) as
    ``1.23456789012346e+400``: exact digits are unreadable, and Python refuses
    to print more than 4300 of them."""
    if abs(expr.p) > _LONG or abs(expr.q) > _LONG:
        return sympy.Float(expr, 15).__str__()
    return None


class _Str(StrPrinter):
    def _print_Symbol(self, expr):
        return expr.name

    def _print_Integer(self, expr):
        return _long_number(expr) or super()._print_Integer(expr)

    def _print_Rational(self, expr):
        return _long_number(expr) or super()._print_Rational(expr)


class _Latex(LatexPrinter):
    def _print_Rational(self, expr):  # Integer too
        return _long_number(expr) or super()._print_Rational(expr)

    def _print_Symbol(self, expr, style="plain"):
        name = expr.name.replace("#", "_")
        primes = name.count("'")
        core = name.replace("'", "")
        head, _, digits = core.partition("_") if "_" in core else (core.rstrip("0123456789"), "",
                                                                   core[len(core.rstrip("0123456789")):])
        text = head + (f"_{{{digits}}}" if digits else "")
        return text + "'" * primes

    def _print_IndexedBase(self, expr):
        return self._print_Symbol(expr.label)

    def _print_Indexed(self, expr):
        base = self._print(expr.base)
        idx = " ".join(self._print(i) for i in expr.indices)
        return f"{base}_{{{idx}}}"

    def _print_IndexSum(self, expr):
        idx = " ".join(self._print(i) for i in expr.indices)
        return rf"\sum_{{{idx}}} \left({self._print(expr.body)}\right)"

    def _print_IndexMax(self, expr):
        idx = " ".join(self._print(i) for i in expr.indices)
        return rf"\max_{{{idx}}} \left({self._print(expr.body)}\right)"

    def _print_ArgmaxIndicator(self, expr):
        idx = " ".join(self._print(i) for i in expr.indices)
        return rf"\mathbb{{1}}\left[{idx} = \operatorname{{argmax}}_{{{idx}}} {self._print(expr.reduced)}\right]"

    def _print_Pick(self, expr):
        return rf"\mathbb{{1}}\left[{self._print(expr.index)} = {self._print(expr.value)}\right]"

    def _print_Indicator(self, expr):
        return rf"\mathbb{{1}}\left[{self._print(expr.cond)}\right]"

    def _print_Where(self, expr):
        return (rf"\begin{{cases}} {self._print(expr.then)} & \text{{if }} {self._print(expr.cond)} \\ "
                rf"{self._print(expr.other)} & \text{{otherwise}} \end{{cases}}")


def _s(expr) -> str:
    return _Str().doprint(expr)


def _lhs(name: str, indices, fmt: str) -> str:
    if fmt == "latex":
        return _Latex().doprint(sympy.Indexed(name, *indices)) if indices else name
    return f"{name}[{', '.join(i.name for i in indices)}]"


def _lines(d):
    """(section, lhs indices, name, raw, value, note) rows of the derivation."""
    rows = []
    for eq in d.forward:
        rows.append(("forward", list(eq.target.indices), eq.target.name, None, eq.rhs, ""))
    for s in d.steps:
        idx, value, raw = display_indices(list(s.tensor.indices), s.value, s.raw)
        note = ""
        if s.value == 0 and s.tensor.role != "input":
            note = f"the pullback through {s.tensor.name} vanishes"
            if d.ir.definition(s.tensor.name) and isinstance(d.ir.definition(s.tensor.name).rhs, IndexMax):
                note = f"the max-shift {s.tensor.name} contributes no gradient"
        elif s.tensor.role == "input":
            note = "result"
        elif s.kept:
            note = "named value of the backward"
        rows.append(("pullback", idx, s.adjoint.name, raw if raw != value else None, value, note))
    return rows


def _outputs(ir) -> str:
    outs = ir.outputs
    return _s(outs[0].indexed) if len(outs) == 1 else "(" + ", ".join(_s(o.indexed) for o in outs) + ")"


def render(d, fmt: str = "text") -> str:
    if fmt not in ("text", "markdown", "latex"):
        raise ValueError(f"unknown format {fmt!r}; expected text, markdown or latex")
    ir = d.ir
    head = f"{ir.name}({', '.join(_s(t.indexed) for t in ir.inputs)}" \
           f"{'; ' + ', '.join(p.name for p in ir.params) if ir.params else ''}) -> {_outputs(ir)}"
    rows = _lines(d)
    grad = ", ".join(f"d{o.name}[{', '.join(i.name for i in o.indices)}]" for o in ir.outputs)
    is_are, plural = ("are", "s") if len(ir.outputs) > 1 else ("is", "")
    needs = ", ".join(d.backward_needs) or "nothing"
    if fmt == "latex":
        out = [f"% {head} -- derived by pullback from {d.path}", r"\begin{align*}"]
        for section, idx, name, raw, value, note in rows:
            lhs = _lhs(name, idx, "latex")
            rhs = _Latex().doprint(value)
            if raw is not None:
                rhs = f"{_Latex().doprint(raw)} \\\\ &= {rhs}"
            tag = rf" && \text{{{note}}}" if note else ""
            out.append(f"{lhs} &= {rhs}{tag} \\\\")
        out.append(r"\end{align*}")
        return "\n".join(out) + "\n"
    if fmt == "markdown":
        out = [f"## `{head}`", "", f"Derived by pullback from `{d.path}`.", "", "### Forward", ""]
        out += [f"    {_lhs(n, i, 'text')} = {_s(v)}" for s, i, n, r, v, _ in rows if s == "forward"]
        out += ["", "### Pullbacks", "", f"Reverse order; `{grad}` {is_are} the incoming gradient{plural}.", "",
                "| adjoint | pulled back | simplified | note |", "|---|---|---|---|"]
        for s, i, n, r, v, note in rows:
            if s == "pullback":
                out.append(f"| `{_lhs(n, i, 'text')}` | `{_s(r) if r is not None else _s(v)}` | `{_s(v)}` | {note} |")
        out += ["", f"The backward reads: {needs}.", ""]
        return "\n".join(out)
    out = [f"{head}    ({d.path})", "", "forward:"]
    fw = [(f"{_lhs(n, i, 'text')}", _s(v)) for s, i, n, r, v, _ in rows if s == "forward"]
    width = max(len(a) for a, _ in fw)
    out += [f"  {a.ljust(width)} = {b}" for a, b in fw]
    out += ["", f"pullbacks (reverse order; {grad} {is_are} the incoming gradient{plural}):"]
    pb = [(f"{_lhs(n, i, 'text')}", r, v, note) for s, i, n, r, v, note in rows if s == "pullback"]
    width = max((len(a) for a, *_ in pb), default=0)
    for a, r, v, note in pb:
        if r is not None:
            out.append(f"  {a.ljust(width)} = {_s(r)}")
            out.append(f"  {' ' * width} = {_s(v)}" + (f"    # {note}" if note else ""))
        else:
            out.append(f"  {a.ljust(width)} = {_s(v)}" + (f"    # {note}" if note else ""))
    out += ["", f"the backward reads: {needs}"]
    return "\n".join(out) + "\n"
