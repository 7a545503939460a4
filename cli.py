"""pullback's command line: derive pullbacks of tensor-index specs and emit Triton kernels.

    pullback list                      built-in ops and their signatures
    pullback derive softmax            the derivation, as text (or --format markdown|latex)
    pullback emit softmax -o out/      add the op's module to the package out/ (with its runtime and __init__)
    pullback regen [--check]           rewrite generated/ from the built-in specs (or check it)
    pullback build                     compile every generated kernel for sm_80 and sm_90 (no GPU needed)
    pullback bench [--report DIR]      time against torch/SDPA on a GPU; count bytes moved on the CPU
    pullback tune                      on a GPU: time candidate configs, write the winners to the config table
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


def _machine(cuda: bool) -> str:
    import platform

    import torch
    import triton
    where = (f"{torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})"
             if cuda else f"no CUDA device: Triton's interpreter on the CPU ({platform.machine()})")
    return f"{where}; torch {torch.__version__}, triton {triton.__version__}"


def _read_builds(path: str) -> list[dict]:
    import json
    try:
        builds = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise click.ClickException(f"{path}: not the JSON of `pullback build --json` ({e.msg} at line {e.lineno})")
    need = {"module", "kernel", "arch", "registers", "spill_stores", "spill_loads", "shared_bytes"}
    if not isinstance(builds, list) or not all(isinstance(b, dict) and need <= set(b) for b in builds):
        raise click.ClickException(f"{path}: not the JSON of `pullback build --json` (a list of builds with "
                                   f"{', '.join(sorted(need))})")
    return builds


@main.command("bench")
@click.option("--quick", is_flag=True, help="Fewer, smaller cases.")
@click.option("--dtype", default="float16", show_default=True,
              type=click.Choice(["float16", "bfloat16", "float32", "float64"]),
              help="Input dtype for the byte counts (CPU).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON (one object per row).")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Also write a Markdown report with PNG plots into this directory (e.g. docs/bench).")
@click.option("--build-json", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Put the compile stats of this `pullback build --json` output in the report.")
@click.option("--with-build", is_flag=True, help="Run `pullback build` for the report's compile stats.")
@click.option("--date", default=None, help="A date to print in the report (none by default: same inputs, same "
              "report).")
def bench_cmd(quick, dtype, as_json, report_dir, build_json, with_build, date):
    """Measure the generated kernels: on a GPU, time them against torch eager,
    torch.compile and SDPA flash; on the CPU, count the bytes they move and the
    programs they launch under the interpreter against the ideal."""
    import dataclasses
    import json

    import torch

    from derive import bench
    if (build_json or with_build or date) and not report_dir:
        raise click.ClickException("--build-json, --with-build and --date go with --report DIR")
    if build_json and with_build:
        raise click.ClickException("--build-json and --with-build both give the compile stats: pass one")
    builds = _read_builds(build_json) if build_json else None
    cuda = torch.cuda.is_available()
    traffic, timings = None, None
    if cuda:
        rows = timings = bench.timings(quick=quick, progress=_progress)
        text = bench.format_timings(rows)
    else:
        rows = traffic = bench.traffic(dtype, quick=quick, progress=_progress)
        text = "no CUDA device: counting bytes moved under Triton's interpreter (time is meaningless there)\n" + \
            bench.format_traffic(rows)
    if as_json:
        text = json.dumps([{**dataclasses.asdict(r), **({"ratio": r.ratio} if hasattr(r, "ratio") else {})}
                           for r in rows], indent=1)
    click.echo(text)
    if report_dir:
        from derive import aot, bench_report
        if with_build:
            try:
                stats = aot.run_in_subprocess([f"generated.{n}" for n in builtin_ops()], archs=(80, 90))
            except aot.AotError as e:
                _fail(e)
            builds = [dataclasses.asdict(s) for s in stats]
        command = "pullback bench" + (" --quick" if quick else "") + \
            (f" --dtype {dtype}" if not cuda and dtype != "float16" else "") + f" --report {report_dir}"
        if with_build:
            command += " --with-build"
        elif build_json:
            name = Path(build_json).name
            command = f"pullback build --json > {name} && {command} --build-json {name}"
        context = [("command", f"`{command}{f' --date {date}' if date else ''}`"), ("machine", _machine(cuda))]
        if date:
            context.append(("date", date))
        for p in bench_report.write_report(Path(report_dir), context, traffic=traffic, timings=timings,
                                           builds=builds):
            _progress(f"wrote {p}")


@main.command("tune")
@click.option("--quick", is_flag=True, help="Fewer cases (fp16/bf16 at D=64, not causal; one row block).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Table to update (default: templates/tuned_configs.json, which `pullback regen` places in "
                   "generated/).")
@click.option("--no-regen", is_flag=True, help="Write the table only; do not regenerate generated/.")
def tune_cmd(quick, out_path, no_regen):
    """On a GPU: time a small candidate set of launch configs per kernel, dtype, head
    dim and causal flag (attention) and per block size (row-wise ops), and write the
    fastest of each to the tuned config table, under this GPU's architecture."""
    import torch
    import triton

    from derive import tune
    if not torch.cuda.is_available():
        raise click.ClickException(tune.NO_GPU)
    path = Path(out_path) if out_path else tune.TABLE
    try:
        table = tune.read_table(path) if path.exists() else tune.empty_table()
    except tune.TuneError as e:
        _fail(e)
    timer, arch = tune.gpu_timer(quick=quick)
    chosen = tune.choose(tune.cases(quick=quick), tune.candidates, timer, progress=_progress)
    measured = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    path.write_text(tune.table_text(tune.merge(table, arch, chosen, measured)))
    click.echo(f"wrote {path}: {sum(len(v) for v in chosen.values())} entries for {arch}")
    if not no_regen and path.resolve() == tune.TABLE.resolve():
        from derive import emit
        _report(emit.regen(progress=lambda name: _progress(f"deriving and rendering {name} ...")),
                "generated/ is up to date: nothing written")


if __name__ == "__main__":
    main()
