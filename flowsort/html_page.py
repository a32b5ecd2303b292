"""Self-contained HTML pages for reports: one style, tables and inlined PNG figures.

Shared by the trainer's evaluation report and the bench reports; plain
string building with no third-party imports, so any package can use it.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from typing import Any

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
td.diagonal { font-weight: bold; }
figure { margin: 1em 0; } figcaption { color: #555; font-size: 0.9em; }
img { max-width: 100%; }
.note { color: #555; font-size: 0.9em; }
.ok { color: #070; } .bad { color: #b00; }
"""


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], diagonal: bool = False) -> str:
    """An HTML table; ``diagonal`` bolds cell (i, i + 1), the hits of a confusion matrix with a label column."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=diagonal' if diagonal and column == number + 1 else ''}>{escape(cell)}</td>"
            for column, cell in enumerate(row)
        )
        + "</tr>"
        for number, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def png_figure(png: bytes, caption: str) -> str:
    """A PNG inlined as a data URI, so the page is one file that can be mailed or archived."""
    data = base64.b64encode(png).decode("ascii")
    return f"<figure><img alt='{escape(caption)}' src='data:image/png;base64,{data}'><figcaption>{escape(caption)}</figcaption></figure>"


def page(title: str, sections: Sequence[str]) -> str:
    body = "\n".join(sections)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{escape(title)}</title><style>{STYLE}</style></head>\n"
        f"<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )
