"""Stage 5, attention family: two contractions around a row-wise softmax.

An attention spec: a score that contracts Q and K over the head dim; any
elementwise modification of it (``softcap * tanh(R / softcap)``, a bias
``- slopes[h] * (i - j)``) that may use the positions ``i`` and ``j``, tensors
of the batch sets and positions (float or integer) and scalar parameters; an
optional mask (``where(cond, R, -inf)``); a max-shifted softmax over the keys;
a contraction with V.  A parameter ``causal: int`` is the family's own causal
mask (``j <= i``, top-left aligned, a ``bool`` at the API); one named ``scale``
defaults to ``1/sqrt(D)``.  Q may have one batch set K and V lack, the last
(``Q[z, r, i, d]``, ``K[z, j, d]``: grouped-query attention, the query heads ``r``
of a group sharing one k/v head): the engine then derives dK and dV as sums over
``r`` and ``i``, and the plan's :attr:`AttentionPlan.group` (from those sums) makes
the dK/dV kernel loop over the group's query heads.

The spec's shape is checked, then every formula the flash-style kernels need
is printed from the derivation:

* forward: the score tiles (the contraction -> ``tl.dot``, then each
  modification and mask, in spec order), the mask
  value (the identity of the ``max``), the online statistics (running max, the
  sum ``L`` and the unnormalised output, with the rescale factor derived by
  :func:`derive.plan.rescale_ratio`), the output ``O = acc / L`` and the
  log-sum-exp saved for the backward;
* backward: ``P`` recomputed from the log-sum-exp alone (derived: substituting
  ``M = LSE - log L`` into ``P = exp(S - M) / L`` eliminates ``L``), ``Delta``
  (the row sum left in ``dS`` after definition folding), ``dP``, ``dS`` and the
  pullbacks of the modification (each equation's derived pullback, with the
  forward values it repeats folded back into their names: ``1 - tanh(R/c)**2``
  is ``1 - (S/c)**2``), and the three contraction pullbacks, each split into a
  per-tile sum and a final factor.

The backward's tile statements are printed twice: as ``[i, j]`` tiles for the
dQ kernel (queries as the MMA's rows), and as ``[j, i]`` tiles for the dK/dV
kernel (:class:`KeyRows`: keys as the rows, the score transposed, as in
Triton's fused-attention tutorial), so that each kernel's dots have the
streamed-over block as their N or K dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import sympy
from sympy import Indexed, IndexedBase, Symbol

from .derivation import Derivation
from .ir import IndexMax, IndexSum, Indicator, Position, Where, base_name, condition_text, free_indices
from .names import Names, template_identifiers
from .plan import NEG_INF, TEMPLATES, PlanError, rescale_ratio
from .printer import NotSupported, index_code, tile_code, triton_code
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
    term: str        # one tile's contribution (a tl.dot), its score tile [i, j]
    final: str       # the result from the accumulator
    equation: str
    kv_term: str = ""  # the same contribution from [j, i] score tiles (the dK/dV kernel's, see KeyRows)
    group: tuple = ()  # the query-only batch sets it also sums over (dK, dV of grouped attention: "r")

    @property
    def over(self) -> str:
        """The indices it sums over, for comments: "j", or "r, i"."""
        return ", ".join([*self.group, self.loop])


@dataclass
class Stmt:
    """One tile statement of a kernel: ``name = code  # comment``."""
    name: str
    code: str
    comment: str = ""


@dataclass
class KeyRows:
    """The dK/dV kernel's statements: the same formulas as the plan's backward
    ones, printed for score tiles laid out ``[j, i]`` (keys as rows, queries as
    columns; row statistics broadcast along the columns, ``LSE[None, :]``)."""
    score_steps: list[Stmt]
    p_code: str
    dp_code: str
    ds_code: str
    bwd_steps: list[Stmt]


@dataclass
class Load:
    """A load of an input besides Q, K, V at one use: a scalar, a vector over
    the queries or keys, or a tile.  ``on_i``/``on_j``: it depends on the query
    (key) positions, so it lies inside the loop over them."""
    name: str
    code: str
    on_i: bool
    on_j: bool
    comment: str = ""


@dataclass
class Extra:
    """An input of the modification or mask (a per-head slope, per-token document ids)."""
    name: str            # the spec's name
    arg: str             # its argument name in the module's functions
    dtype: str           # "float" or "int"
    layout: list         # per declared index set: its batch set's position (an int), "i" or "j"
    kargs: list          # the kernel's arguments: pointer, batch offsets, one stride per "i"/"j" set
    decl: str            # "slopes[h]", for messages
    cross: bool = False  # read at query positions along an axis declared over keys, or the reverse (M = N)
    grad: str = "none"   # "built": the kernels compute its gradient; "unbuilt": a float read across,
                         # "grouped": one of a grouped spec (both refused with requires_grad)


@dataclass
class ExtraGrad:
    """The gradient of a float input X of the modification, from its derived pullback
    (a sum over the positions and batch sets X lacks of a tile the backward kernels
    compute).  X indexed by the key position is accumulated in the dK/dV kernel (which
    streams every query past a block of keys), any other in the dQ kernel (every key
    past a block of queries); each program writes its partial sums, the runtime sums
    them over the batch sets (and positions) X lacks, in a fixed order."""
    of: str             # the spec's name, "slopes"
    arg: str            # its argument name in the module's functions
    slot: int           # its position among the extras
    kernel: str         # "dq" or "dkdv"
    positions: tuple    # the partials' position axes after the batch entry: ("i",), ("j",) or ("i", "j")
    tile: Stmt          # the masked summand over one (query, key) tile
    acc: str | None     # the partial sums per row (dq) or per key (dkdv); None: the tile is stored as it is
    term: str           # the accumulator's increment: the tile summed over the other position
    ptr: str            # the kernel's pointer to the partials
    flag: str           # the kernel's constexpr: the gradient is wanted
    equation: str       # dslopes[h] = ..., for the docstrings


@dataclass
class Param:
    name: str            # the spec's name
    arg: str             # the argument name in the module's functions
    dtype: str           # "float" or "int"
    default: object      # None: required; a number; for scale, None means 1/sqrt(D)
    annot: str           # the custom op's annotation: "float" or "int"


@dataclass
class AttentionPlan:
    family: str
    name: str        # the spec's op name
    fn: str          # the public function's name
    n: dict          # every other identifier the template writes, by role (see _allocate)
    extras: list[Extra]
    params: list[Param]       # the kernels' scalar parameters, in spec order (scale among them)
    scale: Param | None       # the parameter named scale (None -> 1/sqrt(D)), if declared
    causal: Param | None      # the family's causal flag, if declared (causal: int = 0 or 1)
    n_sets: int               # batch index sets of Q (z, or b and h)
    loads: list[Load]
    # forward
    score_steps: list[Stmt]   # the contraction, then each modification and mask, in spec order
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
    bwd_steps: list[Stmt]     # the modification's pullbacks, then the contraction pullbacks' tiles
    grads: list[Pullback]
    forward_text: list[str]
    pullback_text: list[str]
    delta_text: str
    masked: bool = False      # the score has a mask of its own (where(cond, s, -inf))
    kv: KeyRows | None = None  # the dK/dV kernel's statements, score tiles [j, i]
    # tiles the mask removes entirely (see _skips): the key range of a query tile (forward, dQ),
    # the query range of a key tile (dK/dV), as integer code in the tile's first position
    # (start_m / start_n) and the tile size; "" where the mask bounds nothing
    key_start: str = ""       # the first key any query of the tile can see
    key_stop: str = ""        # one past the last
    key_text: str = ""        # the per-query bounds they come from, for comments
    query_start: str = ""
    query_stop: str = ""
    query_text: str = ""
    tile_ranges: list = field(default_factory=list)  # Loads: min/max of integer inputs over a tile
    tile_test: str = ""       # the tiles' ranges overlap: some pair may pass the mask
    tile_text: str = ""
    group: str | None = None  # the query-only batch set (Q[z, r, i, d], K[z, j, d]: "r") that dK, dV sum over
    xgrads: list[ExtraGrad] = field(default_factory=list)  # the float extras' gradients

    def xgrads_in(self, kernel: str) -> list[ExtraGrad]:
        return [g for g in self.xgrads if g.kernel == kernel]

    @property
    def xgrads_meta(self) -> list[dict]:
        """What the runtime allocates and reduces for each extra's gradient."""
        return [{"slot": g.slot, "positions": list(g.positions)} for g in self.xgrads]

    @property
    def score(self) -> str:
        """The contraction's tile (the first score statement)."""
        return self.score_steps[0].code

    @property
    def kernel_args(self) -> str:
        """The kernels' arguments for the other inputs, then the scalar parameters."""
        return ", ".join([a for x in self.extras for a in x.kargs] + [self.n[f"param:{q.name}"] for q in self.params])

    @property
    def extras_meta(self) -> list[dict]:
        """What the runtime checks and lays out for each other input."""
        return [{"name": x.arg, "decl": x.decl, "dtype": x.dtype, "layout": x.layout, "cross": x.cross,
                 "grad": x.grad} for x in self.extras]

    @property
    def public_params(self) -> list[str]:
        """The keyword-only parameters of the public function, with their defaults:
        required ones, then causal, then those with defaults, then scale."""
        out = [f"{q.arg}: {q.annot}" for q in self.params if q.default is None and q is not self.scale]
        if self.causal is not None:
            out.append(f"{self.causal.arg}: bool = {bool(self.causal.default)}")
        out += [f"{q.arg}: {q.annot} = {q.default!r}" for q in self.params
                if q.default is not None and q is not self.scale]
        if self.scale is not None:
            out.append(f"{self.scale.arg}: float | None = None")
        if self.group is not None:
            out.append("enable_gqa: bool = False")
        return out

    @property
    def aot_cases(self) -> str:
        """``AOT_CASES``'s text: representative calls at B=4, H=16, N=4096 (`pullback build`)."""
        def inputs(h_kv: int) -> list:
            """q [4, 16, 4096, D], k and v with h_kv heads, the other inputs (sized as
            the kernels see q: [4, h_kv, 16 // h_kv, ...] when grouped)."""
            lead = [4, h_kv, 16 // h_kv] if self.group is not None else [4, 16]
            sets = [lead[:len(lead) - (self.n_sets - 1)]] + [[x] for x in lead[len(lead) - (self.n_sets - 1):]]
            out = [[4, 16, 4096, "D"], [4, h_kv, 4096, "D"], [4, h_kv, 4096, "D"]]
            for x in self.extras:
                shape = [m for a in x.layout for m in (sets[a] if isinstance(a, int) else [4096])]
                out.append({"shape": shape, "dtype": "int64" if x.dtype == "int" else "float32"})
            return out

        kwargs = {q.arg: (256 if q.dtype == "int" else 1.0) for q in self.params
                  if q.default is None and q is not self.scale}
        flags = [False, True] if self.causal is not None and self.name == "attention" else [None]
        cases = []
        for d in (64, 128) if self.name == "attention" else (64,):  # the variants: one head dim (build time)
            for flag in flags:
                kw = dict(kwargs, **({self.causal.arg: flag} if flag is not None else {}))
                label = f"B=4 H=16 N=4096 D={d}" + (" causal" if flag else "")
                shapes = [[d if a == "D" else a for a in s] if isinstance(s, list) else s for s in inputs(16)]
                cases.append({"op": self.fn, "label": label, "inputs": shapes, "kwargs": kw,
                              "dtypes": ["float16", "bfloat16", "float32", "float64"]})
        if self.group is not None:  # 4 query heads per k/v head: dK, dV loop over the group
            d = 128 if self.name == "attention" else 64
            shapes = [[d if a == "D" else a for a in s] if isinstance(s, list) else s for s in inputs(4)]
            cases.append({"op": self.fn, "label": f"B=4 Hq=16 Hkv=4 N=4096 D={d}", "inputs": shapes,
                          "kwargs": dict(kwargs, enable_gqa=True), "dtypes": ["float16", "bfloat16", "float32",
                                                                              "float64"]})
        if self.xgrads:  # the same call with the float extras learned: the backward kernels accumulate their gradients
            learned = {x.slot for x in self.xgrads}
            shapes = [dict(s, requires_grad=True) if k - 3 in learned else s for k, s in enumerate(cases[0]["inputs"])]
            cases.append(dict(cases[0], label=cases[0]["label"] + " learned " + ", ".join(x.arg for x in self.xgrads),
                              inputs=shapes))
        if self.name == "attention":
            cases.append({"op": self.fn, "label": "B=1 H=16 N=1024 D=256", "inputs": [[1, 16, 1024, 256]] * 3,
                          "kwargs": {}, "dtypes": ["float16", "bfloat16"]})
        return "[\n" + "".join(f"    {c!r},\n" for c in cases) + "]"

    def grad(self, name: str) -> Pullback:
        return next(g for g in self.grads if g.of == name)


def _fail(msg: str):
    raise PlanError(f"attention family: {msg}")


def _allocate(ir, roles: dict, internal: dict, indices: dict, extras: list) -> tuple[str, dict, dict]:
    """Every identifier of the op's module that depends on the spec, from
    :class:`derive.names.Names`: the public function, its arguments and kernel
    names in the module's scope (the whole template's words reserved), the
    values, pointers, strides and sizes in the kernels' scope (the kernels' words
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
    # the public function's arguments: locals of the module's Python functions, which read
    # only the words written outside the kernels (a parameter may be named pid or alpha)
    outside = source.split(KERNELS_BEGIN, 1)[0] + source.split(KERNELS_END, 1)[1]
    args = Names(template_identifiers(outside) | {fn} | set(n.values()))
    for x in extras:
        n[f"arg:{x}"] = args.take(x)
    for prm in ir.params:
        n[f"arg:{prm.name}"] = args.take(prm.name)
    label: dict[str, str] = {}

    def value(key: str, want: str) -> str:
        label[key] = kn.of(("value", key), want)
        return label[key]

    # the spec's own names first, in spec order, so that they are kept where they can be
    for t in ir.tensors.values():
        value(t.name, t.name)
    for prm in ir.params:
        n[f"param:{prm.name}"] = value(prm.name, prm.name)
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
    for role in ("q", "k", "v", "o", "do", "dq", "dk", "dv"):  # tensor descriptors (TMA)
        n[f"{role}_desc"] = kn.take(f"{n[role]}_desc")
    for x in indices:  # "r" too for grouped attention: the query heads per k/v head
        n[f"n_{x}"] = kn.take(f"n_{indices[x]}")
    n["kn"] = kn  # for the plan's further kernel names (the extras' pointers and loads)
    return fn, n, label


def _fold(expr, eqs):
    """Fold forward values back into their names: where an equation ``T = a * F(x) + b``
    (``a``, ``b`` free of tensors and of ``F``) defines ``T`` through one function
    application ``F(x)``, each ``F(x)`` in ``expr`` becomes ``(T - b) / a`` (so the
    pullback of a tanh cap reads the capped score, never a second tanh)."""
    for eq in eqs:
        for f in eq.rhs.atoms(sympy.Function):
            if not isinstance(f, (sympy.tanh, sympy.exp, sympy.log)) or not expr.has(f):
                continue
            x = sympy.Dummy("x")
            r = eq.rhs.xreplace({f: x})
            if r.has(f):
                continue
            a, b = r.diff(x), r.xreplace({x: 0})
            if (a == 0 or a.has(x) or a.atoms(Indexed) or a.has(Where, Indicator) or b.has(x)
                    or b.has(Where) or sympy.expand(a * x + b - r) != 0):
                continue
            expr = expr.xreplace({f: (eq.lhs - b) / a})
    return expr


def _score_contributions(step, chain_names) -> list:
    """The derived contributions to ``step``'s adjoint, each from a step of the score
    (the chain rule's terms the backward kernels can form); a located failure if the
    tensor is read anywhere else."""
    parts = [c for who, c in step.contributions if who in chain_names]
    if len(parts) != len(step.contributions):
        _fail(f"{step.tensor.name} is read outside the score")
    return parts


def _chain(ir, defs, s_name, batch, i, j) -> list:
    """The score's equations, in spec order: every defined tensor the max's
    argument depends on (the contraction, the modification, the mask)."""
    need, stack = set(), [s_name]
    while stack:
        name = stack.pop()
        if name in need:
            continue
        need.add(name)
        for t in defs[name].rhs.atoms(Indexed):
            if str(t.base.label) in defs:
                stack.append(str(t.base.label))
    chain = [eq for eq in ir.equations if eq.target.name in need]
    for eq in chain:
        if eq.target.indices != (*batch, i, j) or isinstance(eq.rhs, IndexMax):
            _fail(f"the score's equation {eq.target.name} must be elementwise over [{', '.join(x.name for x in (*batch, i, j))}]")
    names = {eq.target.name for eq in chain}
    for eq in ir.equations:
        if eq.target.name in names:
            continue
        used = {str(t.base.label) for t in eq.rhs.atoms(Indexed)} & (names - {s_name})
        if used:
            _fail(f"{eq.target.name} reads {', '.join(sorted(used))}, a step of the score before {s_name}; "
                  f"the softmax may read only the score {s_name}")
    return chain


def _mask_conjuncts(s_eq) -> list:
    """The conditions of the score's mask, split at ``and``: ``where(c1 and c2, where(c3, s,
    -inf), -inf)`` -> [c1, c2, c3].  Only a where at the top of the score the max reads
    removes keys outright (a modification after it could turn -inf finite: tanh(-inf) = -1)."""
    out, e = [], s_eq.rhs
    while isinstance(e, Where) and e.other == NEG_INF:
        out += list(sympy.And.make_args(e.cond))
        e = e.then
    return out


_RELATIONS = {sympy.StrictLessThan: (1, True), sympy.LessThan: (1, False),
              sympy.StrictGreaterThan: (-1, True), sympy.GreaterThan: (-1, False)}


def _position_bounds(conjuncts, x, y, params) -> tuple[list, list, sympy.Dummy]:
    """Bounds on the position ``x`` as functions of the position ``y`` (a dummy ``v``), from each
    conjunct that is a linear inequality (or equality) in the two positions with number
    coefficients, the rest a polynomial in the int ``params``; solved with SymPy.  Returns
    (starts, stops, v): (first visible x, inclusive; coefficient of v) and (one past the last,
    exclusive; coefficient of v).  Every other conjunct bounds nothing.  Integer rounding:
    a solution ``x <= N/d`` with d > 1 is printed ``N // d``, within one of the exact quotient
    whichever way the kernel rounds, and the bound keeps that slack, so it never excludes a
    visible position."""
    u, v = sympy.Dummy("u"), sympy.Dummy("v")
    starts, stops = [], []
    for c in conjuncts:
        if isinstance(c, sympy.Eq):
            rels = [(c.lhs - c.rhs, False), (c.rhs - c.lhs, False)]
        elif type(c) in _RELATIONS:
            sign, strict = _RELATIONS[type(c)]
            rels = [(sign * (c.lhs - c.rhs), strict)]
        else:
            continue
        for e, strict in rels:  # e < 0 (strict) or e <= 0
            e = sympy.expand(e.xreplace({Position(x): u, Position(y): v}))
            if e.atoms(Indexed, Position, sympy.Function) or not e.free_symbols <= {u, v, *params}:
                continue
            a, b = e.coeff(u), e.coeff(v)
            rest = sympy.expand(e - a * u - b * v)
            if not (a.is_Rational and a != 0 and b.is_Rational) or rest.has(u, v):
                continue
            if params and not rest.is_polynomial(*params):
                continue
            coeffs = sympy.Poly(rest, *params).coeffs() if params else [rest]
            if not all(k.is_Rational for k in coeffs):
                continue
            scale = sympy.ilcm(*[sympy.fraction(k)[1] for k in [a, b, *coeffs]])  # integer coefficients
            a, b, rest = a * scale, b * scale, sympy.expand(rest * scale)
            if a > 0:  # a u <(=) -(b v + rest): an upper bound on u
                num, den = -(b * v + rest), a
                stop = (num if strict else num + 1) if den == 1 else sympy.floor(num / den) + 1
                stops.append((stop, -b))
            else:      # -a u >(=) b v + rest: a lower bound
                num, den = b * v + rest, -a
                start = (num + 1 if strict else num) if den == 1 else sympy.floor(num / den)
                starts.append((start, b))
    return starts, stops, v


def _tile_range(bounds, first, last, names, x, y) -> tuple[str, str, str]:
    """A tile's range from per-position bounds (monotone in v): the first visible position is the
    least start over the tile's positions (at its first or last one, by the sign of v's
    coefficient), the stop the greatest; several conjuncts: the greatest start, the least stop.
    Returns the printed start, the printed stop and the per-position bounds as text."""
    starts, stops, v = bounds
    pick = lambda k, low: (first if (k >= 0) == low else last)  # noqa: E731
    start = [e.xreplace({v: pick(k, True)}) for e, k in starts]
    stop = [e.xreplace({v: pick(k, False)}) for e, k in stops]
    show = {v: Symbol(y)}
    text = [f"{x} >= {sympy.sstr(e.xreplace(show))}" for e, _ in starts] + \
        [f"{x} < {sympy.sstr(e.xreplace(show))}" for e, _ in stops]
    try:
        return (index_code(sympy.Max(*start), names) if start else "",
                index_code(sympy.Min(*stop), names) if stop else "", ", ".join(text))
    except NotSupported:  # (not expected: the bounds hold integers and floors only) no bounds
        return "", "", ""


def _id_overlaps(conjuncts, ints, i, j, uses, names, kn) -> tuple[list, str, str]:
    """``ids[.., i] == ids[.., j]`` (integer inputs, one read at the query and one at the key
    positions) holds for no pair of a query tile and a key tile whose ranges of values do
    not overlap.  Returns the Loads of each tile's min and max (rows past the end take the
    tile's max for its min and its min for its max: they widen nothing), the overlap test and
    its text."""
    loads, tests, texts = [], [], []
    for c in conjuncts:
        if not (isinstance(c, sympy.Eq) and isinstance(c.lhs, Indexed) and isinstance(c.rhs, Indexed)):
            continue
        a, b = c.lhs, c.rhs
        if not {str(a.base.label), str(b.base.label)} <= ints:
            continue
        pa, pb = ([s for s in t.indices if s in (i, j)] for t in (a, b))
        if (pa, pb) == ([j], [i]):
            a, b = b, a
        elif (pa, pb) != ([i], [j]):
            continue
        bounds = []
        for t, ok, on_i in ((a, "row_ok", True), (b, "col_ok", False)):
            label = str(uses[t].base.label)
            x = names[label]
            lo, hi = kn.take(f"{x}_lo"), kn.take(f"{x}_hi")
            loads += [Load(lo, f"tl.min(tl.where({ok}, {x}, tl.max({x}, axis=0)), axis=0)", on_i, not on_i,
                           f"least {sympy.sstr(t)} of the tile"),
                      Load(hi, f"tl.max(tl.where({ok}, {x}, tl.min({x}, axis=0)), axis=0)", on_i, not on_i,
                           f"greatest {sympy.sstr(t)} of the tile")]
            bounds.append((Symbol(lo), Symbol(hi)))
        (qlo, qhi), (klo, khi) = bounds
        tests.append(sympy.And(sympy.Le(klo, qhi, evaluate=False), sympy.Le(qlo, khi, evaluate=False)))
        texts.append(condition_text(sympy.StrPrinter(), c))
    if not tests:
        return [], "", ""
    return loads, triton_code(sympy.And(*tests)), " and ".join(texts)


def plan_attention(d: Derivation) -> AttentionPlan:
    ir = d.ir
    decls = {x.name: x for x in (d.spec.param_decls if d.spec is not None else [])}
    floats = [t for t in ir.inputs if t.dtype != "int"]
    if len(floats) < 3:
        _fail("expected the inputs Q[..., i, d], K[..., j, d], V[..., j, e] first")
    q, k, v = ir.inputs[:3]
    extras_t = ir.inputs[3:]
    out = ir.output
    defs = {eq.target.name: eq for eq in ir.equations}
    if len(q.indices) < 3 or q.dtype == "int" or k.dtype == "int" or v.dtype == "int":
        _fail("declare Q[z, i, d], K[z, j, d], V[z, j, e] -> O[z, i, e]")
    batch, (i, dd) = q.indices[:-2], q.indices[-2:]
    j, e = k.indices[-2], v.indices[-1]
    # grouped-query attention: Q's batch sets may end in one set K and V lack (Q[z, r, i, d],
    # K[z, j, d]: the query heads r of a group share one k/v head)
    kv_batch = k.indices[:-2]
    group = batch[len(kv_batch):]
    if not (kv_batch == batch[:len(kv_batch)] and len(group) <= 1 and (kv_batch or not group)
            and k.indices == (*kv_batch, j, dd) and v.indices == (*kv_batch, j, e) and out.indices == (*batch, i, e)
            and len({i, j, dd, e, *batch}) == len(batch) + 4 and len(ir.outputs) == 1):
        _fail("declare Q[z, i, d], K[z, j, d], V[z, j, e] -> O[z, i, e] (z: the batch index sets), or, "
              "grouped, Q[z, r, i, d], K[z, j, d], V[z, j, e] -> O[z, r, i, e] (r: the query heads that "
              "share one k/v head, the last of Q's batch sets)")
    for x in extras_t:
        if not set(x.indices) <= {*batch, i, j} or list(x.indices) != sorted(
                x.indices, key=lambda s: [*batch, i, j].index(s)):
            _fail(f"{x.name} must be indexed by the batch sets and the positions {i} and {j}, in the order "
                  f"[{', '.join(s.name for s in (*batch, i, j))}]")
    # -- the chain S -> M -> E -> L -> P -> O
    maxes = [eq for eq in ir.equations if isinstance(eq.rhs, IndexMax)]
    if len(maxes) != 1 or maxes[0].rhs.indices != (j,):
        _fail(f"expected one max over the key index {j}")
    m_eq = maxes[0]
    s_name = str(m_eq.rhs.body.base.label) if isinstance(m_eq.rhs.body, Indexed) else _fail("max of a named score")
    s_eq = defs[s_name]
    m_name = m_eq.target.name
    chain = _chain(ir, defs, s_name, batch, i, j)
    # the sums over the key index: L (the normaliser) and the output's contraction
    sums = [eq for eq in ir.equations if isinstance(eq.rhs, IndexSum) and eq.rhs.indices == (j,)]
    o_eq = defs[out.name]
    l_eqs = [eq for eq in sums if eq is not o_eq and eq.target.indices == (*batch, i)]
    if len(l_eqs) != 1 or o_eq not in sums:
        _fail(f"expected the normaliser L = sum[{j}](...) and O = sum[{j}](P * V)")
    l_eq = l_eqs[0]
    p_names = [x for x, eq in defs.items() if eq.target.indices == (*batch, i, j) and x != s_name
               and not isinstance(eq.rhs, IndexSum) and eq not in chain]
    p_name = next((x for x in p_names if x in {str(t.base.label) for t in o_eq.rhs.atoms(Indexed)}), None)
    if p_name is None:
        _fail("the output must contract the softmax P with V")
    steps = {s.tensor.name: s for s in d.steps}
    if not (steps.get(p_name) and steps[p_name].kept and steps.get(s_name)):
        _fail("expected named adjoints of P and S")

    # -- parameters: causal is the family's flag, scale defaults to 1/sqrt(D)
    causal_sym = next((x for x in ir.params if x.name == "causal"), None)
    if causal_sym is not None:
        cd = decls.get("causal")
        if cd is None or cd.dtype != "int" or cd.default not in (0, 1):
            _fail("causal is the family's causal mask: declare it causal: int = 0 (or 1, on by default)")
        if any(eq.rhs.has(causal_sym) for eq in ir.equations):
            _fail("causal is the family's causal mask (j <= i, applied by the kernels); the equations cannot use it")

    # -- names: the plan's own tiles have labels no spec name can take (":" is not in identifiers)
    roles = {"q": q.name, "k": k.name, "v": v.name, "o": out.name, "do": f"d{out.name}", "s": s_name,
             "m": m_name, "l": l_eq.target.name, "p": p_name, "dp": f"d{p_name}", "ds": f"d{s_name}",
             "dq": f"d{q.name}", "dk": f"d{k.name}", "dv": f"d{v.name}"}
    internal = {"lse": (":LSE", "LSE"), "delta": (":Delta", "Delta"), "m_run": (":run", "{m}_run"),
                "m_new": (":new", "{m}_new"), "m_ref": (":ref", "{m}_ref"), "acc": (":acc", "acc"),
                "acc_dq": (":acc:dq", "acc_{dq}"), "acc_dk": (":acc:dk", "acc_{dk}"),
                "acc_dv": (":acc:dv", "acc_{dv}")}
    fn, n, names = _allocate(ir, roles, internal, {"i": i.name, "j": j.name, "d": dd.name, "e": e.name,
                                                   **({"r": group[0].name} if group else {})},
                             [x.name for x in extras_t])
    kn = n.pop("kn")

    params, scale, causal = [], None, None
    for prm in ir.params:
        decl = decls.get(prm.name)
        dtype = decl.dtype if decl is not None else "float"
        default = decl.default if decl is not None else None
        if default == "eps":
            _fail(f"{prm.name} = eps: attention's parameters default to numbers")
        q_ = Param(prm.name, n[f"arg:{prm.name}"], dtype, default, "int" if dtype == "int" else "float")
        if prm is causal_sym:
            causal = q_
            continue
        params.append(q_)
        if prm.name == "scale":
            if dtype != "float" or default is not None:
                _fail("scale is the score's scale: declare it without a type or default (None means 1/sqrt(D))")
            scale = q_

    axes = {q.name: (i.name, dd.name), k.name: (j.name, dd.name), v.name: (j.name, e.name),
            out.name: (i.name, e.name)}
    for eq in ir.equations:
        axes.setdefault(eq.target.name, tuple(x.name for x in eq.target.indices if x not in batch))
    for x in [a for a in ir.tensors.values() if a.role != "input"]:
        axes.setdefault(f"d{x.name}", axes[x.name])
    for x in ir.inputs[:3]:
        axes[f"d{x.name}"] = axes[x.name]
    computed = {c for c in axes if c not in (q.name, k.name, v.name, out.name, f"d{out.name}")}
    opts = ", input_precision=PREC"
    positions = {i.name: "offs_i", j.name: "offs_j"}
    batch_names = tuple(x.name for x in batch)

    # -- the other inputs: one kernel value per use (ids[b, i] and ids[b, j] are two loads)
    extras, loads, uses, differentiable = [], [], {}, []
    for x in extras_t:
        layout = [batch.index(s) if s in batch else ("i" if s == i else "j") for s in x.indices]
        ptr, zoff = kn.take(f"{names[x.name]}_ptr"), kn.take(f"{names[x.name]}_zoff")
        strides = {s: kn.take(f"{names[x.name]}_s{s.name}") for s in x.indices if s in (i, j)}
        extras.append(Extra(x.name, n[f"arg:{x.name}"], x.dtype, layout, [ptr, zoff, *strides.values()],
                            f"{x.name}[{', '.join(s.name for s in x.indices)}]"))
        zname = kn.take(f"{names[x.name]}_z")
        loads.append(Load(zname, f"tl.load({zoff} + z)", False, False, f"{x.name}'s offset for this batch entry"))
        seen = sorted({t for eq in chain for t in eq.rhs.atoms(Indexed) if t.base.label == x.base.label},
                      key=str)
        for use in seen:
            pos = [(decl_s, used) for decl_s, used in zip(x.indices, use.indices) if decl_s in (i, j)]
            if any(decl_s != used for decl_s, used in pos):
                extras[-1].cross = True
            if [u for u in use.indices if u in batch] != [s_ for s_ in x.indices if s_ in batch]:
                _fail(f"{x.name} must be read at the batch sets it is declared with: {sympy.sstr(use)}")
            label = f":use:{x.name}:{','.join(s.name for s in use.indices)}"
            want = x.name if tuple(use.indices) == x.indices else f"{x.name}_{'_'.join(u.name for _, u in pos)}"
            name = names[x.name] if tuple(use.indices) == x.indices else kn.take(want)
            names[label] = name
            axes[label] = tuple(u.name for _, u in pos)
            uses[use] = Indexed(IndexedBase(label), *use.indices)
            offs, oks = [], []
            for k_, (decl_s, used) in enumerate(pos):
                o, ok = ("offs_i", "row_ok") if used == i else ("offs_j", "col_ok")
                b = "" if len(pos) == 1 else ("[:, None]" if k_ == 0 else "[None, :]")
                offs.append(f"{o}{b} * {strides[decl_s]}")
                oks.append(f"{ok}{b}")
            cast = ".to(ACC)" if x.dtype == "float" else ""
            if pos:
                code = f"tl.load({ptr} + {zname} + {' + '.join(offs)}, mask={' & '.join(oks)}, other=0){cast}"
            else:
                code = f"tl.load({ptr} + {zname}){cast}"
            loads.append(Load(name, code, any(u == i for _, u in pos), any(u == j for _, u in pos),
                              sympy.sstr(use)))
        if x.dtype == "float" and steps.get(x.name) is not None and steps[x.name].value != 0:
            differentiable.append((len(extras) - 1, x))

    # -- tiles the mask removes entirely: bounds from its linear conditions on the positions,
    # an overlap test from its equalities of integer inputs
    conjuncts = _mask_conjuncts(s_eq)
    int_params = [prm for prm in ir.params if prm is not causal_sym and decls.get(prm.name) is not None
                  and decls[prm.name].dtype == "int"]
    first, block = Symbol(":first"), Symbol(":block")
    skips = {}
    for x, y, (f, b) in ((j, i, ("start_m", "BLOCK_M")), (i, j, ("start_n", "BLOCK_N"))):
        skips[x] = _tile_range(_position_bounds(conjuncts, x, y, int_params), first, first + block - 1,
                               dict(names, **{":first": f, ":block": b}), x.name, y.name)
    tile_ranges, tile_test, tile_text = _id_overlaps(
        conjuncts, {t.name for t in extras_t if t.dtype == "int"}, i, j, uses, names, kn)

    def code(expr, target) -> str:
        expr = expr.xreplace(uses)
        return tile_code(expr, axes, [t.name if isinstance(t, Symbol) else t for t in target], computed,
                         batch_names, names=names, dot_options=opts, positions=positions)

    def code_kv(expr, target) -> str:
        """``code`` for the dK/dV kernel, whose computed score-shaped tiles are [j, i]."""
        flipped = {c: a[::-1] if c in computed and tuple(a) == (i.name, j.name) else a for c, a in axes.items()}
        return tile_code(expr.xreplace(uses), flipped, [t.name if isinstance(t, Symbol) else t for t in target],
                         computed, batch_names, names=names, dot_options=opts, positions=positions)

    def inline(expr, keep=()):
        for _ in range(len(ir.equations) + 1):
            subs = {t: defs[str(t.base.label)].rhs for t in expr.atoms(Indexed)
                    if str(t.base.label) in defs and str(t.base.label) not in keep
                    and not isinstance(defs[str(t.base.label)].rhs, (IndexMax, IndexSum))}
            if not subs:
                return expr
            expr = expr.xreplace(subs)
        return expr

    ij, ie, ijx, ji = (i, j), (i, e), (i,), (j, i)
    score_steps = [Stmt(names[eq.target.name], code(eq.rhs, ij), str(eq)) for eq in chain]
    kv = KeyRows([Stmt(names[eq.target.name], code_kv(eq.rhs, ji), str(eq)) for eq in chain], "", "", "", [])
    m_ind = m_eq.lhs
    row = (*batch, i)
    m_run, m_new, m_ref = (Indexed(IndexedBase(t), *row) for t in (":run", ":new", ":ref"))
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
    acc = Indexed(IndexedBase(":acc"), *batch, i, e)
    axes[":acc"] = (i.name, e.name)
    o_term = code(IndexSum(inner_body.xreplace({m_ind: m_ref}), *term.bound), ie)
    o_final = code(term.coeff * sympy.Mul(*outer) * acc, ie)
    l_term = code(IndexSum(l_body.xreplace({m_ind: m_ref}), j), ijx)
    # the log-sum-exp: P = exp(S - M) / L depends on M and L only through M + log L
    lse = Indexed(IndexedBase(":LSE"), *row)
    axes[":LSE"] = (i.name,)
    p_from_lse = sympy.simplify(inline(defs[p_name].rhs, keep=(s_name,)).xreplace(
        {m_ind: lse - sympy.log(l_eq.lhs)}))
    if l_eq.lhs in p_from_lse.atoms(Indexed) or m_ind in p_from_lse.atoms(Indexed):
        _fail("P is not a function of the score and the log-sum-exp alone")
    lse_code = code(m_ind + sympy.log(l_eq.lhs), ijx)

    # -- the backward, from the derived adjoints
    dp_name, ds_name = f"d{p_name}", f"d{s_name}"
    ds_value = steps[s_name].value
    rows = [s for s in ds_value.atoms(IndexSum) if free_indices(s) == set(row)]
    if len(rows) != 1:
        _fail(f"expected dS to hold one row sum (Delta), found {len(rows)}")
    delta_sum = rows[0]
    delta = Indexed(IndexedBase(":Delta"), *row)
    axes[":Delta"] = (i.name,)
    ds_code = code(ds_value.xreplace({delta_sum: delta}), ij)
    delta_code = code(delta_sum, ijx)
    dp_code = code(steps[p_name].value, ij)
    kv.p_code = code_kv(p_from_lse, ji)
    kv.ds_code = code_kv(ds_value.xreplace({delta_sum: delta}), ji)
    kv.dp_code = code_kv(steps[p_name].value, ji)
    # the modification's pullbacks, last equation first: each the sum of its consumers'
    # derived contributions (the engine's chain rule), forward values folded into their names
    chain_names = {eq.target.name for eq in chain}
    bwd_steps, pullback_text = [], [f"{dp_name} = {sympy.sstr(steps[p_name].value)}",
                                    f"{ds_name} = {sympy.sstr(ds_value)}    (Delta = {sympy.sstr(delta_sum)})"]
    for eq in reversed(chain[:-1]):
        st = steps[eq.target.name]
        parts = _score_contributions(st, chain_names)
        raw = _fold(sympy.Add(*parts), chain)
        text, text_kv = code(raw, ij), code_kv(raw, ji)
        if s_eq.lhs in raw.atoms(Indexed):  # it reads the score, -inf where the kernels mask it (valid)
            text, text_kv = f"tl.where(valid, {text}, 0.0)", f"tl.where(valid, {text_kv}, 0.0)"
        bwd_steps.append(Stmt(names[f"d{eq.target.name}"], text, f"d{eq.target.name} = {sympy.sstr(raw)}"))
        kv.bwd_steps.append(Stmt(names[f"d{eq.target.name}"], text_kv, f"d{eq.target.name} = {sympy.sstr(raw)}"))
        pullback_text.append(f"d{eq.target.name} = {sympy.sstr(raw)}")
    grads = []
    for x, role in zip(ir.inputs[:3], ("dq", "dk", "dv")):
        value = steps[x.name].value
        terms = normalize(value)
        if len(terms) != 1:
            _fail(f"expected d{x.name} to be one contraction, got {sympy.sstr(value)}")
        (t,) = terms
        outer = [f for f in sympy.Mul.make_args(t.mono) if not (free_indices(f) & t.bound)]
        inner = [f for f in sympy.Mul.make_args(t.mono) if free_indices(f) & t.bound]
        # one position (the kernel's streamed loop), plus the batch sets x lacks (a loop over them)
        loops = [s_ for s_ in t.bound if s_ in (i, j)]
        summed_sets = tuple(s_ for s_ in batch if s_ in t.bound)
        if len(loops) != 1 or len(t.bound) != 1 + len(summed_sets):
            _fail(f"expected d{x.name} to sum over one position, {i} or {j}, and the query-only batch sets, "
                  f"got {sympy.sstr(value)}")
        (loop,) = loops
        operand = [f for f in inner if isinstance(f, Indexed) and set(axes.get(str(f.base.label), ())) & {dd.name, e.name}]
        rest = sympy.Mul(*[f for f in inner if f not in operand])
        if len(operand) != 1:
            _fail(f"expected d{x.name} to contract one tensor with a score-shaped tile, got {sympy.sstr(value)}")
        if not isinstance(rest, Indexed):  # a product of tiles: one plan tile before the dot
            label = f":g:{x.name}"
            tile = Indexed(IndexedBase(label), *batch, i, j)
            axes[label] = (i.name, j.name)
            names[label] = kn.take(f"g_{names[f'd{x.name}']}")
            computed.add(label)
            bwd_steps.append(Stmt(names[label], code(rest, ij), f"the tile d{x.name} contracts"))
            kv.bwd_steps.append(Stmt(names[label], code_kv(rest, ji), f"the tile d{x.name} contracts"))
            rest = tile
        acc_label = f":acc:{role}"
        acc_x = Indexed(IndexedBase(acc_label), *x.indices)
        axes[acc_label] = axes[x.name]
        target = axes[x.name]
        term_code = code(IndexSum(operand[0] * rest, loop), target)
        final = code(t.coeff * sympy.Mul(*outer) * acc_x, target)
        idx, shown = display_indices(list(x.indices), value)
        grads.append(Pullback(n[role], x.name, n[f"acc_{role}"], base_name(loop), term_code, final,
                              f"d{x.name}[{', '.join(s.name for s in idx)}] = {sympy.sstr(shown)}",
                              code_kv(IndexSum(operand[0] * rest, loop), target),
                              tuple(base_name(s_) for s_ in summed_sets)))
    # the kernels' loops, from the derived sums: dQ streams the keys; dK and dV the queries of
    # every query head their k/v head serves (the query-only sets, summed by the engine)
    loops = {g.of: g.over for g in grads}
    shared = ", ".join([*(base_name(s_) for s_ in group), i.name])
    if loops != {q.name: j.name, k.name: shared, v.name: shared}:
        _fail(f"expected dQ to sum over {j} and dK, dV over {shared}; found {loops}")
    pullback_text += [g.equation for g in grads]
    xgrads = _extra_grads(differentiable, extras, steps, chain, chain_names, batch, i, j, axes, names, computed,
                          kn, code, code_kv, bool(group))
    pullback_text += [g.equation for g in xgrads]
    return AttentionPlan(
        "attention", ir.name, fn, n, extras, params, scale, causal, len(batch), loads, score_steps,
        'float("-inf")', code(m_eq.rhs.body, ij), rescale, l_term,
        o_term, o_final, lse_code, code(p_from_lse, ij), delta_code, dp_code, ds_code, bwd_steps, grads,
        [str(eq) for eq in ir.equations], pullback_text, sympy.sstr(delta_sum),
        any(eq.rhs.has(Where) for eq in chain), kv, *skips[j], *skips[i], tile_ranges, tile_test, tile_text,
        grads[1].group[0] if grads[1].group else None, xgrads)


def _extra_grads(differentiable, extras, steps, chain, chain_names, batch, i, j, axes, names, computed, kn,
                 code, code_kv, grouped: bool) -> list[ExtraGrad]:
    """The gradients of the float extras X with a nonzero derived pullback.  Each is
    ``dX = sum[the batch sets and positions X lacks](a tile)``, the tile printed from the
    derived summand (its consumers' contributions: dS and the modification's pullbacks,
    which the backward kernels compute); the kernel that streams the position X lacks
    sums the tile over it (tl.sum, plan text), the runtime the rest.  An extra read at
    positions other than its declared ones (``ids[b, i]`` of ``ids[b, j]``) gets no
    gradient built: the runtime refuses it with requires_grad.  Neither does any extra of a
    grouped spec (``Q[z, r, i, d]``: the dK/dV kernel's partials would span a group's query
    heads).  The dK/dV kernel's tiles are [keys, queries] (``code_kv``), the dQ kernel's
    [queries, keys]."""
    out = []
    for slot, x in differentiable:
        ex = extras[slot]
        st = steps[x.name]
        if ex.cross or grouped:
            ex.grad = "unbuilt" if ex.cross else "grouped"
            continue
        parts = _score_contributions(st, chain_names)
        lacks = {s.name for s in (*batch, i, j) if s not in x.indices}
        summand = []
        for t in normalize(sympy.Add(*parts)):
            bound = [base_name(b) for b in t.bound]
            if sorted(bound) != sorted(lacks):
                _fail(f"expected d{x.name} to sum over {', '.join(sorted(lacks)) or 'nothing'}, got "
                      f"{sympy.sstr(t.expr())}")
            summand.append(t.coeff * t.mono.xreplace({b: Symbol(base_name(b)) for b in t.bound}))
        summand = _fold(sympy.Add(*summand), chain)
        kernel = "dkdv" if j in x.indices else "dq"
        positions = (i.name, j.name) if i in x.indices and j in x.indices else (
            (j.name,) if kernel == "dkdv" else (i.name,))
        dx = names[f"d{x.name}"]
        label = f":gx:{x.name}"
        axes[label] = (i.name, j.name)
        names[label] = kn.take(f"g_{dx}")
        computed.add(label)
        printer, order = (code_kv, (j, i)) if kernel == "dkdv" else (code, (i, j))
        tile = Stmt(names[label], f"tl.where(valid, {printer(summand, order)}, 0.0)",
                    f"the summand of d{x.name}, zero where the score is masked")
        acc, term = None, ""
        if len(positions) == 1:
            acc_label = f":acc:x:{x.name}"
            names[acc_label] = acc = kn.take(f"acc_{dx}")
            other = j if positions == (i.name,) else i
            term = printer(IndexSum(Indexed(IndexedBase(label), *batch, i, j), other), (Symbol(positions[0]),))
        equation = f"d{x.name}[{', '.join(s.name for s in x.indices)}] = {sympy.sstr(sympy.Add(*parts))}"
        ex.grad = "built"
        out.append(ExtraGrad(x.name, ex.arg, slot, kernel, positions, tile, acc, term,
                             kn.take(f"{dx}_ptr"), kn.take(f"NEED_{dx}"), equation))
    return out
