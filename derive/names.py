"""One allocator for every identifier that reaches generated code.

Generated modules mix three kinds of names: the template's own (``row``,
``mask``, ``offs``, ``torch``, ``tl``, ...), Python's keywords and builtins,
and names that come from the user's spec (tensors, indices, parameters, the
op).  A user's name must never change what a kernel computes, so every name a
plan hands to a template is allocated here, as SymPy's code printers do with
``reserved_words``: a name is kept where it is safe and renamed (``X`` ->
``X_1``) where it would collide.  Derived names (``X_ptr``, ``X_off``) are
allocated too, never formed by pasting strings in a template.

The template's own names are read from the template source itself (every
identifier outside Jinja tags), so a name a template starts using is reserved
without anyone updating a list.
"""
from __future__ import annotations

import builtins
import keyword
import re
from pathlib import Path

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JINJA = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.S)


_DOCSTRING = re.compile(r'"""(?:[^"\\]|\\.|"(?!""))*"""', re.S)
_COMMENT = re.compile(r"#[^\n'\"]*$", re.M)


def template_identifiers(source: str) -> set[str]:
    """Identifiers a Jinja template writes literally: outside ``{{ }}``, ``{% %}``
    and ``{# #}``, its docstrings and its ``#`` comments.  Words inside one-line
    strings are kept (an f-string's names are code): reserving a name too many
    is harmless, one too few is not."""
    code = _COMMENT.sub(" ", _DOCSTRING.sub(" ", _JINJA.sub(" ", source)))
    return set(_IDENT.findall(code))


def template_names(*paths: Path) -> set[str]:
    out: set[str] = set()
    for p in paths:
        out |= template_identifiers(Path(p).read_text())
    return out


PYTHON_RESERVED = set(keyword.kwlist) | set(getattr(keyword, "softkwlist", [])) | set(dir(builtins))


def _identifier(text: str) -> str:
    """A Python identifier made from ``text`` (non-identifier characters -> ``_``)."""
    s = re.sub(r"[^A-Za-z0-9_]", "_", text) or "_"
    return "_" + s if s[0].isdigit() else s


class Names:
    """Hands out identifiers unique within one generated module.

    ``names.take("X")`` returns ``"X"`` when nothing else uses it, else
    ``"X_1"``, ``"X_2"``, ...  ``names.of(key, want)`` memoises by ``key`` so one
    thing (``("ptr", "X")``) always gets the same name.
    """

    def __init__(self, reserved=(), builtins: bool = True):
        """``builtins=False`` for a scope that may shadow builtins it never uses
        (a wrapper's parameters): keywords stay reserved."""
        self.taken: set[str] = set(reserved) | (PYTHON_RESERVED if builtins else set(keyword.kwlist))
        self.given: dict[object, str] = {}

    def take(self, want: str) -> str:
        base = _identifier(want)
        if base.startswith("__"):  # no dunder names (name mangling, module attributes)
            base = "u" + base
        name, k = base, 1
        while name in self.taken or keyword.iskeyword(name):
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def of(self, key, want: str) -> str:
        if key not in self.given:
            self.given[key] = self.take(want)
        return self.given[key]


# ---- user text in comments and docstrings ---------------------------------------------
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def visible(text) -> str:
    """``text`` on one line of printable characters, escaped the way ``repr`` escapes
    (a backslash, newlines, tabs, control, format and separator characters, lone
    surrogates), so the result is unambiguous and cannot end a line of source."""
    out = []
    for ch in str(text):
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            o = ord(ch)
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def comment_text(text) -> str:
    """User text for a ``#`` comment: one line, nothing that Python reads as code."""
    return visible(text)


def docstring_text(text) -> str:
    """User text for a triple-quoted docstring: one line; backslashes and every
    double quote escaped, so the string reads back (``__doc__``) as ``visible(text)``
    and cannot close the literal or start an escape sequence."""
    return visible(text).replace("\\", "\\\\").replace('"', '\\"')
