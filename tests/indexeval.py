"""A reference evaluator of the engine's SymPy index expressions on torch tensors.

Independent of any kernel and of the printer: every index symbol (``s1``,
the primed ``s1'``, a bound ``s1#3``) is ONE axis whose length is the size of
its index set (``derive.ir.base_name``).  Values are :class:`NT`, a tensor
with a list of named axes; ``Add`` and ``Mul`` broadcast by axis name,
``IndexSum``/``IndexMax`` reduce named axes, and ``ArgmaxIndicator(M[...], s)``
is the one-hot of the FIRST argmax of the body of ``M``'s defining ``max``.

    env   = {"A": tensor, "scale": 0.7, ...}   # tensors in their declared index order
    sizes = {"s1": 5, "s2": 3}                # index set -> length
    evaluate(expr, env, sizes, defs=ir)       # -> NT
"""
from __future__ import annotations

import sympy
import math

import torch
from sympy import Indexed, KroneckerDelta, Symbol

from derive.ir import ArgmaxIndicator, IndexMax, IndexSum, Indicator, OpIR, Pick, Where, base_name

DTYPE = torch.float64


class NT:
    """A tensor whose axes are named by index symbols."""

    def __init__(self, t: torch.Tensor, idx):
        self.t = t
        self.idx = list(idx)
        assert self.t.dim() == len(self.idx), (tuple(self.t.shape), self.idx)
        assert len(set(self.idx)) == len(self.idx), self.idx

    def __repr__(self):
        return f"NT({[s.name for s in self.idx]}, shape={tuple(self.t.shape)})"

    def to(self, indices, sizes) -> torch.Tensor:
        """The plain tensor with axes in ``indices`` order (broadcasting missing ones)."""
        indices = list(indices)
        extra = [i for i in self.idx if i not in indices]
        if extra:
            raise ValueError(f"value has axes {extra} that the target {indices} lacks")
        order = [self.idx.index(i) for i in indices if i in self.idx]
        t = self.t.permute(*order) if order else self.t
        shape = [size_of(i, sizes) if i in self.idx else 1 for i in indices]
        t = t.reshape(shape)
        return t.expand([size_of(i, sizes) for i in indices]).clone()


def size_of(index: Symbol, sizes) -> int:
    return sizes[base_name(index)]


def scalar(x) -> NT:
    return NT(torch.tensor(float(x), dtype=DTYPE), [])


def align(values: list[NT]) -> tuple[list[torch.Tensor], list[Symbol]]:
    """Broadcastable views of ``values`` over the union of their axes."""
    order: list[Symbol] = []
    for v in values:
        for i in v.idx:
            if i not in order:
                order.append(i)
    out = []
    for v in values:
        present = [i for i in order if i in v.idx]
        t = v.t.permute(*[v.idx.index(i) for i in present]) if present else v.t
        shape = [t.shape[present.index(i)] if i in v.idx else 1 for i in order]
        out.append(t.reshape(shape))
    return out, order


def rename(v: NT, mapping: dict) -> NT:
    return NT(v.t, [mapping.get(i, i) for i in v.idx])


_FUNCS = {sympy.exp: torch.exp, sympy.log: torch.log, sympy.tanh: torch.tanh, sympy.Abs: torch.abs}


def evaluate(expr, env: dict, sizes: dict, defs: OpIR | None = None) -> NT:
    """Evaluate ``expr`` (see the module docstring) to a named tensor."""
    ev = lambda e: evaluate(e, env, sizes, defs)  # noqa: E731
    if isinstance(expr, Indexed):
        name = str(expr.base.label)
        if name not in env:
            raise KeyError(f"no value for tensor {name}")
        t = torch.as_tensor(env[name], dtype=DTYPE)
        idx = list(expr.indices)
        if len(set(idx)) != len(idx):
            raise NotImplementedError(f"repeated index in {expr}")
        if t.dim() != len(idx):
            raise ValueError(f"{name} has {t.dim()} axes but is indexed as {expr}")
        for i, n in zip(idx, t.shape):
            if n != size_of(i, sizes):
                raise ValueError(f"axis {i} of {name} has length {n}, expected {size_of(i, sizes)}")
        return NT(t, idx)
    if isinstance(expr, sympy.IndexedBase):  # a tensor with no indices (a scalar intermediate)
        name = str(expr.label)
        if name not in env:
            raise KeyError(f"no value for tensor {name}")
        return NT(torch.as_tensor(env[name], dtype=DTYPE).reshape(()), [])
    if isinstance(expr, IndexSum):
        body = ev(expr.body)
        t, idx = body.t, list(body.idx)
        factor = 1
        for i in expr.indices:
            if i in idx:
                t = t.sum(dim=idx.index(i))
                idx.remove(i)
            else:  # a sum over an index the body does not depend on
                factor *= size_of(i, sizes)
        return NT(t * factor, idx)
    if isinstance(expr, IndexMax):
        body = ev(expr.body)
        t, idx = body.t, list(body.idx)
        for i in expr.indices:
            if i not in idx:
                raise ValueError(f"max over {i}, which {expr.body} lacks")
            t = t.amax(dim=idx.index(i))
            idx.remove(i)
        return NT(t, idx)
    if isinstance(expr, ArgmaxIndicator):
        return _argmax_indicator(expr, env, sizes, defs)
    if isinstance(expr, Pick):  # one-hot of the integer tensor's values along the index
        value = evaluate(expr.value, {**env, str(expr.value.base.label):
                                      torch.as_tensor(env[str(expr.value.base.label)]).to(DTYPE)}, sizes, defs)
        n = size_of(expr.index, sizes)
        hot = (torch.arange(n, dtype=DTYPE).reshape([n] + [1] * value.t.dim()) == value.t.unsqueeze(0)).to(DTYPE)
        return NT(hot, [expr.index] + value.idx)
    if isinstance(expr, Where):
        (c, a, b), order = align([ev(expr.cond), ev(expr.then), ev(expr.other)])
        return NT(torch.where(c != 0, a, b).to(DTYPE).expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, Indicator):
        return ev(expr.cond)
    if isinstance(expr, sympy.logic.boolalg.BooleanAtom):
        return scalar(1.0 if expr is sympy.true else 0.0)
    if isinstance(expr, (sympy.And, sympy.Or, sympy.Not, sympy.core.relational.Relational)):
        ts, order = align([ev(a) for a in expr.args])
        if isinstance(expr, sympy.Not):
            out = ts[0] == 0
        elif isinstance(expr, (sympy.And, sympy.Or)):
            out = ts[0] != 0
            for t in ts[1:]:
                out = (out & (t != 0)) if isinstance(expr, sympy.And) else (out | (t != 0))
        else:
            out = _RELATIONS[expr.rel_op](ts[0], ts[1])
        return NT(out.to(DTYPE).expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, KroneckerDelta):
        a, b = expr.args
        if base_name(a) != base_name(b):
            raise ValueError(f"delta across index sets: {expr}")
        return NT(torch.eye(size_of(a, sizes), dtype=DTYPE), [a, b])
    if isinstance(expr, sympy.Add):
        ts, order = align([ev(a) for a in expr.args])
        out = ts[0]
        for t in ts[1:]:
            out = out + t
        return NT(out.expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, sympy.Mul):
        ts, order = align([ev(a) for a in expr.args])
        out = ts[0]
        for t in ts[1:]:
            out = out * t
        return NT(out.expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, sympy.Pow):
        (b, e), order = align([ev(expr.base), ev(expr.exp)])
        return NT(torch.pow(b, e).expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, (sympy.Max, sympy.Min)):  # elementwise, as torch.maximum / torch.minimum
        ts, order = align([ev(a) for a in expr.args])
        out = ts[0]
        for t in ts[1:]:
            out = torch.maximum(out, t) if isinstance(expr, sympy.Max) else torch.minimum(out, t)
        return NT(out.expand([size_of(i, sizes) for i in order]).clone(), order)
    if isinstance(expr, sympy.Heaviside):  # H(0) = 1/2 (SymPy's convention, as torch splits a tie)
        arg = ev(expr.args[0])
        half = 0.5 if len(expr.args) == 1 else float(expr.args[1])
        return NT(torch.where(arg.t > 0, 1.0, torch.where(arg.t < 0, 0.0, half)).to(DTYPE), arg.idx)
    if expr.func in _FUNCS:
        arg = ev(expr.args[0])
        return NT(_FUNCS[expr.func](arg.t), arg.idx)
    if expr.is_Number or expr in (sympy.E, sympy.pi):
        return scalar(float(expr))
    if isinstance(expr, Symbol):
        if expr.name.startswith("|"):  # the size of index sets, |c| or |c, d|
            sets = [n.strip() for n in expr.name.strip("|").split(",")]
            return scalar(math.prod(sizes[n] for n in sets))
        if expr.name not in env:
            raise KeyError(f"no value for the scalar {expr.name} (a bare index symbol?)")
        return scalar(env[expr.name])
    raise NotImplementedError(f"cannot evaluate {type(expr).__name__}: {expr}")


_RELATIONS = {"==": torch.eq, "!=": torch.ne, "<": torch.lt, "<=": torch.le, ">": torch.gt, ">=": torch.ge}


def _argmax_indicator(expr: ArgmaxIndicator, env, sizes, defs: OpIR | None) -> NT:
    if defs is None:
        raise ValueError("ArgmaxIndicator needs defs (the OpIR) to find the max it refers to")
    reduced = expr.reduced
    name = str(reduced.base.label)
    eq = defs.definition(name)
    if eq is None or not isinstance(eq.rhs, IndexMax):
        raise ValueError(f"{name} is not defined by a max")
    mx = eq.rhs
    body = evaluate(mx.body, env, sizes, defs)  # axes named by the definition's indices
    kept = list(eq.target.indices)
    red = list(mx.indices)
    t = body.to(kept + red, sizes)
    lead = t.shape[:len(kept)]
    flat = t.reshape(*lead, -1)
    first = flat.argmax(dim=-1)  # torch returns the first maximal element
    onehot = torch.nn.functional.one_hot(first, flat.shape[-1]).to(DTYPE).reshape(t.shape)
    # the definition's names -> the names used in this expression
    mapping = dict(zip(kept, reduced.indices))
    for r in red:
        match = [i for i in expr.indices if base_name(i) == base_name(r)]
        if len(match) != 1:
            raise ValueError(f"cannot match the reduced index {r} of {name} in {expr}")
        mapping[r] = match[0]
    return rename(NT(onehot, kept + red), mapping)


# ---- whole ops ----------------------------------------------------------------------
def forward(ir: OpIR, env: dict, sizes: dict) -> dict:
    """Evaluate the forward equations in order; returns env extended with every tensor."""
    env = dict(env)
    for eq in ir.equations:
        env[eq.target.name] = evaluate(eq.rhs, env, sizes, ir).to(eq.target.indices, sizes)
    return env


def adjoints(derivation, env: dict, sizes: dict) -> dict:
    """Evaluate every adjoint step in the reverse walk's order (``dOut`` must be in env)."""
    env = dict(env)
    for step in derivation.steps:
        t = step.tensor
        if t.role == "output":  # an output other equations use: the derived expressions read its incoming
            continue            # gradient by its name (its total, incoming plus theirs, is inlined where needed)
        if step.value == 0:
            env["d" + t.name] = torch.zeros([size_of(i, sizes) for i in t.indices], dtype=DTYPE)
        else:
            env["d" + t.name] = evaluate(step.value, env, sizes, derivation.ir).to(t.indices, sizes)
    return env


def random_inputs(ir: OpIR, sizes: dict, generator: torch.Generator, params: dict | None = None) -> dict:
    env = {}
    for t in ir.inputs:
        env[t.name] = torch.randn([size_of(i, sizes) for i in t.indices], dtype=DTYPE, generator=generator)
    env.update(params or {})
    return env


def loss(ir: OpIR, env: dict, sizes: dict, d_out: torch.Tensor) -> torch.Tensor:
    return (forward(ir, env, sizes)[ir.output.name] * d_out).sum()


def finite_differences(ir: OpIR, env: dict, sizes: dict, d_out: torch.Tensor, h: float = 1e-6) -> dict:
    """Central differences of ``sum(dOut * Out)`` with respect to every input element."""
    grads = {}
    for t in ir.inputs:
        x = env[t.name]
        g = torch.zeros_like(x)
        flat = g.view(-1)
        for k in range(x.numel()):
            plus, minus = x.clone(), x.clone()
            plus.view(-1)[k] += h
            minus.view(-1)[k] -= h
            lp = loss(ir, {**env, t.name: plus}, sizes, d_out)
            lm = loss(ir, {**env, t.name: minus}, sizes, d_out)
            flat[k] = (lp - lm) / (2 * h)
        grads[t.name] = g
    return grads
