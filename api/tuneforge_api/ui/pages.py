"""HTML from the templates folder: ``$name`` placeholders, every value HTML-escaped.

Pages carry no user data beyond ids; the scripts fetch the rest as JSON and insert it with
``textContent``, so nothing a user uploaded is ever parsed as HTML.
"""

from __future__ import annotations

import html
from functools import cache
from pathlib import Path
from string import Template

from fastapi.responses import HTMLResponse

TEMPLATES = Path(__file__).parent / "templates"


@cache
def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


def render(
    name: str,
    *,
    title: str,
    csrf: str = "",
    signed_in: bool = False,
    status: int = 200,
    scripts: tuple[str, ...] = (),
    **values: str,
) -> HTMLResponse:
    body = _template(name).substitute({k: html.escape(v, quote=True) for k, v in values.items()})
    nav = _template("nav.html").substitute(csrf=html.escape(csrf)) if signed_in else ""
    tags = "".join(f'<script src="/ui/static/{html.escape(s)}" defer></script>' for s in scripts)
    page = _template("layout.html").substitute(
        title=html.escape(title), csrf=html.escape(csrf), scripts=tags, nav=nav, body=body
    )
    # Pages hold a CSRF token: never cached.
    return HTMLResponse(page, status_code=status, headers={"cache-control": "no-store"})


def message(title: str, text: str, *, status: int, csrf: str = "", signed_in: bool = False) -> HTMLResponse:
    return render(
        "message.html", title=title, status=status, csrf=csrf, signed_in=signed_in, heading=title, text=text
    )
