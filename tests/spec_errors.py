"""Helpers shared by the parser and IR tests: expect a SpecError and locate tokens."""
import pytest

from derive.spec import SpecError

FILE = "t.op"


def expect_error(call, text: str) -> SpecError:
    """Run ``call(text)``; it must raise a SpecError located in FILE, formatted file:line:col: message."""
    with pytest.raises(SpecError) as info:
        call(text)
    e = info.value
    assert e.file == FILE
    assert str(e) == f"{FILE}:{e.line}:{e.col}: {e.message}"
    return e


def col(line: str, token: str, nth: int = 0) -> int:
    """1-based column of the nth occurrence of ``token`` in ``line``."""
    at = -1
    for _ in range(nth + 1):
        at = line.index(token, at + 1)
    return at + 1
