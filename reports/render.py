"""Markdown and self-contained HTML (figures embedded as base64 PNG, no external resources) for a report."""

from __future__ import annotations

import base64
import html
from pathlib import Path

from reports.claims import INCONCLUSIVE, NOT_SUPPORTED, SUPPORTED, Claim
from reports.tables import Table

VERDICT_COLORS = {SUPPORTED: "#1b7f3b", NOT_SUPPORTED: "#b3261e", INCONCLUSIVE: "#8a6d00"}


# -- Markdown ---------------------------------------------------------------------------------------------------------
def _md_cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def md_table(t: Table) -> list[str]:
    cols = list(t.columns) + (["note"] if any(t.marks) else [])
    lines = [f"### {t.title}", "", "| " + " | ".join(_md_cell(c) for c in cols) + " |", "|" + "---|" * len(cols)]
    for i, r in enumerate(t.rows):
        extra = [t.marks[i] if i < len(t.marks) else ""] if any(t.marks) else []
        lines.append("| " + " | ".join(_md_cell(c) for c in [*r, *extra]) + " |")
    if t.note:
        lines += ["", f"_{t.note}_"]
    return lines + [""]


def md_claims(claims: list[Claim]) -> list[str]:
    if not claims:
        return ["No claim of the paper can be decided from this sweep's runs (see Missing).", ""]
    lines = ["| # | claim (paper) | comparison | statistic | n | verdict |", "|---|---|---|---|---|---|"]
    for i, c in enumerate(claims, 1):
        for j, r in enumerate(c.rows):
            head = f"{i} | {_md_cell(c.text)} ({c.source}): **{c.verdict}**" if j == 0 else " | ↳"
            stat = r.statistic + ("; " + "; ".join(r.notes) if r.notes else "")
            lines.append(f"| {head} | {_md_cell(r.comparison)} | {_md_cell(stat)} | {r.n} | {r.verdict} |")
    lines += ["", "Rules:", ""]
    lines += [f"{i}. **{c.text}**: {c.rule}" for i, c in enumerate(claims, 1)]
    return lines + [""]


# -- HTML -------------------------------------------------------------------------------------------------------------
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.86em} th,td{border:1px solid #d0d0d0;padding:.3em .55em;
vertical-align:top;text-align:left} th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
.verdict{font-weight:600;padding:.05em .45em;border-radius:.3em;color:#fff;white-space:nowrap}
.note{color:#555;font-size:.85em} .warn{color:#b3261e} figure{margin:1em 0} figcaption{color:#555;font-size:.88em}
img{max-width:100%;border:1px solid #eee} code{background:#f3f3f3;padding:0 .2em;border-radius:.2em}
ul.meta{list-style:none;padding-left:0;color:#333}
"""


def esc(s: object) -> str:
    return html.escape(str(s))


def html_table(t: Table) -> str:
    cols = list(t.columns) + (["note"] if any(t.marks) else [])
    out = [f"<h3>{esc(t.title)}</h3>", "<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"]
    for i, r in enumerate(t.rows):
        extra = [t.marks[i] if i < len(t.marks) else ""] if any(t.marks) else []
        cells = "".join(f"<td>{esc(c)}</td>" for c in r)
        cells += "".join(f'<td class="warn">{esc(c)}</td>' for c in extra)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    if t.note:
        out.append(f'<p class="note">{esc(t.note)}</p>')
    return "\n".join(out)


def badge(verdict: str) -> str:
    return f'<span class="verdict" style="background:{VERDICT_COLORS.get(verdict, "#666")}">{esc(verdict)}</span>'


def html_claims(claims: list[Claim]) -> str:
    if not claims:
        return "<p>No claim of the paper can be decided from this sweep's runs (see Missing).</p>"
    out = [
        "<table><tr><th>#</th><th>claim (paper)</th><th>verdict</th><th>comparison</th><th>statistic</th>"
        "<th>n</th><th>row verdict</th></tr>"
    ]
    for i, c in enumerate(claims, 1):
        for j, r in enumerate(c.rows):
            lead = (
                (
                    f'<td rowspan="{len(c.rows)}">{i}</td><td rowspan="{len(c.rows)}">{esc(c.text)}<br>'
                    f'<span class="note">{esc(c.source)}</span></td><td rowspan="{len(c.rows)}">{badge(c.verdict)}'
                    "</td>"
                )
                if j == 0
                else ""
            )
            notes = "".join(f'<br><span class="warn">{esc(n)}</span>' for n in r.notes)
            out.append(
                f"<tr>{lead}<td>{esc(r.comparison)}</td><td>{esc(r.statistic)}{notes}</td><td>{r.n}</td>"
                f"<td>{badge(r.verdict)}</td></tr>"
            )
    out.append("</table><p><b>Rules</b></p><ol>")
    out += [f"<li><b>{esc(c.text)}</b>: {esc(c.rule)}</li>" for c in claims]
    out.append("</ol>")
    return "\n".join(out)


def html_figure(title: str, caption: str, png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{esc(title)}" src="data:image/png;base64,{data}"><figcaption><b>{esc(title)}.</b> '
        f'{esc(caption)} (<a href="{esc(png.name)}">PNG</a>, <a href="{esc(png.with_suffix(".svg").name)}">SVG'
        "</a>)</figcaption></figure>"
    )


def html_list(items: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{esc(i)}</li>" for i in items) + "</ul>" if items else "<p>None.</p>"


__all__ = ["CSS", "badge", "esc", "html_claims", "html_figure", "html_list", "html_table", "md_claims", "md_table"]
