"""Stage 5, attention family: two contractions around a row-wise softmax.

The spec's shape is checked, then every formula the flash-style kernels need
is printed from the derivation:

* forward: the score tile (``S = scale * sum_d Q K`` -> ``tl.dot``), the mask
  value (the identity of the ``max``), the online statistics (running max, the
  sum ``L`` and the unnormalised output, with the rescale factor derived by
  :func:`derive.plan.rescale_ratio`), the output ``O = acc / L`` and the
  log-sum-exp saved for the backward;
* backward: ``P`` recomputed from the log-sum-exp alone (derived: substituting
  ``M = LSE - log L`` into ``P = exp(S - M) / L`` eliminates ``L``), ``Delta``
  (the row sum left in ``dS`` after definition folding), ``dP``, ``dS`` and the
  three contraction pullbacks, each split into a per-tile sum and a final factor.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy import Indexed, IndexedBase, Symbol

from .derivation import Derivation
from .ir import IndexMax, IndexSum, base_name, free_indices
from .names import Names, template_identifiers
from .plan import NEG_INF, TEMPLATES, PlanError, rescale_ratio
from .printer import tile_code
from .report import display_indices
from .simplify import normalize


# The template's kernels lie between these two Jinja comments: the identifiers
# written there are the kernels' own and are reserved in the kernels' scope.
KERNELS_BEGIN = "{# kernels: begin #}"
KERNELS_END = "{# kernels: end #}"


@dataclass
class Pullback:
    name: str        # the kernel's name for dQ
    of: str          # the spec's input, "Q"
    acc: str         # the kernel's name for its accumulator
    loop: str        # the index the kernel streams over to accumulate it ("i" or "j")
    term: str        # one tile's contribution (a tl.dot)
    final: str       # the result from the accumulator
    equation: str


@dataclass
class AttentionPlan:
    family: str
    name: str        # the spec's op name
    fn: str          # the public function's name
    n: dict          # every other identifier the template writes, by role (see _allocate)
    # forward
    score: str
    mask_value: str
    m_body: str
    rescale: str
    l_term: str
    o_term: str
    o_final: str
    lse_code: str
    # backward
    p_code: str
    delta_code: str
    dp_code: str
    ds_code: str
    grads: list[Pullback]
    forward_text: list[str]
    pullback_text: list[str]
    delta_text: str

    def grad(self, name: str) -> Pullback:
        return next(g for g in self.grads if g.of == name)


def _fail(msg: str):
    raise PlanError(f"attention family: {msg}")


def _allocate(ir, roles: dict, internal: dict, indices: dict) -> tuple[str, dict, dict]:
    """Every identifier of the op's module that depends on the spec, from
    :class:`derive.names.Names`: the public function and kernel names in the
    module's scope (the whole template's words reserved), the values,
    pointers, strides and sizes in the kernels' scope (the kernels' words
    reserved).  A spec name is kept where it is free and renamed where it would
    collide (a score named ``alpha``, a scale named ``pid``, an index ``blocks``).

    ``roles``: role -> spec label (``q`` -> "Q"); ``internal``: role -> (label,
    wanted name) for the plan's own tiles; ``indices``: role -> index name.
    Returns the function's name, role -> identifier, and label -> identifier
    (the printer's ``names``)."""
    source = (TEMPLATES / "attention.py.j2").read_text()
    if KERNELS_BEGIN not in source or KERNELS_END not in source:
        raise RuntimeError(f"templates/attention.py.j2 lacks the markers {KERNELS_BEGIN} and {KERNELS_END}")
    kernels = source.split(KERNELS_BEGIN, 1)[1].split(KERNELS_END, 1)[0]
    module = Names(template_identifiers(source))
    fn = module.of(("fn", ir.name), ir.name)
    n = {f"k_{k}": module.take(f"_{ir.name}_{k}") for k in ("fwd", "bwd_delta", "bwd_dkdv", "bwd_dq")}
    kn = Names(template_identifiers(kernels) | {fn} | set(n.values()))
    label: dict[str, str] = {}

    def value(key: str, want: str) -> str:
        label[key] = kn.of(("value", key), want)
        return label[key]

    # the spec's own names first, in spec order, so that they are kept where they can be
    for t in ir.tensors.values():
        value(t.name, t.name)
    for prm in ir.params:
        value(prm.name, prm.name)
    for t in ir.tensors.values():
        value(f"d{t.name}", f"d{t.name}")
    for role, key in roles.items():
        n[role] = label[key]
    for role, (key, want) in internal.items():
        n[role] = value(key, want.format(**n))
    for role, tensor, strides in (("q", "q", ("i", "d")), ("k", "k", ("j", "d")), ("v", "v", ("j", "e"))):
        n[f"{role}_ptr"] = kn.take(f"{n[tensor]}_ptr")
        n[f"{role}_sz"] = kn.take(f"{n[tensor]}_sz")
        n[f"{role}_srow"], n[f"{role}_scol"] = (kn.take(f"{n[tensor]}_s{indices[x]}") for x in strides)
    for role in ("o", "lse", "delta", "do", "dq", "dk", "dv"):
        n[f"{role}_ptr"] = kn.take(f"{n[role]}_ptr")
    for x in ("i", "j", "d", "e"):
        n[f"n_{x}"] = kn.take(f"n_{indices[x]}")
    return fn, n, label


def plan_attention(d: Derivation) -> AttentionPlan:
    ir = d.ir
    if len(ir.params) != 1:
        _fail("expected one scalar parameter (the score scale)")
    q, k, v = ir.inputs
    out = ir.output
    defs = {eq.target.name: eq for eq in ir.equations}
    (batch, i, dd), (_, j, _), (_, _, e) = [t.indices for t in (q, k, v)]
    if not (q.indices[0] == k.indices[0] == v.indices[0] and k.indices[2] == dd and v.indices[1] == j
            and out.indices == (batch, i, e)):
        _fail("declare Q[z, i, d], K[z, j, d], V[z, j, e] -> O[z, i, e]")
    # -- the chain S -> M -> E -> L -> P -> O
    maxes = [eq for eq in ir.equations if isinstance(eq.rhs, IndexMax)]
    if len(maxes) != 1 or maxes[0].rhs.indices != (j,):
        _fail(f"expected one max over the key index {j}")
    m_eq = maxes[0]
    s_name = str(m_eq.rhs.body.base.label) if isinstance(m_eq.rhs.body, Indexed) else _fail("max of a named score")
    s_eq = defs[s_name]
    m_name = m_eq.target.name
    # the sums over the key index: L (the normaliser) and the output's contraction
    sums = [eq for eq in ir.equations if isinstance(eq.rhs, IndexSum) and eq.rhs.indices == (j,)]
    o_eq = defs[out.name]
    l_eqs = [eq for eq in sums if eq is not o_eq and eq.target.indices == (batch, i)]
    if len(l_eqs) != 1 or o_eq not in sums:
        _fail(f"expected the normaliser L = sum[{j}](...) and O = sum[{j}](P * V)")
    l_eq = l_eqs[0]
    p_names = [x for x, eq in defs.items() if eq.target.indices == (batch, i, j) and x != s_name
               and not isinstance(eq.rhs, IndexSum)]
    p_name = next((x for x in p_names if x in {str(t.base.label) for t in o_eq.rhs.atoms(Indexed)}), None)
    if p_name is None:
        _fail("the output must contract the softmax P with V")
    steps = {s.tensor.name: s for s in d.steps}
    if not (steps.get(p_name) and steps[p_name].kept and steps.get(s_name) and steps[s_name].kept):
        _fail("expected named adjoints of P and S")

    # -- names: the plan's own tiles have labels no spec name can take (":" is not in identifiers)
    roles = {"q": q.name, "k": k.name, "v": v.name, "o": out.name, "do": f"d{out.name}", "s": s_name,
             "m": m_name, "l": l_eq.target.name, "p": p_name, "dp": f"d{p_name}", "ds": f"d{s_name}",
             "dq": f"d{q.name}", "dk": f"d{k.name}", "dv": f"d{v.name}", "scale": ir.params[0].name}
    internal = {"lse": (":LSE", "LSE"), "delta": (":Delta", "Delta"), "m_run": (":run", "{m}_run"),
                "m_new": (":new", "{m}_new"), "m_ref": (":ref", "{m}_ref"), "acc": (":acc", "acc"),
                "acc_dq": (":acc:dq", "acc_{dq}"), "acc_dk": (":acc:dk", "acc_{dk}"),
                "acc_dv": (":acc:dv", "acc_{dv}")}
    fn, n, names = _allocate(ir, roles, internal, {"i": i.name, "j": j.name, "d": dd.name, "e": e.name})

    axes = {q.name: (i.name, dd.name), k.name: (j.name, dd.name), v.name: (j.name, e.name),
            out.name: (i.name, e.name)}
    for eq in ir.equations:
        axes.setdefault(eq.target.name, tuple(x.name for x in eq.target.indices if x != batch))
    for x in [a for a in ir.tensors.values() if a.role != "input"]:
        axes.setdefault(f"d{x.name}", axes[x.name])
    for x in ir.inputs:
        axes[f"d{x.name}"] = axes[x.name]
    computed = {c for c in axes if c not in (q.name, k.name, v.name, out.name, f"d{out.name}")}
    opts = ", input_precision=PREC"

    def code(expr, target) -> str:
        return tile_code(expr, axes, [t.name if isinstance(t, Symbol) else t for t in target], computed,
                         (batch.name,), names=names, dot_options=opts)

    def inline(expr, keep=()):
        for _ in range(len(ir.equations) + 1):
            subs = {t: defs[str(t.base.label)].rhs for t in expr.atoms(Indexed)
                    if str(t.base.label) in defs and str(t.base.label) not in keep
                    and not isinstance(defs[str(t.base.label)].rhs, (IndexMax, IndexSum))}
            if not subs:
                return expr
            expr = expr.xreplace(subs)
        return expr

    ij, ie, ijx = (i, j), (i, e), (i,)
    score = code(s_eq.rhs, ij)
    m_ind = m_eq.lhs
    m_run, m_new, m_ref = (Indexed(IndexedBase(t), batch, i) for t in (":run", ":new", ":ref"))
    axes.update({t: (i.name,) for t in (":run", ":new", ":ref")})
    l_body = inline(l_eq.rhs.body, keep=(s_name,))
    old, new = sympy.Dummy("old"), sympy.Dummy("new")  # never equal to a spec's symbol
    ratio = rescale_ratio(l_body, m_ind, old, new)
    if ratio is not None:
        ratio = ratio.xreplace({old: m_run, new: m_new})
    else:
        _fail("the normaliser does not rescale with the running max")
    rescale = code(sympy.Piecewise((0, sympy.Eq(m_run, NEG_INF)), (ratio, True)), ijx)
    # O = sum_j P V = (sum_j E V) / L: split off the factors free of j
    (term,) = normalize(inline(o_eq.rhs, keep=(s_name, l_eq.target.name)))
    outer = [f for f in sympy.Mul.make_args(term.mono) if not (free_indices(f) & term.bound)]
    inner = [f for f in sympy.Mul.make_args(term.mono) if free_indices(f) & term.bound]
    inner_body = sympy.Mul(*inner)
    o_ratio = rescale_ratio(inner_body, m_ind, old, new)
    if o_ratio is None or o_ratio.xreplace({old: m_run, new: m_new}) != ratio:
        _fail("the output's sum does not rescale like the normaliser")
    acc = Indexed(IndexedBase(":acc"), batch, i, e)
    axes[":acc"] = (i.name, e.name)
    o_term = code(IndexSum(inner_body.xreplace({m_ind: m_ref}), *term.bound), ie)
    o_final = code(term.coeff * sympy.Mul(*outer) * acc, ie)
    l_term = code(IndexSum(l_body.xreplace({m_ind: m_ref}), j), ijx)
    # the log-sum-exp: P = exp(S - M) / L depends on M and L only through M + log L
    lse = Indexed(IndexedBase(":LSE"), batch, i)
    axes[":LSE"] = (i.name,)
    p_from_lse = sympy.simplify(inline(defs[p_name].rhs, keep=(s_name,)).xreplace(
        {m_ind: lse - sympy.log(l_eq.lhs)}))
    if l_eq.lhs in p_from_lse.atoms(Indexed) or m_ind in p_from_lse.atoms(Indexed):
        _fail("P is not a function of the score and the log-sum-exp alone")
    lse_code = code(m_ind + sympy.log(l_eq.lhs), ijx)

    # -- the backward, from the derived adjoints
    dp_name, ds_name = f"d{p_name}", f"d{s_name}"
    ds_value = steps[s_name].value
    rows = [s for s in ds_value.atoms(IndexSum) if free_indices(s) == {batch, i}]
    if len(rows) != 1:
        _fail(f"expected dS to hold one row sum (Delta), found {len(rows)}")
    delta_sum = rows[0]
    delta = Indexed(IndexedBase(":Delta"), batch, i)
    axes[":Delta"] = (i.name,)
    ds_code = code(ds_value.xreplace({delta_sum: delta}), ij)
    delta_code = code(delta_sum, ijx)
    dp_code = code(steps[p_name].value, ij)
    grads = []
    for x, role in zip(ir.inputs, ("dq", "dk", "dv")):
        value = steps[x.name].value
        (t,) = normalize(value)
        outer = [f for f in sympy.Mul.make_args(t.mono) if not (free_indices(f) & t.bound)]
        inner = [f for f in sympy.Mul.make_args(t.mono) if free_indices(f) & t.bound]
        (loop,) = t.bound
        acc_label = f":acc:{role}"
        acc_x = Indexed(IndexedBase(acc_label), *x.indices)
        axes[acc_label] = axes[x.name]
        target = axes[x.name]
        term_code = code(IndexSum(sympy.Mul(*inner), loop), target)
        final = code(t.coeff * sympy.Mul(*outer) * acc_x, target)
        idx, shown = display_indices(list(x.indices), value)
        grads.append(Pullback(n[role], x.name, n[f"acc_{role}"], base_name(loop), term_code, final,
                              f"d{x.name}[{', '.join(s.name for s in idx)}] = {sympy.sstr(shown)}"))
    loops = {g.of: g.loop for g in grads}
    if loops != {q.name: j.name, k.name: i.name, v.name: i.name}:
        _fail(f"expected dQ to sum over {j} and dK, dV over {i}; found {loops}")
    pullback_text = [f"{dp_name} = {sympy.sstr(steps[p_name].value)}",
                     f"{ds_name} = {sympy.sstr(ds_value)}    (Delta = {sympy.sstr(delta_sum)})"]
    pullback_text += [g.equation for g in grads]
    return AttentionPlan(
        "attention", ir.name, fn, n, score, 'float("-inf")', code(m_eq.rhs.body, ij), rescale, l_term,
        o_term, o_final, lse_code, code(p_from_lse, ij), delta_code, dp_code, ds_code, grads,
        [str(eq) for eq in ir.equations], pullback_text, sympy.sstr(delta_sum))
