"""Every human-facing page is a Jinja2 template in ``report/templates`` rendered by ``write_page``.

The pages share one stylesheet (``templates/style.css``) and one frame (``base.html.j2``), and
each page is one self-contained file: the stylesheet is inlined, figures are inline SVG (drawn by
the macros of ``charts.html.j2``) or PNG data URIs, and nothing is fetched from the network, so a
page mailed to an analyst or opened offline shows everything. Autoescaping is on: any text that
came from traffic, a model or a config is escaped, never pasted in.
"""

from __future__ import annotations

import base64
from functools import cache
from pathlib import Path

import jinja2


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("distillscope.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def render(template: str, **context) -> str:
    """The page ``template`` (a name in ``report/templates``) filled with ``context``."""
    return _environment().get_template(template).render(**context)


def write_page(path: str | Path, template: str, **context) -> Path:
    """Render ``template`` into ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(render(template, **context), encoding="utf-8")
    return path


def png_uri(data: bytes) -> str:
    """A PNG as a ``data:`` URI, so the page carries its own figures."""
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")
