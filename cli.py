"""pullback's command line: derive pullbacks of tensor-index specs and emit Triton kernels.

    pullback list                      built-in ops and their signatures
    pullback derive softmax            the derivation, as text (or --format markdown|latex)
    pullback emit softmax -o out/      add the op's module to the package out/ (with its runtime and __init__)
    pullback regen [--check]           rewrite generated/ from the built-in specs (or check it)
    pullback build                     compile every generated kernel for sm_80 and sm_90 (no GPU needed)
    pullback bench                     time against torch/SDPA on a GPU; count bytes moved on the CPU
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from derive import SpecError, builtin_ops, derive
from derive.plan import PlanError
from derive.printer import NotSupported


def _fail(e: Exception):
    raise click.ClickException(str(e))


def _derive(name_or_path: str):
    return derive(name_or_path)  # its expected failures become one-line errors in _Main.invoke


def _progress(msg: str):
    click.echo(msg, err=True)


EXIT_INTERNAL = 70  # an unexpected exception: a bug in pullback (sysexits' EX_SOFTWARE)


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + " ..."


def _expected(e: Exception) -> str | None:
    """The one-line message of a failure the user can fix (bad spec, unknown op,
    unreadable file, an op no kernel family fits), or None for anything else."""
    if isinstance(e, (SpecError, PlanError, NotSupported)):
        return str(e)
    if type(e) is LookupError:  # derive.resolve's unknown op; KeyError and IndexError are bugs
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
    return None


class _InternalError(click.ClickException):
    exit_code = EXIT_INTERNAL


class _Main(click.Group):
    """Every expected failure is one line ``Error: ...`` and exit 1; an unexpected
    exception is one line that asks for a bug report and exit 70, with the
    traceback only under ``--debug``."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Abort, click.exceptions.Exit):
            raise
        except Exception as e:  # noqa: BLE001 - the one place that turns exceptions into messages
            message = _expected(e)
            if message is not None:
                raise click.ClickException(_one_line(message)) from None
            if ctx.params.get("debug"):
                raise
            raise _InternalError(f"internal error: {type(e).__name__}: {_one_line(str(e), 200)} (this is a bug "
                                 f"in pullback; rerun with --debug for the traceback and report it)") from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show the full traceback of an internal error.")
def main(debug):
    """Derive pullbacks (reverse-mode derivatives) of tensor-index expressions
    with SymPy and emit fused Triton kernels for them."""


@main.command("list")
def list_ops():
    """List the built-in ops with their signatures."""
    for name in builtin_ops():
        d = _derive(name)
        ir = d.ir
        args = ", ".join(str(t.indexed) for t in ir.inputs)
        params = "; " + ", ".join(p.name for p in ir.params) if ir.params else ""
        click.echo(f"{name:<10} {name}({args}{params}) -> {ir.output.indexed}    [{d.path}]")


@main.command("derive")
@click.argument("op")
@click.option("--format", "fmt", type=click.Choice(["text", "markdown", "latex"]), default="text",
              show_default=True, help="How to render the derivation.")
def derive_cmd(op, fmt):
    """Derive the pullbacks of OP (a built-in name or a .op file) and print them."""
    d = _derive(op)
    click.echo(d.latex() if fmt == "latex" else d.markdown() if fmt == "markdown" else d.text(), nl=False)


@main.command("emit")
@click.argument("op")
@click.option("-o", "--out", "out_dir", type=click.Path(), default=None,
              help="Package directory to write into (default: generated/); ops already there stay exported.")
def emit_cmd(op, out_dir):
    """Derive OP and emit its Triton module (forward and backward kernels) into a
    package, with the shared runtime and an __init__ exporting every op in it."""
    from derive import emit
    _derive(op)  # report spec errors before anything else
    try:
        fm = emit.emit(op, Path(out_dir) if out_dir else emit.GENERATED)
    except (SpecError, PlanError, NotSupported, emit.PackageError) as e:
        _fail(e)
    _report(fm, "up to date: nothing written")


def _report(fm, unchanged: str):
    for p in fm.cleaned:
        click.echo(f"cleaned up after an interrupted run: {p}")
    for p in fm.written:
        click.echo(f"wrote {p}")
    for p in fm.removed:
        click.echo(f"removed orphan {p}")
    if not fm.written and not fm.removed:
        click.echo(unchanged)


@main.command("regen")
@click.option("--check", is_flag=True, help="Write nothing; fail and name each stale, missing or orphan file.")
def regen_cmd(check):
    """Rewrite generated/ from the built-in specs; remove generated files no spec produces."""
    from derive import emit
    try:
        fm = emit.regen(check=check, progress=lambda name: _progress(f"deriving and rendering {name} ..."))
    except emit.PackageError as e:
        _fail(e)
    if check:
        if fm.stale:
            for path, why in fm.stale:
                click.echo(f"{why}: {path}", err=True)
            click.echo("generated/ is out of date; run `pullback regen` (or `python cli.py regen`) and commit "
                       "the result", err=True)
            sys.exit(1)
        click.echo("generated/ is up to date")
        return
    _report(fm, "generated/ is up to date: nothing written")


@main.command("build")
@click.option("--arch", "archs", type=int, multiple=True, default=(80, 90), show_default=True,
              help="Compute capability to compile for (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of the builds instead of the table.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Compiler processes (default: the CPUs available, at most 8).")
def build_cmd(archs, as_json, jobs):
    """Compile the generated kernels ahead of time for real GPUs (no GPU needed),
    as Triton's JIT specialises them for each op's representative calls (its
    AOT_CASES), and print per build: registers, spills, shared memory, the
    tensor-core instructions, TMA and cp.async use, and the tensor-core work ratio."""
    import dataclasses
    import json

    from derive import aot
    modules = [f"generated.{name}" for name in builtin_ops()]
    try:
        stats = aot.run_in_subprocess(modules, archs=tuple(archs), jobs=jobs)
    except aot.AotError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(s) for s in stats], indent=1))
    else:
        click.echo(aot.format_table(stats))
    spills = [s for s in stats if s.spill_stores or s.spill_loads]
    if spills:
        click.echo(f"warning: {len(spills)} kernel builds spill registers", err=True)


@main.command("bench")
@click.option("--quick", is_flag=True, help="Fewer, smaller cases.")
@click.option("--dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "bfloat16", "float32", "float64"]),
              help="Input dtype for the byte counts (CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (one object per row).")
def bench_cmd(quick, dtype, as_json):
    """Measure the generated kernels: on a GPU, time them against torch and SDPA;
    on the CPU, count the bytes they move under the interpreter against the ideal."""
    import dataclasses
    import json

    import torch

    from derive import bench
    if torch.cuda.is_available():
        rows = bench.timings(quick=quick, progress=_progress)
        text = bench.format_timings(rows)
    else:
        rows = bench.traffic(dtype, quick=quick, progress=_progress)
        text = "no CUDA device: counting bytes moved under Triton's interpreter (time is meaningless there)\n" + \
            bench.format_traffic(rows)
    if as_json:
        text = json.dumps([{**dataclasses.asdict(r), **({"ratio": r.ratio} if hasattr(r, "ratio") else {})}
                           for r in rows], indent=1)
    click.echo(text)


if __name__ == "__main__":
    main()
