"""Test setup: without a CUDA device the generated kernels run on CPU tensors
through Triton's interpreter, which must be enabled before triton is imported."""
import os
import sys

import torch

HAS_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def small_block(monkeypatch):
    """Lower the block size so short rows take the looped (long-row) kernels."""
    import generated._runtime as rt
    monkeypatch.setattr(rt, "MAX_BLOCK", 16)
    return 16


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def run():
    """``run("derive", "softmax")``: the command line, in process (click's runner)."""
    from click.testing import CliRunner

    import cli
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli.main, list(args), catch_exceptions=False)

    return invoke


@pytest.fixture
def emit_spec(tmp_path, monkeypatch):
    """``emit_spec(text, name, package)``: write the spec ``text`` to ``<name>.op``, emit it
    into the package ``package`` under tmp_path (as ``pullback emit``) and import it."""
    import importlib

    from derive import emit as E

    def emit(text: str, name: str, package: str):
        path = tmp_path / f"{name}.op"
        path.write_text(text)
        E.emit(str(path), tmp_path / package)
        monkeypatch.syspath_prepend(str(tmp_path))
        return importlib.import_module(package)

    return emit
