"""A static, self-contained HTML report: headings, paragraphs, figures, tables and links.

Every analysis command (analyze, landscape, abinit summaries...) describes what it made as a list of
:class:`Section` objects and calls :func:`write_html_report`.  The page has no JavaScript and no
external resources, so it opens from a laptop's file browser, from a cluster's shared disk through
any viewer, and in a headless browser test; figures are referenced by paths *relative to the
report*, so the whole folder can be copied or zipped.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from cryoscape import __version__
from cryoscape.io.writers import atomic_write

__all__ = ["Figure", "Link", "Table", "Section", "write_html_report"]


@dataclass
class Figure:
    """An image file shown in the report; ``path`` is absolute or relative to the report."""

    path: str | os.PathLike
    caption: str = ""


@dataclass
class Link:
    """A hyperlink inside a table cell; ``href`` is absolute or relative to the report."""

    href: str | os.PathLike
    label: str


@dataclass
class Table:
    """A table: column names and rows (cells are formatted with ``str``, floats with 4 digits,
    :class:`Link` cells as links)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]
    caption: str = ""


@dataclass
class Section:
    """One titled part of the report.

    ``links`` are ``(href, label)`` pairs (files such as maps or particle lists, relative to the
    report or absolute).
    """

    heading: str
    paragraphs: Sequence[str] = field(default_factory=list)
    figures: Sequence[Figure] = field(default_factory=list)
    tables: Sequence[Table] = field(default_factory=list)
    links: Sequence[tuple[str, str]] = field(default_factory=list)


_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1100px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; } h2 { font-size: 1.25em; margin-top: 1.8em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #666; font-size: 0.9em; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; max-width: 520px; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f4f4f4; } caption { caption-side: bottom; font-size: 0.85em; color: #555; }
ul.links { columns: 2; font-size: 0.9em; }
"""


def _cell(value: Any, base: Path | None = None) -> str:
    if isinstance(value, Link):
        href = _relative(value.href, base) if base is not None else Path(value.href).as_posix()
        return f'<a href="{html.escape(href)}">{html.escape(value.label)}</a>'
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _relative(target: str | os.PathLike, base: Path) -> str:
    target = Path(target)
    if not target.is_absolute():
        return target.as_posix()
    return Path(os.path.relpath(target, base)).as_posix()


def _render_section(section: Section, base: Path) -> list[str]:
    out = [f"<h2>{html.escape(section.heading)}</h2>"]
    out += [f"<p>{html.escape(p)}</p>" for p in section.paragraphs]
    if section.figures:
        out.append('<div class="figures">')
        for fig in section.figures:
            src = _relative(fig.path, base)
            if not (base / src).is_file():
                raise FileNotFoundError(f"report figure {base / src} does not exist")
            alt = html.escape(fig.caption or Path(src).stem)
            out.append(f'<figure><img src="{html.escape(src)}" alt="{alt}">'
                       f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
        out.append("</div>")
    for table in section.tables:
        out.append("<table>")
        if table.caption:
            out.append(f"<caption>{html.escape(table.caption)}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns) + "</tr>")
        for row in table.rows:
            out.append("<tr>" + "".join(f"<td>{_cell(v, base)}</td>" for v in row) + "</tr>")
        out.append("</table>")
    if section.links:
        out.append('<ul class="links">')
        for href, label in section.links:
            out.append(f'<li><a href="{html.escape(_relative(href, base))}">{html.escape(label)}</a></li>')
        out.append("</ul>")
    return out


def write_html_report(path: str | os.PathLike, *, title: str, sections: Sequence[Section],
                      subtitle: str = "") -> Path:
    """Write ``sections`` as one static HTML page at ``path`` (atomically) and return the path.

    Raises ``FileNotFoundError`` if a figure is missing, so a report never shows a broken image.
    """
    path = Path(path)
    base = path.parent.resolve()
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(subtitle + " · " if subtitle else "")}cryoscape {__version__}, {stamp}</p>',
    ]
    for section in sections:
        body += _render_section(section, base)
    body.append("</body></html>")
    with atomic_write(path, "w") as fh:
        fh.write("\n".join(body) + "\n")
    return path
