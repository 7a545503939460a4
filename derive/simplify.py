"""Stage 4: normal form, Kronecker-delta contraction and definition folding.

An index expression is brought to a *sum of products*: each term is a
coefficient times a monomial of tensor factors, summed over a set of bound
indices (``Term``).  In that form the engine

* contracts Kronecker deltas against bound indices (``sum_j d(j, j') X_j = X_j'``),
  which SymPy's own ``Sum.doit`` leaves undone inside nested sums;
* gives bound indices canonical names, so equal terms are recognised and
  cancel (this is how ``dM = 0`` falls out for the max-shift);
* folds definitions: a monomial that contains a named product (``E / Z``)
  or function (``exp(A - M)``) is rewritten with that name, and a sum that
  equals a named reduction (``sum_s1 E -> Z``, ``sum_j P V -> O``) is replaced
  by it.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy
from sympy import Add, Indexed, KroneckerDelta, Mul, Pow, Symbol, Wild

from .ir import ArgmaxIndicator, Equation, IndexMax, IndexSum, Pick, base_name, free_indices, size_symbol

_fresh = itertools.count(1)

MAX_TERMS = 256       # terms of one sum-of-products form (a spec past it is an error, not a hang)
MAX_PERMUTED = 6      # bound indices of one set whose renamings canonical() searches exhaustively


class TooLarge(ValueError):
    """A sum-of-products form past MAX_TERMS terms: nested functions and powers
    of sums multiply out exponentially; the caller locates the equation."""


def fresh(index: Symbol) -> Symbol:
    """A new bound index of the same index set as ``index``."""
    return Symbol(f"{base_name(index)}#{next(_fresh)}")


@dataclass(frozen=True)
class Term:
    """``coeff * sum_{bound} mono``; ``mono`` is a product of tensor factors."""

    coeff: sympy.Expr
    mono: sympy.Expr
    bound: frozenset

    def expr(self) -> sympy.Expr:
        return self.coeff * IndexSum(self.mono, *self.bound)


# ---- expression -> terms ----------------------------------------------------------
def terms_of(expr) -> list[Term]:
    """Expand ``expr`` into a list of terms (bound indices made fresh, deltas kept)."""
    if isinstance(expr, Add):
        out = [t for a in expr.args for t in terms_of(a)]
        if len(out) > MAX_TERMS:
            raise TooLarge(f"its sum-of-products form has more than {MAX_TERMS} terms")
        return out
    if isinstance(expr, IndexSum):
        rename = {i: fresh(i) for i in expr.indices}
        inner = terms_of(expr.body.xreplace(rename))
        return [Term(t.coeff, t.mono, t.bound | frozenset(rename.values())) for t in inner]
    if isinstance(expr, Mul):
        out = [Term(sympy.S.One, sympy.S.One, frozenset())]
        for factor in expr.args:
            parts = terms_of(factor)
            if len(out) * len(parts) > MAX_TERMS:
                raise TooLarge(f"its sum-of-products form has more than {MAX_TERMS} terms")
            out = [Term(a.coeff * b.coeff, a.mono * b.mono, a.bound | b.bound) for a in out for b in parts]
        return out
    if isinstance(expr, Pow) and expr.exp.is_Integer and expr.exp > 1 and \
            (isinstance(expr.base, (Add, IndexSum))):
        return terms_of(Mul(*([expr.base] * int(expr.exp)), evaluate=False))
    if expr.is_number or (isinstance(expr, Symbol) and not free_indices(expr)):
        return [Term(expr, sympy.S.One, frozenset())]
    if isinstance(expr, IndexMax):
        raise ValueError("max[...] inside an expression cannot be put into sum-of-products form")
    return [Term(sympy.S.One, expr, frozenset())]


def _factors(mono) -> list[sympy.Expr]:
    return list(mono.args) if isinstance(mono, Mul) else ([] if mono == 1 else [mono])


def contract(term: Term) -> Term:
    """Contract every Kronecker delta that touches a bound index."""
    mono, bound = term.mono, set(term.bound)
    changed = True
    while changed:
        changed = False
        for f in _factors(mono):
            if isinstance(f, Pow) and isinstance(f.base, KroneckerDelta):
                f = f.base  # delta**n == delta
            if not isinstance(f, KroneckerDelta):
                continue
            a, b = f.args
            if a in bound or b in bound:
                gone, keep = (a, b) if a in bound else (b, a)
                mono = (mono / f).xreplace({gone: keep})
                bound.discard(gone)
                changed = True
                break
    return Term(term.coeff, mono, frozenset(bound))


def _split_coeff(term: Term) -> Term:
    """Move numbers and scalar parameters from the monomial into the coefficient."""
    coeff, rest = sympy.S.One, []
    for f in _factors(term.mono):
        if f.is_number or not free_indices(f) and not f.atoms(Indexed):
            coeff *= f
        else:
            rest.append(f)
    mono = Mul(*rest)
    used = free_indices(mono)
    for i in term.bound - used:  # a sum of a term free of its index: times the set's size
        coeff *= size_symbol([i])
    return Term(term.coeff * coeff, mono, frozenset(i for i in term.bound if i in used))


def canonical(term: Term, reserved=()) -> Term:
    """Rename bound indices to the first free names of their index sets (never
    one of ``reserved``), choosing among same-set permutations the one with the
    smallest printed form."""
    free = (free_indices(term.mono) - term.bound) | set(reserved)
    by_set: dict[str, list[Symbol]] = {}
    for i in sorted(term.bound, key=lambda s: s.name):
        by_set.setdefault(base_name(i), []).append(i)
    mapping: dict[Symbol, Symbol] = {}
    mono = term.mono
    for base, idxs in sorted(by_set.items()):
        names, k = [], 0
        while len(names) < len(idxs):
            cand = Symbol(base if k == 0 else f"{base}#{k}")
            if cand not in free:
                names.append(cand)
            k += 1
        best = None
        # the search is n!: past MAX_PERMUTED indices of one set, keep their order
        perms = itertools.permutations(idxs) if len(idxs) <= MAX_PERMUTED else [tuple(idxs)]
        for perm in perms:
            sub = dict(zip(perm, names))
            key = sympy.srepr(mono.xreplace({**mapping, **sub}))
            if best is None or key < best[0]:
                best = (key, sub)
        mapping.update(best[1])
    # two-step rename so that swaps cannot collide
    tmp = {i: Symbol(f"__tmp{n}") for n, i in enumerate(mapping)}
    mono = mono.xreplace(tmp).xreplace({tmp[i]: mapping[i] for i in mapping})
    return Term(term.coeff, mono, frozenset(mapping.values()))


def combine(terms: list[Term]) -> list[Term]:
    """Add up terms with the same monomial and bound set; drop zeros."""
    acc: dict[tuple, list] = {}
    for t in terms:
        t = canonical(_split_coeff(contract(t)))
        num, rest = t.mono.as_coeff_Mul()
        key = (sympy.srepr(rest), tuple(sorted(i.name for i in t.bound)))
        if key in acc:
            acc[key][0] += t.coeff * num
        else:
            acc[key] = [t.coeff * num, rest, t.bound]
    out = []
    for key in sorted(acc):
        coeff, mono, bound = acc[key]
        coeff = sympy.expand(coeff)
        if coeff != 0 and mono != 0:
            out.append(Term(coeff, mono, bound))
    return out


def normalize(expr) -> list[Term]:
    return combine(terms_of(sympy.expand(expr) if not expr.has(IndexSum) else expr))


def to_expr(terms: list[Term]) -> sympy.Expr:
    return Add(*[t.expr() for t in terms])


# ---- definition folding ---------------------------------------------------------------
def _powers(mono) -> list[tuple[sympy.Expr, sympy.Expr]]:
    return [(f.base, f.exp) if isinstance(f, Pow) else (f, sympy.S.One) for f in _factors(mono)]


def _unify(pattern: Indexed, target: Indexed, mapping: dict) -> dict | None:
    if not isinstance(target, Indexed) or pattern.base != target.base or len(pattern.indices) != len(target.indices):
        return None
    out = dict(mapping)
    for p, t in zip(pattern.indices, target.indices):
        if out.get(p, t) != t:
            return None
        out[p] = t
    return out


def _alpha(expr):
    """``expr`` with every sum's bound indices renamed by position (``sum[c''](x)``
    and ``sum[c](x)`` become the same expression), for matching definitions."""
    def walk(e, depth):
        if isinstance(e, IndexSum):
            names = {i: Symbol(f"{base_name(i)}#bound{depth}_{k}") for k, i in enumerate(e.indices)}
            return IndexSum(walk(e.body.xreplace(names), depth + 1), *names.values())
        if not e.args or isinstance(e, Indexed):
            return e
        return e.func(*[walk(a, depth) for a in e.args])
    return walk(expr, 0)


def _labels(expr) -> set[str]:
    """Names of the tensors in ``expr``."""
    return {str(t.base.label) for t in expr.atoms(Indexed)}


class Folder:
    """Rewrites terms with the names of the forward definitions of an op."""

    def __init__(self, equations: list[Equation]):
        self.product_defs = []   # (eq, [(base, exp)])
        self.function_defs = []  # (eq, wild pattern, wilds)
        self.sum_defs = []       # (body monomial, reduced indices, target indices, what the sum equals)
        for eq in equations:
            rhs = eq.rhs
            if isinstance(rhs, IndexSum) and not isinstance(rhs.body, Add):
                self.sum_defs.append((rhs.body, rhs.indices, eq.target.indices, eq.lhs))
            elif isinstance(rhs, Mul) and len(rhs.atoms(Indexed)) >= 2 and not rhs.has(IndexSum):
                pw = _powers(rhs)
                if all(isinstance(b, Indexed) and e.is_Integer for b, e in pw):
                    self.product_defs.append((eq, pw))
            elif isinstance(rhs, sympy.Function) or (isinstance(rhs, Pow) and not rhs.exp.is_Integer
                                                       and rhs.exp.is_Rational):
                # exp(A - M) -> E; sqrt(V + eps) -> R (also 1/sqrt(V + eps) -> 1/R), sums inside included
                wilds = {i: Wild(f"w_{i.name}") for i in eq.target.indices}
                pattern = _alpha(rhs).xreplace(wilds)
                self.function_defs.append((eq, pattern, wilds, _labels(pattern)))
        # Identities that follow from two definitions: with P = E / L and
        # L = sum_j E, sum_j P = (sum_j E) / L = 1.
        for eq, pw in self.product_defs:
            for body, red, _, value in list(self.sum_defs):
                if isinstance(body, Indexed) and (body, 1) in pw:
                    rest = Mul(*[b ** e for b, e in pw if (b, e) != (body, 1)])
                    if not (free_indices(rest) & set(red)):
                        self.sum_defs.append((eq.lhs, red, eq.target.indices, sympy.simplify(rest * value)))
        self.sum_defs += self._vanishing_sums(equations)

    @staticmethod
    def _vanishing_sums(equations) -> list:
        """Sums of a definition that are zero by the definitions: with ``xc = x - mu``
        and ``mu = sum_c x / |c|``, ``sum_c xc = sum_c x - |c| mu = 0``.  The sum of a
        sum-free linear definition over each of its indices, and over the index sets
        other definitions reduce (``mean[c, k]``), is expanded, its sums folded by the
        definitions (means as well as sums), and kept only when nothing remains."""
        if not equations:
            return []
        sums = Folder([])
        for eq in equations:
            rhs = eq.rhs
            inner = [a for a in Mul.make_args(rhs) if isinstance(a, IndexSum)]
            if len(inner) == 1 and not isinstance(inner[0].body, Add):
                # |c, k| is |c| |k|, as a sum over c and k of what depends on neither counts it
                joint = {size_symbol(inner[0].indices): Mul(*[size_symbol([i]) for i in inner[0].indices])}
                scale = (rhs / inner[0]).xreplace(joint)
                if not scale.has(Indexed) and not scale.has(IndexSum):
                    sums.sum_defs.append((inner[0].body, inner[0].indices, eq.target.indices, eq.lhs / scale))
        out = []
        for eq in equations:
            if not isinstance(eq.rhs, Add) or eq.rhs.has(IndexSum) or not sums.sum_defs:
                continue
            own = eq.target.indices
            reduced = {(i,) for i in own}
            for _, red, _, _ in sums.sum_defs:  # the same index sets, by name
                pick = tuple(next((i for i in own if base_name(i) == base_name(r)), None) for r in red)
                if None not in pick and len(set(pick)) == len(pick):
                    reduced.add(pick)
            for idx in sorted(reduced, key=lambda t: [i.name for i in t]):
                bound = {i: fresh(i) for i in idx}
                try:
                    terms = combine(terms_of(IndexSum(eq.rhs.xreplace(bound), *bound.values())))
                except TooLarge:
                    continue
                if terms and not sums.fold(terms)[0]:
                    out.append((eq.lhs, idx, tuple(k for k in own if k not in idx), sympy.S.Zero))
        return out

    # -- exp(A - M) -> E ---------------------------------------------------------
    def fold_functions(self, mono):
        present = _labels(mono)
        for eq, pattern, wilds, needs in self.function_defs:
            if not needs <= present:  # cheap test first: a spec may have hundreds of definitions
                continue
            for sub in list(mono.atoms(type(pattern))):
                power = sympy.S.One
                if isinstance(pattern, Pow):  # (V + eps)**(-1/2) is R**-1 when R = (V + eps)**(1/2)
                    power = sub.exp / pattern.exp
                    if not power.is_Integer or power == 0:
                        continue
                    m = _alpha(sub.base).match(pattern.base)
                else:
                    m = _alpha(sub).match(pattern)
                if m is not None and all(w in m for w in wilds.values()):
                    idx = [m[wilds[i]] for i in eq.target.indices]
                    mono = mono.xreplace({sub: eq.target.at(idx) ** power})
                    present = _labels(mono)
        return mono

    # -- E / Z -> B ------------------------------------------------------------------
    def fold_products(self, mono):
        changed = True
        while changed:
            changed = False
            have = dict(_powers(mono))
            present = {str(b.base.label) for b in have if isinstance(b, Indexed)}
            for eq, pw in self.product_defs:
                if not {str(b.base.label) for b, _ in pw} <= present:
                    continue
                for mapping in self._product_matches(pw, have, 0, {}):
                    if not set(eq.target.indices) <= set(mapping):
                        continue
                    ratio = Mul(*[b.xreplace(mapping) ** e for b, e in pw])
                    mono = sympy.powsimp(mono / ratio * eq.target.at([mapping[i] for i in eq.target.indices]))
                    changed = True
                    break
                if changed:
                    break
        return mono

    def _product_matches(self, pw, have, k, mapping):
        if k == len(pw):
            yield mapping
            return
        base, exp = pw[k]
        for tb, te in have.items():
            if not (te.is_Integer and (te * exp) > 0 and abs(te) >= abs(exp)):
                continue
            m = _unify(base, tb, mapping)
            if m is not None:
                yield from self._product_matches(pw, have, k + 1, m)

    # -- sum_j P V -> O --------------------------------------------------------------
    def fold_sum(self, term: Term) -> Term | None:
        """Replace one sum inside ``term`` by what it equals (a named reduction), if any."""
        factors = _factors(term.mono)
        present = _labels(term.mono)
        for body, red, target_indices, value in self.sum_defs:
            if not _labels(body) <= present:  # cheap test first
                continue
            body_factors = _factors(body)
            bound = sorted(term.bound, key=lambda s: s.name)
            # each reduced index takes a bound index of its own set (the permutations of the
            # bound indices, less the n! that cannot match)
            candidates = [[t for t in bound if base_name(t) == base_name(r)] for r in red]
            for targets in itertools.product(*candidates):
                if len(set(targets)) != len(targets):
                    continue
                dependent = [f for f in factors if free_indices(f) & set(targets)]
                if len(dependent) != len(body_factors):
                    continue
                for mapping in self._sum_matches(body_factors, dependent, dict(zip(red, targets))):
                    if Mul(*dependent) != body.xreplace(mapping):
                        continue
                    if any(mapping.get(i) in targets for i in target_indices):
                        continue
                    rest = Mul(*[f for f in factors if f not in dependent])
                    return Term(term.coeff, rest * value.xreplace(mapping), term.bound - set(targets))
        return None

    def _sum_matches(self, pattern, targets, mapping):
        if not pattern:
            yield mapping
            return
        head, rest = pattern[0], pattern[1:]
        hb, he = (head.base, head.exp) if isinstance(head, Pow) else (head, sympy.S.One)
        if not isinstance(hb, Indexed):  # a function of tensors, e.g. exp(X - M): match with wilds
            wilds = {i: Wild(f"w{k}") for k, i in enumerate(sorted(free_indices(head) - set(mapping),
                                                                    key=lambda s: s.name))}
            pattern = head.xreplace({**mapping, **wilds})
            for t in targets:
                m = t.match(pattern)
                if m is not None and all(w in m for w in wilds.values()):
                    found = {**mapping, **{i: m[w] for i, w in wilds.items()}}
                    yield from self._sum_matches(rest, [x for x in targets if x is not t], found)
            return
        for t in targets:
            tb, te = (t.base, t.exp) if isinstance(t, Pow) else (t, sympy.S.One)
            if te != he:
                continue
            m = _unify(hb, tb, mapping)
            if m is not None:
                yield from self._sum_matches(rest, [x for x in targets if x is not t], m)

    def fold(self, terms: list[Term]) -> tuple[list[Term], bool]:
        """Fold functions, products and sums to a fixpoint.  Returns (terms, any sum folded)."""
        folded_sum = False
        work = list(terms)
        for _ in range(20):
            out, changed = [], False
            for t in work:
                s = self.fold_sum(t)  # sums first: sum_j E -> L before E / L -> P hides E
                if s is not None:
                    t, changed, folded_sum = s, True, True
                mono = self.fold_products(self.fold_functions(t.mono))
                if mono != t.mono:
                    changed = True
                out.append(Term(t.coeff, mono, t.bound))
            work = combine(out)
            if not changed:
                break
        return work, folded_sum


# ---- presentation ---------------------------------------------------------------------
def pretty(terms: list[Term], reserved=()) -> sympy.Expr:
    """Pull factors that do not depend on bound indices out of each sum, split a
    sum of a product of independent parts into a product of sums, and factor
    what the terms share: ``B dB - B sum(dB B)`` -> ``B (dB - sum(dB B))``.
    Bound indices never take the names in ``reserved`` (the result's own)."""
    parts = []
    for t in terms:
        t = canonical(t, reserved)
        outer, groups = [], []  # groups: [bound indices, factors] joined by shared bound indices
        for f in _factors(t.mono):
            mine = free_indices(f) & t.bound
            if not mine:
                outer.append(f)
                continue
            joined = [g for g in groups if g[0] & mine]
            merged = [set(mine), [f]]
            for g in joined:
                merged[0] |= g[0]
                merged[1] += g[1]
                groups.remove(g)
            groups.append(merged)
        sums = [IndexSum(Mul(*fs), *sorted(b, key=lambda s: s.name)) for b, fs in groups]
        parts.append(t.coeff * Mul(*outer) * Mul(*sums))
    expr = Add(*parts)
    return sympy.factor_terms(expr) if isinstance(expr, Add) else expr


def rename_free(expr, mapping: dict) -> sympy.Expr:
    """Rename free indices, alpha-renaming bound ones that would be captured.
    An index a sum binds is not free inside it: ``sum[c'](X[r, c'])`` keeps its
    ``c'`` when ``c'`` is renamed outside."""
    def walk(e, mapping):
        if isinstance(e, (IndexSum, IndexMax)):
            inner = {k: v for k, v in mapping.items() if k not in e.indices}
            targets = set(inner.values())
            clash = {i: fresh(i) for i in e.indices if i in targets}
            body = e.body.xreplace(clash) if clash else e.body
            return type(e)(walk(body, inner), *[clash.get(i, i) for i in e.indices])
        if isinstance(e, Indexed):
            return e.xreplace(mapping)
        if isinstance(e, ArgmaxIndicator):
            return ArgmaxIndicator(walk(e.reduced, mapping), *[mapping.get(i, i) for i in e.indices])
        if isinstance(e, Pick):
            return Pick(mapping.get(e.index, e.index), walk(e.value, mapping))
        if not e.args:
            return mapping.get(e, e)
        return e.func(*[walk(a, mapping) for a in e.args])

    return walk(expr, mapping)
