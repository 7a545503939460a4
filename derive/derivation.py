"""The result of deriving one spec: forward equations, pullbacks, and what the
backward pass needs from the forward.  ``derive("softmax")`` or
``derive("path/to/op.op")`` runs spec -> IR -> pullback and returns one."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from sympy import Indexed

from . import ir as IR
from . import pullback as PB
from . import spec as SP

OPS_DIR = Path(__file__).resolve().parent / "ops"
REPO_ROOT = OPS_DIR.parent.parent


def builtin_ops() -> list[str]:
    return sorted(p.stem for p in OPS_DIR.glob("*.op"))


@dataclass
class Derivation:
    name: str
    path: str            # spec path as given, relative to the repo for built-ins
    source: str          # spec text
    ir: IR.OpIR
    steps: list[PB.AdjointStep]
    spec: SP.OpSpec | None = None  # the parsed spec (declarations, defaults and their positions)

    @property
    def spec_hash(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    @property
    def forward(self) -> list[IR.Equation]:
        return self.ir.equations

    @property
    def pullbacks(self) -> dict[str, object]:
        """Input name -> its pullback (SymPy), in the input's own indices."""
        return {s.tensor.name: s.value for s in self.steps if s.tensor.role == "input"}

    @property
    def named_adjoints(self) -> list[PB.AdjointStep]:
        """Adjoints of intermediates that the backward computes as named values."""
        return [s for s in self.steps if s.kept and s.tensor.role != "input"]

    @property
    def vanishing(self) -> list[PB.AdjointStep]:
        """Intermediates whose adjoint simplifies to exactly zero (e.g. the max-shift)."""
        return [s for s in self.steps if s.value == 0 and s.tensor.role != "input"]

    @property
    def backward_needs(self) -> list[str]:
        """Forward tensors (and argmax indicators) that the backward reads."""
        needs: set[str] = set()
        for s in self.steps:
            if not s.kept:
                continue
            for t in s.value.atoms(Indexed):
                name = str(t.base.label)
                if not name.startswith("d") or name[1:] not in self.ir.tensors:
                    needs.add(name)
            for a in s.value.atoms(IR.ArgmaxIndicator):
                needs.add(f"argmax of {a.reduced.base.label}")
        return sorted(needs)

    def text(self) -> str:
        from .report import render
        return render(self, "text")

    def markdown(self) -> str:
        from .report import render
        return render(self, "markdown")

    def latex(self) -> str:
        from .report import render
        return render(self, "latex")


def resolve(name_or_path: str) -> tuple[str, str]:
    """Return (display path, text) of a built-in op name or a spec file path."""
    p = Path(name_or_path)
    if p.suffix == ".op" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"no spec file {name_or_path!r}")
        try:
            shown = str(p.resolve().relative_to(REPO_ROOT))
        except ValueError:
            shown = str(p)
        return shown, SP.decode(p.read_bytes(), shown)
    builtin = OPS_DIR / f"{name_or_path}.op"
    if not builtin.is_file():
        raise LookupError(f"unknown op {name_or_path!r}; built-in ops: {', '.join(builtin_ops())}; "
                          f"or give the path of a .op file")
    shown = f"derive/ops/{name_or_path}.op"
    return shown, SP.decode(builtin.read_bytes(), shown)


def derive_text(text: str, path: str = "<spec>") -> Derivation:
    spec = SP.parse(text, path)
    ir = IR.build(spec)
    return Derivation(spec.name, path, text, ir, PB.reverse(ir), spec)


def derive(name_or_path: str) -> Derivation:
    """Derive the pullbacks of a built-in op (``"softmax"``) or a ``.op`` file."""
    path, text = resolve(name_or_path)
    return derive_text(text, path)
