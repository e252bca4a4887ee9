"""The report as a document: one list of blocks (headings, paragraphs, tables, figures...) rendered twice, as
Markdown (:func:`to_markdown`) and as one self-contained HTML page (:func:`to_html`), so both say the same
thing; and how its figures read (every number with its unit, "n/a" when unknown).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# --- formatting: every number with its unit, "n/a" when unknown -----------------------------------------

NA = "n/a"
"""What every unknown figure reads: never a zero."""


def fmt_tok_s(value: float | None, unit: str = " tok/s") -> str:
    """Tokens per second: ``"1,234 tok/s"``, one decimal below 100."""
    if value is None:
        return NA
    return f"{value:,.0f}{unit}" if value >= 100 else f"{value:,.1f}{unit}"


def fmt_ms(seconds: float | None) -> str:
    """Seconds as whole milliseconds: ``"412 ms"``."""
    return NA if seconds is None else f"{seconds * 1000:,.0f} ms"


def ms_value(seconds: float | None) -> float | None:
    """Seconds as milliseconds, for a cell whose header says "(ms)"."""
    return None if seconds is None else seconds * 1000


def num_secs(seconds: float) -> str:
    """Seconds without the unit: ``"0.034"`` below 0.1 s, ``"2.35"`` below 10 s, whole seconds above."""
    return f"{seconds:,.3f}" if seconds < 0.1 else f"{seconds:,.2f}" if seconds < 10 else f"{seconds:,.0f}"


def num_ms(seconds: float) -> str:
    """Seconds as milliseconds without the unit, one decimal: ``"38.0"``."""
    return f"{seconds * 1000:,.1f}"


def num_tok_s(value: float) -> str:
    """Tokens per second without the unit: ``"1,234"``, one decimal below 100."""
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def fmt_secs(seconds: float | None) -> str:
    """Seconds: ``"2.35 s"``, ``"0.034 s"``, whole seconds from 10 s."""
    return NA if seconds is None else f"{num_secs(seconds)} s"


def fmt_interval(
    interval: tuple[float, float | None] | None, num: Callable[[float], str], unit: str = ""
) -> str:
    """A 90 % interval: ``"0.36-0.47 s"``; unbounded above (too few requests to bound it): ``"0.92 s-∞"``."""
    if interval is None:
        return NA
    lo, hi = interval
    return f"{num(lo)}-{num(hi)}{unit}" if hi is not None else f"{num(lo)}{unit}-∞"


def fmt_estimate(
    value: float | None,
    interval: tuple[float, float | None] | None,
    num: Callable[[float], str],
    unit: str = "",
) -> str:
    """A figure with its interval in brackets: ``"0.41 s (0.36-0.47 s)"``, or in a table cell whose header has
    the unit, ``"0.41 (0.36-0.47)"``; the figure alone without an interval; "n/a" without a figure."""
    if value is None:
        return NA
    text = f"{num(value)}{unit}"
    return text if interval is None else f"{text} ({fmt_interval(interval, num, unit)})"


def fmt_usd(value: float | None) -> str:
    """US dollars, with more decimals for small amounts: ``"$0.125"``, ``"$4.20"``, ``"$1,200"``."""
    if value is None:
        return NA
    return f"${value:,.0f}" if value >= 100 else f"${value:.2f}" if value >= 1 else f"${value:.3f}"


def fmt_joules(value: float | None) -> str:
    """Energy per output token: ``"0.412 J/token"``."""
    return NA if value is None else f"{value:.3g} J/token"


def fmt_times(value: float | None) -> str:
    """A ratio: ``"1.31x"``."""
    return NA if value is None else f"{value:.2f}x"


def fmt_users(value: int | None) -> str:
    """Concurrent users: ``"1 user"``, ``"64 users"``."""
    return NA if value is None else f"{value:,} user" + ("" if value == 1 else "s")


def fmt_bare(value: float | None, decimals: int = 0) -> str:
    """A table cell whose unit is in the column header."""
    return NA if value is None else f"{value:,.{decimals}f}"


# --- the document: one list of blocks, rendered twice ---------------------------------------------------


@dataclass(frozen=True)
class Span:
    """Text inside a paragraph or cell, plain or styled."""

    text: str
    style: str = "plain"  # plain | bold | code


Inline = str | Span
"""A piece of a paragraph or a table cell: plain text, or a styled :class:`Span`."""


def bold(text: str) -> Span:
    """Text in bold."""
    return Span(text, "bold")


def code(text: str) -> Span:
    """Text in a monospaced code span."""
    return Span(text, "code")


@dataclass(frozen=True)
class Heading:
    """A heading of level 1-3."""

    level: int
    text: str


@dataclass(frozen=True)
class Para:
    """A paragraph; a note or a warning stands out (a quote in Markdown, a bordered block in HTML)."""

    parts: tuple[Inline, ...]
    kind: str = "plain"  # plain | note | warning


@dataclass(frozen=True)
class Bullets:
    """A bulleted list, one item a tuple of inline pieces."""

    items: tuple[tuple[Inline, ...], ...]


@dataclass(frozen=True)
class Table:
    """A table; each row has one cell per header."""

    header: tuple[str, ...]
    rows: tuple[tuple[Inline, ...], ...]
    numeric: tuple[bool, ...]  # right-align these columns


@dataclass(frozen=True)
class Code:
    """A block of code, shown as is."""

    text: str


@dataclass(frozen=True)
class Details:
    """A collapsed block: a summary line that opens onto preformatted text (a server log)."""

    summary: str
    body: str


@dataclass(frozen=True)
class Figure:
    """A plot: linked as ``file`` from the Markdown, inlined as ``svg`` in the HTML."""

    file: str
    alt: str
    svg: str
    caption: str


Block = Heading | Para | Bullets | Table | Code | Details | Figure
"""One block of the document, in reading order."""

# Backslash-escape what Markdown would read as markup; "<" only where it could open an HTML tag ("<= 2 s" stays).
_MD_ESCAPE = re.compile(r"([\\`*_\[\]|]|<(?=[A-Za-z/!?]))")


def _md_inline(part: Inline) -> str:
    span = part if isinstance(part, Span) else Span(part)
    text = " ".join(span.text.split("\n"))
    if span.style == "code":
        fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
        pad = " " if text.startswith("`") or text.endswith("`") else ""
        return f"{fence}{pad}{text}{pad}{fence}"
    escaped = _MD_ESCAPE.sub(r"\\\1", text)
    return f"**{escaped}**" if span.style == "bold" else escaped


def _md_fence(text: str) -> str:
    return "`" * max(3, max((len(run) + 1 for run in re.findall(r"`{3,}", text)), default=0))


def to_markdown(blocks: Sequence[Block]) -> str:
    """The document as Markdown (GitHub flavour: tables, ``<details>``)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + _md_inline(block.text))
        elif isinstance(block, Para):
            text = "".join(map(_md_inline, block.parts))
            out.append(f"> {text}" if block.kind != "plain" else text)
        elif isinstance(block, Bullets):
            out.append("\n".join("- " + "".join(map(_md_inline, item)) for item in block.items))
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_inline(h) for h in block.header) + " |"]
            lines.append("|" + "|".join("---:" if n else "---" for n in block.numeric) + "|")
            lines.extend("| " + " | ".join(_md_inline(cell) for cell in row) + " |" for row in block.rows)
            out.append("\n".join(lines))
        elif isinstance(block, Code):
            fence = _md_fence(block.text)
            out.append(f"{fence}\n{block.text.rstrip()}\n{fence}")
        elif isinstance(block, Details):
            fence = _md_fence(block.body)
            out.append(
                f"<details><summary>{html.escape(block.summary)}</summary>\n\n"
                f"{fence}text\n{block.body.rstrip()}\n{fence}\n\n</details>"
            )
        else:
            out.append(f"![{_md_inline(block.alt)}]({block.file})\n\n*{_md_inline(block.caption)}*")
    return "\n\n".join(out) + "\n"


def _html_inline(part: Inline) -> str:
    span = part if isinstance(part, Span) else Span(part)
    text = html.escape(span.text)
    return {"bold": f"<strong>{text}</strong>", "code": f"<code>{text}</code>"}.get(span.style, text)


_CSS = """
:root { color-scheme: light dark; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; max-width: 1180px;
       margin: 2em auto; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #8884; } h3 { margin-top: 1.4em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 13px; margin: .6em 0; }
th, td { border: 1px solid #8885; padding: 3px 8px; vertical-align: top; }
th { background: #8881; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
code { background: #8882; padding: 0 .25em; border-radius: 3px; }
pre { background: #8881; padding: .7em; overflow-x: auto; font-size: 12px; }
.note, .warning { border-left: 4px solid #8888; padding: .2em .8em; }
.warning { border-left-color: #d97706; }
figure { margin: 1.2em 0; } figure svg { max-width: 100%; height: auto; }
figcaption { font-size: 13px; opacity: .8; }
details { margin: .4em 0; } summary { cursor: pointer; }
"""


def to_html(blocks: Sequence[Block], title: str) -> str:
    """The document as one self-contained HTML page (its CSS inline, plots as inline SVG)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        '<head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>",
        "<body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            css = f' class="{block.kind}"' if block.kind != "plain" else ""
            out.append(f"<p{css}>{''.join(map(_html_inline, block.parts))}</p>")
        elif isinstance(block, Bullets):
            items = "".join(f"<li>{''.join(map(_html_inline, item))}</li>" for item in block.items)
            out.append(f"<ul>{items}</ul>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>"
                + "".join(
                    f"<td{' class=num' if num else ''}>{_html_inline(cell)}</td>"
                    for cell, num in zip(row, block.numeric, strict=True)
                )
                + "</tr>"
                for row in block.rows
            )
            out.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>'
            )
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
        elif isinstance(block, Details):
            out.append(
                f"<details><summary>{html.escape(block.summary)}</summary>"
                f"<pre>{html.escape(block.body.rstrip())}</pre></details>"
            )
        else:
            out.append(f"<figure>{block.svg}<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
