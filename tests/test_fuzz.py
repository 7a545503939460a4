"""Seeded fuzzing of the front end: every generated spec either derives (and its
report renders) or is a SpecError located at ``fuzz.op:line:col:``; never another
exception, never a hang.  The generator is tests/fuzz_specs.py; its ``outcome``
is where later stages (emit, run) join."""
import collections
import re
import signal
import time
from contextlib import contextmanager

import pytest

from derive.spec import SpecError
from fuzz_specs import FILE, cases, mutate, outcome

CASES = 300
SEED = 20240611
PER_CASE_S = 5.0  # the slowest case takes well under a second on the CPU
LOCATED = re.compile(rf"^{re.escape(FILE)}:[1-9]\d*:[1-9]\d*: \S")


@contextmanager
def time_budget(seconds: float, label: str):
    """Interrupt a case that runs past ``seconds`` (a hang) and fail it by name."""
    def expire(signum, frame):
        raise TimeoutError(f"{label} ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.perf_counter()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert time.perf_counter() - start < seconds, label


def test_outcome_of_a_good_and_a_bad_spec():
    kind, d = outcome("op f(A[i, j]) -> B[i]\nB = sum[j](exp(A))\n")
    assert kind == "derived" and str(d.pullbacks["A"]) == "exp(A[i, j])*dB[i]"
    assert outcome("op f(A[i, j]) -> B[i]\nB = sum[j](foo(A))\n") == (
        "error", f"{FILE}:2:12: unknown function 'foo'; known: exp, log, sqrt, tanh, maximum, minimum, where")


def test_the_generator_is_seeded():
    assert cases(40, seed=3) == cases(40, seed=3)
    assert cases(40, seed=3) != cases(40, seed=4)
    import random
    assert mutate("op f(A[i]) -> B[i]\nB = A\n", random.Random(1)) == \
        mutate("op f(A[i]) -> B[i]\nB = A\n", random.Random(1))


def test_fuzzed_specs_derive_or_fail_with_a_located_error():
    tally = collections.Counter()
    start = time.perf_counter()
    for label, text in cases(CASES, SEED):
        with time_budget(PER_CASE_S, label):
            try:
                kind, value = outcome(text)
            except Exception as e:  # anything but a SpecError is a bug: show the case
                pytest.fail(f"{label} raised {type(e).__name__}: {e}\n--- spec ---\n{text}")
        if kind == "error":
            assert LOCATED.match(value), f"{label}: unlocated message {value!r}\n--- spec ---\n{text}"
        tally[kind] += 1
    elapsed = time.perf_counter() - start
    print(f"\nfuzz: {CASES} cases in {elapsed:.1f} s: {dict(tally)}")
    assert tally["derived"] + tally["error"] == CASES
    # both outcomes are well represented, or the generator has drifted into one corner
    assert tally["derived"] >= CASES // 5 and tally["error"] >= CASES // 5, tally
    assert elapsed < 60


def test_the_hostile_specs_of_the_fuzzing_report():
    """The inputs that used to crash or hang, through the same outcome()."""
    hdr = "op f(X[r, c]; eps) -> Y[r, c]\n"
    hostile = [
        hdr + "Y = " + "exp(" * 150 + "X" + ")" * 150 + "\n",
        hdr + "Y = " + " + ".join(["X"] * 3000) + "\n",
        hdr + "Y = " + "-" * 3000 + "X\n",
        hdr + "Y = T0\n" + "".join(f"T{k} = T{k + 1} + 1\n" for k in range(1000)).replace("T1000", "X"),
        hdr + "Y = T0\n" + "".join(f"T{k} = T{(k + 1) % 5000} + X\n" for k in range(5000)),
        "op f(X[r, c]) -> Y[r]\nY[r] = sum[c](X * 0**-1)\n",
        hdr + "Y = X * 10**5000\n", hdr + "Y = X * 2**100000000\n", hdr + "Y = X * 9**9**9\n",
        hdr + "Y = X * " + "**".join(["2"] * 40) + "\n",
        "op f(A[" + ", ".join(f"i{k}" for k in range(3000)) + "]) -> B[i0]\nB = sum[i1](A)\n",
        hdr + "".join(f"T{k} = X + {k}\n" for k in range(2000)) + "Y = T0\n",
        hdr + "Y = X * (10**400)/3\n", hdr + "Y = X * (-1)**0.5\n",
        "op f(A[s2, s1]) -> B[s2]\nB[s2] = A.sum(s1)\n", hdr + "Y = X * eps[r]\n",
    ]
    for k, text in enumerate(hostile):
        with time_budget(2.0, f"hostile-{k}"):
            kind, message = outcome(text)
        assert kind == "error" and LOCATED.match(message), (k, message)


def test_a_non_spec_error_fails_the_fuzz_check(monkeypatch):
    """outcome() lets a bug through (it is not turned into an 'error' outcome)."""
    import fuzz_specs

    def broken(text, path):
        raise KeyError("bug")

    monkeypatch.setattr(fuzz_specs, "derive_text", broken)
    with pytest.raises(KeyError):
        outcome("op f(A[i]) -> B[i]\nB = A\n")
    monkeypatch.setattr(fuzz_specs, "derive_text", lambda text, path: (_ for _ in ()).throw(SpecError("m", FILE, 1, 1)))
    assert outcome("x") == ("error", f"{FILE}:1:1: m")


# ---- the back end: emit, import, run, and compare with the reference evaluator ---------------------------


def _run_emitted(d, text, tmp_path, k, monkeypatch):
    """Emit ``d`` into its own package, import it, run forward and backward on
    random inputs, and compare every output and gradient with tests/indexeval.py
    (the forward equations and the derived pullbacks, evaluated on torch tensors)."""
    import importlib

    import torch

    import indexeval as IE
    from derive import emit as E
    from derive.plan import match_rowwise
    shape = match_rowwise(d)
    sizes = {i.name: n for i, n in zip(shape.kept, (3, 2, 2))}
    sizes[shape.red.name] = 6
    spec = tmp_path / f"fz{k}.op"
    spec.write_text(text)
    pkg = f"fuzz_pkg_{k}"
    E.emit(str(spec), tmp_path / pkg)
    monkeypatch.syspath_prepend(str(tmp_path))
    mod = importlib.import_module(f"{pkg}.{d.name}")
    gen = torch.Generator().manual_seed(k)
    ir = d.ir
    dims = {t.name: [IE.size_of(i, sizes) for i in t.indices] for t in ir.inputs}
    env = {t.name: torch.randint(0, 6, dims[t.name], generator=gen) if t.dtype == "int" else
           torch.rand(dims[t.name], dtype=torch.float64, generator=gen) + 0.5 for t in ir.inputs}
    int_params = {q.name for q in d.spec.param_decls if q.dtype == "int"}  # (2: some class targets ignored)
    params = {q.name: 2 if q.name in int_params else 0.75 for q in ir.params}
    env.update(params)
    ref = IE.forward(ir, env, sizes)
    inputs = [env[t.name].clone().requires_grad_(t.dtype != "int") for t in ir.inputs]
    dim = -1 if mod.META["reduces"] == "dim" else None
    call = mod.OP._call if mod.META.get("choice") else mod.OP  # (every output, not one chosen by a keyword)
    outs = call(inputs, [params[q.name] for q in ir.params], dim, False)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    close = dict(rtol=1e-6, atol=1e-9, equal_nan=True)
    for o, t in zip(outs, ir.outputs):
        torch.testing.assert_close(o, ref[t.name], **close, msg=lambda m: f"{t.name} of\n{text}\n{m}")
    gs = [torch.rand(o.shape, dtype=torch.float64, generator=gen) for o in outs]
    floats = [(t, x) for t, x in zip(ir.inputs, inputs) if t.dtype != "int"]
    grads = torch.autograd.grad(outs, [x for _, x in floats], gs, allow_unused=True)
    want = IE.adjoints(d, {**ref, **{f"d{t.name}": g for t, g in zip(ir.outputs, gs)}}, sizes)
    for (t, _), g in zip(floats, grads):
        g = torch.zeros_like(env[t.name]) if g is None else g
        torch.testing.assert_close(g, want[f"d{t.name}"], **close, msg=lambda m: f"d{t.name} of\n{text}\n{m}")


def test_fuzzed_specs_emit_and_match_the_evaluator_or_fail_with_a_located_error(tmp_path, monkeypatch):
    """The specs that derive go on: each either plans into kernels that import and
    match tests/indexeval.py (values and every gradient, one block per row and
    looped), or its plan fails with a located error; never another exception."""
    from derive.plan import PlanError, plan
    tally = collections.Counter()
    start = time.perf_counter()
    derived = [(label, text, value) for label, text in cases(CASES, SEED)
               for kind, value in [outcome(text)] if kind == "derived"]
    for k, (label, text, d) in enumerate(derived):
        with time_budget(30.0, label):
            try:
                p = plan(d)
            except PlanError as e:
                assert LOCATED.match(str(e)), f"{label}: unlocated plan error {e}\n--- spec ---\n{text}"
                tally["plan error"] += 1
                continue
            if p.family != "rowwise":  # a mutated attention spec: tests/test_attention.py checks that family
                tally[f"{p.family} plan"] += 1
                continue
            _run_emitted(d, text, tmp_path, k, monkeypatch)
            tally["ran and matched"] += 1
    elapsed = time.perf_counter() - start
    print(f"\nfuzz, the {len(derived)} specs that derive: {dict(tally)} in {elapsed:.1f} s")
    assert sum(tally.values()) == len(derived)
    assert tally["ran and matched"] >= len(derived) // 3, tally
