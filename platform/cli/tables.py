"""Fitted parameters as a table for a paper: Markdown, LaTeX or CSV (`memlayers fit --format`).

Rows are (law or form, parameter, value, 95% interval low, high); values are printed with five
significant digits, a missing interval or an unidentified parameter as an empty cell (— in
LaTeX and Markdown).
"""

from __future__ import annotations

import csv
import io

FORMATS = ("md", "latex", "csv")
HEADER = ("law", "parameter", "value", "low", "high")


def law_rows(name: str, params: dict, intervals: dict | None) -> list[tuple]:
    """One law's rows: (name, parameter, value, low, high) with None where there is nothing."""
    rows = []
    for key, value in params.items():
        low, high = (intervals or {}).get(key) or (None, None)
        rows.append((name, key, value, low, high))
    return rows


def _cell(value, empty: str) -> str:
    if value is None:
        return empty
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _latex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("&", r"\&").replace("%", r"\%")


def render(rows: list[tuple], fmt: str) -> str:
    """The rows in `fmt` (md, latex or csv)."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
        return out.getvalue().rstrip("\n")
    if fmt == "md":
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(_cell(v, "—") for v in row) + " |" for row in rows]
        return "\n".join(lines)
    if fmt == "latex":
        lines = [r"\begin{tabular}{llrrr}", r"\hline", " & ".join(HEADER) + r" \\", r"\hline"]
        lines += [" & ".join(_latex_escape(_cell(v, "--")) for v in row) + r" \\" for row in rows]
        return "\n".join(lines + [r"\hline", r"\end{tabular}"])
    raise ValueError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
