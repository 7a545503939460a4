"""The Markdown report with plots that ``pullback bench --report DIR`` writes.

Deterministic: the same rows and context give the same bytes (no timestamp
unless the caller passes one; PNGs through matplotlib's Agg backend with no
software metadata), so the report can be committed (``docs/bench/``).

Sections, each present when its rows are given: bytes moved against the ideal
and programs launched (the interpreter, any machine), compile stats (``pullback
build --json``), and GPU times against torch eager, ``torch.compile`` and SDPA's
flash backend with the same run's device-copy bandwidth as the row ops' ceiling.
"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from derive.bench import COMPILED, COPY, EAGER, FLASH, PULLBACK, TimingRow, TrafficRow

REPORT = "README.md"
DPI = 72
COLORS = {PULLBACK: "#1f77b4", EAGER: "#7f7f7f", COMPILED: "#ff7f0e", FLASH: "#2ca02c",
          "forward": "#1f77b4", "backward": "#ff7f0e", 80: "#9467bd", 90: "#17becf"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 8, "axes.titlesize": 9})
    return plt


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
    _plt().close(fig)


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


def _num(x: float, digits: int = 3) -> str:
    return "-" if x != x else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---- interpreter: bytes and programs ---------------------------------------------------------
def _cases(rows: list[TrafficRow]) -> list[str]:
    seen: dict[str, None] = {}
    for r in rows:
        seen.setdefault(f"{r.op} {r.shape}", None)
    return list(seen)


def plot_traffic(rows: list[TrafficRow], path: Path) -> None:
    plt = _plt()
    cases = _cases(rows)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 0.22 * len(cases) + 1.2), sharey=True)
    by = {(f"{r.op} {r.shape}", r.direction): r for r in rows}
    for k, direction in enumerate(("forward", "backward")):
        ys = [i + (k - 0.5) * 0.4 for i in range(len(cases))]
        ratios = [by[(c, direction)].ratio if (c, direction) in by else 0 for c in cases]
        progs = [by[(c, direction)].programs if (c, direction) in by else 0 for c in cases]
        ax.barh(ys, ratios, height=0.4, color=COLORS[direction], label=direction)
        bx.barh(ys, [max(p, 1) for p in progs], height=0.4, color=COLORS[direction], label=direction)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.5, color="k", lw=0.6, ls=":")
    ax.axvline(5 / 3, color="k", lw=0.6, ls="--")
    ax.set_yticks(range(len(cases)), cases)
    ax.invert_yaxis()
    ax.set_xlabel("bytes moved / ideal (1 = each input read once, each output written once)")
    ax.set_title("traffic against the ideal (dotted 1.5, dashed 5/3)")
    ax.legend(loc="lower right")
    bx.set_xscale("log")
    bx.set_xlabel("programs launched (all kernels of the pass)")
    bx.set_title("programs launched")
    _save(fig, path)


def traffic_section(rows: list[TrafficRow], image: str) -> str:
    table = _table(
        ["op", "shape", "dtype", "pass", "loaded MiB", "stored MiB", "ideal MiB", "per-program MiB", "x ideal",
         "launches", "programs", "rows per program"],
        [[r.op, r.shape, r.dtype, r.direction, _mib(r.loaded), _mib(r.stored), _mib(r.ideal),
          _mib(r.per_program) if r.per_program else "-", f"{r.ratio:.2f}", str(r.launches), str(r.programs),
          f"{r.rows / r.programs:.4g}" if r.rows and r.programs and r.launches == 1 else "-"]
         for r in rows])
    return "\n".join([
        "## Bytes moved and programs launched (Triton's interpreter)", "",
        "Every byte each kernel loads and stores, counted under Triton's interpreter (`derive/memtrace.py`), "
        "against the ideal: each input of the pass read once, each output written once (for a backward: what "
        "it reads of the forward, the incoming gradients, the gradients it writes). `per-program` bytes "
        "(column weights read again, measured: once by each program when rows fit a block, by each pass "
        "over each row when rows are long, `[c]` values a GPU serves from L2; per-program partial sums of "
        "the weights' gradients) are shown and left out of the ratio. `programs` is the sum of the grid sizes of the pass's kernel launches, "
        "counted as they run: row-wise kernels run a persistent grid (at most 16 programs on the CPU, "
        "4 per SM on a GPU), each program walking rows `pid, pid + n, ...` (`rows per program`).", "",
        f"![bytes against the ideal and programs launched]({image})", "", table, ""])


# ---- compile stats ------------------------------------------------------------------------------
def _build_groups(builds: list[dict]) -> list[tuple[str, int, list[dict]]]:
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for b in builds:
        groups[(f"{b['module'].rsplit('.', 1)[-1]}.{b['kernel']}", int(b["arch"]))].append(b)
    return [(k, a, groups[(k, a)]) for k, a in sorted(groups)]


def plot_builds(builds: list[dict], path: Path) -> None:
    plt = _plt()
    groups = _build_groups(builds)
    kernels = sorted({k for k, _, _ in groups})
    fig, ax = plt.subplots(figsize=(8, 0.2 * len(kernels) + 1.2))
    archs = sorted({a for _, a, _ in groups})
    for n, arch in enumerate(archs):
        regs = {k: max(b["registers"] for b in bs) for k, a, bs in groups if a == arch}
        spills = {k for k, a, bs in groups if a == arch and any(b["spill_stores"] or b["spill_loads"] for b in bs)}
        ys = [i + (n - (len(archs) - 1) / 2) * 0.8 / len(archs) for i in range(len(kernels))]
        ax.barh(ys, [regs.get(k, 0) for k in kernels], height=0.8 / len(archs), label=f"sm_{arch}",
                color=COLORS.get(arch, None))
        for y, k in zip(ys, kernels):
            if k in spills:
                ax.text(regs[k] + 2, y, "spills", va="center", color="red")
    ax.axvline(255, color="k", lw=0.6, ls="--")
    ax.set_yticks(range(len(kernels)), kernels)
    ax.invert_yaxis()
    ax.set_xlabel("registers per thread (largest over the kernel's builds; dashed: 255, the most a thread has)")
    ax.set_title("pullback build: registers per kernel")
    ax.legend(loc="lower right")
    _save(fig, path)


def builds_section(builds: list[dict], image: str) -> str:
    rows = []
    for kernel, arch, bs in _build_groups(builds):
        spilled = sum(1 for b in bs if b["spill_stores"] or b["spill_loads"])
        mma = sorted({b.get("mma") or "-" for b in bs})
        work = sorted({f"{b['work']:.2f}" for b in bs if b.get("work") is not None})
        rows.append([kernel, f"sm_{arch}", str(len(bs)), str(max(b["registers"] for b in bs)), str(spilled),
                     str(max(b["shared_bytes"] for b in bs)), ", ".join(mma), ", ".join(work) or "-",
                     "yes" if any(b.get("tma") for b in bs) else "no",
                     "yes" if any(b.get("cp_async") for b in bs) else "no"])
    total = sum(1 for b in builds if b["spill_stores"] or b["spill_loads"])
    return "\n".join([
        "## Compile stats (`pullback build --json`)", "",
        f"{len(builds)} builds: every kernel as Triton's JIT specialises it for each op's representative calls "
        f"(`AOT_CASES`), per GPU architecture; {total} of them spill registers. Per kernel and architecture: "
        "the builds, the most registers per thread, how many builds spill, the most shared memory (bytes), "
        "the tensor-core instructions, the tensor-core work ratio (done / useful), TMA and cp.async.", "",
        f"![registers per kernel]({image})", "",
        _table(["kernel", "arch", "builds", "max registers", "builds that spill", "max shared bytes", "MMA",
                "work ratio", "TMA", "cp.async"], rows), ""])


# ---- GPU times ----------------------------------------------------------------------------------
def _attention_key(r: TimingRow):
    fields = dict(p.split("=") for p in r.shape.split() if "=" in p)
    return int(fields["D"]), "causal" in r.shape, int(fields["N"])


def plot_attention(rows: list[TimingRow], path: Path) -> None:
    plt = _plt()
    rows = [r for r in rows if r.op == "attention"]
    panels = sorted({(r.dtype, r.direction) for r in rows}, key=lambda p: (p[0], p[1] != "forward"))
    cols = sorted({_attention_key(r)[:2] for r in rows})
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(3 * len(cols), 2.4 * len(panels)), squeeze=False)
    for i, (dtype, direction) in enumerate(panels):
        for j, (d, causal) in enumerate(cols):
            ax = axes[i][j]
            sel = sorted((r for r in rows if r.dtype == dtype and r.direction == direction
                          and _attention_key(r)[:2] == (d, causal)), key=lambda r: _attention_key(r)[2])
            for who in (PULLBACK, FLASH, COMPILED, EAGER):
                pts = [(_attention_key(r)[2], r.rate(who)) for r in sel if who in r.times]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=who,
                            color=COLORS[who])
            ax.set_xscale("log", base=2)
            ax.set_title(f"{dtype} {direction} D={d}{' causal' if causal else ''}")
            ax.set_xlabel("N")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
    axes[0][0].legend()
    fig.tight_layout()
    _save(fig, path)


def plot_rows(rows: list[TimingRow], path: Path) -> None:
    plt = _plt()
    rows = [r for r in rows if r.op not in ("attention", COPY)]
    panels = sorted({(r.dtype, r.direction) for r in rows}, key=lambda p: (p[0], p[1] != "forward"))
    cases = list(dict.fromkeys(f"{r.op} {r.shape}" for r in rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 3.4 * len(panels)), squeeze=False)
    who = (PULLBACK, COMPILED, EAGER)
    for i, (dtype, direction) in enumerate(panels):
        ax = axes[i][0]
        by = {f"{r.op} {r.shape}": r for r in rows if r.dtype == dtype and r.direction == direction}
        for n, w in enumerate(who):
            xs = [c + (n - 1) * 0.27 for c in range(len(cases))]
            ax.bar(xs, [by[c].rate(w) if c in by and w in by[c].times else 0 for c in cases], width=0.27,
                   label=w, color=COLORS[w])
        ceiling = next((r.ceiling for r in by.values() if r.ceiling), 0)
        if ceiling:
            ax.axhline(ceiling, color="k", lw=0.8, ls="--", label=f"device copy {ceiling:.0f} GB/s")
        ax.set_xticks(range(len(cases)), cases, rotation=60, ha="right")
        ax.set_ylabel("GB/s (ideal bytes / time)")
        ax.set_title(f"row-wise ops, {dtype} {direction}")
        rates = [by[c].rate(w) for c in by for w in who if w in by[c].times]
        ax.set_ylim(0, max([ceiling, 1e-9] + [x for x in rates if x == x]) * 1.25)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    fig.tight_layout()
    _save(fig, path)


def timings_section(rows: list[TimingRow], images: list[str]) -> str:
    copy = next((r for r in rows if r.op == COPY), None)
    who = [PULLBACK, EAGER, COMPILED, FLASH]
    table = _table(["op", "shape", "dtype", "pass", *[f"{w} ms" for w in who], "pullback", "vs eager",
                    "vs compile", "vs flash"],
                   [[r.op, r.shape, r.dtype, r.direction,
                     *[_num(r.times[w], 4) if w in r.times else "-" for w in who],
                     f"{_num(r.rate())} {r.unit}", *[_num(r.speedup(w)) + "x" if w in r.times else "-"
                                                     for w in (EAGER, COMPILED, FLASH)]]
                    for r in rows if r.op != COPY])
    lines = ["## GPU times", "",
             "Median times (`triton.testing.do_bench`) of the forward and of the backward (`torch.autograd.grad` "
             "of the output) against torch eager, `torch.compile` of the same torch code and, for attention, "
             "SDPA's flash backend, all in one run. Row ops are rated in GB/s of their ideal bytes against the "
             "same run's device copy (read and write once: the bandwidth ceiling); attention in TFLOP/s "
             "(4·B·H·N²·D forward, half of it causal; backward 2.5 times the forward). `vs X` is X's time over "
             "pullback's: above 1, pullback is faster. Torch eager and compiled attention materialise the "
             "scores, so cases whose scores pass the memory budget leave them out.", ""]
    if copy is not None:
        lines += [f"Device copy ({copy.shape}, read and written once): {copy.rate(COPY):.0f} GB/s.", ""]
    lines += [f"![{im}]({im})" for im in images] + ["", table, ""]
    return "\n".join(lines)


# ---- the report ---------------------------------------------------------------------------------
def write_report(out_dir: Path, context: list[tuple[str, str]], traffic: list[TrafficRow] | None = None,
                 timings: list[TimingRow] | None = None, builds: list[dict] | None = None) -> list[Path]:
    """Write ``out_dir/README.md`` and its PNGs; returns the paths written.  ``context``
    is (label, text) pairs for the header (command, machine, versions, date if any)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    parts = ["# pullback bench report", "",
             "Written by `pullback bench --report` (do not edit: run it again). Regenerate with the command "
             "below.", "", _table(["", ""], [[k, v] for k, v in context]), ""]
    if traffic:
        plot_traffic(traffic, out_dir / "traffic.png")
        written.append(out_dir / "traffic.png")
        parts.append(traffic_section(traffic, "traffic.png"))
    if builds:
        plot_builds(builds, out_dir / "build.png")
        written.append(out_dir / "build.png")
        parts.append(builds_section(builds, "build.png"))
    if timings:
        images = []
        if any(r.op == "attention" for r in timings):
            plot_attention(timings, out_dir / "attention.png")
            images.append("attention.png")
        if any(r.op not in ("attention", COPY) for r in timings):
            plot_rows(timings, out_dir / "rowwise.png")
            images.append("rowwise.png")
        written += [out_dir / im for im in images]
        parts.append(timings_section(timings, images))
    report = out_dir / REPORT
    report.write_text("\n".join(parts).rstrip("\n") + "\n")
    return [report] + written
