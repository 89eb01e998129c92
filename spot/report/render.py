"""Rendering: the report's markdown from jinja2 templates (`spot/report/templates/`), and HTML pages
of that markdown (markdown-it, CommonMark with tables) for the Snakemake report and browsers."""
from __future__ import annotations

import math

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markdown_it import MarkdownIt

TEMPLATES = Environment(loader=PackageLoader("spot.report"), autoescape=select_autoescape(["html.j2"]),
                        trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
# Numbers as the report prints them: fractions as percent (points when signed), other values as they are.
TEMPLATES.filters |= {"pct": lambda x, digits=2: f"{100 * x:.{digits}f}",
                      "points": lambda x, digits=2: f"{100 * x:+.{digits}f}",
                      "fixed": lambda x, digits=4: f"{x:.{digits}f}",
                      "signed": lambda x, digits=4: f"{x:+.{digits}f}"}
TEMPLATES.tests["nan"] = lambda x: isinstance(x, float) and math.isnan(x)


def render(template: str, **data) -> str:
    """The template `template` of `spot/report/templates/` filled with `data`."""
    return TEMPLATES.get_template(template).render(**data)


def html_page(markdown: str, title: str) -> str:
    """A standalone HTML page of `markdown` (headings, paragraphs, lists, pipe tables, bold, code)."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return render("page.html.j2", title=title, body=body)
