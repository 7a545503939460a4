"""pullback's symbolic side: spec -> IR -> pullbacks -> plan -> printer -> emit.

    >>> from derive import derive
    >>> d = derive("softmax")
    >>> print(d.text())
"""
from .derivation import Derivation, builtin_ops, derive, derive_text
from .spec import SpecError

__all__ = ["derive", "derive_text", "Derivation", "builtin_ops", "SpecError"]
