"""Markdown tables and matplotlib plots of benchmark results."""
from __future__ import annotations

import math
import os
import re

SPEEDUP = "speedup (>1: attnkit faster)"
# A max err above this means the two sides computed different things (bf16 rounding stays near
# 1e-2): the row's timings compare different work. Marked in the table and listed by the CLI.
DIFFERS_ABOVE = 0.1


def _missing(value) -> bool:
    return value is None or value != value  # NaN: a family's "not measured"


def _ms(value) -> str:
    return "n/a" if _missing(value) else f"{value:.3f}"


def _num(value, spec) -> str:
    if isinstance(value, str):  # "inf": a NaN or infinite result on one side only
        return value
    return "-" if _missing(value) else format(value, spec)


def format_table(rows: list) -> str:
    """One markdown table. Peak-memory, TFLOP/s and note columns appear only
    when some row has them; a missing baseline shows as n/a, never a crash."""
    if not rows:
        return "(no rows)"
    has = lambda key: any(row.get(key) is not None for row in rows)  # noqa: E731
    columns = [("case", lambda r: str(r["case"]), "---"), ("shape", lambda r: str(r["shape"]), "---"),
               ("backend", lambda r: str(r.get("backend", "")), "---"),
               ("attnkit ms", lambda r: _ms(r.get("ours_ms")), "---:"),
               ("baseline ms", lambda r: _ms(r.get("baseline_ms")), "---:"),
               (SPEEDUP, lambda r: _num(_speedup(r), ".2f") + ("x" if _speedup(r) is not None else ""), "---:")]
    if has("ours_peak_mb") or has("baseline_peak_mb"):
        columns += [("attnkit peak MB", lambda r: _num(r.get("ours_peak_mb"), ".1f"), "---:"),
                    ("baseline peak MB", lambda r: _num(r.get("baseline_peak_mb"), ".1f"), "---:")]
    if has("ours_tflops") or has("baseline_tflops"):
        columns += [("attnkit TFLOP/s", lambda r: _num(r.get("ours_tflops"), ".1f"), "---:"),
                    ("baseline TFLOP/s", lambda r: _num(r.get("baseline_tflops"), ".1f"), "---:")]
    columns.append(("max err", lambda r: _num(r.get("max_err"), ".1e") + (" (!)" if _differs(r) else ""), "---:"))
    if has("note"):
        columns.append(("note", lambda r: str(r.get("note") or ""), "---"))
    lines = ["| " + " | ".join(name for name, _, _ in columns) + " |",
             "|" + "|".join(align for _, _, align in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row).replace("|", "\\|") for _, cell, _ in columns) + " |")
    return "\n".join(lines)


def _differs(row) -> bool:
    error = row.get("max_err")
    return error == "inf" or error == float("inf") or (not _missing(error) and error > DIFFERS_ABOVE)


def differing_rows(results: dict) -> list:
    """"family: case (shape): max err" of every row whose sides disagree (see DIFFERS_ABOVE)."""
    return [f"{name}: {row['case']} ({row['shape']}): max err {_num(row['max_err'], '.2g')}"
            for name, result in results.items() for row in result.get("rows") or [] if _differs(row)]


def _speedup(row):
    ours, base = row.get("ours_ms"), row.get("baseline_ms")
    return None if _missing(ours) or _missing(base) or not ours else base / ours


def format_family(name: str, result: dict) -> str:
    text = f"## {result['title']}\n\n"
    if result.get("error"):
        return text + f"FAILED ({name}): {result['error']}\n"
    if not result["rows"]:
        return text + f"(no rows: {result.get('skipped') or f'{name} has nothing to measure on this device'})\n"
    return text + format_table(result["rows"]) + "\n"


# Plots


def _params(shape: str) -> dict:
    return {key: float(value) for key, value in re.findall(r"([A-Za-z_]\w*)=(\d+(?:\.\d+)?)", shape)}


def _split_case(case: str):
    """"forward causal vs flash" -> ("forward causal", "flash"): families
    with several baselines name them in the case; one line each."""
    head, sep, tail = case.rpartition(" vs ")
    return (head, tail) if sep else (case, None)


def baseline_label(title: str) -> str:
    head, sep, tail = title.rpartition(" vs ")
    return tail.strip() if sep else "baseline"


def _x_axis(shapes: list):
    """A numeric axis named after the one parameter that varies across the
    shapes (sequence length, batch, ...), or None: then shapes are categories."""
    params = [_params(s) for s in shapes]
    if len(shapes) < 2 or any(p.keys() != params[0].keys() for p in params):
        return None
    varying = [k for k in params[0] if len({p[k] for p in params}) > 1]
    if len(varying) != 1 or len({p[varying[0]] for p in params}) != len(shapes):
        return None
    return varying[0], [p[varying[0]] for p in params]


def _value(row, key):
    value = row.get(key)
    return value if isinstance(value, (int, float)) and value == value and value > 0 else None  # not NaN


def _groups(rows: list, family_baseline: str) -> dict:
    """{panel: {series: {shape: (side, row)}}} in first-seen order; series
    "attnkit" and one per baseline. "forward vs flash" and "forward vs
    flex" share the panel "forward" only where attnkit's time is the same
    number in both (one attnkit measurement against several baselines);
    otherwise each case keeps its own panel."""
    shared = {}
    for row in rows:
        head, baseline = _split_case(str(row["case"]))
        if baseline is not None:
            shared.setdefault((head, row["shape"]), set()).add(row.get("ours_ms"))
    groups = {}
    for row in rows:
        head, baseline = _split_case(str(row["case"]))
        if baseline is None or len(shared[(head, row["shape"])]) > 1:
            head, baseline = str(row["case"]), baseline or family_baseline
        series = groups.setdefault(head, {})
        series.setdefault("attnkit", {}).setdefault(row["shape"], ("ours", row))
        series.setdefault(baseline, {}).setdefault(row["shape"], ("baseline", row))
    return groups


def plot_family(name: str, result: dict, out_dir: str, device_label: str) -> list:
    """Writes <out_dir>/<name>-time.png and, when peak memory was measured,
    <name>-memory.png; returns the paths. One panel per case, attnkit against
    each baseline across the family's shapes."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    paths = []
    for metric, unit, label in (("ms", "ms", "time"), ("peak_mb", "MiB", "memory")):
        # Rows that measured only memory (or only time) stay out of the other figure.
        rows = [r for r in result["rows"] if _value(r, f"ours_{metric}") or _value(r, f"baseline_{metric}")]
        if not rows:
            continue
        groups = _groups(rows, baseline_label(result["title"]))
        ncols = min(3, len(groups))
        nrows = math.ceil(len(groups) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.6 * ncols, 4.4 * nrows), squeeze=False)
        for ax, (case, series) in zip(axes.flat, groups.items()):
            _panel(ax, case, series, metric, unit, label)
        for ax in list(axes.flat)[len(groups):]:
            ax.set_visible(False)
        fig.suptitle(f"{result['title']}\n{label} on {device_label}", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.8 / (4.4 * nrows)))  # keep the two-line title clear of the panels
        path = os.path.join(out_dir, f"{name}-{label}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _panel(ax, case, series, metric, unit, label):
    shapes = list(dict.fromkeys(shape for points in series.values() for shape in points))
    axis = _x_axis(shapes)
    positions = axis[1] if axis else list(range(len(shapes)))
    values, width = [], 0.8 / len(series)
    for index, (name, points) in enumerate(series.items()):
        xs, ys = [], []
        for x, shape in zip(positions, shapes):
            if shape in points:
                side, row = points[shape]
                y = _value(row, f"{side}_{metric}")
                if y is not None:
                    xs.append(x)
                    ys.append(y)
        if not ys:
            continue
        values += ys
        ours = name == "attnkit"
        color = "C0" if ours else f"C{index}"
        if axis:  # a real sweep: lines show the trend
            ax.plot(xs, ys, marker="o" if ours else "s", linestyle="-" if ours else "--",
                    linewidth=2.2 if ours else 1.6, color=color, label=name, zorder=3 if ours else 2)
        else:  # unrelated shapes: side-by-side bars, no line implying a trend between them
            offset = (index - (len(series) - 1) / 2) * width
            ax.bar([x + offset for x in xs], ys, width=width, color=color, label=name,
                   edgecolor="black" if ours else None, linewidth=0.6)
    ax.set_title(case, fontsize=10)
    ax.set_ylabel(f"{label} ({unit}, lower is better)")
    if values and max(values) / min(values) > 10:
        ax.set_yscale("log")
    if axis:
        ax.set_xlabel(axis[0])
        if max(axis[1]) / max(min(axis[1]), 1e-9) >= 8:
            ax.set_xscale("log", base=2)
        ax.set_xticks(axis[1], [f"{v:g}" for v in axis[1]])
        ax.minorticks_off()
    else:
        ax.set_xlabel("shape")
        ax.set_xticks(positions, [s.replace(" ", "\n") for s in shapes], fontsize=8)
        ax.set_xlim(-0.5, len(shapes) - 0.5)
    ax.grid(True, which="major", alpha=0.3)
    if values:
        ax.legend(fontsize=8, loc="best")
