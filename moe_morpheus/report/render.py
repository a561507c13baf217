"""A report as a list of blocks, written once as Markdown and once as self-contained HTML.

The same blocks produce both files, so they never disagree. Inline markup in text is the
Markdown subset the report uses: ``**bold**`` and ```code```. The HTML embeds every figure as a
base64 PNG data URI, so the one file opens anywhere (mail, a browser without the folder).
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path  # a PNG inside the report folder
    caption: str


Block = Heading | Para | Bullets | Table | Figure


def file_name(name: str) -> str:
    """``name`` made safe as a figure's file name (a run or family name may hold spaces or /)."""
    return re.sub(r"[^\w.-]+", "_", name)[:80]


def count(x: float) -> str:
    """Parameter or token counts: 1234567 -> '1.23M'; NaN -> '-'."""
    if x is None or not math.isfinite(x):
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def sci(x: float) -> str:
    """Three significant digits, for FLOPs ('3.41e+15') and ratios that span decades (tokens per
    parameter: 0.0012 to 20 as '0.0012', '20', never rounded to 0); NaN -> '-'."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.3g}"


def pct(x: float, digits: int = 3) -> str:
    """A fraction as a percentage with ``digits`` significant digits: 0.00012 -> '0.012%'."""
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.{digits}g}%"


def num(x: float, digits: int = 4) -> str:
    """Losses and ratios with fixed decimals; NaN -> '-'."""
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_md_cell, b.header)) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows]
            out.append("")
        else:
            out += [f"![{b.caption}]({b.path.name})", "", f"*{b.caption}*", ""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escape, then turn the Markdown subset into tags."""
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
code { font-size: 0.9em; background: #f4f4f4; padding: 0 2px; }
figure { margin: 1em 0 2em; } img { max-width: 100%; } figcaption { font-style: italic; color: #555; }
"""


def to_html(title: str, blocks: list[Block]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.caption)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{_inline(b.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write(title: str, blocks: list[Block], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns their paths. PNGs the
    previous ``report.md`` there showed and this one does not (a rerun's replaced runs' heatmaps)
    are removed, unless another Markdown file of the folder (a hand-written CONCLUSION.md) cites
    them; no other file is touched."""
    md, page = out_dir / "report.md", out_dir / "report.html"
    before = set(re.findall(r"\]\(([^)/]+\.png)\)", md.read_text(encoding="utf-8"))) if md.is_file() else set()
    md.write_text(to_markdown(title, blocks), encoding="utf-8")
    page.write_text(to_html(title, blocks), encoding="utf-8")
    shown = {b.path.name for b in blocks if isinstance(b, Figure)}
    cited = "\n".join(f.read_text(encoding="utf-8") for f in out_dir.glob("*.md") if f != md)
    for name in before - shown:
        if name not in cited:
            (out_dir / name).unlink(missing_ok=True)
    return md, page
