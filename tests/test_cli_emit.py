"""The command line's emit and regen: packages that merge, orphans, and one-line
errors for output directories that cannot be written."""
import os
import tempfile

import pytest

from derive import emit as E




def failed_with(r, message: str):
    """The command failed with exactly one line, ``Error: message``, and no traceback."""
    assert r.exit_code == 1, r.output
    assert r.output == f"Error: {message}\n"


def test_emit_twice_into_one_package_exports_both(run, tmp_path):
    pkg = tmp_path / "pkg"
    assert run("emit", "max", "-o", str(pkg)).exit_code == 0
    r = run("emit", "softmax", "-o", str(pkg))
    assert r.exit_code == 0
    assert r.output == f"wrote {pkg / '__init__.py'}\nwrote {pkg / 'softmax.py'}\n"
    init = (pkg / "__init__.py").read_text()
    assert "from .max import max_1 as max  # noqa: E402\nfrom .softmax import softmax as softmax  # noqa: E402\n" \
        in init
    assert '__all__ = ["max", "softmax"]' in init
    assert run("emit", "max", "-o", str(pkg)).output == "up to date: nothing written\n"


def test_emit_into_a_read_only_directory(run, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: a read-only directory is writable anyway")
        failed_with(run("emit", "max", "-o", str(ro)), f"cannot write package to {ro}: Permission denied")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_emit_when_the_directory_refuses_writes(run, tmp_path, monkeypatch):
    """The same error as a read-only directory, also where root may write anywhere."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    failed_with(run("emit", "max", "-o", str(tmp_path)), f"cannot write package to {tmp_path}: Permission denied")
    assert list(tmp_path.iterdir()) == []


def test_emit_under_an_existing_file(run, tmp_path):
    f = tmp_path / "f"
    f.write_text("not a directory\n")
    failed_with(run("emit", "max", "-o", str(f / "sub")),
                f"cannot write package to {f / 'sub'}: {f} is a file, not a directory")
    failed_with(run("emit", "max", "-o", str(f)), f"cannot write package to {f}: {f} is a file, not a directory")
    assert f.read_text() == "not a directory\n"


def test_emit_to_a_dangling_symlink(run, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    failed_with(run("emit", "max", "-o", str(link)),
                f"cannot write package to {link}: {link} is a symbolic link to {tmp_path / 'nowhere'}, "
                f"which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


def test_emit_to_a_name_too_long(run, tmp_path):
    out = tmp_path / ("x" * 300)
    failed_with(run("emit", "max", "-o", str(out)), f"cannot write package to {out}: File name too long")


def test_emit_an_op_name_too_long(run, tmp_path):
    spec = tmp_path / "long.op"
    spec.write_text(f"op {'n' * 5000}(X[r, c]) -> Y[r]\nY[r] = sum[c](X)\n")
    failed_with(run("emit", str(spec), "-o", str(tmp_path / "pkg")),
                f"{spec}:1:4: the op name '{'n' * 40}...' is 5000 characters long; at most 64 are allowed")
    assert not (tmp_path / "pkg").exists()


def test_emit_next_to_a_users_init(run, tmp_path):
    (tmp_path / "__init__.py").write_text("# mine\n")
    failed_with(run("emit", "max", "-o", str(tmp_path)),
                f"cannot write package to {tmp_path}: {tmp_path / '__init__.py'} exists and was not generated "
                f"by pullback; move it away first")


def test_emit_cleans_up_after_an_interrupted_run(run, tmp_path):
    assert run("emit", "max", "-o", str(tmp_path)).exit_code == 0
    stale = tmp_path / f"{E.STAGING_PREFIX}abc123"
    stale.mkdir()
    (stale / "max.py").write_text("half written")
    r = run("emit", "max", "-o", str(tmp_path))
    assert r.output == f"cleaned up after an interrupted run: {stale}\nup to date: nothing written\n"
    assert not stale.exists()


@pytest.fixture
def regen_into(monkeypatch, tmp_path):
    real = E.regen
    monkeypatch.setattr(E, "regen", lambda check=False, progress=None: real(check=check, root=tmp_path,
                                                                            progress=progress))
    return tmp_path


def test_regen_check_names_orphans_and_regen_removes_them(run, regen_into):
    root = regen_into
    assert run("regen").exit_code == 0
    (root / "oldop.py").write_bytes((root / "max.py").read_bytes())
    (root / "mine.py").write_text("x = 1\n")
    r = run("regen", "--check")
    assert r.exit_code == 1
    assert f"orphan: {root / 'oldop.py'}\n" in r.output and "mine.py" not in r.output
    r = run("regen")
    assert r.exit_code == 0
    assert r.output.endswith(f"removed orphan {root / 'oldop.py'}\n")
    assert not (root / "oldop.py").exists() and (root / "mine.py").read_text() == "x = 1\n"
    assert "generated/ is up to date" in run("regen", "--check").output
