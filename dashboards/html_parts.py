"""Building blocks of the self-contained report page: escaping, number formats, tables, the page shell.

The page carries its CSS inline and its images as base64 data URIs, and declares a Content
Security Policy that forbids every network load (`default-src 'none'`), so it renders the same
from disk, from an MLflow artifact view or from an e-mail attachment.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Iterable

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b;
       margin: 0; background: #f6f7f9; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid #d9dde3; }
h3 { font-size: 15px; margin: 20px 0 8px; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 6px; padding: 4px 20px 16px; margin-top: 18px; }
.meta { color: #5b6470; font-size: 13px; }
.meta code { font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; margin: 6px 0 10px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #eceef1; vertical-align: top; }
th { background: #f0f2f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.status-FAILED td { background: #fdf0f0; }
tr.status-RUNNING td, tr.status-SCHEDULED td { background: #fdf9ec; }
.badge { display: inline-block; padding: 0 6px; border-radius: 9px; font-size: 11.5px; font-weight: 600; }
.badge.FINISHED { background: #e3f4e8; color: #1f6b36; }
.badge.FAILED { background: #fbe2e2; color: #9b1c1c; }
.badge.RUNNING, .badge.SCHEDULED { background: #fcf1cf; color: #7a5a00; }
.badge.KILLED { background: #e8e8e8; color: #444; }
pre { background: #f3f4f6; padding: 10px 12px; border-radius: 4px; overflow-x: auto; font-size: 12.5px; }
figure { margin: 18px 0 26px; }
figure img { max-width: 100%; height: auto; border: 1px solid #e6e8eb; background: #fff; }
figcaption { color: #3d4652; font-size: 13px; margin-top: 6px; max-width: 900px; }
.placeholder { padding: 18px; border: 1px dashed #b8bec7; border-radius: 4px; color: #5b6470; background: #fafbfc; }
ul.claims { list-style: none; padding-left: 0; }
li.claim { margin: 6px 0; padding: 6px 10px; border-left: 4px solid; }
li.claim.holds { border-color: #2e7d32; background: #f1f8f1; }
li.claim.fails { border-color: #c62828; background: #fdf1f1; }
li.claim .id { color: #5b6470; font-size: 12px; }
ul.notes { color: #5b6470; font-size: 12.5px; margin: 4px 0 0; padding-left: 18px; }
.skipped { color: #7a5a00; }
.summary li { margin: 3px 0; }
"""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: object, digits: int = 4) -> str:
    """Numbers with `digits` significant digits; None/NaN as an em dash; inf as ∞."""
    if value is None:
        return "—"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return "—"
        if isinstance(value, float) and math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
            return f"{int(value):,}"
        return f"{value:.{digits}g}"
    return str(value)


def interval(values: Iterable | None) -> str:
    if not values:
        return ""
    low, high = list(values)[:2]
    return f"[{fmt(low, 3)}, {fmt(high, 3)}]"


def table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(),
          row_classes: list[str] | None = None, table_id: str = "") -> str:
    """An HTML table; cells are already-escaped HTML strings; `numeric` columns align right."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{esc(row_classes[i])}"' if row_classes else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    id_attr = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )
